"""Fixed chains on a split ring: the batch fast path of :class:`~pyvirtio.ring.split.SplitQueue`.

Theory of operation (the API and its rules: :mod:`pyvirtio.ring.fixed`).
Each slot's chain is linked once in the descriptor table (descriptors
reserved with :meth:`SplitQueue.take_descriptors
<pyvirtio.ring.split.SplitQueue.take_descriptors>`; on a free queue slot s is
headed by descriptor s), so posting a slot is one avail-ring store, and a
batch one avail index store (virtio 1.2 §2.7.13) and one kick decision
(§2.7.10: VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX). The ring's
shadow indices (``avail_idx``, ``last_used``, ``outstanding``,
``kick_from``) are kept current after every call, so the ring's own
``kick_prepare``, ``enable_interrupts`` and ``restart_base`` see the truth.

In-flight state is one list, ``hw1[h]``: 0 unless descriptor h heads a slot
in flight, then that slot's device-writable bytes + 1. One lookup checks "in
flight" and bounds the used length (``length < hw1[h]``, §2.7.8); an id
beyond the ring is caught first. The NumPy path keeps the same in an array
whose index ``size`` is a permanent 0, so that out-of-range ids, clipped to
it, fail the same gather; a batch with anything wrong is re-run entry by
entry (:meth:`SplitFixedChains._reap_exact`), which reports the exact entry.

A used entry for a slot that was published in the same pass as the batch
was counted is rejected: the cycles mark the slots they publish in flight
only after checking the batch (the device wrote the batch before it could
see them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueStateError
from pyvirtio.ring import ordering
from pyvirtio.ring.fixed import BufferSpec, FixedChains, chain_shapes
from pyvirtio.ring.split import SplitQueue
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
        self._m = m
        self.nslots = len(shapes)
        self._shapes = [[[list(b) for b in form] for form in forms] for forms in shapes]
        self._descs = descs
        self._alt = bytearray(self.nslots)  # the shape each slot has now (0: first, 1: alternate)
        self._wlen = [0] * self.nslots
        self._np: _Arrays | None = None
        self._streaming = False
        self.heads = [d[0] for d in descs]
        self.slot_of = [-1] * ring.size
        for s, d in enumerate(descs):
            self.slot_of[d[0]] = s
            for a, b in zip(d, d[1:], strict=False):
                m.desc16[8 * a + 7] = b
            self._write_slot(s)
        self.heads_are_slots = self.heads == list(range(self.nslots))
        self._hw1 = [0] * ring.size

    def _write_slot(self, s: int) -> None:
        """Write slot s's current shape into its descriptors; recompute its writable bytes."""
        m = self._m
        d = self._descs[s]
        form = self._shapes[s][self._alt[s]]
        last = len(d) - 1
        wlen = 0
        for k, (addr, length, writable) in enumerate(form):
            i = d[k]
            m.desc64[2 * i] = addr
            m.desc32[4 * i + 2] = length
            m.desc16[8 * i + 6] = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if k < last else 0)
            if writable:
                wlen += length
        self._wlen[s] = wlen
        a = self._np
        if a is not None:
            a.wlen1[s] = wlen + 1
            a.uniform = None if wlen + 1 != a.uniform else a.uniform

    # -- state ------------------------------------------------------------------

    @property
    def n_inflight(self) -> int:
        return self.ring.outstanding

    @property
    def wlen(self) -> Sequence[int]:
        self._sync()
        return self._wlen

    def _sync(self) -> None:
        """Bring the per-slot lists up to date after NumPy switches of shape."""
        a = self._np
        if a is not None and a.dirty:
            self._alt[:] = a.alt.tobytes()
            self._wlen[:] = (a.wlen1.astype(a.np.int64) - 1).tolist()
            a.dirty = False

    def in_flight(self) -> list[int]:
        self._check_path(None)
        if self._np is not None:
            hw = self._np.head_wlen1
            return [self.slot_of[int(h)] for h in hw[: self.ring.size].nonzero()[0]]
        hw1 = self._hw1
        return [s for s, h in enumerate(self.heads) if hw1[h]]

    def pending(self) -> int:
        return (self._m.used16[1] - self.ring.last_used) & 0xFFFF

    def _check_path(self, numpy: bool | None) -> None:
        if self._streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        if numpy is False and self._np is not None:
            raise QueueStateError("this FixedChains is driven through the NumPy path")

    def _check_idle_slot(self, s: int) -> None:
        if not 0 <= s < self.nslots:
            raise InvalidArgument(f"slot {s} out of range (0..{self.nslots - 1})")
        a = self._np
        busy = a.head_wlen1[self.heads[s]] if a is not None else self._hw1[self.heads[s]]
        if busy:
            raise QueueStateError(f"slot {s} is in flight")

    # -- shapes -------------------------------------------------------------------

    def set_buffer(
        self, s: int, k: int, addr: int | None = None, length: int | None = None, writable: bool | None = None
    ) -> None:
        self._check_idle_slot(s)
        self._sync()
        form = self._shapes[s][self._alt[s]]
        if not 0 <= k < len(form):
            raise InvalidArgument(f"slot {s} has {len(form)} buffers, not {k + 1}")
        old = form[k]
        new = [old[0] if addr is None else addr, old[1] if length is None else length,
               old[2] if writable is None else bool(writable)]
        if not (0 <= new[1] <= 0xFFFFFFFF and 0 <= new[0] <= 0xFFFFFFFFFFFFFFFF):
            raise InvalidArgument(f"bad buffer addr=0x{new[0]:x} length={new[1]}")
        if (k and form[k - 1][2] and not new[2]) or (k + 1 < len(form) and new[2] and not form[k + 1][2]):
            raise InvalidArgument(f"slot {s}: a device-readable buffer after a writable one (§2.7.4.2)")
        form[k] = new
        if self._np is not None:
            self._np.shape_changed(self, s)
        i = self._descs[s][k]
        m = self._m
        m.desc64[2 * i] = new[0]
        m.desc32[4 * i + 2] = new[1]
        m.desc16[8 * i + 6] = (DESC_F_WRITE if new[2] else 0) | (DESC_F_NEXT if k < len(form) - 1 else 0)
        self._wlen[s] = sum(b[1] for b in form if b[2])
        if self._np is not None:
            self._np.wlen1[s] = self._wlen[s] + 1
            self._np.uniform = None

    def set_length(self, s: int, k: int, length: int) -> None:
        if (
            not 0 <= s < self.nslots
            or not 0 <= k < len(self._descs[s])
            or self._hw1[self.heads[s]]
            or self._np is not None
            or not 0 <= length <= 0xFFFFFFFF
        ):
            self.set_buffer(s, k, length=length)  # the checks and errors, the NumPy state
            return
        b = self._shapes[s][self._alt[s]][k]
        self._m.desc32[4 * self._descs[s][k] + 2] = length
        if b[2]:
            self._wlen[s] += length - b[1]
        b[1] = length

    def use_alternate(self, s: int, on: bool) -> None:
        self._check_idle_slot(s)
        if len(self._shapes[s]) < 2:
            raise InvalidArgument(f"slot {s} has no alternate chain")
        self._sync()
        v = 1 if on else 0
        if self._alt[s] != v:
            self._alt[s] = v
            self._write_slot(s)
            if self._np is not None:
                self._np.alt[s] = v
                self._np.uniform = None

    def use_alternate_many(self, slots: np.ndarray, on: np.ndarray, *, check: bool = True) -> None:
        a = self._arrays()
        if check:
            if a.head_wlen1[a.heads[slots]].any():
                raise QueueStateError("a slot given is in flight")
            if not a.has_alt:
                raise InvalidArgument("these fixed chains have no alternate shapes")
        a.switch(slots, on)

    # -- plain calls --------------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        ring = self.ring
        self._check_broken()
        self._check_path(False)
        hw1 = self._hw1
        wlen = self._wlen
        heads = self.heads
        a16 = self._m.avail16
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
        ring = self.ring
        m = self._m
        last = ring.last_used
        n = (m.used16[1] - last) & 0xFFFF
        if not n:
            return []
        self._check_broken()
        self._check_path(False)
        if n > ring.outstanding:
            self._break(f"used index moved by {n} with only {ring.outstanding} requests in flight", [], [])
        ordering.read_barrier()
        out = self._take_exact(min(n, max_n), [] if lengths is None else lengths)
        if ring.event_idx and ring.interrupts_enabled:
            m.avail16[m.used_event] = ring.last_used  # keep the next completion signalled
        return out

    def _take_exact(self, n: int, lens: list[int]) -> list[int]:
        """Validate and take the next ``n`` used entries entry by entry; raises at the first bad one."""
        ring = self.ring
        last = ring.last_used
        used32 = self._m.used32
        mask = ring.size - 1
        slot_of = self.slot_of
        hw1 = self._hw1
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
                self._break(
                    f"used length {length} for id {head} exceeds the {w - 1} device-writable bytes offered", out, lens
                )
            hw1[head] = 0
            out.append(slot_of[head])
            lens.append(length)
            last = (last + 1) & 0xFFFF
        ring.last_used = last
        ring.outstanding -= n
        return out

    def _break(self, reason: str, slots: list[int], lengths: list[int]) -> NoReturn:
        ring = self.ring
        done = len(slots)
        ring.last_used = (ring.last_used + done) & 0xFFFF
        ring.outstanding -= done
        ring.broken = reason
        raise DeviceProtocolError(f"queue {ring.index}: {reason}", list(zip(slots, lengths, strict=True)))

    # -- NumPy ----------------------------------------------------------------------

    def _arrays(self) -> _Arrays:
        if self._np is None:
            self._check_path(None)
            if self.ring.outstanding:
                raise QueueStateError("switch to the NumPy path with nothing in flight")
            self._np = _Arrays(self)
        return self._np

    def post_many(self, slots: np.ndarray, *, check: bool = True) -> bool:
        ring = self.ring
        self._check_broken()
        a = self._arrays()
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
        self._m.avail16[1] = idx
        return ring.kick_prepare()

    def reap_many(self) -> tuple[np.ndarray, np.ndarray] | None:
        ring = self.ring
        m = self._m
        last = ring.last_used
        n = (m.used16[1] - last) & 0xFFFF
        if not n:
            return None
        self._check_broken()
        a = self._arrays()
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
        return self._reap_exact(n)

    def _reap_exact(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Entry-by-entry validation of a NumPy batch: finds and reports the bad entry."""
        a = self._arrays()
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
                self._break(
                    f"used length {length} for id {head} exceeds the {int(hw[head]) - 1} device-writable bytes offered",
                    slots,
                    lens,
                )
            hw[head] = 0
            slots.append(int(a.slot_of[head]))
            lens.append(length)
        ring.last_used = (last + n) & 0xFFFF
        ring.outstanding -= n
        return a.np.asarray(slots, dtype=a.np.int64), a.np.asarray(lens, dtype=a.np.int64)

    # -- engines ------------------------------------------------------------------

    def cycle(self, depth: int, notify: Callable[[], object], *, vectorised: bool = False) -> Any:
        self._check_broken()
        self._check_path(None if vectorised else False)
        if self.ring.outstanding:
            raise QueueStateError("a cycle starts with nothing in flight")
        if not 1 <= depth <= self.nslots:
            raise InvalidArgument(f"depth must be 1..{self.nslots}, got {depth}")
        return SplitManyCycle(self, depth, notify) if vectorised else SplitCycle(self, depth, notify)

    def stream(self, notify: Callable[[], object], *, min_len: int = 0) -> SplitStream:
        self._check_broken()
        self._check_path(False)
        return SplitStream(self, notify, min_len)

    # -- interrupts, reconnect, teardown -----------------------------------------------

    def enable_interrupts(self) -> None:
        self.ring.enable_interrupts()

    def disable_interrupts(self) -> None:
        self.ring.disable_interrupts()

    def restart_base(self, resubmit: bool = True) -> int:
        self._check_path(None)
        return self.ring.restart_base(resubmit, in_flight=[self.heads[s] for s in self.in_flight()])

    def detach(self) -> None:
        ring = self.ring
        if ring.outstanding and ring.broken is None:
            raise QueueStateError(f"{ring.outstanding} slots still in flight")
        if self._streaming:
            raise QueueStateError("close the stream first")
        ring.give_back_descriptors(self._descs)
        self._descs = []
        self._np = None


class SplitCycle:
    """The closed loop of :meth:`SplitFixedChains.cycle`, in plain Python (one call per pass)."""

    def __init__(self, fc: SplitFixedChains, depth: int, notify: Callable[[], object]) -> None:
        ring = fc.ring
        m = fc._m
        self._fc = fc
        self._ring = ring
        self._notify = notify
        self._depth = depth
        self._a16 = m.avail16
        self._u16 = m.used16
        self._u32 = m.used32
        self._used_event = m.used_event
        self._avail_event = m.avail_event
        self._event_idx = ring.event_idx
        self._signals = ring.interrupts_enabled  # read once: the interrupt mode of the whole loop
        self._size = ring.size
        self._heads = fc.heads
        self._slot_of = fc.slot_of
        self._hw1 = fc._hw1
        self._wlen = fc._wlen
        self._spares = list(range(fc.nslots))  # prepared, not published; oldest first
        self.posted: list[int] = []
        self.kicks = 0

    def turn(self) -> list[int] | None:
        ring = self._ring
        last = ring.last_used
        u16 = self._u16
        n = (u16[1] - last) & 0xFFFF
        out = ring.outstanding
        depth = self._depth
        if not n and out == depth:
            return None
        if ring.broken is not None:
            self._fc._check_broken()
        if n > out:
            self._fc.reap_slots()  # raises: the used index moved by more than is in flight
        size = self._size
        mask = size - 1
        heads = self._heads
        spares = self._spares
        # 1. Publish one spare per completion seen (and any shortfall), decide the kick.
        want = n + depth - out
        posted = spares[:want]
        if posted:
            del spares[:want]
            a16 = self._a16
            idx = ring.avail_idx
            for s in posted:
                a16[2 + (idx & mask)] = heads[s]
                idx = (idx + 1) & 0xFFFF
            if not ordering.STRONGLY_ORDERED:
                ordering.write_barrier()
            a16[1] = idx
            ring.avail_idx = idx
            # The kick decision (virtio 1.2 §2.7.10), as SplitQueue.kick_prepare.
            if self._event_idx:
                ue = self._used_event
                if self._signals:
                    a16[ue] = (last + n) & 0xFFFF  # signal the next completion after this batch
                elif (a16[ue] - last) & 0xFFFF < 0x8000:
                    a16[ue] = (last - size - 1) & 0xFFFF
                ordering.fence_acquire()
                ordering.fence_release()
                need = ((idx - u16[self._avail_event] - 1) & 0xFFFF) < ((idx - ring.kick_from) & 0xFFFF)
            else:
                ordering.fence_acquire()
                ordering.fence_release()
                need = not u16[0] & 1
            ring.kick_from = idx
            if need:
                self._notify()
                self.kicks += 1
            out += len(posted)
        self.posted = posted
        # 2. Check the completions (the spares just published are not in flight yet).
        done: list[int] = []
        hw1 = self._hw1
        if n:
            if not ordering.STRONGLY_ORDERED:
                ordering.read_barrier()
            u32 = self._u32
            slot_of = self._slot_of
            pos = last
            for _ in range(n):
                i = 1 + 2 * (pos & mask)
                head = u32[i]
                # hw1[head]: writable bytes + 1 if in flight, else 0 (also after its
                # first completion in this batch: a duplicate fails).
                if head >= size or u32[i + 1] >= hw1[head]:
                    self._violation(posted, done, out, n)
                hw1[head] = 0
                done.append(slot_of[head])
                pos = (pos + 1) & 0xFFFF
            ring.last_used = pos
            out -= n
            spares += done
        # 3. What was published is in flight from now on.
        wlen = self._wlen
        for s in posted:
            hw1[heads[s]] = wlen[s] + 1
        ring.outstanding = out
        return done

    def _violation(self, posted: list[int], done: list[int], out: int, n: int) -> NoReturn:
        """A used entry of the batch of ``n`` broke a rule: undo the check, re-run it entry by entry (it raises).

        The spares published in this turn are marked in flight only afterwards,
        as on the fast path: the batch cannot name them.
        """
        fc = self._fc
        hw1 = self._hw1
        for s in done:
            hw1[fc.heads[s]] = fc._wlen[s] + 1
        self._ring.outstanding = out - len(posted)
        try:
            fc._take_exact(n, [])  # raises DeviceProtocolError naming the entry
        finally:
            for s in posted:
                hw1[fc.heads[s]] = fc._wlen[s] + 1
            self._ring.outstanding += len(posted)
        raise AssertionError("the exact check accepted a batch the cycle rejected")


class SplitManyCycle:
    """The closed loop of :meth:`SplitFixedChains.cycle` in array operations (a fixed number per pass).

    Spare slots are a circular queue in one array (slices, no copies but at
    the wrap), so a device that completes in order sees them published in a
    fixed cyclic order (docs/benchmarks.md §1.1: it keeps the device's reads
    of request headers sequential). Each array operation costs ~0.2-0.7 us
    whatever its size: used ids are converted to intp once, bounds are
    uint32 like the used lengths, ring positions are slices.
    """

    def __init__(self, fc: SplitFixedChains, depth: int, notify: Callable[[], object]) -> None:
        a = fc._arrays()
        ring = fc.ring
        m = fc._m
        np = a.np
        self._fc = fc
        self._a = a
        self._ring = ring
        self._notify = notify
        self._depth = depth
        self._nslots = fc.nslots
        self._a16 = m.avail16
        self._u16 = m.used16
        self._used_event = m.used_event
        self._avail_event = m.avail_event
        self._event_idx = ring.event_idx
        self._signals = ring.interrupts_enabled
        self._size = ring.size
        self._ident = fc.heads_are_slots
        self._rq = np.arange(fc.nslots, dtype=np.intp)  # spares: rq[rh], rq[rh + 1] ... (nr of them, cyclic)
        self._rh = 0
        self._nr = fc.nslots
        self.posted: Any = self._rq[:0]
        self.kicks = 0

    def turn(self) -> Any:
        ring = self._ring
        last = ring.last_used
        u16 = self._u16
        n = (u16[1] - last) & 0xFFFF
        out = ring.outstanding
        depth = self._depth
        if not n and out == depth:
            return None
        if ring.broken is not None:
            self._fc._check_broken()
        a = self._a
        if n > out:
            self._fc.reap_many()  # raises: the used index moved by more than is in flight
        size = self._size
        mask = size - 1
        nslots = self._nslots
        rq = self._rq
        rh = self._rh
        nr = self._nr
        # 1. Publish one spare per completion seen (and any shortfall), decide the kick.
        k = n + depth - out
        if k > nr:
            k = nr
        if k:
            if rh + k <= nslots:
                posted = rq[rh : rh + k]
            else:
                posted = a.np.concatenate((rq[rh:], rq[: rh + k - nslots]))
            rh = (rh + k) % nslots
            nr -= k
            ph = posted if self._ident else a.heads[posted]
            idx = ring.avail_idx
            start = idx & mask
            avail = a.avail
            if start + k <= size:
                avail[2 + start : 2 + start + k] = ph
            else:
                cut = size - start
                avail[2 + start : 2 + size] = ph[:cut]
                avail[2 : 2 + k - cut] = ph[cut:]
            idx = (idx + k) & 0xFFFF
            if not ordering.STRONGLY_ORDERED:
                ordering.write_barrier()
            a16 = self._a16
            a16[1] = idx
            ring.avail_idx = idx
            if self._event_idx:  # the kick decision (virtio 1.2 §2.7.10), as SplitQueue.kick_prepare
                ue = self._used_event
                if self._signals:
                    a16[ue] = (last + n) & 0xFFFF
                elif (a16[ue] - last) & 0xFFFF < 0x8000:
                    a16[ue] = (last - size - 1) & 0xFFFF
                ordering.fence_acquire()
                ordering.fence_release()
                need = ((idx - u16[self._avail_event] - 1) & 0xFFFF) < ((idx - ring.kick_from) & 0xFFFF)
            else:
                ordering.fence_acquire()
                ordering.fence_release()
                need = not u16[0] & 1
            ring.kick_from = idx
            if need:
                self._notify()
                self.kicks += 1
            out += k
        else:
            posted = ph = rq[:0]
        self.posted = posted
        # 2. Check the batch. hw[h]: writable bytes + 1 if h heads a slot in flight,
        #    else 0 (the spares just published are not marked yet); ids out of range
        #    clip to a permanent 0.
        hw = a.head_wlen1
        if n:
            if not ordering.STRONGLY_ORDERED:
                ordering.read_barrier()
            start = last & mask
            pos = a.idx2[start : start + n]
            ids = a.used_id[pos].astype(a.intp)
            if a.count_nonzero(a.used_len[pos] >= hw.take(ids, mode="clip")):
                self._violation(posted, k, out, n)
            hw[ids] = 0
            if a.count_nonzero(hw) != out - k - n:  # an id twice in the batch
                hw[ids] = a.wlen1[a.slot_of[ids]]
                self._violation(posted, k, out, n)
            ring.last_used = (last + n) & 0xFFFF
            out -= n
            slots = ids if self._ident else a.slot_of[ids]
            # The batch's slots join the spares at the back (never over the slots just published).
            tail = (rh + nr) % nslots
            if tail + n <= nslots:
                rq[tail : tail + n] = slots
            else:
                cut = nslots - tail
                rq[tail:] = slots[:cut]
                rq[: n - cut] = slots[cut:]
            nr += n
        else:
            slots = rq[:0]
        # 3. What was published is in flight from now on.
        if k:
            w1 = a.uniform
            hw[ph] = a.wlen1[posted] if w1 is None else w1
        self._rh = rh
        self._nr = nr
        ring.outstanding = out
        return slots

    def _violation(self, posted: Any, k: int, out: int, n: int) -> NoReturn:
        """A batch of ``n`` broke a rule: re-run it entry by entry (it raises), then mark the spares published."""
        a = self._a
        self._ring.outstanding = out - k
        try:
            self._fc._reap_exact(n)  # raises DeviceProtocolError naming the entry
        finally:
            if k:
                a.head_wlen1[a.heads[posted]] = a.wlen1[posted]
            self._ring.outstanding += k
        raise AssertionError("the exact check accepted a batch the cycle rejected")


class SplitStream:
    """Every slot a one-buffer chain at its own avail position, all in flight (:meth:`SplitFixedChains.stream`).

    Slot p's head sits at avail position p for good (or, when every slot was
    already in flight, wherever the ring published them: read back once and
    checked to hold each head once), so re-posting the n slots just reaped
    puts the same heads at the same positions: one avail index store. A
    device that completes in order writes at used position p the head
    published at avail position p; each batch is compared with those
    expected entries in bulk (:meth:`peek`: the (id, length 0) pairs, one
    ``bytes ==``; :meth:`peek_many`: ids and length bounds in NumPy).
    Anything else is -1 / ``()`` and stays in the used ring: the caller
    closes the stream and ``reap_slots`` takes over, which raises on a
    violation and accepts a legal out-of-order batch.
    """

    def __init__(self, fc: SplitFixedChains, notify: Callable[[], object], min_len: int) -> None:
        ring = fc.ring
        size = ring.size
        m = fc._m
        if fc.nslots != size or any(len(d) != 1 for d in fc._descs):
            raise InvalidArgument("a stream needs one one-buffer slot per ring descriptor")
        a16 = m.avail16
        if ring.outstanding == 0:
            for pos in range(size):
                a16[2 + pos] = fc.heads[pos]  # slot p lives at avail position p for the whole run
        elif ring.outstanding == size:
            exp = [a16[2 + pos] for pos in range(size)]  # what the ring published
            if sorted(exp) != sorted(fc.heads):
                raise InvalidArgument("the ring's avail entries are not one of each slot's head")
        else:
            raise QueueStateError("a stream starts with no slot or every slot in flight")
        self._fc = fc
        self._ring = ring
        self._notify = notify
        self._size = size
        self._min_len = min_len
        self._a16 = a16
        self._u16 = m.used16
        self._used_b = m.used32.cast("B")  # [flags/idx: 4 bytes][ring: 8 bytes per entry]...
        self._avail_event = m.avail_event
        self._event_idx = ring.event_idx
        self._expected = [a16[2 + pos] for pos in range(size)]  # the head expected at each used position
        self._exp_bytes = b"".join(h.to_bytes(4, "little") + bytes(4) for h in self._expected)
        self._many: _StreamArrays | None = None
        self.kicks = 0
        fc._streaming = True

    def peek(self) -> int:
        ring = self._ring
        last = ring.last_used
        n = (self._u16[1] - last) & 0xFFFF
        if not n:
            return 0
        if n > ring.outstanding:
            return -1
        if not ordering.STRONGLY_ORDERED:
            ordering.read_barrier()
        size = self._size
        ub = self._used_b
        exp = self._exp_bytes
        start = last & (size - 1)
        end = start + n
        if end <= size:
            ok = ub[4 + 8 * start : 4 + 8 * end] == exp[8 * start : 8 * end]
        else:
            end -= size
            ok = ub[4 + 8 * start : 4 + 8 * size] == exp[8 * start :] and ub[4 : 4 + 8 * end] == exp[: 8 * end]
        return n if ok else -1

    def peek_many(self) -> tuple[Any, ...] | None:
        ring = self._ring
        last = ring.last_used
        n = (self._u16[1] - last) & 0xFFFF
        if not n:
            return None
        if n > ring.outstanding:
            return ()
        t = self._many
        if t is None:
            t = self._many = _StreamArrays(self._fc, self._expected)
        if not ordering.STRONGLY_ORDERED:
            ordering.read_barrier()
        size = self._size
        start = last & (size - 1)
        end = start + n
        ids, lens, exp = t.ids, t.lens, t.exp
        if end <= size:
            if not t.array_equal(ids[start:end], exp[start:end]):
                return ()
            got = lens[start:end]
            slots = t.slot_at[start:end]
        else:
            end -= size
            if not (t.array_equal(ids[start:], exp[start:]) and t.array_equal(ids[:end], exp[:end])):
                return ()
            got = t.np.concatenate((lens[start:], lens[:end]))
            slots = t.np.concatenate((t.slot_at[start:], t.slot_at[:end]))
        if int(got.max()) >= t.max_len1 or int(got.min()) < self._min_len:
            return ()
        return slots, got

    def advance(self, n: int) -> None:
        ring = self._ring
        if n:
            ring.last_used = (ring.last_used + n) & 0xFFFF
            ring.outstanding -= n
        free = self._size - ring.outstanding
        if not free:
            return
        idx = (ring.avail_idx + free) & 0xFFFF
        ring.outstanding = self._size
        ring.avail_idx = idx
        if not ordering.STRONGLY_ORDERED:
            ordering.write_barrier()
        u16 = self._u16
        self._a16[1] = idx
        ordering.fence_acquire()
        ordering.fence_release()
        if self._event_idx:
            need = ((idx - u16[self._avail_event] - 1) & 0xFFFF) < ((idx - ring.kick_from) & 0xFFFF)
        else:
            need = not u16[0] & 1
        ring.kick_from = idx
        if need:
            self._notify()
            self.kicks += 1

    def close(self) -> None:
        """Back to the plain path: the slots at positions [last used, avail index) are in flight."""
        fc = self._fc
        if not fc._streaming:
            return
        ring = self._ring
        size = self._size
        fc._streaming = False
        inflight = {(ring.last_used + k) & (size - 1) for k in range(ring.outstanding)}
        hw1 = fc._hw1
        for pos in range(size):
            h = self._expected[pos]
            hw1[h] = fc._wlen[fc.slot_of[h]] + 1 if pos in inflight else 0


class _StreamArrays:
    """The NumPy views of a :class:`SplitStream`."""

    def __init__(self, fc: SplitFixedChains, expected: list[int]) -> None:
        import numpy as np

        size = fc.ring.size
        used = np.frombuffer(fc._m.used32, dtype="<u4", count=1 + 2 * size)
        self.np = np
        self.array_equal = np.array_equal
        self.ids = used[1::2]
        self.lens = used[2::2]
        self.exp = np.asarray(expected, dtype=np.uint32)
        self.slot_at = np.asarray([fc.slot_of[h] for h in expected], dtype=np.intp)
        self.max_len1 = min(fc._wlen) + 1  # the smallest writable buffer of a slot bounds every length


class _Arrays:
    """The NumPy state of a :class:`SplitFixedChains` (one per FixedChains, built at its first NumPy call)."""

    def __init__(self, fc: SplitFixedChains) -> None:
        import numpy as np

        ring = fc.ring
        size = ring.size
        m = fc._m
        self.np = np
        self.intp = np.intp
        self.count_nonzero = np.count_nonzero
        used = np.frombuffer(m.used32, dtype="<u4", count=1 + 2 * size)
        idx2 = np.arange(2 * size, dtype=np.int64) & (size - 1)
        # The used ring's lengths are uint32: comparing them with uint32 is
        # cheaper than with int64 (no conversion), when every bound fits.
        bound = max(sum(b[1] for b in form if b[2]) for forms in fc._shapes for form in forms) + 1
        wdt: Any = np.uint32 if bound <= 0xFFFFFFFF else np.int64
        self.wdt = wdt
        self.avail = np.frombuffer(m.avail16, dtype="<u2")  # flags, idx, ring[size], used_event
        self.used_id = used[1::2]
        self.used_len = used[2::2]
        self.heads = np.asarray(fc.heads, dtype=np.int64)
        self.slot_of = np.asarray(fc.slot_of + [-1], dtype=np.int64)
        self.wlen1 = np.asarray([w + 1 for w in fc._wlen], dtype=wdt)  # per slot: writable bytes + 1
        self.head_wlen1 = np.zeros(size + 1, dtype=wdt)
        hw1 = fc._hw1
        for h in range(size):
            self.head_wlen1[h] = hw1[h]
        w = set(fc._wlen)
        self.uniform: int | None = w.pop() + 1 if len(w) == 1 else None
        self.idx2 = idx2  # ring positions of k indices from i: idx2[i & mask : (i & mask) + k]
        self.avail_pos2 = idx2 + 2
        self.alt = np.frombuffer(bytes(fc._alt), dtype=np.uint8).copy()
        self.has_alt = all(len(forms) == 2 for forms in fc._shapes)
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
        m = fc._m
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
        nbuf = len(fc._shapes[0][0])
        if any(len(forms[0]) != nbuf for forms in fc._shapes):
            raise InvalidArgument("use_alternate_many needs every slot with as many buffers")
        for k in range(nbuf):
            last = k == nbuf - 1
            for view, scale, off, get, dt in fields:
                v0 = [get(forms[0][k], last) for forms in fc._shapes]
                v1 = [get(forms[1][k], last) for forms in fc._shapes]
                if v0 == v1:
                    continue
                index = np.asarray([scale * d[k] + off for d in fc._descs], dtype=np.intp)
                c0: Any = v0[0] if len(set(v0)) == 1 else np.asarray(v0, dtype=dt)
                c1: Any = v1[0] if len(set(v1)) == 1 else np.asarray(v1, dtype=dt)
                out.append((view, index, c0, c1))
        w0 = [sum(b[1] for b in forms[0] if b[2]) + 1 for forms in fc._shapes]
        w1 = [sum(b[1] for b in forms[1] if b[2]) + 1 for forms in fc._shapes]
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


__all__ = ["SplitCycle", "SplitFixedChains", "SplitManyCycle", "SplitStream"]
