"""The conformance catalogue: every rule ``pyvirtio check`` knows, as data.

Theory of operation
-------------------
A rule is a :class:`Rule` record (id, one-line title, the spec section it
comes from, severity, the area it belongs to, the device types and features
it needs) and a function of a few lines that drives a fresh
:class:`~pyvirtio.conformance.harness.Probe` (one new connection per rule)
and either returns (PASS), raises :class:`~pyvirtio.errors.RuleFailed`
through ``h.fail`` / ``h.expect`` (FAIL: what was sent, what came back,
what was expected), raises :class:`~pyvirtio.errors.RuleSkipped` (SKIP), or
lets :class:`~pyvirtio.errors.TransportTimeout` escape (the back end stopped
answering: WEDGED). The runner (:mod:`pyvirtio.conformance.runner`) skips a
rule whose needs (``devices``, ``features``, ``protocol``, ``pid``) the back
end does not meet before running it, and after every rule checks that the
back end still accepts a new frontend (a back end that dies or hangs after
a rule has that rule's verdict turned into WEDGED).

Adding a rule is a decorator line and a function::

    @rule("blk.flush", "FLUSH completes with status OK and used length 1",
          "virtio 1.2 §5.2.6", MUST, devices="blk", features=(B.F_FLUSH,))
    def _(h: Probe, dev: Device) -> None:
        ring = dev.start(h, 1 << B.F_FLUSH)
        status, used, _ = blk_request(h, ring, B.T_FLUSH)
        h.expect(status == B.S_OK and used == 1, "status OK, used length 1", f"status {status}, used {used}")

Severities: MUST and SHOULD are the specs' words (vhost-user.rst, virtio
1.2); "robustness" rules ask what no spec demands but every back end facing
a misbehaving or dying frontend needs: no crash, no hang, the next frontend
served. ``pyvirtio check`` exits non-zero only when a MUST rule fails or
wedges. Rule ids are ``area.name`` (``--rules`` takes shell patterns on
them). The areas: ``handshake`` (messages and replies), ``ring`` (ring life
cycle and notifications), ``blk`` / ``scsi`` / ``net`` / ``fs`` (data path
per device type), ``hostile`` (a frontend that breaks the rules),
``lifecycle`` (frontends that come and go).

Refusals: the spec lets a back end refuse with a non-zero REPLY_ACK or by
closing the connection ("If back-end detects some error ... it may also
close the connection"); both pass a "refused" rule, an ack of 0 fails it.
Without REPLY_ACK an accepted request cannot be told from an ignored one,
and such a rule is skipped unless the connection closed.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirtio.conformance.devices import (
    Device,
    blk_request,
    fuse_init,
    fuse_post,
    net_frame,
    net_tx,
    scsi_command,
    scsi_ready,
)
from pyvirtio.conformance.harness import PackedRing, Probe, SplitRing
from pyvirtio.errors import ConnectionLost, RuleFailed
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
from pyvirtio.spec.ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

__all__ = ["CATALOGUE", "Rule", "Severity", "rule"]


class Severity(enum.Enum):
    MUST = "MUST"
    SHOULD = "SHOULD"
    ROBUSTNESS = "robustness"


MUST, SHOULD, ROBUST = Severity.MUST, Severity.SHOULD, Severity.ROBUSTNESS

Check = Callable[[Probe, Device], None]


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of the catalogue (see the module docstring)."""

    id: str
    title: str
    section: str
    severity: Severity
    check: Check
    devices: frozenset[str] = frozenset()  # empty: every device type
    features: tuple[int, ...] = ()  # device / ring feature bits the back end must offer
    protocol: tuple[int, ...] = ()  # protocol feature bits the back end must offer
    pid: bool = False  # needs the back end's process id
    #: Needs a second frontend served by the same back-end process: skipped for a back end that
    #: serves one connection per process (virtiofsd; the runner restarts it for every rule).
    reconnects: bool = False

    @property
    def area(self) -> str:
        return self.id.partition(".")[0]


_RULES: list[Rule] = []


def rule(
    id: str,
    title: str,
    section: str,
    severity: Severity,
    *,
    devices: str = "",
    features: Sequence[int] = (),
    protocol: Sequence[int] = (),
    pid: bool = False,
    reconnects: bool = False,
) -> Callable[[Check], Check]:
    """Add the decorated check to the catalogue with this record."""

    def add(check: Check) -> Check:
        if any(r.id == id for r in _RULES):
            raise ValueError(f"duplicate rule id {id}")
        _RULES.append(
            Rule(id, title, section, severity, check, frozenset(devices.split()), tuple(features), tuple(protocol), pid,
                 reconnects)
        )
        return check

    return add


VU = "vhost-user.rst"
REPLY_ACK = (vu.PROTOCOL_F_REPLY_ACK,)
CONFIG = (vu.PROTOCOL_F_CONFIG,)
MEM_SLOTS = (vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS,)
PROTOCOL = (VHOST_USER_F_PROTOCOL_FEATURES,)


# -- helpers shared by the rules -------------------------------------------------------------


def refused(h: Probe, out: vu.Outgoing, what: str) -> None:
    """``out`` (with need_reply when acks are on) must be refused: a non-zero ack or a closed connection."""
    outcome = h.outcome(out)
    if outcome in ("nack", "closed"):
        return
    if outcome == "ack":
        raise h.fail(f"{what} refused (non-zero ack, or the connection closed)", "ack 0: accepted")
    raise h.skip("REPLY_ACK not negotiated: an accepted request cannot be told from an ignored one")


def survived(h: Probe) -> None:
    """After abuse: the back end either dropped the connection or still answers (no hang)."""
    time.sleep(h.settings.quiet)
    if h.closed:
        return
    try:
        h.sync()
    except ConnectionLost:
        return


def post_request(h: Probe, dev: Device, ring: SplitRing | PackedRing, *, kick: bool = True) -> int:
    """Post one harmless request of the device type (not waited for); its head."""
    if dev.name == "blk":
        parts = [(h.buf(B.OUTHDR.pack(B.T_IN, 0, 0)), 16, False), (h.buf(512), 512, True), (h.buf(b"\xee"), 1, True)]
    elif dev.name == "scsi":
        req = S.CMD_REQ_HDR.pack(S.lun_address(0, 0), 1, 0, 0, 0) + bytes(S.CDB_SIZE)  # TEST UNIT READY
        parts = [(h.buf(req), S.CMD_REQ_SIZE, False), (h.buf(S.CMD_RESP_SIZE), S.CMD_RESP_SIZE, True)]
    elif dev.name == "net":
        frame = bytes(N.HDR_SIZE) + net_frame()
        parts = [(h.buf(frame), len(frame), False)]
    else:
        return fuse_post(h, ring, kick=kick)
    return ring.post(parts, kick=kick)


def one_request(h: Probe, dev: Device, ring: SplitRing | PackedRing) -> None:
    """One harmless request of the device type, waited for."""
    if dev.name == "blk":
        blk_request(h, ring, B.T_IN, 0, in_len=512)
    elif dev.name == "scsi":
        scsi_command(h, ring, bytes([T.TEST_UNIT_READY]))
    elif dev.name == "net":
        net_tx(h, ring, net_frame())
    else:
        fuse_init(h, ring)


def check_works(h: Probe, dev: Device) -> None:
    """A fresh connection to the back end serves a normal request (the device's ``io``)."""
    try:
        again = Probe(h.path, h.settings, h.info)
    except ConnectionLost as exc:
        raise h.fail("a new frontend accepted after the previous one left", str(exc)) from None
    with again:
        dev.start(again)
        dev.io(again)


def raw(request: int, payload: bytes, *, flags: int = vu.VERSION, size: int | None = None) -> bytes:
    return struct.pack("=III", request, flags, len(payload) if size is None else size) + payload


def config_size(h: Probe, dev: Device) -> int:
    return len(h.info.config) if h.info is not None and h.info.config else dev.config_size


# -- handshake: messages, replies, REPLY_ACK, config, memory ---------------------------------------


@rule("handshake.get-features", "GET_FEATURES is answered with a well-formed u64", f"{VU} GET_FEATURES", MUST)
def _get_features(h: Probe, dev: Device) -> None:
    h.u64(h.codec.get_features())


@rule("handshake.version-1", "VIRTIO_F_VERSION_1 is offered", "virtio 1.2 §6.2", MUST)
def _version_1(h: Probe, dev: Device) -> None:
    offered = h.sync()
    h.expect(bool(offered >> F_VERSION_1 & 1), "feature bit 32 (VERSION_1) offered", f"features 0x{offered:x}")


@rule("handshake.protocol-features", "GET_PROTOCOL_FEATURES is answered before SET_FEATURES",
      f"{VU} GET_PROTOCOL_FEATURES", MUST, features=PROTOCOL)
def _protocol_features(h: Probe, dev: Device) -> None:
    h.u64(h.codec.get_protocol_features())


@rule("handshake.queries-before-owner", "GET_FEATURES, GET_PROTOCOL_FEATURES and GET_QUEUE_NUM are answered "
      "before SET_OWNER (QEMU's order)", f"{VU} Communication; QEMU vhost_user_backend_init", SHOULD)
def _queries_before_owner(h: Probe, dev: Device) -> None:
    h.hello(owner=False)
    if h.protocol >> vu.PROTOCOL_F_MQ & 1:
        h.u64(h.codec.get_queue_num())


@rule("handshake.reply-flags", "every reply carries version 1 and the reply flag", f"{VU} Header", MUST)
def _reply_flags(h: Probe, dev: Device) -> None:
    for out in (h.codec.get_features(), h.codec.get_features()):
        h.send(out)
        msg = h.reply(out)
        h.expect(msg.version == vu.VERSION and msg.is_reply, "flags with version 1 and bit 2 (reply)",
                 f"flags 0x{msg.flags:x}")


def _acked(h: Probe, out: vu.Outgoing) -> None:
    value = h.ack(out)
    h.expect(value == 0, f"ack 0 for {out.name}", f"ack {value}")
    h.nothing_more(f"exactly one reply to {out.name}")


@rule("handshake.reply-ack.set-owner", "SET_OWNER with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_owner(h: Probe, dev: Device) -> None:
    h.hello(owner=False)
    _acked(h, h.codec.set_owner(need_reply=True))


@rule("handshake.reply-ack.set-features", "SET_FEATURES with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_features(h: Probe, dev: Device) -> None:
    h.hello()
    _acked(h, h.codec.set_features(h.features, need_reply=True))


@rule("handshake.reply-ack.set-mem-table", "SET_MEM_TABLE with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_mem_table(h: Probe, dev: Device) -> None:
    h.hello()
    regions, fds = h.regions()
    _acked(h, h.codec.set_mem_table(regions, fds, need_reply=True))


@rule("handshake.reply-ack.ring-setup", "SET_VRING_NUM, SET_VRING_BASE and SET_VRING_ADDR with need_reply "
      "each get exactly one reply, 0", f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_ring_setup(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = SplitRing(h, dev.request_queue, 64)
    h.rings[dev.request_queue] = ring
    _acked(h, h.codec.set_vring_num(ring.index, 64, need_reply=True))
    _acked(h, h.codec.set_vring_base(ring.index, 0, need_reply=True))
    _acked(h, h.codec.set_vring_addr(ring.addr(), need_reply=True))


@rule("handshake.reply-ack.kick-call", "SET_VRING_KICK and SET_VRING_CALL with need_reply each get exactly one "
      "reply, 0", f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_kick_call(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = h.ring(dev.request_queue, kick=False, call=False, enable=False)
    _acked(h, h.codec.set_vring_call(ring.index, ring.call_fd, need_reply=True))
    _acked(h, h.codec.set_vring_kick(ring.index, ring.kick_fd, need_reply=True))


@rule("handshake.reply-ack.enable", "SET_VRING_ENABLE with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_enable(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = h.ring(dev.request_queue, enable=False)
    _acked(h, h.codec.set_vring_enable(ring.index, True, need_reply=True))


@rule("handshake.reply-ack.natural-reply", "GET_FEATURES with need_reply gets its one reply (the features), "
      "no extra ack", f"{VU} REPLY_ACK (\"no behavioural change\")", MUST, protocol=REPLY_ACK)
def _ack_natural(h: Probe, dev: Device) -> None:
    h.hello()
    out = vu.Outgoing(vu.GET_FEATURES, raw(vu.GET_FEATURES, b"", flags=vu.VERSION | vu.NEED_REPLY), expects_reply=True)
    value = h.u64(out)
    h.expect(value == h.info.features if h.info else True, "the offered features", f"0x{value:x}")
    h.nothing_more("exactly one reply to GET_FEATURES")


@rule("handshake.reply-ack.failure", "a ring request for a ring the device does not have is not acked as "
      "success", f"{VU} REPLY_ACK (\"non-zero on failure\")", SHOULD, protocol=REPLY_ACK)
def _ack_failure(h: Probe, dev: Device) -> None:
    h.hello()
    refused(h, h.codec.set_vring_num(255, 64, need_reply=True), "SET_VRING_NUM for ring 255")


@rule("handshake.unknown-request", "an unknown request code with need_reply is refused, not acked",
      f"{VU} REPLY_ACK", ROBUST, protocol=REPLY_ACK)
def _unknown_need_reply(h: Probe, dev: Device) -> None:
    h.hello()
    out = vu.Outgoing(0xF0, raw(0xF0, bytes(8), flags=vu.VERSION | vu.NEED_REPLY), expects_reply=True)
    try:
        h.send(out)
        msg = h.reply(out)
    except ConnectionLost:
        return
    value = struct.unpack_from("=Q", msg.payload.ljust(8, b"\0"))[0]
    h.expect(value != 0, "a non-zero ack (or the connection closed)", "ack 0")


@rule("handshake.unknown-request.no-reply", "an unknown request code without need_reply does not crash or hang "
      "the back end", VU, ROBUST)
def _unknown(h: Probe, dev: Device) -> None:
    h.hello()
    h.send_raw(raw(0xF1, bytes(8)))
    survived(h)


@rule("handshake.bad-version", "a header with version bits 2 does not crash or hang the back end", f"{VU} Header",
      ROBUST)
def _bad_version(h: Probe, dev: Device) -> None:
    h.send_raw(raw(vu.GET_FEATURES, b"", flags=2))
    survived(h)


@rule("handshake.short-payload", "SET_VRING_NUM with a 4-byte payload is refused or dropped, not misread",
      f"{VU} Payload", ROBUST)
def _short_payload(h: Probe, dev: Device) -> None:
    h.hello()
    h.send_raw(raw(vu.SET_VRING_NUM, struct.pack("=I", dev.request_queue)))
    survived(h)


@rule("handshake.oversized", "a size field of 2 GiB followed by a disconnect does not crash or hang the back end",
      f"{VU} Header", ROBUST)
def _oversized(h: Probe, dev: Device) -> None:
    h.send_raw(raw(vu.SET_FEATURES, bytes(8), size=0x7FFF_FFFF))
    time.sleep(h.settings.quiet)


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


def _rings_up(h: Probe, dev: Device) -> None:
    """Set up every ring of the device in the memory given so far, then DRIVER_OK (when STATUS) and sync."""
    for q in dev.queues:
        h.ring(q)
    h.go()


@rule("handshake.add-mem-reg", "memory given by ADD_MEM_REG alone (no SET_MEM_TABLE) serves rings and requests",
      f"{VU} ADD_MEM_REG", MUST, protocol=MEM_SLOTS)
def _add_mem_reg(h: Probe, dev: Device) -> None:
    h.hello()
    _regions(h, 2)
    _add_regions(h)
    _rings_up(h, dev)
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
    _rings_up(h, dev)
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
    _rings_up(h, dev)
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
    _rings_up(h, dev)
    dev.io(h)


@rule("handshake.features-unoffered", "SET_FEATURES acking a ring feature that was not offered is refused",
      "virtio 1.2 §2.2.2", SHOULD, protocol=REPLY_ACK)
def _features_unoffered(h: Probe, dev: Device) -> None:
    offered = h.hello()
    bit = next((b for b in (F_RING_PACKED, 35, 38, 39) if not offered >> b & 1), None)
    if bit is None:
        raise h.skip("every candidate ring feature bit is offered")
    refused(h, h.codec.set_features(h.features | 1 << bit, need_reply=True), f"SET_FEATURES with bit {bit}")


# -- ring life cycle ----------------------------------------------------------------------------


def _ring_refused(h: Probe, dev: Device, out: Callable[[bool], vu.Outgoing], what: str) -> None:
    h.hello()
    h.mem_table()
    refused(h, out(h.acks), what)


@rule("ring.num.zero", "SET_VRING_NUM 0 is refused", "virtio 1.2 §2.7", SHOULD, protocol=REPLY_ACK)
def _num_zero(h: Probe, dev: Device) -> None:
    _ring_refused(h, dev, lambda a: h.codec.set_vring_num(dev.request_queue, 0, need_reply=a), "ring size 0")


@rule("ring.num.not-power-of-2", "SET_VRING_NUM 100 (not a power of 2) is refused for a split ring",
      "virtio 1.2 §2.7", SHOULD, protocol=REPLY_ACK)
def _num_pow2(h: Probe, dev: Device) -> None:
    _ring_refused(h, dev, lambda a: h.codec.set_vring_num(dev.request_queue, 100, need_reply=a), "ring size 100")


@rule("ring.num.too-large", "SET_VRING_NUM 65536 (above 32768) is refused", "virtio 1.2 §2.7", SHOULD,
      protocol=REPLY_ACK)
def _num_large(h: Probe, dev: Device) -> None:
    _ring_refused(h, dev, lambda a: h.codec.set_vring_num(dev.request_queue, 65536, need_reply=a), "ring size 65536")


def _addr_outside(h: Probe, dev: Device, which: str) -> None:
    h.hello()
    h.mem_table()
    ring = SplitRing(h, dev.request_queue, 64)
    h.rings[ring.index] = ring
    h.send(h.codec.set_vring_num(ring.index, 64))
    a = ring.addr()
    far = 0x1000  # the zero page's neighbour: never part of a frontend's memory
    addr = vu.VringAddr(a.index, 0, far if which == "desc" else a.desc, far if which == "used" else a.used,
                        far if which == "avail" else a.avail)
    refused(h, h.codec.set_vring_addr(addr, need_reply=h.acks), f"a {which} ring address outside the memory table")


@rule("ring.addr.desc-outside", "SET_VRING_ADDR with the descriptor table outside the memory table is refused",
      f"{VU} Memory access", SHOULD, protocol=REPLY_ACK)
def _desc_outside(h: Probe, dev: Device) -> None:
    _addr_outside(h, dev, "desc")


@rule("ring.addr.used-outside", "SET_VRING_ADDR with the used ring outside the memory table is refused",
      f"{VU} Memory access", SHOULD, protocol=REPLY_ACK)
def _used_outside(h: Probe, dev: Device) -> None:
    _addr_outside(h, dev, "used")


@rule("ring.addr.outside-started", "a ring whose addresses lie outside the memory table, started and kicked, "
      "neither crashes nor hangs the back end", f"{VU} Memory access", ROBUST)
def _outside_started(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = SplitRing(h, dev.request_queue, 64)
    h.rings[ring.index] = ring
    for out in (h.codec.set_vring_num(ring.index, 64), h.codec.set_vring_base(ring.index, 0),
                h.codec.set_vring_addr(vu.VringAddr(ring.index, 0, 0x1000, 0x3000, 0x2000)),
                h.codec.set_vring_kick(ring.index, ring.kick_fd), h.codec.set_vring_call(ring.index, ring.call_fd),
                h.codec.set_vring_enable(ring.index, True)):
        if h.closed:
            return
        try:
            h.send(out)
        except ConnectionLost:
            return
    ring.kick()
    survived(h)


@rule("ring.addr.misaligned", "SET_VRING_ADDR with a descriptor table not 16-byte aligned is refused",
      "virtio 1.2 §2.7", SHOULD, protocol=REPLY_ACK)
def _misaligned(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = SplitRing(h, dev.request_queue, 64)
    h.rings[ring.index] = ring
    h.send(h.codec.set_vring_num(ring.index, 64))
    a = ring.addr()
    refused(h, h.codec.set_vring_addr(vu.VringAddr(a.index, 0, a.desc + 8, a.used, a.avail), need_reply=h.acks),
            "a descriptor table at an 8-byte offset")


def _set_up(h: Probe, ring: SplitRing | PackedRing, base: int) -> None:
    """(Re)configure an existing ring object at ``base``: size, base, addresses, kick, call, enable, DRIVER_OK."""
    for out in (h.codec.set_vring_num(ring.index, ring.size), h.codec.set_vring_base(ring.index, base),
                h.codec.set_vring_addr(ring.addr()), h.codec.set_vring_kick(ring.index, ring.kick_fd),
                h.codec.set_vring_call(ring.index, ring.call_fd)):
        h.send(out)
    if h.negotiated(VHOST_USER_F_PROTOCOL_FEATURES):
        h.send(h.codec.set_vring_enable(ring.index, True))
    h.go()


@rule("ring.get-base.index", "GET_VRING_BASE returns the avail index the device reached", f"{VU} GET_VRING_BASE",
      MUST)
def _base_index(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    if isinstance(ring, PackedRing):
        raise h.skip("packed ring: see ring.packed.get-base")
    for _ in range(3):
        one_request(h, dev, ring)
    base = h.get_vring_base(ring.index)
    h.expect(base == 3, "base 3 after three requests", f"{base}")


@rule("ring.get-base.stops", "after GET_VRING_BASE the ring is stopped: a new request is not processed",
      f"{VU} Ring states", MUST)
def _base_stops(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    one_request(h, dev, ring)
    h.get_vring_base(ring.index)
    post_request(h, dev, ring)
    late = ring.quiet()
    h.expect(not late, "no completion on a stopped ring", f"{len(late)} completion(s)")


@rule("ring.get-base.idle", "GET_VRING_BASE on a ring that never ran returns the base SET_VRING_BASE set",
      f"{VU} GET_VRING_BASE", MUST)
def _base_idle(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    h.ring(dev.request_queue, base=5, kick=False, call=False, enable=False)
    base = h.get_vring_base(dev.request_queue)
    h.expect(base == 5, "base 5", f"{base}")


@rule("ring.restart", "a ring stopped by GET_VRING_BASE and set up again at that base goes on where it stopped",
      f"{VU} GET_VRING_BASE, SET_VRING_BASE", MUST)
def _restart(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    if isinstance(ring, PackedRing):
        raise h.skip("packed ring: see ring.packed")
    one_request(h, dev, ring)
    one_request(h, dev, ring)
    _set_up(h, ring, h.get_vring_base(ring.index))
    one_request(h, dev, ring)
    h.expect(ring.raw.used_idx == 3, "used index 3 after the restart", f"{ring.raw.used_idx}")


@rule("ring.base.wrap", "a ring started at base 65535 serves requests across the 16-bit index wrap",
      "virtio 1.2 §2.7.6", MUST)
def _base_wrap(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    for q in dev.queues:
        if q != dev.request_queue:
            h.ring(q)
    ring = SplitRing(h, dev.request_queue, 64)
    ring.raw.set_avail_idx(0xFFFF)
    ring.raw.set_used_idx(0xFFFF)
    ring.completed = 0xFFFF
    h.rings[ring.index] = ring
    _set_up(h, ring, 0xFFFF)
    one_request(h, dev, ring)
    one_request(h, dev, ring)
    h.expect(ring.raw.used_idx == 1, "used index 1 (wrapped)", f"{ring.raw.used_idx}")


@rule("ring.enable.disabled-start", "with PROTOCOL_FEATURES a ring starts disabled: a write posted before "
      "SET_VRING_ENABLE(1) has no effect until then", f"{VU} Ring states", MUST, devices="blk", features=PROTOCOL)
def _disabled_start(h: Probe, dev: Device) -> None:
    if h.info is not None and h.info.offers(B.F_RO):
        raise h.skip("read-only device")
    h.hello()
    h.mem_table()
    ring = h.ring(0, enable=False)
    pattern = os.urandom(512)
    ring.post([(h.buf(B.OUTHDR.pack(B.T_OUT, 0, 24)), 16, False), (h.buf(pattern), 512, False),
               (h.buf(b"\xee"), 1, True)])
    early = ring.quiet()
    h.send(h.codec.set_vring_enable(0, True))
    h.go()  # DRIVER_OK when STATUS was negotiated
    if not early:
        ring.kick()  # the kick of the post came while the ring was disabled: not every back end keeps it
        ring.wait()
    _status, _used, back = blk_request(h, ring, B.T_IN, 24, in_len=512)
    h.expect(not (early and back == pattern), "no write done while the ring was disabled",
             "the write completed and took effect before SET_VRING_ENABLE(1)")


@rule("ring.enable.without-protocol-features", "without PROTOCOL_FEATURES negotiated a ring runs without "
      "SET_VRING_ENABLE", f"{VU} Ring states", MUST)
def _no_protocol_features(h: Probe, dev: Device) -> None:
    h.hello(protocol_features=False)
    h.mem_table()
    _rings_up(h, dev)
    dev.io(h)


@rule("ring.enable.toggle", "SET_VRING_ENABLE 0 then 1: the ring serves requests again", f"{VU} SET_VRING_ENABLE",
      SHOULD, features=PROTOCOL)
def _toggle(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    one_request(h, dev, ring)
    h.send(h.codec.set_vring_enable(ring.index, False))
    h.send(h.codec.set_vring_enable(ring.index, True))
    one_request(h, dev, ring)


@rule("ring.call.replace", "SET_VRING_CALL on a running ring: the next completion signals the new eventfd, not "
      "the old", f"{VU} Ring states (\"changing some configuration aspects on the fly\")", SHOULD)
def _call_replace(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    one_request(h, dev, ring)
    old = ring.call_fd
    ring.call_fd = h.eventfd()
    h.send(h.codec.set_vring_call(ring.index, ring.call_fd))
    h.sync()
    ring.drain_calls()
    try:
        os.eventfd_read(old)
    except BlockingIOError:
        pass
    one_request(h, dev, ring)
    h.expect(ring.signalled(h.settings.timeout), "the new call eventfd written", "not written")
    ring.call_fd, new = old, ring.call_fd
    h.expect(not ring.signalled(0), "the old call eventfd left alone", "written")
    ring.call_fd = new


@rule("ring.call.nofd", "SET_VRING_CALL with the NOFD flag: requests still complete (the frontend polls)",
      f"{VU} SET_VRING_CALL", SHOULD)
def _call_nofd(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    for q in dev.queues:
        h.ring(q, call=q != dev.request_queue)
    h.send(h.codec.set_vring_call(dev.request_queue, None))
    h.go()
    one_request(h, dev, h.rings[dev.request_queue])


@rule("ring.kick.nofd", "SET_VRING_KICK with the NOFD flag: the back end polls the ring, a request completes "
      "without a kick", f"{VU} SET_VRING_KICK", SHOULD)
def _kick_nofd(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    for q in dev.queues:
        h.ring(q, kick=q != dev.request_queue)
    h.send(h.codec.set_vring_kick(dev.request_queue, None))
    h.go()
    ring = h.rings[dev.request_queue]
    ring.kick_fd, saved = h.eventfd(), ring.kick_fd  # kicks now go nowhere
    one_request(h, dev, ring)
    ring.kick_fd = saved


@rule("ring.packed", "a packed ring serves requests", "virtio 1.2 §2.8", MUST, features=(F_RING_PACKED,))
def _packed(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << F_RING_PACKED)
    h.expect(isinstance(ring, PackedRing), "a packed ring", "split")
    for _ in range(3):
        one_request(h, dev, ring)
    dev.io(h)


@rule("ring.packed.get-base", "GET_VRING_BASE of a packed ring returns the avail position with its wrap counter "
      "(bit 15)", f"{VU} GET_VRING_BASE", SHOULD, features=(F_RING_PACKED,))
def _packed_base(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << F_RING_PACKED)
    for _ in range(3):
        one_request(h, dev, ring)
    base = h.get_vring_base(ring.index)
    h.expect(base & 0xFFFF == 0x8000 | 3 * _chain_len(dev), f"avail position {3 * _chain_len(dev)}, wrap 1 "
             f"(0x{0x8000 | 3 * _chain_len(dev):x})", f"0x{base:x}")


def _chain_len(dev: Device) -> int:
    return {"blk": 3, "scsi": 2, "net": 1, "fs": 2}[dev.name]


# -- notifications (virtio 1.2 §2.7.7) ------------------------------------------------------------


def _notify(h: Probe, dev: Device, *, event_idx: bool, setup: Callable[[SplitRing], None]) -> SplitRing:
    ring = dev.start(h, 1 << F_RING_EVENT_IDX if event_idx else 0)
    if not isinstance(ring, SplitRing):
        raise h.skip("packed ring")
    one_request(h, dev, ring)
    setup(ring)
    time.sleep(h.settings.quiet / 2)
    ring.drain_calls()
    one_request(h, dev, ring)
    return ring


@rule("ring.notify.flags-zero", "without EVENT_IDX and with avail flags 0, a completion is notified",
      "virtio 1.2 §2.7.7.2", MUST)
def _notify_zero(h: Probe, dev: Device) -> None:
    ring = _notify(h, dev, event_idx=False, setup=lambda r: r.raw.set_no_interrupt(False))
    h.expect(ring.signalled(h.settings.timeout), "the call eventfd written", "no notification")


@rule("ring.notify.no-interrupt", "without EVENT_IDX and with VIRTQ_AVAIL_F_NO_INTERRUPT, a completion is not "
      "notified", "virtio 1.2 §2.7.7.2", SHOULD)
def _notify_suppressed(h: Probe, dev: Device) -> None:
    ring = _notify(h, dev, event_idx=False, setup=lambda r: r.raw.set_no_interrupt(True))
    h.expect(not ring.signalled(h.settings.quiet), "no notification", "the call eventfd written")


@rule("ring.notify.event-idx", "with EVENT_IDX, a completion that reaches used_event is notified",
      "virtio 1.2 §2.7.7.2", MUST, features=(F_RING_EVENT_IDX,))
def _event_idx(h: Probe, dev: Device) -> None:
    ring = _notify(h, dev, event_idx=True, setup=lambda r: r.raw.set_used_event(r.completed))
    h.expect(ring.signalled(h.settings.timeout), "the call eventfd written", "no notification")


@rule("ring.notify.event-idx-suppressed", "with EVENT_IDX and used_event far ahead, a completion is not notified",
      "virtio 1.2 §2.7.7.2", SHOULD, features=(F_RING_EVENT_IDX,))
def _event_idx_suppressed(h: Probe, dev: Device) -> None:
    ring = _notify(h, dev, event_idx=True, setup=lambda r: r.raw.set_used_event(r.completed + 100))
    h.expect(not ring.signalled(h.settings.quiet), "no notification", "the call eventfd written")


# -- virtio-blk data path (virtio 1.2 §5.2) ------------------------------------------------------


def _writable(h: Probe) -> None:
    if h.info is not None and h.info.offers(B.F_RO):
        raise h.skip("read-only device (VIRTIO_BLK_F_RO offered)")


@rule("blk.read", "a read completes with status OK and used length = data + status byte",
      "virtio 1.2 §5.2.6, §2.7.8.2", MUST, devices="blk")
def _blk_read(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=4096)
    h.expect(status == B.S_OK and used == 4097, "status OK, used length 4097", f"status {status}, used {used}")


@rule("blk.write", "a write completes with status OK and used length 1, and reads back",
      "virtio 1.2 §5.2.6, §2.7.8.2", MUST, devices="blk")
def _blk_write(h: Probe, dev: Device) -> None:
    _writable(h)
    ring = dev.start(h)
    data = os.urandom(4096)
    status, used, _ = blk_request(h, ring, B.T_OUT, 16, out=data)
    h.expect(status == B.S_OK and used == 1, "status OK, used length 1 (only the status byte is writable)",
             f"status {status}, used {used}")
    _s, _u, back = blk_request(h, ring, B.T_IN, 16, in_len=4096)
    h.expect(back == data, "the data written", "different bytes")


@rule("blk.flush", "FLUSH completes with status OK and used length 1", "virtio 1.2 §5.2.6", MUST, devices="blk",
      features=(B.F_FLUSH,))
def _blk_flush(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << B.F_FLUSH)
    status, used, _ = blk_request(h, ring, B.T_FLUSH)
    h.expect(status == B.S_OK and used == 1, "status OK, used length 1", f"status {status}, used {used}")


@rule("blk.get-id", "GET_ID completes (OK or UNSUPP) with a used length of at most 21 (20 id bytes + status)",
      "virtio 1.2 §5.2.6, §2.7.8.2", MUST, devices="blk")
def _blk_get_id(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_GET_ID, in_len=B.ID_BYTES)
    h.expect(status in (B.S_OK, B.S_UNSUPP) and 1 <= used <= B.ID_BYTES + 1,
             "status OK or UNSUPP, used length 1..21", f"status {status}, used {used}")


def _dwz(h: Probe, dev: Device, rtype: int, feature: int, flags: int) -> tuple[int, int]:
    _writable(h)
    ring = dev.start(h, 1 << feature)
    status, used, _ = blk_request(h, ring, rtype, out=B.DISCARD_WZ.pack(32, 8, flags))
    return status, used


@rule("blk.discard", "DISCARD of one segment completes with status OK", "virtio 1.2 §5.2.6", MUST, devices="blk",
      features=(B.F_DISCARD,))
def _blk_discard(h: Probe, dev: Device) -> None:
    status, used = _dwz(h, dev, B.T_DISCARD, B.F_DISCARD, 0)
    h.expect(status == B.S_OK and used == 1, "status OK, used length 1", f"status {status}, used {used}")


@rule("blk.discard.unmap-flag", "DISCARD with the unmap flag completes with status UNSUPP", "virtio 1.2 §5.2.6.2",
      MUST, devices="blk", features=(B.F_DISCARD,))
def _blk_discard_unmap(h: Probe, dev: Device) -> None:
    status, _used = _dwz(h, dev, B.T_DISCARD, B.F_DISCARD, B.DWZ_F_UNMAP)
    h.expect(status == B.S_UNSUPP, "status UNSUPP (2)", f"status {status}")


@rule("blk.write-zeroes", "WRITE_ZEROES completes with status OK and the range reads back as zeroes",
      "virtio 1.2 §5.2.6.2", MUST, devices="blk", features=(B.F_WRITE_ZEROES,))
def _blk_wz(h: Probe, dev: Device) -> None:
    _writable(h)
    ring = dev.start(h, 1 << B.F_WRITE_ZEROES)
    blk_request(h, ring, B.T_OUT, 32, out=b"\xa5" * 4096)
    status, _used, _ = blk_request(h, ring, B.T_WRITE_ZEROES, out=B.DISCARD_WZ.pack(32, 8, 0))
    h.expect(status == B.S_OK, "status OK", f"status {status}")
    _s, _u, back = blk_request(h, ring, B.T_IN, 32, in_len=4096)
    h.expect(back == bytes(4096), "4096 zero bytes", f"{sum(1 for b in back if b)} non-zero bytes")


@rule("blk.write-zeroes.unknown-flag", "WRITE_ZEROES with an unknown flag completes with status UNSUPP",
      "virtio 1.2 §5.2.6.2", MUST, devices="blk", features=(B.F_WRITE_ZEROES,))
def _blk_wz_flag(h: Probe, dev: Device) -> None:
    status, _used = _dwz(h, dev, B.T_WRITE_ZEROES, B.F_WRITE_ZEROES, 0x2)
    h.expect(status == B.S_UNSUPP, "status UNSUPP (2)", f"status {status}")


@rule("blk.unknown-type", "a request of an unknown type completes with status UNSUPP", "virtio 1.2 §5.2.6", SHOULD,
      devices="blk")
def _blk_unknown(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, 0x55, in_len=512)
    h.expect(status == B.S_UNSUPP, "status UNSUPP (2)", f"status {status}, used {used}")


@rule("blk.read-only", "a read-only device (RO offered) fails a write with IOERR and writes nothing",
      "virtio 1.2 §5.2.6.2", MUST, devices="blk", features=(B.F_RO,))
def _blk_ro(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << B.F_RO)
    _s, _u, before = blk_request(h, ring, B.T_IN, 0, in_len=512)
    status, _used, _ = blk_request(h, ring, B.T_OUT, 0, out=bytes(b ^ 0xFF for b in before))
    h.expect(status == B.S_IOERR, "status IOERR (1)", f"status {status}")
    _s, _u, after = blk_request(h, ring, B.T_IN, 0, in_len=512)
    h.expect(after == before, "the sector unchanged", "it changed")


@rule("blk.beyond-capacity", "a read past the capacity fails (status not OK)", "virtio 1.2 §5.2.6", SHOULD,
      devices="blk", protocol=CONFIG)
def _blk_capacity(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    config = h.call(h.codec.get_config(0, 8))
    assert isinstance(config, vu.ConfigSpace)
    capacity = struct.unpack("<Q", config.data)[0]
    status, _used, _ = blk_request(h, ring, B.T_IN, capacity, in_len=512)
    h.expect(status != B.S_OK, f"an error status for sector {capacity} (the capacity)", "status OK")


@rule("blk.any-layout.header", "a request header split over two descriptors is understood",
      "virtio 1.2 §2.7.4.1", MUST, devices="blk")
def _blk_split_header(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=512, layout="split-header")
    h.expect(status == B.S_OK and used == 513, "status OK, used length 513", f"status {status}, used {used}")


@rule("blk.any-layout.status", "data-in and the status byte in one descriptor are understood",
      "virtio 1.2 §2.7.4.1", MUST, devices="blk")
def _blk_merged_status(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=512, layout="merged-status")
    h.expect(status == B.S_OK and used == 513, "status OK, used length 513", f"status {status}, used {used}")


@rule("blk.indirect", "a request in an indirect descriptor table completes", "virtio 1.2 §2.7.5.3", MUST,
      devices="blk", features=(F_RING_INDIRECT_DESC,))
def _blk_indirect(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << F_RING_INDIRECT_DESC)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=1024, indirect=True)
    h.expect(status == B.S_OK and used == 1025, "status OK, used length 1025", f"status {status}, used {used}")


@rule("blk.queue-depth", "16 requests in flight complete, each head once, each with its used length",
      "virtio 1.2 §2.7.8", MUST, devices="blk")
def _blk_depth(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    heads = {}
    for i in range(16):
        parts = [(h.buf(B.OUTHDR.pack(B.T_IN, 0, i)), 16, False), (h.buf(512 * (1 + i % 4)), 512 * (1 + i % 4), True),
                 (h.buf(b"\xee"), 1, True)]
        heads[ring.post(parts, kick=False)] = 512 * (1 + i % 4) + 1
    ring.kick()
    done = ring.wait(16)
    got = {u.id: u.length for u in done}
    h.expect(len(got) == 16 and got == heads, f"heads {sorted(heads)} once each with their lengths",
             f"{[(u.id, u.length) for u in done]}")


@rule("blk.multiqueue", "with MQ, a request on queue 1 is served", "virtio 1.2 §5.2.6", MUST, devices="blk",
      features=(B.F_MQ,))
def _blk_mq(h: Probe, dev: Device) -> None:
    config = h.info.config if h.info is not None else None
    if not config or struct.unpack_from("<H", config, 34)[0] < 2:
        raise h.skip("fewer than 2 queues in the config")
    h.start(1 << B.F_MQ, queues=(0, 1))
    status, used, _ = blk_request(h, h.rings[1], B.T_IN, 0, in_len=512)
    h.expect(status == B.S_OK and used == 513, "status OK, used length 513", f"status {status}, used {used}")


# -- virtio-scsi data path (virtio 1.2 §5.6) ------------------------------------------------------


def _scsi_good(h: Probe, cdb: bytes, **kw: object) -> bytes:
    ring = h.rings[S.FIRST_REQUEST_QUEUE]
    response, status, sense, data = scsi_ready(h, ring, cdb, **kw)
    h.expect(response == S.S_OK and status == T.GOOD, f"{T.opcode_name(cdb)}: response OK, status GOOD",
             f"response {response}, status 0x{status:02x}, sense {sense}")
    return data


@rule("scsi.inquiry", "INQUIRY on LUN 0:0 returns standard data with a connected peripheral",
      "virtio 1.2 §5.6.6.1; SPC-4 INQUIRY", MUST, devices="scsi")
def _scsi_inquiry(h: Probe, dev: Device) -> None:
    dev.start(h)
    data = _scsi_good(h, bytes([T.INQUIRY, 0, 0, 0, 96, 0]), data_in=96)
    h.expect(data[0] >> 5 == 0 and data[4] + 5 >= 36, "peripheral qualifier 0, at least 36 bytes",
             f"byte 0 0x{data[0]:02x}, additional length {data[4]}")


@rule("scsi.test-unit-ready", "TEST UNIT READY on LUN 0:0 answers GOOD", "virtio 1.2 §5.6.6.1", MUST, devices="scsi")
def _scsi_tur(h: Probe, dev: Device) -> None:
    dev.start(h)
    _scsi_good(h, bytes([T.TEST_UNIT_READY]))


@rule("scsi.read-capacity", "READ CAPACITY(10) returns a non-zero block length", "SBC-3 READ CAPACITY (10)", MUST,
      devices="scsi")
def _scsi_capacity(h: Probe, dev: Device) -> None:
    dev.start(h)
    data = _scsi_good(h, bytes([T.READ_CAPACITY_10]) + bytes(9), data_in=8)
    h.expect(struct.unpack(">I", data[4:8])[0] > 0, "a block length > 0", data.hex())


@rule("scsi.report-luns", "REPORT LUNS lists LUN 0", "SPC-4 REPORT LUNS", MUST, devices="scsi")
def _scsi_report_luns(h: Probe, dev: Device) -> None:
    dev.start(h)
    data = _scsi_good(h, bytes([T.REPORT_LUNS, 0, 0, 0, 0, 0]) + struct.pack(">I", 256) + bytes(2), data_in=256)
    count = struct.unpack(">I", data[:4])[0] // 8
    luns = [data[8 + 8 * i : 16 + 8 * i] for i in range(min(count, 31))]
    h.expect(bytes(8) in luns, "LUN 0 in the list", f"{[x.hex() for x in luns]}")


@rule("scsi.bad-target", "a command to a target that does not exist gets response BAD_TARGET",
      "virtio 1.2 §5.6.6.1.1", MUST, devices="scsi")
def _scsi_bad_target(h: Probe, dev: Device) -> None:
    dev.start(h)
    config = h.info.config if h.info is not None else None
    target = struct.unpack_from("<H", config, 30)[0] + 1 if config else 255
    if target > 255:
        raise h.skip("the config announces every target")
    response, status, _sense, _ = scsi_command(h, h.rings[S.FIRST_REQUEST_QUEUE], bytes([T.TEST_UNIT_READY]),
                                               target=target)
    h.expect(response == S.S_BAD_TARGET, f"response BAD_TARGET ({S.S_BAD_TARGET}) for target {target}",
             f"response {response}, status 0x{status:02x}")


@rule("scsi.tmf", "a LOGICAL UNIT RESET on the control queue completes with FUNCTION_COMPLETE or "
      "FUNCTION_SUCCEEDED", "virtio 1.2 §5.6.6.2", MUST, devices="scsi")
def _scsi_tmf(h: Probe, dev: Device) -> None:
    dev.start(h)
    ring = h.rings[S.CONTROL_QUEUE]
    req = h.buf(S.CTRL_TMF_REQ.pack(S.T_TMF, S.T_TMF_LOGICAL_UNIT_RESET, S.lun_address(0, 0), 0))
    resp = h.buf(b"\xee")
    ring.post([(req, S.CTRL_TMF_REQ.size, False), (resp, 1, True)])
    ring.wait()
    h.expect(resp.view[0] in (S.S_OK, S.S_FUNCTION_SUCCEEDED), "response FUNCTION_COMPLETE (0) or "
             "FUNCTION_SUCCEEDED (10)", f"response {resp.view[0]}")


@rule("scsi.read-write", "WRITE(10) then READ(10) of 8 blocks returns the data", "SBC-3", MUST, devices="scsi")
def _scsi_rw(h: Probe, dev: Device) -> None:
    dev.start(h)
    cap = _scsi_good(h, bytes([T.READ_CAPACITY_10]) + bytes(9), data_in=8)
    block = struct.unpack(">I", cap[4:8])[0]
    data = os.urandom(8 * block)
    cdb = T.BE32.pack(16) + b"\0" + T.BE16.pack(8) + b"\0"
    _scsi_good(h, bytes([T.WRITE_10, 0]) + cdb, data_out=data)
    back = _scsi_good(h, bytes([T.READ_10, 0]) + cdb, data_in=len(data))
    h.expect(back == data, "the data written", "different bytes")


@rule("scsi.unknown-opcode", "an unknown opcode ends in CHECK CONDITION, ILLEGAL REQUEST", "SPC-4 §4.5.6", SHOULD,
      devices="scsi")
def _scsi_unknown(h: Probe, dev: Device) -> None:
    dev.start(h)
    response, status, sense, _ = scsi_ready(h, h.rings[S.FIRST_REQUEST_QUEUE], bytes([0xC7]) + bytes(9))
    h.expect(response == S.S_OK and status == T.CHECK_CONDITION and sense is not None
             and sense.key == T.ILLEGAL_REQUEST, "CHECK CONDITION with sense key ILLEGAL REQUEST",
             f"response {response}, status 0x{status:02x}, sense {sense}")


# -- virtio-net data path (virtio 1.2 §5.1) -------------------------------------------------------


@rule("net.tx", "a transmitted frame completes with used length 0 (nothing device-writable)",
      "virtio 1.2 §2.7.8.2, §5.1.6.2", MUST, devices="net")
def _net_tx(h: Probe, dev: Device) -> None:
    dev.start(h)
    used = net_tx(h, h.rings[1], net_frame())
    h.expect(used == 0, "used length 0", f"{used}")


@rule("net.tx.split-header", "a frame with its header in a descriptor of its own is transmitted",
      "virtio 1.2 §2.7.4.1", MUST, devices="net")
def _net_split(h: Probe, dev: Device) -> None:
    dev.start(h)
    net_tx(h, h.rings[1], net_frame(), split_header=True)


def _echo(h: Probe, sizes: Sequence[int], frame: bytes, mrg: bool) -> list[tuple[bytes, int]]:
    """Post receive buffers of ``sizes``, send ``frame``; the (buffer bytes, used length) that came back."""
    h.start((1 << N.F_MRG_RXBUF) if mrg else 0, queues=(0, 1))
    rx = h.rings[0]
    bufs = [h.buf(n) for n in sizes]
    heads = {rx.post([(b, n, True)], kick=False): b for b, n in zip(bufs, sizes, strict=True)}
    rx.kick()
    net_tx(h, h.rings[1], frame)
    try:
        first = rx.wait(1, timeout=h.settings.quiet * 5)
    except RuleFailed:  # no echo is not the back end's fault: the rule does not apply
        raise h.skip("nothing came back: not a loopback/echo back end") from None
    got = first + rx.quiet(h.settings.quiet)
    return [(bytes(heads[u.id].view[: u.length]), u.length) for u in got if u.id in heads]


@rule("net.rx.header", "without MRG_RXBUF a received frame has num_buffers 1, flags 0, GSO_NONE, and used "
      "length = 12 + frame", "virtio 1.2 §5.1.6.4.1", MUST, devices="net")
def _net_rx(h: Probe, dev: Device) -> None:
    frame = net_frame(128)
    got = _echo(h, [2048] * 4, frame, mrg=False)
    data, used = got[0]
    flags, gso, _hl, _gs, _cs, _co, nbuf = N.HDR.unpack_from(data)
    h.expect(used == N.HDR_SIZE + len(frame) and nbuf == 1 and flags == 0 and gso == N.GSO_NONE,
             f"used {N.HDR_SIZE + len(frame)}, num_buffers 1, flags 0, gso_type 0",
             f"used {used}, num_buffers {nbuf}, flags {flags}, gso_type {gso}")


@rule("net.rx.mrg-rxbuf", "with MRG_RXBUF a 1514-byte frame over 256-byte buffers: num_buffers = buffers used, "
      "all but the last full", "virtio 1.2 §5.1.6.4.1", MUST, devices="net", features=(N.F_MRG_RXBUF,))
def _net_mrg(h: Probe, dev: Device) -> None:
    frame = net_frame(1514)
    got = _echo(h, [256] * 16, frame, mrg=True)
    nbuf = N.HDR.unpack_from(got[0][0])[6]
    lengths = [used for _data, used in got[:nbuf]]
    h.expect(len(got) >= nbuf and all(n == 256 for n in lengths[:-1])
             and sum(lengths) == N.HDR_SIZE + len(frame),
             f"num_buffers ({nbuf}) buffers, all but the last full, {N.HDR_SIZE + len(frame)} bytes in all",
             f"lengths {[u for _d, u in got]}")


# -- virtio-fs (virtio 1.2 §5.11) -------------------------------------------------------------


@rule("fs.init", "FUSE_INIT on the first request queue is answered without error", "virtio 1.2 §5.11.6", MUST,
      devices="fs")
def _fs_init(h: Probe, dev: Device) -> None:
    dev.start(h)
    dev.io(h)


# -- hostile frontend (robustness) ------------------------------------------------------------


def _hostile(h: Probe, dev: Device, build: Callable[[SplitRing], None], features: int = 0) -> SplitRing:
    """Start the device on split rings, let ``build`` write a bad chain on the request ring, kick, survive."""
    ring = dev.start(h, features & ~(1 << F_RING_PACKED))
    if not isinstance(ring, SplitRing):
        raise h.skip("packed ring negotiated")
    build(ring)
    try:
        ring.kick()
    except OSError:
        pass
    survived(h)
    return ring


def _bad(ring: SplitRing, descs: Sequence[tuple[int, int, int, int]], head: int = 0) -> None:
    for i, d in enumerate(descs):
        ring.raw.desc(head + i, *d)
    ring.raw.publish(head)
    ring.probe.note(f"ring {ring.index}: chain at {head}: {descs}")


def _ok(h: Probe) -> tuple[int, int]:
    """A valid readable buffer (addr, len) for the start of a hostile chain."""
    b = h.buf(B.OUTHDR.pack(B.T_IN, 0, 0))
    return b.addr, 16


@rule("hostile.desc-outside", "a descriptor pointing outside the memory table", "virtio 1.2 §2.7.5", ROBUST)
def _h_outside(h: Probe, dev: Device) -> None:
    _hostile(h, dev, lambda r: _bad(r, [(*_ok(h), DESC_F_NEXT, 1), (0x1000, 512, DESC_F_WRITE, 0)]))


@rule("hostile.desc-overflow", "a descriptor of length 0xFFFFFFFF running past its region", "virtio 1.2 §2.7.5",
      ROBUST)
def _h_overflow(h: Probe, dev: Device) -> None:
    b = h.buf(64)
    _hostile(h, dev, lambda r: _bad(r, [(*_ok(h), DESC_F_NEXT, 1), (b.addr, 0xFFFF_FFFF, DESC_F_WRITE, 0)]))


@rule("hostile.desc-loop", "a descriptor whose next is itself", "virtio 1.2 §2.7.5.2", ROBUST)
def _h_loop(h: Probe, dev: Device) -> None:
    _hostile(h, dev, lambda r: _bad(r, [(*_ok(h), DESC_F_NEXT, 0)]))


@rule("hostile.desc-cycle", "a chain of three descriptors that cycles back to its head", "virtio 1.2 §2.7.5.2",
      ROBUST)
def _h_cycle(h: Probe, dev: Device) -> None:
    _hostile(h, dev, lambda r: _bad(r, [(*_ok(h), DESC_F_NEXT, 1), (*_ok(h), DESC_F_NEXT, 2),
                                        (*_ok(h), DESC_F_NEXT, 0)]))


@rule("hostile.chain-too-long", "an indirect table of twice the ring size (a chain longer than the ring)",
      "virtio 1.2 §2.7.5.3.1", ROBUST, features=(F_RING_INDIRECT_DESC,))
def _h_long(h: Probe, dev: Device) -> None:
    def build(r: SplitRing) -> None:
        n = 2 * r.size
        table = [(*_ok(h), DESC_F_NEXT, k + 1) for k in range(n - 1)] + [(h.buf(1).addr, 1, DESC_F_WRITE, 0)]
        addr, length = r.raw.table(table)
        _bad(r, [(addr, length, DESC_F_INDIRECT, 0)])
    _hostile(h, dev, build, 1 << F_RING_INDIRECT_DESC)


@rule("hostile.head-out-of-range", "an avail ring entry beyond the ring size", "virtio 1.2 §2.7.6", ROBUST)
def _h_head(h: Probe, dev: Device) -> None:
    def build(r: SplitRing) -> None:
        r.raw.publish(r.size + 5)
        h.note(f"ring {r.index}: avail entry {r.size + 5}")
    _hostile(h, dev, build)


@rule("hostile.next-out-of-range", "a next index beyond the ring size", "virtio 1.2 §2.7.5", ROBUST)
def _h_next(h: Probe, dev: Device) -> None:
    _hostile(h, dev, lambda r: _bad(r, [(*_ok(h), DESC_F_NEXT, r.size + 5)]))


@rule("hostile.avail-jump", "avail.idx jumping ahead by more than the ring size", "virtio 1.2 §2.7.6", ROBUST)
def _h_jump(h: Probe, dev: Device) -> None:
    def build(r: SplitRing) -> None:
        r.raw.set_avail_idx(r.size + 10)
        h.note(f"ring {r.index}: avail.idx {r.size + 10}")
    _hostile(h, dev, build)


def _table(h: Probe, dev: Device, entries: Callable[[SplitRing], tuple[int, int]]) -> None:
    def build(r: SplitRing) -> None:
        addr, length = entries(r)
        _bad(r, [(addr, length, DESC_F_INDIRECT, 0)])
    _hostile(h, dev, build, 1 << F_RING_INDIRECT_DESC)


@rule("hostile.indirect-nested", "an indirect table holding an indirect descriptor", "virtio 1.2 §2.7.5.3.1",
      ROBUST, features=(F_RING_INDIRECT_DESC,))
def _h_nested(h: Probe, dev: Device) -> None:
    def entries(r: SplitRing) -> tuple[int, int]:
        inner = r.raw.table([(*_ok(h), 0, 0)])
        return r.raw.table([(inner[0], inner[1], DESC_F_INDIRECT, 0)])
    _table(h, dev, entries)


@rule("hostile.indirect-bad-length", "an indirect table whose length is not a multiple of 16",
      "virtio 1.2 §2.7.5.3", ROBUST, features=(F_RING_INDIRECT_DESC,))
def _h_table_len(h: Probe, dev: Device) -> None:
    _table(h, dev, lambda r: r.raw.table([(*_ok(h), 0, 0), (*_ok(h), 0, 0)], length=20))


@rule("hostile.indirect-empty", "an indirect table of length 0", "virtio 1.2 §2.7.5.3", ROBUST,
      features=(F_RING_INDIRECT_DESC,))
def _h_table_empty(h: Probe, dev: Device) -> None:
    _table(h, dev, lambda r: r.raw.table([(*_ok(h), 0, 0)], length=0))


@rule("hostile.indirect-outside", "an indirect table outside the memory table", "virtio 1.2 §2.7.5.3", ROBUST,
      features=(F_RING_INDIRECT_DESC,))
def _h_table_outside(h: Probe, dev: Device) -> None:
    _table(h, dev, lambda r: (0x1000, 64))


@rule("hostile.indirect-and-next", "a descriptor with both INDIRECT and NEXT", "virtio 1.2 §2.7.5.3.1", ROBUST,
      features=(F_RING_INDIRECT_DESC,))
def _h_ind_next(h: Probe, dev: Device) -> None:
    def build(r: SplitRing) -> None:
        addr, length = r.raw.table([(*_ok(h), 0, 0)])
        _bad(r, [(addr, length, DESC_F_INDIRECT | DESC_F_NEXT, 1), (h.buf(1).addr, 1, DESC_F_WRITE, 0)])
    _hostile(h, dev, build, 1 << F_RING_INDIRECT_DESC)


@rule("hostile.readonly-status", "a status byte in a device-readable descriptor is not written",
      "virtio 1.2 §2.7.5.1", MUST, devices="blk")
def _h_ro_status(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status = h.buf(b"\xee")
    ring.post([(h.buf(B.OUTHDR.pack(B.T_IN, 0, 0)), 16, False), (h.buf(512), 512, True), (status, 1, False)])
    try:
        ring.wait(1, timeout=h.settings.quiet * 2)
    except (RuleFailed, ConnectionLost):  # refusing such a request is fine; writing the byte is not
        h.note("no completion (fine)")
    h.expect(status.view[0] == 0xEE, "the read-only status byte left at 0xee", f"0x{status.view[0]:02x}")


@rule("hostile.write-before-read", "a device-writable descriptor before a readable one: no crash, the readable "
      "one is not written", "virtio 1.2 §2.7.4.2, §2.7.5.1", ROBUST)
def _h_order(h: Probe, dev: Device) -> None:
    hdr = h.buf(B.OUTHDR.pack(B.T_IN, 0, 0))
    snapshot = bytes(hdr.view)
    _hostile(h, dev, lambda r: _bad(r, [(h.buf(512).addr, 512, DESC_F_WRITE | DESC_F_NEXT, 1), (hdr.addr, 16, 0, 0)]))
    h.expect(bytes(hdr.view) == snapshot, "the readable descriptor untouched", "it was written")


@rule("hostile.zero-length", "a zero-length descriptor in a chain: no crash", "virtio 1.2 §2.7.5", ROBUST)
def _h_zero(h: Probe, dev: Device) -> None:
    _hostile(h, dev, lambda r: _bad(r, [(*_ok(h), DESC_F_NEXT, 1), (h.buf(16).addr, 0, DESC_F_WRITE | DESC_F_NEXT, 2),
                                        (h.buf(1).addr, 1, DESC_F_WRITE, 0)]))


@rule("hostile.no-writable", "a request with nothing device-writable: no crash, nothing written",
      "virtio 1.2 §2.7.5.1", ROBUST)
def _h_no_writable(h: Probe, dev: Device) -> None:
    hdr = h.buf(B.OUTHDR.pack(B.T_IN, 0, 0))
    _hostile(h, dev, lambda r: _bad(r, [(hdr.addr, 16, 0, 0)]))
    h.expect(bytes(hdr.view) == B.OUTHDR.pack(B.T_IN, 0, 0), "the readable header untouched", "it was written")


@rule("hostile.short-memfd", "a memory region larger than its file (a SIGBUS trap) is refused or never touched",
      f"{VU} SET_MEM_TABLE", ROBUST)
def _h_short_memfd(h: Probe, dev: Device) -> None:
    h.hello()
    fd = os.memfd_create("pyvirtio-check-short", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    regions, fds = h.regions()
    base = max(r.guest_phys_addr + r.memory_size for r in regions) + (1 << 30)
    short = vu.MemRegion(base, 1 << 20, base, 0)
    try:
        h.send(h.codec.set_mem_table([*regions, short], [*fds, fd]))
        for q in dev.queues:
            h.ring(q)
        ring = h.rings[dev.request_queue]
        if isinstance(ring, SplitRing):
            _bad(ring, [(*_ok(h), DESC_F_NEXT, 1), (base + 65536, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                        (h.buf(1).addr, 1, DESC_F_WRITE, 0)])
            ring.kick()
    except ConnectionLost:
        return
    finally:
        os.close(fd)
    survived(h)


@rule("hostile.not-eventfd", "SET_VRING_KICK with a pipe instead of an eventfd: no crash", f"{VU} SET_VRING_KICK",
      ROBUST)
def _h_pipe(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    r, w = os.pipe()
    try:
        h.ring(dev.request_queue, kick=False)
        h.send(h.codec.set_vring_kick(dev.request_queue, r))
        os.write(w, b"\1" * 8)
    except ConnectionLost:
        return
    finally:
        os.close(r)
        os.close(w)
    survived(h)


@rule("hostile.extra-fds", "SET_OWNER carrying three unexpected fds: no crash", f"{VU} Communication", ROBUST)
def _h_fds(h: Probe, dev: Device) -> None:
    fds = [h.eventfd() for _ in range(3)]
    try:
        h.send_raw(raw(vu.SET_OWNER, b""), fds)
    except ConnectionLost:
        return
    survived(h)


@rule("hostile.mem-table-nine", "SET_MEM_TABLE claiming 9 regions (more than the 8 a message holds): no crash",
      f"{VU} Memory regions description", ROBUST)
def _h_nine(h: Probe, dev: Device) -> None:
    h.hello()
    regions, fds = h.regions()
    r = regions[0]
    body = struct.pack("=II", 9, 0) + struct.pack("=QQQQ", r.guest_phys_addr, r.memory_size, r.userspace_addr, 0) * 9
    try:
        h.send_raw(raw(vu.SET_MEM_TABLE, body), fds)
    except ConnectionLost:
        return
    survived(h)


# -- lifecycle: frontends that come and go ---------------------------------------------------------


@rule("lifecycle.die-mid-io", "a frontend that disconnects with requests in flight: the next one is served",
      f"{VU} Communication (reconnection)", ROBUST, reconnects=True)
def _die_mid_io(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    for _ in range(8):
        if dev.name == "blk":
            ring.post([(h.buf(B.OUTHDR.pack(B.T_IN, 0, 0)), 16, False), (h.buf(65536), 65536, True),
                       (h.buf(1), 1, True)], kick=False)
        else:
            ring.post([(h.buf(64), 64, False), (h.buf(256), 256, True)], kick=False)
    ring.kick()
    h.sock.close()
    check_works(h, dev)


@rule("lifecycle.reconnect", "a second frontend after a clean disconnect is served", f"{VU} Communication", ROBUST,
      reconnects=True)
def _reconnect(h: Probe, dev: Device) -> None:
    dev.start(h)
    dev.io(h)
    h.sock.close()
    check_works(h, dev)


@rule("lifecycle.disconnect-handshake", "a frontend that disconnects during the handshake: the next one is served",
      f"{VU} Communication", ROBUST, reconnects=True)
def _disconnect_early(h: Probe, dev: Device) -> None:
    h.sync()
    h.sock.close()
    check_works(h, dev)


@rule("lifecycle.partial-message", "a frontend that disconnects in the middle of a header: the next one is served",
      f"{VU} Communication", ROBUST, reconnects=True)
def _partial(h: Probe, dev: Device) -> None:
    h.send_raw(raw(vu.GET_FEATURES, b"")[:6])
    h.sock.close()
    check_works(h, dev)


def _count(pid: int) -> tuple[int, int]:
    """(open fds, shared file mappings) of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if " rw-s " in line or " r--s " in line)
    return fds, maps


@rule("lifecycle.fd-growth", "fds and shared mappings of the back end's process do not grow across connections",
      "resource hygiene", ROBUST, pid=True, reconnects=True)
def _fd_growth(h: Probe, dev: Device) -> None:
    pid = h.settings.pid
    assert pid is not None
    h.sock.close()
    check_works(h, dev)
    time.sleep(h.settings.quiet)
    before = _count(pid)
    for _ in range(h.settings.connections):
        with Probe(h.path, h.settings, h.info) as p:
            dev.start(p)
            one_request(p, dev, p.rings[dev.request_queue])
    deadline = time.monotonic() + 2.0
    after = _count(pid)
    while (after[0] > before[0] + 2 or after[1] > before[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _count(pid)
    h.expect(after[0] <= before[0] + 2 and after[1] <= before[1],
             f"at most {before[0] + 2} fds and {before[1]} shared mappings after {h.settings.connections} connections",
             f"{after[0]} fds (were {before[0]}), {after[1]} shared mappings (were {before[1]})")


CATALOGUE: tuple[Rule, ...] = tuple(_RULES)
"""Every rule, in the order they run (handshake, ring, per device, hostile, lifecycle)."""
