"""The ``hostile`` rules: a frontend that breaks the rules on purpose.

Theory of operation
-------------------
Most rules start the device on split rings, write one malformed chain
straight into the request ring with the raw writers of
:class:`~pyvirtio.conformance.harness.SplitRing` (no driver would post
it), kick, and ask only that the back end survives: it drops the
connection or still answers
(:func:`~pyvirtio.conformance.catalogue.survived`); after the rule the
runner checks that the next frontend is served (a rule whose ring came up
packed is skipped). The chains break virtio 1.2 §2.7.5
(descriptors: outside the memory table, past the end of their region, zero
length, a next index beyond the ring), §2.7.5.2 (a loop, a cycle),
§2.7.5.3 and §2.7.5.3.1 (indirect tables: nested, a length not a multiple
of 16 or 0, outside the memory table, with NEXT, longer than the ring) and
§2.7.6 (an avail entry beyond the ring, avail.idx jumping ahead).

Three rules check what the back end writes (virtio 1.2 §2.7.5.1, §2.7.4.2):
a device-readable buffer is never written, whether it holds a blk status
byte (a MUST), follows a writable one, or is all the request has.

The rest abuse the control channel: a memory region larger than its file
(touching it would raise SIGBUS in the back end; vhost-user.rst
SET_MEM_TABLE), a pipe instead of an eventfd (SET_VRING_KICK), fds on a
message that takes none (vhost-user.rst, Communication), a memory table
claiming 9 regions (vhost-user.rst, Memory regions description).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence

from pyvirtio.conformance.catalogue import MUST, ROBUST, VU, raw, rule, survived
from pyvirtio.conformance.devices import Device
from pyvirtio.conformance.harness import Probe, SplitRing
from pyvirtio.errors import ConnectionLost, RuleFailed
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec.common import F_RING_INDIRECT_DESC, F_RING_PACKED
from pyvirtio.spec.ring import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

__all__: list[str] = []  # importing the module adds its rules to the catalogue; it exports nothing


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
