"""The ``handshake`` rules on what the control channel sets up: config space, queues, memory, status, features.

Theory of operation
-------------------
Config space (vhost-user.rst GET_CONFIG): a read of the device's config
size comes back with that offset and size; a read of more than the config
comes back with the size asked or empty ("payload size MUST match"), never
short; a partial read returns the same bytes as the whole; a read of size 0
does not crash or hang the back end. GET_QUEUE_NUM (vhost-user.rst,
Multiple queue support) answers at least the queues the device type needs
and its config announces (blk ``num_queues``, scsi ``num_queues`` + 2, net
``max_virtqueue_pairs``).

Memory (vhost-user.rst SET_MEM_TABLE, CONFIGURE_MEM_SLOTS, ADD_MEM_REG,
REM_MEM_REG): a memory table of the baseline 8 regions, memory given region
by region with ADD_MEM_REG alone (up to 16 or the slots offered, at least 8
by GET_MAX_MEM_SLOTS), a region removed while no ring uses it, and a table
replaced while the rings are stopped. The region rules give the probe
several pools (each its own region, the first holding the rings) and put
the parts of a blk request in different ones (header, data and status;
other device types: one request), so a back end that maps only one region,
or translates an address with the wrong region, fails.

Status and reset (vhost-user.rst SET_STATUS, GET_STATUS, RESET_DEVICE):
GET_STATUS returns what SET_STATUS set, and a reset device is set up again
and serves requests. Features (virtio 1.2 §2.2.2): SET_FEATURES acking a
ring feature bit that was not offered is refused.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyvirtio.conformance.catalogue import (
    CONFIG,
    MEM_SLOTS,
    MUST,
    REPLY_ACK,
    ROBUST,
    SHOULD,
    VU,
    one_request,
    raw,
    refused,
    rings_up,
    rule,
    survived,
)
from pyvirtio.conformance.devices import Device
from pyvirtio.conformance.harness import PackedRing, Probe, SplitRing
from pyvirtio.errors import ConnectionLost
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec.common import F_RING_PACKED, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK

__all__: list[str] = []  # importing the module adds its rules to the catalogue; it exports nothing


@rule("handshake.config.exact", "GET_CONFIG of the device's config size is answered with that offset and size",
      f"{VU} GET_CONFIG", MUST, protocol=CONFIG)
def _config_exact(h: Probe, dev: Device) -> None:
    h.hello()
    size = dev.config_size
    config = h.call(h.codec.get_config(0, size))
    assert isinstance(config, vu.ConfigSpace)


@rule("handshake.config.larger", "GET_CONFIG of 256 bytes (more than the config) gets a reply of 256 bytes or an "
      "empty one, not a short reply or a dropped connection", f"{VU} GET_CONFIG (\"payload size MUST match\")", MUST,
      protocol=CONFIG)
def _config_larger(h: Probe, dev: Device) -> None:
    h.hello()
    out = h.codec.get_config(0, 256)
    h.send(out)
    msg = h.reply(out)
    h.expect(msg.size in (0, 12 + 256), "a payload of 268 bytes (head + 256) or none", f"{msg.size} bytes")


@rule("handshake.config.partial", "GET_CONFIG of 4 bytes at offset 8 returns bytes 8..12 of the whole config",
      f"{VU} GET_CONFIG", SHOULD, protocol=CONFIG)
def _config_partial(h: Probe, dev: Device) -> None:
    h.hello()
    whole = h.call(h.codec.get_config(0, dev.config_size))
    part = h.call(h.codec.get_config(8, 4))
    assert isinstance(whole, vu.ConfigSpace) and isinstance(part, vu.ConfigSpace)
    h.expect(part.data == whole.data[8:12], f"bytes {whole.data[8:12].hex()}", part.data.hex())


@rule("handshake.config.zero", "GET_CONFIG of size 0 does not crash or hang the back end",
      f"{VU} GET_CONFIG", ROBUST, protocol=CONFIG)
def _config_zero(h: Probe, dev: Device) -> None:
    h.hello()
    h.send_raw(raw(vu.GET_CONFIG, struct.pack("=III", 0, 0, 0)))
    try:
        h.recv()
    except ConnectionLost:
        return
    survived(h)


@rule("handshake.queue-num", "GET_QUEUE_NUM answers at least the queues the device needs and its config announces",
      f"{VU} Multiple queue support", SHOULD, protocol=(vu.PROTOCOL_F_MQ,))
def _queue_num(h: Probe, dev: Device) -> None:
    h.hello()
    num = h.u64(h.codec.get_queue_num())
    config = h.info.config if h.info is not None else None
    need = {"blk": 1, "scsi": 3, "net": 1, "fs": 1}[dev.name]
    if config and dev.name == "blk" and h.info is not None and h.info.offers(B.F_MQ):
        need = struct.unpack_from("<H", config, 34)[0]
    elif config and dev.name == "scsi":
        need = struct.unpack_from("<I", config, 0)[0] + 2
    elif config and dev.name == "net" and h.info is not None and h.info.offers(N.F_MQ):
        need = struct.unpack_from("<H", config, 8)[0]
    h.expect(num >= need, f"at least {need}", f"{num}")


@rule("handshake.max-mem-slots", "GET_MAX_MEM_SLOTS is answered with at least 8 slots",
      f"{VU} GET_MAX_MEM_SLOTS", MUST, protocol=MEM_SLOTS)
def _max_mem_slots(h: Probe, dev: Device) -> None:
    h.hello()
    slots = h.u64(h.codec.get_max_mem_slots())
    h.expect(slots >= vu.VHOST_MEMORY_BASELINE_NREGIONS, "at least 8", f"{slots}")


def _regions(h: Probe, count: int) -> None:
    """``count`` pools in all (the first holds the rings), each its own region."""
    while len(h.pools) < count:
        h.add_pool(64 << 10)


def _spread_request(h: Probe, dev: Device, ring: SplitRing | PackedRing, pools: Sequence[int]) -> None:
    """A request whose parts lie in the given pools (blk: header, data, status; others: one request)."""
    if dev.name == "blk":
        hdr = h.buf(B.OUTHDR.pack(B.T_IN, 0, 0), pool=pools[0])
        data = h.buf(512, pool=pools[1 % len(pools)])
        status = h.buf(b"\xee", pool=pools[2 % len(pools)])
        ring.post([(hdr, 16, False), (data, 512, True), (status, 1, True)])
        (used,) = ring.wait()
        h.expect(status.view[0] == B.S_OK and used.length == 513, "status OK, used length 513",
                 f"status {status.view[0]}, used {used.length}")
    else:
        one_request(h, dev, ring)


def _add_regions(h: Probe) -> list[vu.MemRegion]:
    """Hand the probe's memory over region by region (ADD_MEM_REG, no SET_MEM_TABLE); the regions."""
    regions, fds = h.regions()
    for region, fd in zip(regions, fds, strict=True):
        h.send(h.codec.add_mem_reg(region, fd))
    return regions


@rule("handshake.add-mem-reg", "memory given by ADD_MEM_REG alone (no SET_MEM_TABLE) serves rings and requests",
      f"{VU} ADD_MEM_REG", MUST, protocol=MEM_SLOTS)
def _add_mem_reg(h: Probe, dev: Device) -> None:
    h.hello()
    _regions(h, 2)
    _add_regions(h)
    rings_up(h, dev)
    _spread_request(h, dev, h.rings[dev.request_queue], [1, 0, 1])


@rule("handshake.rem-mem-reg", "REM_MEM_REG of a region no ring uses leaves the others working",
      f"{VU} REM_MEM_REG", MUST, protocol=MEM_SLOTS)
def _rem_mem_reg(h: Probe, dev: Device) -> None:
    h.hello()
    _regions(h, 3)
    regions = _add_regions(h)
    for q in dev.queues:
        h.ring(q)
    h.send(h.codec.rem_mem_reg(regions[2]))
    h.go()
    _spread_request(h, dev, h.rings[dev.request_queue], [1, 0, 1])


@rule("handshake.many-regions", "8 memory regions in SET_MEM_TABLE: a request spread over three of them works",
      f"{VU} SET_MEM_TABLE", MUST)
def _many_regions(h: Probe, dev: Device) -> None:
    h.hello()
    _regions(h, vu.VHOST_MEMORY_BASELINE_NREGIONS)
    h.mem_table()
    rings_up(h, dev)
    _spread_request(h, dev, h.rings[dev.request_queue], [2, 5, 7])


@rule("handshake.many-regions.mem-slots", "beyond 8 regions with ADD_MEM_REG (up to 16 or the slots offered): "
      "buffers in the last one work", f"{VU} CONFIGURE_MEM_SLOTS", MUST, protocol=MEM_SLOTS)
def _many_slots(h: Probe, dev: Device) -> None:
    h.hello()
    slots = h.u64(h.codec.get_max_mem_slots())
    count = min(slots, 16)
    if count <= vu.VHOST_MEMORY_BASELINE_NREGIONS:
        raise h.skip(f"the back end offers {slots} slots")
    _regions(h, count)
    _add_regions(h)
    rings_up(h, dev)
    _spread_request(h, dev, h.rings[dev.request_queue], [count - 1, count - 2, count - 1])


@rule("handshake.mem-table.replace", "SET_MEM_TABLE replaced while the rings are stopped: rings set up in the new "
      "memory work", f"{VU} SET_MEM_TABLE", SHOULD)
def _mem_replace(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    one_request(h, dev, ring)
    for q in dev.queues:
        h.get_vring_base(q)
    old = h.pools[:]
    new = h.add_pool(4 << 20)
    h.pool = new  # rings laid out anew in the new region
    h.mem_table([new])
    for q in dev.queues:
        h.rings[q].close()
        h.ring(q)
    for pool in old:
        pool.close()
    h.pools = [new]
    h.go()
    dev.io(h)


@rule("handshake.status", "GET_STATUS returns what SET_STATUS set", f"{VU} SET_STATUS, GET_STATUS", MUST,
      protocol=(vu.PROTOCOL_F_STATUS,))
def _status(h: Probe, dev: Device) -> None:
    h.hello()
    for status in (STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER,
                   STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK):
        h.send(h.codec.set_status(status))
        got = h.u64(h.codec.get_status())
        h.expect(got == status, f"status 0x{status:x}", f"0x{got:x}")


@rule("handshake.reset-device", "after RESET_DEVICE the device is set up again and serves requests",
      f"{VU} RESET_DEVICE", MUST, protocol=(vu.PROTOCOL_F_RESET_DEVICE,))
def _reset_device(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    one_request(h, dev, ring)
    h.send(h.codec.reset_device())
    h.sync()
    for q in dev.queues:
        h.rings.pop(q).close()
    h.hello()
    h.mem_table()
    rings_up(h, dev)
    dev.io(h)


@rule("handshake.features-unoffered", "SET_FEATURES acking a ring feature that was not offered is refused",
      "virtio 1.2 §2.2.2", SHOULD, protocol=REPLY_ACK)
def _features_unoffered(h: Probe, dev: Device) -> None:
    offered = h.hello()
    bit = next((b for b in (F_RING_PACKED, 35, 38, 39) if not offered >> b & 1), None)
    if bit is None:
        raise h.skip("every candidate ring feature bit is offered")
    refused(h, h.codec.set_features(h.features | 1 << bit, need_reply=True), f"SET_FEATURES with bit {bit}")

