"""Fuzz targets for the packed virtqueue (virtio 1.2 §2.8): the driver's used side and the device's pop.

* ``packed_reap``: :meth:`PackedQueue.reap <pyvirtio.ring.packed.PackedQueue.reap>`
  (and restart_base, pending, the kick decision) against descriptors written
  by a :class:`~pyvirtio.testing.HostilePackedDevice`, honest or not.
  Declared: :class:`~pyvirtio.errors.DeviceProtocolError` (``QueueBroken``
  only once broken). Invariants: no token delivered twice or never sent; a
  length within the writable bytes; the id bookkeeping whole
  (``check_ids``); in-flight tokens and ``outstanding`` as the model says.
* ``packed_device_pop``: :meth:`PackedDeviceQueue.pop <pyvirtio.ring.device_packed.PackedDeviceQueue.pop>`
  over a ring, indirect tables and data written from the input into one
  4 KiB region of a memory table. Declared: :class:`~pyvirtio.ring.chain.ChainError`
  (and a ``DriverProtocolError`` for a ring base outside the ring).
  Invariants: every buffer a view inside the region; at most
  max(size, max_chain) buffers per chain; a ChainError without an id
  consumes nothing, one with an id consumes the chain and leaves the id in
  flight; the used side and notifications run on whatever was popped.

The seeds are built here too (:func:`seeds_packed_reap`, :func:`seeds_packed_device_pop`)
and registered in :mod:`fuzz.make_corpus`.
"""

from __future__ import annotations

from collections.abc import Callable

from fuzz._input import FuzzInput, Seed
from fuzz.targets import _check_inside, _device_memory, _pool, _reap_checked, expect
from pyvirtio.errors import DeviceProtocolError, DriverProtocolError, QueueBroken, QueueFull, RequestTooLarge
from pyvirtio.ring.device_side import ChainError, PackedDeviceQueue
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.spec.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESS_SIZE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    packed_layout,
    parse_packed_base,
)
from pyvirtio.testing import HostilePackedDevice

_DEV_GPA = 0x10000  # as fuzz.targets: guest address of the region's first byte
_DEV_REGION_SIZE = 4096


# -- driver side: used descriptors ----------------------------------------------------


class _Model:
    """What the driver published, kept by the fuzzer to check PackedQueue.reap (as targets._SplitModel)."""

    def __init__(self, q: PackedQueue) -> None:
        self.q = q
        self.inflight: dict[int, int] = {}  # token -> writable bytes
        self.delivered: set[int] = set()
        self.next_token = 0

    def completed(self, got: list[tuple[object, int]]) -> None:
        for token, length in got:
            assert isinstance(token, int)
            expect(token not in self.delivered, f"token {token} delivered twice")
            expect(token in self.inflight, f"token {token} was never in flight")
            wlen = self.inflight.pop(token)
            expect(0 <= length <= wlen, f"token {token}: length {length} > {wlen} writable bytes")
            self.delivered.add(token)

    def check(self) -> None:
        q = self.q
        expect(sorted(q.in_flight_tokens()) == sorted(self.inflight), "in-flight tokens differ from the model")  # type: ignore[type-var]
        expect(q.outstanding == len(self.inflight), f"outstanding {q.outstanding} != {len(self.inflight)}")
        try:
            q.check_ids()
        except AssertionError as exc:
            expect(False, f"id bookkeeping: {exc}")


def target_packed_reap(data: bytes) -> int:
    """PackedQueue.reap against a ring written by a hostile device.

    Input: ``u8`` size (1..64), ``u8`` flags (indirect, event_idx, in_order, zero_wrap),
    ``u8`` indirect threshold, then operations (``u8`` opcode): submit, an
    honest device completing what is available, garbage descriptors at any
    slot, reap, reset, interrupts + kick decision, pending, restart.
    """
    fi = FuzzInput(data)
    size = 1 + fi.below(64)
    flags = fi.u8()
    q = PackedQueue(
        size,
        _pool(),
        indirect=bool(flags & 1),
        event_idx=bool(flags & 2),
        in_order=bool(flags & 4),
        indirect_threshold=2 + fi.below(8),
        zero_wrap=bool(flags & 8),
    )
    start = 0 if q.zero_wrap else 1  # the lap both sides start in
    dev = HostilePackedDevice(q)
    dev.avail_wrap = dev.used_wrap = start
    model = _Model(q)
    reaped = 0
    try:
        for _ in range(64):
            if fi.exhausted:
                break
            op = fi.below(8)
            if op == 0:  # submit
                nr, nw = fi.below(4), fi.below(4)
                if nr + nw == 0:
                    nw = 1
                bufs = [(0x10000 * (k + 1), fi.u16(), k >= nr) for k in range(nr + nw)]
                token = model.next_token
                model.next_token += 1
                before = q.num_free
                try:
                    if fi.flag():
                        q.submit(token, bufs)
                    else:
                        q.start(token, len(bufs))
                        q.add_buffers(bufs)
                    q.flush()
                except (QueueFull, RequestTooLarge, QueueBroken):
                    expect(q.num_free == before and not q.request_open, "a refused request took descriptors")
                    continue
                model.inflight[token] = sum(n for _a, n, w in bufs if w)
            elif op == 1:  # an honest device: use what is available, in order, with bounded lengths
                for bid, n in dev.available()[: 1 + fi.below(size)]:
                    dev.use(bid, fi.u16(), n, write=fi.flag())
            elif op == 2:  # garbage: any id, length and flags at any slot
                for _ in range(1 + fi.below(4)):
                    dev.write_used(fi.below(size), fi.u16(), fi.u32(), fi.u16())
            elif op == 3:
                _reap_checked(model, fi.u8() or 1 << 16)  # type: ignore[arg-type]
                reaped += 1
            elif op == 4:
                lost = q.reset()
                expect(sorted(lost) == sorted(model.inflight), "reset() lost tokens differ from the model")  # type: ignore[type-var]
                model.inflight.clear()
                dev.avail_pos, dev.avail_wrap, dev.used_pos, dev.used_wrap = 0, start, 0, start
                model.check()
            elif op == 5:
                if q.broken is None:
                    if fi.flag():
                        q.enable_interrupts()
                    else:
                        q.disable_interrupts()
                    dev.set_event(fi.u8() & 3, fi.u16())
                    q.kick_prepare()
            elif op == 6:
                expect(0 <= q.pending() <= q.outstanding, "pending out of range")
            else:  # the device goes away; a new one starts at the driver's base
                try:
                    base = q.restart_base(fi.flag())
                except DeviceProtocolError as exc:
                    model.completed(list(exc.completed))
                    expect(q.broken is not None, "restart_base raised without breaking the queue")
                    continue
                ap, aw, up, uw = parse_packed_base(base)
                expect((ap, aw) == (up, uw) == (q.next_used, q.used_wrap), f"base 0x{base:08x}")
                expect(not q.zero_wrap or aw == 0, f"zero_wrap, yet base 0x{base:08x} is in lap 1")
                dev.avail_pos, dev.avail_wrap, dev.used_pos, dev.used_wrap = ap, aw, up, uw
                model.check()
        _reap_checked(model, 1 << 16)  # type: ignore[arg-type]
    finally:
        dev.release()
        q.close()
    return reaped


# -- device side: list walking ----------------------------------------------------------


def device_packed_layout(size: int) -> tuple[int, int, int]:
    """Offsets of the descriptor ring, driver and device event structures in the fuzz region."""
    driver, device, _total = packed_layout(size)
    return 0, driver, device


def target_packed_device_pop(data: bytes) -> int:
    """PackedDeviceQueue.pop over a ring written from the input.

    Input: ``u8`` size (1..64), ``u8`` flags (indirect, event_idx, in_order),
    ``u32`` ring base, ``u16`` max_chain (0: default), then the contents of
    the 4 KiB region at guest address 0x10000 that holds the ring
    (:func:`device_packed_layout`), indirect tables and data buffers.
    """
    fi = FuzzInput(data)
    size = 1 + fi.below(64)
    flags = fi.u8()
    base = fi.u32()
    max_chain = fi.u16() or None
    region, table = _device_memory()
    region.view[:] = fi.take(_DEV_REGION_SIZE)
    desc_off, driver_off, device_off = device_packed_layout(size)
    try:
        q = PackedDeviceQueue(
            size,
            table,
            table.gpa(_DEV_GPA + desc_off, DESC_SIZE * size),
            table.gpa(_DEV_GPA + driver_off, EVENT_SUPPRESS_SIZE),
            table.gpa(_DEV_GPA + device_off, EVENT_SUPPRESS_SIZE),
            indirect=bool(flags & 1),
            event_idx=bool(flags & 2),
            in_order=bool(flags & 4),
            base=base,
            max_chain=max_chain,
        )
    except DriverProtocolError:
        ap, _aw, up, _uw = parse_packed_base(base)
        expect(ap >= size or up >= size, f"base 0x{base:08x} refused for a ring of {size}")
        return 0
    bound = max(size, q.max_chain)
    popped = 0
    try:
        for _ in range(2 * size + 2):
            before = (q.base, q.in_flight)
            try:
                chain = q.pop()
            except ChainError as exc:
                if exc.head is None:
                    expect((q.base, q.in_flight) == before, "a ChainError without an id consumed descriptors")
                    break
                expect(q.in_flight == before[1] + 1 and q.base != before[0], "a bad chain was not consumed")
                q.add_used(exc.head, 0)  # the back end completes it with an error
                continue
            if chain is None:
                expect((q.base, q.in_flight) == before, "pop() returned None but consumed")
                break
            popped += 1
            expect(q.in_flight == before[1] + 1, "pop() did not put the id in flight")
            nbufs = len(chain.readable) + len(chain.writable)
            expect(nbufs <= bound, f"chain of {nbufs} buffers from a ring of {size} (max_chain {q.max_chain})")
            for buf in (*chain.readable, *chain.writable):
                _check_inside(buf, region)
            n = chain.write(b"\xa5" * min(chain.writable_len, 64))
            q.add_used(chain.head, n)
            del chain
        q.flush_used()
        expect(q.in_flight == 0, "ids left in flight after every pop was used")
        q.enable_notifications()
        q.disable_notifications()
    finally:
        q.release()
    return popped


# -- seeds ------------------------------------------------------------------------------------


def _submit(s: Seed, readable: list[int], writable: list[int], fast: bool = True) -> None:
    s.below(0, 8).below(len(readable), 4).below(len(writable), 4)
    for n in readable + writable:
        s.u16(n)
    s.flag(fast)


def _reap_seed(size: int, flags: int, threshold: int, ops: Callable[[Seed], None]) -> bytes:
    s = Seed().below(size - 1, 64).u8(flags).below(threshold - 2, 8)
    ops(s)
    return s.bytes()


def seeds_packed_reap() -> dict[str, bytes]:
    def honest(s: Seed) -> None:
        _submit(s, [16], [8])
        _submit(s, [], [512, 512], fast=False)
        _submit(s, [16, 16], [1])
        s.below(1, 8).below(2, 8)  # use three chains
        s.u16(8).flag(True).u16(1024).flag(True).u16(0).flag(False)
        s.below(3, 8).u8(0)  # reap everything

    def wrap(s: Seed) -> None:
        for _ in range(12):  # round a ring of 5 several times, 2 slots a request
            _submit(s, [4], [4])
            s.below(1, 8).below(0, 5).u16(4).flag(True)
            s.below(3, 8).u8(1)

    def lying(s: Seed) -> None:
        _submit(s, [16], [8])
        _submit(s, [], [8])
        s.below(2, 8).below(1, 4)  # two descriptors: a used one with the wrong wrap counter, an id out of range
        s.below(0, 5).u16(0).u32(3).u16(DESC_F_WRITE)
        s.below(2, 5).u16(200).u32(0).u16(PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED)
        s.below(3, 8).u8(0)
        s.below(4, 8)  # reset brings it back
        _submit(s, [1], [1])

    def in_order_restart(s: Seed) -> None:
        for _ in range(3):
            _submit(s, [4], [4])
        s.below(1, 8).below(0, 6).u16(4).flag(True)  # the first completes
        s.below(7, 8).flag(True)  # restart, resubmitting the other two
        s.below(1, 8).below(1, 6).u16(4).flag(True).u16(2).flag(True)
        s.below(3, 8).u8(0)

    def event_idx(s: Seed) -> None:
        _submit(s, [16, 16, 16], [64, 64, 1])
        s.below(5, 8).flag(True).u8(2).u16(0x8000)  # interrupts on, the device asks for slot 0
        _submit(s, [16], [1])
        s.below(1, 8).below(1, 7).u16(129).flag(True).u16(1).flag(True)
        s.below(6, 8)
        s.below(3, 8).u8(0)

    def zero_wrap(s: Seed) -> None:
        for k in range(8):  # a ring of 5 kept in lap 0: restarts in lap 1 move it back
            _submit(s, [4], [4])
            s.below(1, 8).below(0, 5).u16(4).flag(True)  # it completes
            _submit(s, [4], [4])
            s.below(7, 8).flag(k % 2 == 0)  # restart with the second in flight, resubmitting or not
            s.below(1, 8).below(0, 5).u16(4).flag(True)  # the new device completes it
            s.below(3, 8).u8(0)

    return {
        "honest": _reap_seed(8, 0, 8, honest),
        "wrap": _reap_seed(5, 0, 8, wrap),
        "lying_device": _reap_seed(5, 0, 8, lying),
        "in_order_restart": _reap_seed(6, 4, 8, in_order_restart),
        "indirect_event_idx": _reap_seed(7, 3, 2, event_idx),
        "zero_wrap_restarts": _reap_seed(5, 8, 8, zero_wrap),
    }


class _PackedRing:
    """A packed ring in the packed_device_pop region, laid out as the target maps it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mem = bytearray(_DEV_REGION_SIZE)
        self.pos, self.wrap = 0, 1

    def publish(self, bid: int, descs: list[tuple[int, int, int]], *, raw_addr: int | None = None) -> None:
        """(region offset, len, flags) descriptors at the cursor, NEXT linked, available."""
        for k, (off, length, flags) in enumerate(descs):
            more = DESC_F_NEXT if k + 1 < len(descs) else 0
            bits = PACKED_DESC_F_AVAIL if self.wrap else PACKED_DESC_F_USED
            addr = _DEV_GPA + off if raw_addr is None else raw_addr
            PACKED_DESC.pack_into(self.mem, DESC_SIZE * self.pos, addr, length, bid, flags | more | bits)
            self.pos += 1
            if self.pos == self.size:
                self.pos, self.wrap = 0, self.wrap ^ 1

    def table(self, off: int, entries: list[tuple[int, int, int]]) -> None:
        for k, (doff, length, flags) in enumerate(entries):
            PACKED_DESC.pack_into(self.mem, off + DESC_SIZE * k, _DEV_GPA + doff, length, 0, flags)

    def seed(self, flags: int = 1, base: int = 0x8000_8000, max_chain: int = 0) -> bytes:
        return Seed().below(self.size - 1, 64).u8(flags).u32(base).u16(max_chain).raw(bytes(self.mem)).bytes()


def seeds_packed_device_pop() -> dict[str, bytes]:
    out = {}
    r = _PackedRing(8)
    r.publish(0, [(0x800, 16, 0), (0x810, 512, DESC_F_WRITE), (0xA10, 1, DESC_F_WRITE)])
    r.publish(1, [(0xC00, 64, 0)])
    out["direct"] = r.seed()
    r = _PackedRing(5)
    r.table(0x700, [(0x800, 16, 0), (0x810, 256, DESC_F_WRITE), (0xA10, 1, DESC_F_WRITE)])
    r.publish(3, [(0x700, 48, DESC_F_INDIRECT)])
    out["indirect"] = r.seed(flags=7)
    r = _PackedRing(6)
    r.publish(0, [(0x800, 8, DESC_F_WRITE), (0x808, 8, 0)])  # readable after writable
    r.publish(1, [(0, 8, 0)], raw_addr=0xFFFFFFFFFFFFFFF0)  # outside the table
    r.publish(1, [(0x800, 8, 0)])  # an id already in flight
    out["violations"] = r.seed()
    r = _PackedRing(64)
    r.publish(9, [(0xC00 + 8 * i, 8, DESC_F_WRITE if i >= 32 else 0) for i in range(64)])
    out["longest_chain"] = r.seed(flags=0)
    r = _PackedRing(3)
    r.pos, r.wrap = 2, 0  # a ring resumed in its second lap
    r.publish(4, [(0x800, 1, 0), (0x801, 1, DESC_F_WRITE)])
    out["wrap"] = r.seed(flags=2, base=0x0002_0002)
    return out
