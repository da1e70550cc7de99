"""The ``ring`` rules: a ring's life cycle, from its set-up messages to its notifications.

Theory of operation
-------------------
Set-up (virtio 1.2 §2.7; vhost-user.rst, Memory access): a size of 0, not a
power of 2 (split) or above 32768, a descriptor table or used ring outside
the memory table, and a misaligned descriptor table are refused
(:func:`~pyvirtio.conformance.catalogue.refused`); a ring whose addresses
lie outside the memory table, started and kicked anyway, neither crashes
nor hangs the back end.

States (vhost-user.rst, Ring states; GET_VRING_BASE, SET_VRING_BASE,
SET_VRING_ENABLE): GET_VRING_BASE stops a ring and returns the avail index
the device reached (a packed ring: the avail position with its wrap counter
in bit 15); a ring that never ran returns the base it was given; a stopped
ring processes nothing new, and set up again at the base returned it goes on
where it stopped, across the 16-bit index wrap too (virtio 1.2 §2.7.6).
With PROTOCOL_FEATURES a ring starts disabled (a write posted before
SET_VRING_ENABLE(1) does not take effect before it), without them it runs
without SET_VRING_ENABLE; a ring disabled and enabled again serves again.
SET_VRING_CALL on a running ring moves notifications to the new eventfd;
with the NOFD flag (vhost-user.rst SET_VRING_CALL, SET_VRING_KICK) the
frontend polls for completions and the back end polls for requests. A packed
ring (virtio 1.2 §2.8) serves requests.

Notifications (virtio 1.2 §2.7.7.2): each rule completes a first request,
sets the suppression under test (avail flags, or used_event with
EVENT_IDX), drains the call eventfd, completes a second request and asks
whether the eventfd was written: it must be when nothing suppresses it or
used_event is reached, and should not be when VIRTQ_AVAIL_F_NO_INTERRUPT is
set or used_event is far ahead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from pyvirtio.conformance.catalogue import (
    MUST,
    PROTOCOL,
    REPLY_ACK,
    ROBUST,
    SHOULD,
    VU,
    one_request,
    post_request,
    refused,
    rings_up,
    rule,
    survived,
)
from pyvirtio.conformance.devices import Device, blk_request
from pyvirtio.conformance.harness import PackedRing, Probe, SplitRing
from pyvirtio.errors import ConnectionLost
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec.common import F_RING_EVENT_IDX, F_RING_PACKED, VHOST_USER_F_PROTOCOL_FEATURES

__all__: list[str] = []  # importing the module adds its rules to the catalogue; it exports nothing


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
    rings_up(h, dev)
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

