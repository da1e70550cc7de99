"""Fixed chains on a split ring: the batch fast path of :class:`~pyvirtio.ring.split.SplitQueue`.

Theory of operation (the API and its rules: :mod:`pyvirtio.ring.fixed`).
Each slot's chain is linked once in the descriptor table (descriptors
reserved with :meth:`SplitQueue.take_descriptors
<pyvirtio.ring.split.SplitQueue.take_descriptors>`; on a free queue slot s is
headed by descriptor s), so posting a slot is one avail-ring store, and a
batch one avail index store (virtio 1.2 §2.7.13) and one kick decision
(§2.7.10: VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX). The ring's
shadow indices (``avail_idx``, ``last_used``, ``outstanding``,
``kick_from``) are kept current after every plain call, so the ring's own
``kick_prepare``, ``enable_interrupts`` and ``restart_base`` see the truth.
The plain-Python cycle holds them in its loop between passes; every call
here first has it hand them back (:meth:`SplitCycle.sync
<pyvirtio.ring.cycle_split.SplitCycle.sync>`), and its next pass takes
them up again (the queue is used only through this object while it is
attached).

In-flight state is one list, ``hw1[h]``: 0 unless descriptor h heads a slot
in flight, then that slot's device-writable bytes + 1. One lookup checks "in
flight" and bounds the used length (``length < hw1[h]``, §2.7.8); an id
beyond the ring is caught first. The NumPy path keeps the same in an array
whose index ``size`` is a permanent 0, so that out-of-range ids, clipped to
it, fail the same gather; a batch with anything wrong is re-run entry by
entry (:meth:`SplitFixedChains.reap_exact`), which reports the exact entry.

The engines' closed loops on these chains are in :mod:`pyvirtio.ring.cycle_split`
(the cycles) and :mod:`pyvirtio.ring.stream_split` (the stream); they share this object's state (``mem``,
``hw1``, ``slot_wlen``, ``arrays()``...), which is the ring package's and
nobody else's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueStateError
from pyvirtio.ring import ordering
from pyvirtio.ring.cycle_split import SplitCycle, SplitManyCycle
from pyvirtio.ring.fixed import BufferSpec, FixedChains, chain_shapes, changed_buffer, check_length_field
from pyvirtio.ring.split import SplitQueue
from pyvirtio.ring.stream_split import SplitStream
from pyvirtio.spec.ring import DESC_F_NEXT, DESC_F_WRITE

if TYPE_CHECKING:
    import numpy as np


class SplitFixedChains(FixedChains):
    """Fixed chains on a :class:`~pyvirtio.ring.split.SplitQueue` (see the module docstring)."""

    ring: SplitQueue

    def __init__(
        self,
        ring: SplitQueue,
        chains: Sequence[Sequence[BufferSpec]],
        *,
        alternate: Sequence[Sequence[BufferSpec]] | None = None,
    ) -> None:
        shapes = chain_shapes(chains, alternate)
        descs = ring.take_descriptors([len(f[0]) for f in shapes])
        m = ring.shared_views()
        self.ring = ring
        self.mem = m
        self.nslots = len(shapes)
        self.shapes = [[[list(b) for b in form] for form in forms] for forms in shapes]
        self.descs = descs
        self.alt_now = bytearray(self.nslots)  # the shape each slot has now (0: first, 1: alternate)
        self.slot_wlen = [0] * self.nslots
        self._np: _Arrays | None = None
        self.streaming = False
        self.heads = [d[0] for d in descs]
        self.slot_of = [-1] * ring.size
        for s, d in enumerate(descs):
            self.slot_of[d[0]] = s
            for a, b in zip(d, d[1:], strict=False):
                m.desc16[8 * a + 7] = b
            self._write_slot(s)
        self.heads_are_slots = self.heads == list(range(self.nslots))
        self.hw1 = [0] * ring.size
        self._cycle: SplitCycle | None = None  # the last plain-Python cycle: it may hold the shadow indices

    def _write_slot(self, s: int) -> None:
        """Write slot s's current shape into its descriptors; recompute its writable bytes."""
        m = self.mem
        d = self.descs[s]
        form = self.shapes[s][self.alt_now[s]]
        last = len(d) - 1
        wlen = 0
        for k, (addr, length, writable) in enumerate(form):
            i = d[k]
            m.desc64[2 * i] = addr
            m.desc32[4 * i + 2] = length
            m.desc16[8 * i + 6] = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if k < last else 0)
            if writable:
                wlen += length
        self.slot_wlen[s] = wlen
        a = self._np
        if a is not None:
            a.wlen1[s] = wlen + 1
            a.uniform = None if wlen + 1 != a.uniform else a.uniform

    # -- state ------------------------------------------------------------------

    @property
    def n_inflight(self) -> int:
        self._settle()
        return self.ring.outstanding

    def _settle(self) -> None:
        """Have the plain-Python cycle, if any, hand the shadow indices back to the ring (see the module docstring)."""
        if self._cycle is not None:
            self._cycle.sync()

    @property
    def wlen(self) -> Sequence[int]:
        self._sync()
        return self.slot_wlen

    def _sync(self) -> None:
        """Bring the per-slot lists up to date after NumPy switches of shape."""
        a = self._np
        if a is not None and a.dirty:
            self.alt_now[:] = a.alt.tobytes()
            self.slot_wlen[:] = (a.wlen1.astype(a.np.int64) - 1).tolist()
            a.dirty = False

    def in_flight(self) -> list[int]:
        self._check_path(None)
        if self._np is not None:
            hw = self._np.head_wlen1
            return [self.slot_of[int(h)] for h in hw[: self.ring.size].nonzero()[0]]
        hw1 = self.hw1
        return [s for s, h in enumerate(self.heads) if hw1[h]]

    def pending(self) -> int:
        self._settle()
        return (self.mem.used16[1] - self.ring.last_used) & 0xFFFF

    def _check_path(self, numpy: bool | None) -> None:
        self._settle()
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        if numpy is False and self._np is not None:
            raise QueueStateError("this FixedChains is driven through the NumPy path")

    def _check_idle_slot(self, s: int) -> None:
        if not 0 <= s < self.nslots:
            raise InvalidArgument(f"slot {s} out of range (0..{self.nslots - 1})")
        a = self._np
        busy = a.head_wlen1[self.heads[s]] if a is not None else self.hw1[self.heads[s]]
        if busy:
            raise QueueStateError(f"slot {s} is in flight")

    # -- shapes -------------------------------------------------------------------

    def set_buffer(
        self, s: int, k: int, addr: int | None = None, length: int | None = None, writable: bool | None = None
    ) -> None:
        self._check_idle_slot(s)
        self._sync()
        form = self.shapes[s][self.alt_now[s]]
        new = changed_buffer(form, s, k, addr, length, writable)
        form[k] = new
        if self._np is not None:
            self._np.shape_changed(self, s)
        i = self.descs[s][k]
        m = self.mem
        m.desc64[2 * i] = new[0]
        m.desc32[4 * i + 2] = new[1]
        m.desc16[8 * i + 6] = (DESC_F_WRITE if new[2] else 0) | (DESC_F_NEXT if k < len(form) - 1 else 0)
        self.slot_wlen[s] = sum(b[1] for b in form if b[2])
        if self._np is not None:
            self._np.wlen1[s] = self.slot_wlen[s] + 1
            self._np.uniform = None

    def set_length(self, s: int, k: int, length: int) -> None:
        if (
            not 0 <= s < self.nslots
            or not 0 <= k < len(self.descs[s])
            or self.hw1[self.heads[s]]
            or self._np is not None
            or not 0 <= length <= 0xFFFFFFFF
        ):
            self.set_buffer(s, k, length=length)  # the checks and errors, the NumPy state
            return
        b = self.shapes[s][self.alt_now[s]][k]
        self.mem.desc32[4 * self.descs[s][k] + 2] = length
        if b[2]:
            self.slot_wlen[s] += length - b[1]
        b[1] = length

    def length_fields(self, k: int = 0) -> tuple[memoryview, list[int]]:
        check_length_field(self.shapes, k)
        return self.mem.desc32, [4 * d[k] + 2 for d in self.descs]

    def use_alternate(self, s: int, on: bool) -> None:
        self._check_idle_slot(s)
        if len(self.shapes[s]) < 2:
            raise InvalidArgument(f"slot {s} has no alternate chain")
        self._sync()
        v = 1 if on else 0
        if self.alt_now[s] != v:
            self.alt_now[s] = v
            self._write_slot(s)
            if self._np is not None:
                self._np.alt[s] = v
                self._np.uniform = None

    def use_alternate_many(self, slots: np.ndarray, on: np.ndarray, *, check: bool = True) -> None:
        a = self.arrays()
        if check:
            if a.head_wlen1[a.heads[slots]].any():
                raise QueueStateError("a slot given is in flight")
            if not a.has_alt:
                raise InvalidArgument("these fixed chains have no alternate shapes")
        a.switch(slots, on)

    # -- plain calls --------------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        ring = self.ring
        self.check_broken()
        self._check_path(False)
        hw1 = self.hw1
        wlen = self.slot_wlen
        heads = self.heads
        a16 = self.mem.avail16
        mask = ring.size - 1
        idx = ring.avail_idx
        for s in slots:
            h = heads[s]
            if hw1[h]:
                raise QueueStateError(f"slot {s} is already in flight")  # earlier slots: see below
            hw1[h] = wlen[s] + 1
            a16[2 + (idx & mask)] = h
            idx = (idx + 1) & 0xFFFF
        n = len(slots)
        ring.outstanding += n
        ring.avail_idx = idx
        ordering.write_barrier()
        a16[1] = idx
        return ring.kick_prepare()

    def reap_slots(self, max_n: int = 1 << 16, lengths: list[int] | None = None) -> list[int]:
        self._settle()
        ring = self.ring
        m = self.mem
        last = ring.last_used
        n = (m.used16[1] - last) & 0xFFFF
        if not n:
            return []
        self.check_broken()
        self._check_path(False)
        if n > ring.outstanding:
            self._break(f"used index moved by {n} with only {ring.outstanding} requests in flight", [], [])
        ordering.read_barrier()
        out = self.take_exact(min(n, max_n), [] if lengths is None else lengths)
        if ring.event_idx and ring.interrupts_enabled:
            m.avail16[m.used_event] = ring.last_used  # keep the next completion signalled
        return out

    def take_exact(self, n: int, lens: list[int]) -> list[int]:
        """Validate and take the next ``n`` used entries entry by entry; raises at the first bad one."""
        ring = self.ring
        last = ring.last_used
        used32 = self.mem.used32
        mask = ring.size - 1
        slot_of = self.slot_of
        hw1 = self.hw1
        out: list[int] = []
        for _ in range(n):
            pos = 1 + 2 * (last & mask)
            head = used32[pos]
            length = used32[pos + 1]
            try:
                w = hw1[head]
            except IndexError:
                self._break(f"used id {head} is out of range (queue size {ring.size})", out, lens)
            if length >= w:
                if not w:
                    self._break(f"used id {head} is not the head of an in-flight request", out, lens)
                length = self._long_used(head, length, w - 1, out, lens)
            hw1[head] = 0
            out.append(slot_of[head])
            lens.append(length)
            last = (last + 1) & 0xFFFF
        ring.last_used = last
        ring.outstanding -= n
        return out

    def _long_used(self, head: int, length: int, offered: int, slots: list[int], lengths: list[int]) -> int:
        """A used length above the ``offered`` writable bytes: clamped if the ring tolerates it
        (``clamp_used_len``, counted in ``long_used``, as its own reap), else the queue breaks."""
        ring = self.ring
        if not ring.clamp_used_len:
            reason = f"used length {length} for id {head} exceeds the {offered} device-writable bytes offered"
            self._break(reason, slots, lengths)
        ring.long_used += 1
        return offered

    def _break(self, reason: str, slots: list[int], lengths: list[int]) -> NoReturn:
        ring = self.ring
        done = len(slots)
        ring.last_used = (ring.last_used + done) & 0xFFFF
        ring.outstanding -= done
        ring.broken = reason
        raise DeviceProtocolError(f"queue {ring.index}: {reason}", list(zip(slots, lengths, strict=True)))

    # -- NumPy ----------------------------------------------------------------------

    def arrays(self) -> _Arrays:
        if self._np is None:
            self._check_path(None)
            if self.ring.outstanding:
                raise QueueStateError("switch to the NumPy path with nothing in flight")
            self._np = _Arrays(self)
        return self._np

    def post_many(self, slots: np.ndarray, *, check: bool = True) -> bool:
        self._settle()
        ring = self.ring
        self.check_broken()
        a = self.arrays()
        n = len(slots)
        if not n:
            return False
        heads = a.heads[slots]
        hw = a.head_wlen1
        if check and hw[heads].any():
            raise QueueStateError("a slot posted is already in flight")
        hw[heads] = a.wlen1[slots]
        idx = ring.avail_idx
        start = idx & (ring.size - 1)
        a.avail[a.avail_pos2[start : start + n]] = heads
        idx = (idx + n) & 0xFFFF
        ring.outstanding += n
        ring.avail_idx = idx
        ordering.write_barrier()
        self.mem.avail16[1] = idx
        return ring.kick_prepare()

    def reap_many(self) -> tuple[np.ndarray, np.ndarray] | None:
        self._settle()
        ring = self.ring
        m = self.mem
        last = ring.last_used
        n = (m.used16[1] - last) & 0xFFFF
        if not n:
            return None
        self.check_broken()
        a = self.arrays()
        if n > ring.outstanding:
            self._break(f"used index moved by {n} with only {ring.outstanding} requests in flight", [], [])
        ordering.read_barrier()
        start = last & (ring.size - 1)
        pos = a.idx2[start : start + n]
        ids = a.used_id[pos].astype(a.intp)
        lens = a.used_len[pos]
        hw = a.head_wlen1
        if not a.count_nonzero(lens >= hw.take(ids, mode="clip")):
            hw[ids] = 0
            after = ring.outstanding - n
            if a.count_nonzero(hw) == after:
                ring.outstanding = after
                ring.last_used = (last + n) & 0xFFFF
                if ring.event_idx and ring.interrupts_enabled:
                    m.avail16[m.used_event] = ring.last_used
                return a.slot_of[ids], lens
            hw[ids] = a.wlen1[a.slot_of[ids]]  # a duplicate id: undo
        return self.reap_exact(n)

    def reap_exact(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Entry-by-entry validation of a NumPy batch: finds and reports the bad entry."""
        a = self.arrays()
        ring = self.ring
        hw = a.head_wlen1
        last = ring.last_used
        slots: list[int] = []
        lens: list[int] = []
        for k in range(n):
            pos = (last + k) & (ring.size - 1)
            head = int(a.used_id[pos])
            length = int(a.used_len[pos])
            if head >= ring.size:
                self._break(f"used id {head} is out of range (queue size {ring.size})", slots, lens)
            if not hw[head]:
                self._break(f"used id {head} is not the head of an in-flight request", slots, lens)
            if length >= hw[head]:
                length = self._long_used(head, length, int(hw[head]) - 1, slots, lens)
            hw[head] = 0
            slots.append(int(a.slot_of[head]))
            lens.append(length)
        ring.last_used = (last + n) & 0xFFFF
        ring.outstanding -= n
        return a.np.asarray(slots, dtype=a.np.int64), a.np.asarray(lens, dtype=a.np.int64)

    # -- engines ------------------------------------------------------------------

    def cycle(self, depth: int, notify: Callable[[], object], *, vectorised: bool = False) -> Any:
        self.check_broken()
        self._check_path(None if vectorised else False)
        if self.ring.outstanding:
            raise QueueStateError("a cycle starts with nothing in flight")
        if not 1 <= depth <= self.nslots:
            raise InvalidArgument(f"depth must be 1..{self.nslots}, got {depth}")
        if vectorised:
            return SplitManyCycle(self, depth, notify)
        self._cycle = SplitCycle(self, depth, notify)
        return self._cycle

    def stream(self, notify: Callable[[], object], *, min_len: int = 0) -> SplitStream:
        self.check_broken()
        self._check_path(False)
        return SplitStream(self, notify, min_len)

    # -- interrupts, reconnect, teardown -----------------------------------------------

    def enable_interrupts(self) -> None:
        self._settle()
        self.ring.enable_interrupts()

    def disable_interrupts(self) -> None:
        self._settle()
        self.ring.disable_interrupts()

    def restart_base(self, resubmit: bool = True) -> int:
        self._check_path(None)
        return self.ring.restart_base(resubmit, in_flight=[self.heads[s] for s in self.in_flight()])

    def detach(self) -> None:
        self._settle()
        self._cycle = None
        ring = self.ring
        if ring.outstanding and ring.broken is None:
            raise QueueStateError(f"{ring.outstanding} slots still in flight")
        if self.streaming:
            raise QueueStateError("close the stream first")
        ring.give_back_descriptors(self.descs)
        self.descs = []
        self._np = None


class _Arrays:
    """The NumPy state of a :class:`SplitFixedChains` (one per FixedChains, built at its first NumPy call)."""

    def __init__(self, fc: SplitFixedChains) -> None:
        import numpy as np

        ring = fc.ring
        size = ring.size
        m = fc.mem
        self.np = np
        self.intp = np.intp
        self.count_nonzero = np.count_nonzero
        used = np.frombuffer(m.used32, dtype="<u4", count=1 + 2 * size)
        idx2 = np.arange(2 * size, dtype=np.int64) & (size - 1)
        # The used ring's lengths are uint32: comparing them with uint32 is
        # cheaper than with int64 (no conversion), when every bound fits.
        bound = max(sum(b[1] for b in form if b[2]) for forms in fc.shapes for form in forms) + 1
        wdt: Any = np.uint32 if bound <= 0xFFFFFFFF else np.int64
        self.wdt = wdt
        self.avail = np.frombuffer(m.avail16, dtype="<u2")  # flags, idx, ring[size], used_event
        self.used_id = used[1::2]
        self.used_len = used[2::2]
        self.heads = np.asarray(fc.heads, dtype=np.int64)
        self.slot_of = np.asarray(fc.slot_of + [-1], dtype=np.int64)
        self.wlen1 = np.asarray([w + 1 for w in fc.slot_wlen], dtype=wdt)  # per slot: writable bytes + 1
        self.head_wlen1 = np.zeros(size + 1, dtype=wdt)
        hw1 = fc.hw1
        for h in range(size):
            self.head_wlen1[h] = hw1[h]
        w = set(fc.slot_wlen)
        self.uniform: int | None = w.pop() + 1 if len(w) == 1 else None
        self.idx2 = idx2  # ring positions of k indices from i: idx2[i & mask : (i & mask) + k]
        self.avail_pos2 = idx2 + 2
        self.alt = np.frombuffer(bytes(fc.alt_now), dtype=np.uint8).copy()
        self.has_alt = all(len(forms) == 2 for forms in fc.shapes)
        self._fc = fc
        self._switch: list[tuple[Any, Any, Any, Any]] | None = None
        self.dirty = False  # switched by arrays: the FixedChains' per-slot lists are stale

    def shape_changed(self, fc: SplitFixedChains, s: int) -> None:
        """A buffer of slot s changed: the switch tables are rebuilt at the next switch."""
        self._switch = None

    def _switch_tables(self) -> list[tuple[Any, Any, Any, Any]]:
        """(field view, element index per slot, value per slot if first shape, if alternate) per field that differs.

        A column whose values are the same for every slot is kept as a
        scalar (a ``where`` with scalars is one array operation cheaper).
        """
        np = self.np
        fc = self._fc
        m = fc.mem
        fields = (
            (np.frombuffer(m.desc64, dtype="<u8"), 2, 0, lambda b, last: b[0], np.uint64),
            (np.frombuffer(m.desc32, dtype="<u4"), 4, 2, lambda b, last: b[1], np.uint32),
            (
                np.frombuffer(m.desc16, dtype="<u2"),
                8,
                6,
                lambda b, last: (DESC_F_WRITE if b[2] else 0) | (0 if last else DESC_F_NEXT),
                np.uint16,
            ),
        )
        out: list[tuple[Any, Any, Any, Any]] = []
        nbuf = len(fc.shapes[0][0])
        if any(len(forms[0]) != nbuf for forms in fc.shapes):
            raise InvalidArgument("use_alternate_many needs every slot with as many buffers")
        for k in range(nbuf):
            last = k == nbuf - 1
            for view, scale, off, get, dt in fields:
                v0 = [get(forms[0][k], last) for forms in fc.shapes]
                v1 = [get(forms[1][k], last) for forms in fc.shapes]
                if v0 == v1:
                    continue
                index = np.asarray([scale * d[k] + off for d in fc.descs], dtype=np.intp)
                c0: Any = v0[0] if len(set(v0)) == 1 else np.asarray(v0, dtype=dt)
                c1: Any = v1[0] if len(set(v1)) == 1 else np.asarray(v1, dtype=dt)
                out.append((view, index, c0, c1))
        w0 = [sum(b[1] for b in forms[0] if b[2]) + 1 for forms in fc.shapes]
        w1 = [sum(b[1] for b in forms[1] if b[2]) + 1 for forms in fc.shapes]
        c0w: Any = w0[0] if len(set(w0)) == 1 else np.asarray(w0, dtype=self.wdt)
        c1w: Any = w1[0] if len(set(w1)) == 1 else np.asarray(w1, dtype=self.wdt)
        out.append((self.wlen1, None, c0w, c1w))
        return out

    def switch(self, slots: Any, on: Any) -> None:
        """use_alternate for arrays (no checks)."""
        tables = self._switch
        if tables is None:
            tables = self._switch = self._switch_tables()
        where = self.np.where
        for view, index, c0, c1 in tables:
            a = c1 if isinstance(c1, int) else c1[slots]
            b = c0 if isinstance(c0, int) else c0[slots]
            if index is None:
                view[slots] = where(on, a, b)
            else:
                view[index[slots]] = where(on, a, b)
        self.alt[slots] = on
        self.uniform = None
        self.dirty = True


__all__ = ["SplitFixedChains"]
