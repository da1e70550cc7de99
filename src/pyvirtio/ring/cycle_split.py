"""The engines' closed loops on a split ring: the cycles of :class:`~pyvirtio.ring.fixed_split.SplitFixedChains`.

Theory of operation (the contract: :mod:`pyvirtio.ring.fixed`, ``Cycle`` and
``Stream``). These objects are the ring's batch fast path for a closed loop:
they keep the ring's shadow indices (``avail_idx``, ``last_used``,
``outstanding``, ``kick_from``) and the fixed chains' in-flight table
(``hw1``: writable bytes + 1 per head in flight, else 0) current after every
call, so the plain calls, the ring's ``kick_prepare`` and ``restart_base``
can take over at any time.

:class:`SplitCycle` (plain Python, its loop a generator whose locals
outlive each pass; ``stepper()`` hands out its ``send``) and
:class:`SplitManyCycle` (NumPy) each turn: (1) publish one spare per
completion seen, one avail index store (virtio 1.2 §2.7.13), and make the
kick decision (§2.7.10: VRING_USED_F_NO_NOTIFY, or avail_event with
EVENT_IDX); (2) validate the
batch of used entries (§2.7.8: id in range and heading a slot in flight,
length within the slot's device-writable bytes; a duplicate fails because
its first occurrence cleared the entry); (3) mark the slots just published
in flight, only now, so an entry naming one of them is rejected. On any
anomaly the batch is re-run entry by entry by the fixed chains
(``take_exact`` / ``reap_exact``), which raise
:class:`~pyvirtio.errors.DeviceProtocolError` naming the entry with the
completions validated before it.

The stream, every slot at its own avail position: :mod:`pyvirtio.ring.stream_split`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from pyvirtio.ring import ordering
from pyvirtio.ring.ordering import STRONGLY_ORDERED

if TYPE_CHECKING:
    from pyvirtio.ring.fixed_split import SplitFixedChains


class _HandBack(Exception):
    """Thrown into the split cycle's loop by :meth:`SplitCycle.sync`: write the shadow indices back."""


class SplitCycle:
    """The closed loop of :meth:`SplitFixedChains.cycle`, in plain Python (one ``send`` of its generator per pass).

    Between passes the loop holds the ring's shadow indices in its locals
    (see :meth:`_steps`); :meth:`sync` hands them back to the ring, and the
    next pass takes them up again. The fixed chains call it before any call
    of their own, so the plain calls always see the truth.
    """

    def __init__(self, fc: SplitFixedChains, depth: int, notify: Callable[[], object]) -> None:
        ring = fc.ring
        m = fc.mem
        self._fc = fc
        self._ring = ring
        self._notify = notify
        self._depth = depth
        self._a16 = m.avail16
        self._u16 = m.used16
        self._u32 = m.used32
        self._used_event = m.used_event
        self._avail_event = m.avail_event if ring.event_idx else -1
        self._signals = ring.interrupts_enabled  # read once: the interrupt mode of the whole loop
        self._size = ring.size
        self._heads = fc.heads
        self._slot_of = fc.slot_of
        self.hw1 = fc.hw1
        self.slot_wlen = fc.slot_wlen
        self._spares = list(range(fc.nslots))  # prepared, not published; oldest first
        self.posted: list[int] = []
        #: Kicks sent so far: current after an idle turn and after :meth:`sync`.
        self.kicks = 0
        self._held = False  # the loop holds the shadow indices (not the ring)
        self._start()

    def turn(self, spins: int = 1) -> list[int] | None:
        try:
            return self._send(spins)
        except StopIteration:  # the loop ended on an exception: a new one starts from the ring's state
            self._start()
            return self._send(spins)

    def stepper(self) -> Callable[[int], list[int] | None]:
        """:meth:`turn` as a bare callable: the loop's ``send`` (see :meth:`_steps`); after it raised, use turn."""
        return self._send

    def sync(self) -> None:
        """Write the shadow indices and the kick count back to the ring and this object; the next turn takes
        them up again. Cheap if already done."""
        if self._held:
            self._held = False
            try:
                self._throw(_HandBack)
            except (_HandBack, StopIteration):  # the loop had ended (on an exception, the ring's state written)
                pass

    def _start(self) -> None:
        steps = self._steps()
        next(steps)
        self._send = steps.send
        self._throw = steps.throw

    def _hand_back(self, last: int, out: int, idx: int, kf: int, kicks: int) -> None:
        """The loop's state to the ring (before an exact path or an error leaves the loop)."""
        ring = self._ring
        ring.last_used = last
        ring.outstanding = out
        ring.avail_idx = idx
        ring.kick_from = kf
        self.kicks = kicks
        self._held = False

    def _steps(self) -> Generator[list[int] | None, int, None]:
        """The cycle as a generator: one pass per ``send(spins)``.

        Its locals are the loop's state and outlive each pass, so a pass
        loads nothing from an object and stores nothing to one but the ring
        and ``posted``: the work between a kick and the next poll is on the
        QD1 round trip (docs/benchmarks.md §1.2, §7; against
        qemu-storage-daemon 0.7 us more of it cost 40% of QD1), and each
        attribute load or store costs ~15-20 ns. The ring's shadow indices
        (``last_used``, ``outstanding``, ``avail_idx``, ``kick_from``) live
        in these locals from the first pass on; :meth:`sync` throws
        :class:`_HandBack` in, which writes them back and parks the loop
        until the next pass reads them again. Every way out of the loop on
        an error writes them back first.
        """
        ring = self._ring
        fc = self._fc
        u16 = self._u16
        u32 = self._u32
        a16 = self._a16
        depth = self._depth
        spares = self._spares
        heads = self._heads
        slot_of = self._slot_of
        hw1 = self.hw1
        wlen = self.slot_wlen
        size = self._size
        mask = size - 1
        avail_event = self._avail_event  # -1 without EVENT_IDX
        used_event = self._used_event
        # The used_event hint with each batch published: none (no EVENT_IDX), the next completion (device
        # signals on), or kept behind the used index (off, as kick_prepare).
        hint = 0 if avail_event < 0 else 1 if self._signals else 2
        notify = self._notify
        fence, fence_end = ordering.private_fence()
        spins = yield None
        fc.check_broken()
        last = ring.last_used
        out = ring.outstanding
        idx = ring.avail_idx
        kf = ring.kick_from
        kicks = self.kicks
        self._held = True
        while True:
            n = (u16[1] - last) & 0xFFFF
            if not n and out == depth:
                while spins > 1:  # poll again without leaving the pass (an idle poll stores nothing)
                    spins -= 1
                    n = (u16[1] - last) & 0xFFFF
                    if n:
                        break
                else:
                    self.kicks = kicks
                    if ring.broken is not None:  # closed or broken by another path: say so, the state handed back
                        self._hand_back(last, out, idx, kf, kicks)
                        fc.check_broken()
                    try:
                        spins = yield None
                    except _HandBack:
                        last, out, idx, kf, kicks, spins = yield from self._parked(last, out, idx, kf, kicks)
                    continue
            if n > out:
                self._hand_back(last, out, idx, kf, kicks)
                fc.reap_slots()  # raises: the used index moved by more than is in flight
            # 1. Publish one spare per completion seen (and any shortfall), decide the kick.
            want = n + depth - out
            posted = spares[:want]
            if posted:
                del spares[:want]
                for s in posted:
                    a16[2 + (idx & mask)] = heads[s]
                    idx = (idx + 1) & 0xFFFF
                if hint == 1:
                    # Signals on: the next completion after this batch is wanted, and the device sees so
                    # with the new request (stored before the avail index). Written after the kick, it
                    # raced the device: a device done first read the old hint and did not signal, and
                    # qemu-storage-daemon then slept more often (QD1, 20 rounds: 165k against 255k IOPS,
                    # docs/benchmarks.md §7).
                    a16[used_event] = (last + n) & 0xFFFF
                if not STRONGLY_ORDERED:
                    ordering.write_barrier()
                a16[1] = idx
                # The kick decision (virtio 1.2 §2.7.10), as SplitQueue.kick_prepare: the fence's
                # first half (a locked compare-and-swap, a full fence on x86-64) orders the avail
                # index store before the reads below; its second half comes after the kick.
                fence()
                try:
                    if (
                        ((idx - u16[avail_event] - 1) & 0xFFFF) < ((idx - kf) & 0xFFFF)
                        if hint
                        else not u16[0] & 1
                    ):
                        notify()
                        kicks += 1
                except BaseException:
                    fence_end()
                    self._hand_back(last, out, idx, idx, kicks)  # published, not yet in flight (as before a kick)
                    raise
                fence_end()
                kf = idx
                if hint == 2 and (a16[used_event] - last) & 0xFFFF < 0x8000:
                    a16[used_event] = (last - size - 1) & 0xFFFF  # signals off: as kick_prepare
                out += len(posted)
            self.posted = posted
            # 2. Check the completions (the spares just published are not in flight yet).
            done: list[int] = []
            if n:
                if not STRONGLY_ORDERED:
                    ordering.read_barrier()
                pos = last
                for _ in range(n):
                    i = 1 + 2 * (pos & mask)
                    head = u32[i]
                    # hw1[head]: writable bytes + 1 if in flight, else 0 (also after its
                    # first completion in this batch: a duplicate fails).
                    if head >= size or u32[i + 1] >= hw1[head]:
                        self._hand_back(last, out, idx, kf, kicks)
                        done = self._exact(posted, done, out, n)  # raises, or clamped lengths were accepted
                        self._held = True
                        pos = (last + n) & 0xFFFF
                        break
                    hw1[head] = 0
                    done.append(slot_of[head])
                    pos = (pos + 1) & 0xFFFF
                last = pos
                out -= n
                spares += done
            # 3. What was published is in flight from now on.
            for s in posted:
                hw1[heads[s]] = wlen[s] + 1
            try:
                spins = yield done
            except _HandBack:
                last, out, idx, kf, kicks, spins = yield from self._parked(last, out, idx, kf, kicks)

    def _parked(
        self, last: int, out: int, idx: int, kf: int, kicks: int
    ) -> Generator[None, int, tuple[int, int, int, int, int, int]]:
        """:meth:`sync`: the state to the ring, the loop parked until the next pass, which takes it up again."""
        self._hand_back(last, out, idx, kf, kicks)
        spins = yield None
        self._fc.check_broken()
        ring = self._ring
        self._held = True
        return ring.last_used, ring.outstanding, ring.avail_idx, ring.kick_from, self.kicks, spins

    def _exact(self, posted: list[int], done: list[int], out: int, n: int) -> list[int]:
        """A used entry of the batch of ``n`` failed the quick check: undo it, re-run the batch entry by entry.

        That raises DeviceProtocolError naming the entry, or, on a ring that
        tolerates overlong used lengths (``clamp_used_len``), returns the
        batch's slots with those lengths clamped. The spares published in this
        turn are marked in flight only afterwards, as on the fast path: the
        batch cannot name them. The ring holds the shadow indices (the loop
        handed them back), so ``take_exact`` moves them; the caller goes on
        with the loop's own arithmetic, which matches.
        """
        fc = self._fc
        hw1 = self.hw1
        for s in done:
            hw1[fc.heads[s]] = fc.slot_wlen[s] + 1
        self._ring.outstanding = out - len(posted)
        try:
            return fc.take_exact(n, [])
        finally:
            for s in posted:
                hw1[fc.heads[s]] = fc.slot_wlen[s] + 1
            self._ring.outstanding += len(posted)


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
        a = fc.arrays()
        ring = fc.ring
        m = fc.mem
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

    def sync(self) -> None:
        """Nothing to hand back: the ring's shadow indices are current after every turn."""

    def stepper(self) -> Callable[[int], Any]:
        return self.turn

    def turn(self, spins: int = 1) -> Any:
        ring = self._ring
        last = ring.last_used
        u16 = self._u16
        n = (u16[1] - last) & 0xFFFF
        out = ring.outstanding
        depth = self._depth
        if not n and out == depth:
            while spins > 1:  # poll again with everything in locals (an idle pass costs a few stores)
                spins -= 1
                n = (u16[1] - last) & 0xFFFF
                if n:
                    break
            else:
                if ring.broken is not None:  # closed or broken by another path
                    self._fc.check_broken()
                return None
        if ring.broken is not None:
            self._fc.check_broken()
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
            if start + n <= size:
                # No wrap: strided views of the used ring instead of two gathers. The ids are
                # copied (astype) before use; the lengths are read once, by this comparison.
                ids = a.used_id[start : start + n].astype(a.intp)
                lens = a.used_len[start : start + n]
            else:
                pos = a.idx2[start : start + n]
                ids = a.used_id[pos].astype(a.intp)
                lens = a.used_len[pos]
            bad = bool(a.count_nonzero(lens >= hw.take(ids, mode="clip")))
            if not bad:
                hw[ids] = 0
                if a.count_nonzero(hw) != out - k - n:  # an id twice in the batch
                    hw[ids] = a.wlen1[a.slot_of[ids]]
                    bad = True
            if bad:
                slots = self._exact(posted, k, out, n)  # raises, or clamped lengths were accepted
            else:
                slots = ids if self._ident else a.slot_of[ids]
            ring.last_used = (last + n) & 0xFFFF
            out -= n
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

    def _exact(self, posted: Any, k: int, out: int, n: int) -> Any:
        """A batch of ``n`` failed the array check: re-run it entry by entry, then mark the spares published.

        That raises DeviceProtocolError naming the entry, or (``clamp_used_len``)
        returns the batch's slots with overlong lengths clamped.
        """
        a = self._a
        self._ring.outstanding = out - k
        try:
            slots, _lens = self._fc.reap_exact(n)
        finally:
            if k:
                a.head_wlen1[a.heads[posted]] = a.wlen1[posted]
            self._ring.outstanding += k
        return slots.astype(a.intp)


__all__ = ["SplitCycle", "SplitManyCycle"]
