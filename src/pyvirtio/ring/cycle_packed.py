"""The engines' closed loop on a packed ring: the cycle of :class:`~pyvirtio.ring.fixed_packed.PackedFixedChains`.

Theory of operation (the contract: :mod:`pyvirtio.ring.fixed`, ``Cycle`` and
``Stream``; the ring memory and checks: :mod:`pyvirtio.ring.fixed_packed`).
Both keep the packed ring's shadow state current after every call, so the
plain calls, ``pending`` and ``restart_base`` can take over at any time.

:class:`PackedCycle` turns (with more than one request in flight; with
one, steps 3 then 2, or at QD1 the lane below): (1) count the used
descriptors at the used position, following their ids, or n descriptors
at a time when every slot has n (nothing checked yet: the count only sizes
step 2, and every slot fits the ring at once);
(2) publish one spare per
completion counted (and any shortfall): when every slot has as many
descriptors, the slots' prepared descriptors in one store (two across the
end of the ring, each descriptor with the bits of the lap it lies in:
:meth:`PackedFixedChains.across
<pyvirtio.ring.fixed_packed.PackedFixedChains.across>`), the first slot's
head "not available", every other slot whole, then the first head's flags
(§2.8.21.1: a batch is exposed by its first descriptor's flags, written
last; the device starts processing there, §2.8 device requirements), otherwise
:meth:`PackedFixedChains.publish
<pyvirtio.ring.fixed_packed.PackedFixedChains.publish>`; then one kick
decision from the device's event suppression structure (§2.8.10); (3) take
the used descriptors, checked as the fixed chains' reap checks them
(§2.8.4, §2.8.6: wrap bits, id in flight, length within the slot's
device-writable bytes), inlined: the counted ones, when every slot has the
same number of descriptors, in bulk (their ids and lengths read through
strided views, two each across the end of the ring, one sufficient
test for the batch: in flight, each once, every length within the
smallest writable size among them), else, or when that test fails, one by
one; on any anomaly the entries taken in this
turn are put back and :meth:`PackedFixedChains.take
<pyvirtio.ring.fixed_packed.PackedFixedChains.take>` re-runs them, which
raises :class:`~pyvirtio.errors.DeviceProtocolError` naming the bad one with
the completions validated before it (or clamps, ``clamp_used_len``). With
interrupts on, the driver's event for the next used descriptor is written
last (as the split cycle's used_event: a device that completes before it
sees the old event and does not signal).

Publishing before checking is what the split cycle does (its used index
says how many completed): the device works on the new batch while this
side checks and books the last one, where checking first put the whole
reap on the round trip (docs/benchmarks.md §7, "where the packed driver's
time goes"). It is the order of a turn that starts with more than one
request in flight; with one (QD1) there is no batch to overlap and the
count costs more than it hides on a fast device, so that turn checks
first and publishes after, as before. At QD1 (``depth`` 1) a lane of its
own publishes the next request first after all: the one used descriptor's
successor (where the request goes) is looked at instead of counting, the
request is one image store and its head's flags, and the completion is
checked after the kick decision, the new slot out of flight meanwhile
(docs/benchmarks.md §7: DPDK's vhost_blk, packed/split at QD1 0.905 and
0.743 checking first, 1.025 with the lane). Where the request would cross
the end of the ring, or the successor is used too, the turn goes the
general way.

Two guarantees of checking first are kept. The counted entries were used
before the new slots were published, so they must not name one: the new
slots' tokens stay idle (not in flight) until the counted entries are
checked, and the fixed chains' take, on the anomaly path, is bounded to
them too. After them the new slots are in flight (a fast device may have
used them already). And when every request in flight is counted, a used
descriptor after them would lie in the free part of the ring that step 2
overwrites: if there is one, step 2 publishes nothing (not even a
shortfall), and step 3 walks on to it and raises. A turn that raises has
published its spares: they are in flight (``in_flight``), nothing is
lost. With ``vectorised`` it hands out NumPy
arrays (the work stays per descriptor).

The stream, one slot per ring descriptor: :mod:`pyvirtio.ring.stream_packed`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from pyvirtio.ring import ordering
from pyvirtio.spec.ring import (
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_DESC_F_WRAP_BITS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_MASK,
    RING_EVENT_WRAP_SHIFT,
)

if TYPE_CHECKING:
    from pyvirtio.ring.fixed_packed import PackedFixedChains

AVAIL = PACKED_DESC_F_AVAIL
USED = PACKED_DESC_F_USED
FLIP = PACKED_DESC_F_WRAP_BITS
WRITE = DESC_F_WRITE
_PUBLISH_FIRST = (False, True)  # the order of a turn's two steps: check the completions?
_CHECK_FIRST = (True, False)


class PackedCycle:
    """The closed loop of :meth:`PackedFixedChains.cycle` (one call per pass; see the module docstring)."""

    def __init__(self, fc: PackedFixedChains, depth: int, notify: Callable[[], object], vectorised: bool) -> None:
        ring = fc.ring
        sh = fc.sh
        self._fc = fc
        self._ring = ring
        self._notify = notify
        self._depth = depth
        self._desc = sh.desc
        self._fl = sh.flags
        self._ids = sh.ids
        self._lv = sh.lens
        self._o16 = fc.o16
        self._dev16 = sh.device16
        self._drv16 = sh.driver16
        self._tokens = sh.tokens
        self._idle = sh.idle
        self._wlen = sh.wlen
        self._nd = sh.ndescs
        self._stash = sh.stash
        self._size = ring.size
        self._event_idx = ring.event_idx
        self._weak = not ordering.STRONGLY_ORDERED  # barriers are instructions only there (ordering.py)
        self._signals = ring.interrupts_enabled and ring.event_idx  # read once: the interrupt mode of the whole loop
        self._spares = list(range(fc.nslots))  # prepared, not published; oldest first
        self.np: Any = None
        if vectorised:
            import numpy as np

            self.np = np
        self.posted: Any = []
        self.kicks = 0
        self._start()

    def stepper(self) -> Callable[[int], Any]:
        """:meth:`turn` as a bare callable: the loop's ``send`` (see :meth:`_steps`); after it raised, use turn."""
        return self._send

    def sync(self) -> None:
        """Nothing to hand back: the ring's shadow state is current after every turn."""

    def turn(self, spins: int = 1) -> Any:
        try:
            return self._send(spins)
        except StopIteration:  # the loop ended on an exception: a new one starts
            self._start()
            return self._send(spins)

    def _start(self) -> None:
        steps = self._steps()
        next(steps)
        self._send = steps.send

    def _steps(self) -> Generator[Any, int, None]:
        """The cycle as a generator: one pass per ``send(spins)``.

        What does not change during the loop (views, tables, the depth) is
        in its locals, so a pass loads from objects only the ring's shadow
        state (read and written every pass, as the plain calls') and the
        fixed chains' ``vol``: at QD1 the path from a completion seen to the
        kick is on the round trip (docs/benchmarks.md §1.2, §7).
        """
        ring = self._ring
        fc = self._fc
        fl = self._fl
        ids = self._ids
        lens = self._lv
        wlen = self._wlen
        tokens = self._tokens
        idle = self._idle
        size = self._size
        nd = self._nd
        stash = self._stash
        depth = self._depth
        spares = self._spares
        desc = self._desc
        o16 = self._o16
        dev = self._dev16
        drv = self._drv16
        event_idx = self._event_idx
        weak = self._weak  # barriers are instructions only there (ordering.py)
        signals = self._signals
        notify = self._notify
        np = self.np
        n1 = fc.n1
        img1, av1, hf1 = fc.img1, fc.av1, fc.hf1
        img0, av0, hf0 = fc.img0, fc.av0, fc.hf0
        fence_acquire, fence_release = ordering.fence_acquire, ordering.fence_release
        result: Any = None
        while True:
            spins = yield result
            if ring.broken is not None:
                fc.check_broken()
            pos = ring.next_used
            ub = ring.used_bits
            flags = fl[pos]
            used = flags & FLIP == ub
            out = ring.outstanding
            if not used and not stash and out == depth:
                while spins > 1:  # poll again with everything in locals
                    spins -= 1
                    flags = fl[pos]
                    if flags & FLIP == ub:
                        used = True
                        break
                else:
                    if flags & FLIP != ub ^ USED:
                        fc.take(1 << 16, [], [])  # raises: neither used nor available (wrong wrap counter)
                    result = None
                    continue
            # QD1: the next request first, then the check of the completion (as the split cycle): checked
            # first, the check was on the round trip. The used descriptor's successor (where the request
            # goes) must not be used too (more used than in flight: the general path below raises), and
            # the new slot is out of flight until the completion is checked (one naming it is not in
            # flight, §2.8.6). The tests are nested ifs with short bodies, the fast path below them: an int
            # comparison whose jump is far (an EXTENDED_ARG before it) stays unspecialised in CPython 3.11.
            qd1 = False
            if used and depth == 1:
                if out == 1 and spares and not stash and n1 and fc.vol is None:
                    bid = ids[pos]
                    apos = ring.next_avail
                    if bid < size:
                        if apos + n1 < size:
                            p = pos + nd[bid]
                            u = ub
                            if p >= size:
                                p -= size
                                u ^= FLIP
                            if fl[p] & FLIP != u:
                                qd1 = True
            if qd1:
                new_s = spares.pop(0)
                bits = ring.avail_bits  # unchanged by this publish: the chain ends before the end of the ring
                if bits == AVAIL:
                    desc[o16[apos] : o16[apos + n1]] = img1[new_s]
                    h = hf1[new_s]
                else:
                    desc[o16[apos] : o16[apos + n1]] = img0[new_s]
                    h = hf0[new_s]
                if weak:
                    ordering.write_barrier()
                fl[apos] = h  # the head's flags last (§2.8.21.1)
                ring.next_avail = apos + n1
                ring.num_free -= n1
                ring.outstanding = 2
                # The kick decision (§2.8.10), inlined as in the batch path below (a twin kept on purpose: the
                # two calls it replaced, kick_needed and packed_need_event, cost more than the rest of it; the
                # chain is shorter than the ring, so the window passes at most n1 descriptors).
                fence_acquire()
                fence_release()
                ev = dev[1] & RING_EVENT_FLAGS_MASK
                if ev == RING_EVENT_FLAGS_DISABLE:
                    need = False
                elif ev == RING_EVENT_FLAGS_DESC and event_idx:
                    new = apos + n1 if bits == AVAIL else apos + n1 + size
                    off = dev[0]
                    event = (off & 0x7FFF) + (0 if off & 0x8000 else size)
                    need = (new - event - 1) % (2 * size) < n1
                else:
                    need = True
                if need:
                    try:
                        notify()
                    except BaseException:
                        tokens[new_s] = new_s  # published: in flight for whoever takes over (a reconnect)
                        raise
                    self.kicks += 1
                if weak:
                    ordering.read_barrier()
                if tokens[bid] is idle or (lens[pos] if flags & WRITE else 0) > wlen[bid]:
                    done = self._retake([], [new_s], 1)  # raises, or (clamp_used_len) took it
                else:
                    tokens[bid] = idle
                    tokens[new_s] = new_s
                    ring.next_used = p
                    ring.used_bits = u
                    ring.num_free += nd[bid]
                    ring.outstanding = 1
                    done = [bid]
                if signals:
                    drv[0] = ring.next_used | (1 if ring.used_bits else 0) << RING_EVENT_WRAP_SHIFT
                spares += done
                if np is None:
                    self.posted = [new_s]
                    result = done
                else:
                    self.posted = np.asarray([new_s], dtype=np.intp)
                    result = np.asarray(done, dtype=np.intp)
                continue
            done = []
            nfree = 0
            seen = bonus = 0
            late = False
            fresh: list[int] | None = None
            if stash:
                fc.take(1 << 16, done, [])  # a reconnect's completions first (committed by take)
                out = ring.outstanding
            elif used:
                seen = 1
            if seen and out > 1:
                # 1. Count the used descriptors, following their ids without checking them: the count
                # only says how many spares to publish now (every slot fits the ring at once, fits()).
                late = True
                p = pos
                u = ub
                if n1:  # every slot n1 descriptors: the next used one is n1 on, whatever id this one names
                    while seen < out:
                        p += n1
                        if p >= size:
                            p -= size
                            u ^= FLIP
                        if fl[p] & FLIP != u:
                            break
                        seen += 1
                else:
                    while seen < out:
                        bid = ids[p]
                        if bid >= size:
                            break  # 3. says what is wrong
                        p += nd[bid]
                        if p >= size:
                            p -= size
                            u ^= FLIP
                        if fl[p] & FLIP != u:
                            break
                        seen += 1
                bonus = seen
                if seen == out:
                    # All in flight used: one more used descriptor would lie in the free part of the ring,
                    # where step 2 writes. Seen there, nothing is published before step 3 has raised.
                    bid = ids[p]
                    if bid < size:
                        p += nd[bid]
                        if p >= size:
                            p -= size
                            u ^= FLIP
                        if fl[p] & FLIP == u:
                            bonus = out - depth  # publish nothing now (want 0); step 3 walks on to it
            # 2. and 3.: publish one spare per completion (and any shortfall), and check the completions.
            # With more than one in flight, publish first (one spare per completion counted), so the device
            # works on them while this side checks and books (as the split cycle); the new slots stay out
            # of flight (their tokens idle) until the counted completions, used before they were published,
            # are checked. With one in flight (QD1) there is nothing to overlap: check first, publish after.
            for check in _PUBLISH_FIRST if late else _CHECK_FIRST:
                if not check:
                    want = depth - out + bonus
                    posted = spares[:want]
                    fresh = posted if late else None
                    if posted:
                        del spares[:want]
                        apos = ring.next_avail
                        bits = ring.avail_bits
                        k = len(posted)
                        if n1 and fc.vol is None:
                            # Every slot n1 descriptors: in one store (two across the end of the ring), the first
                            # slot with its head not available, every other one whole; then (barrier) the first
                            # head's flags, which expose the batch (§2.8.21.1: the device starts at the first).
                            first = posted[0]
                            if bits == AVAIL:
                                img, av, h = img1, av1, hf1[first]
                            else:
                                img, av, h = img0, av0, hf0[first]
                            total = n1 * k
                            new = apos + total  # along two laps (below)
                            if new >= size:
                                before, after = fc.across(posted, apos, bits)
                                desc[o16[apos] : o16[size]] = before
                                desc[: o16[new - size]] = after
                                ring.avail_bits = bits ^ FLIP
                            elif k == 1:
                                desc[o16[apos] : o16[new]] = img[first]
                            else:
                                parts = list(map(av.__getitem__, posted))
                                parts[0] = img[first]
                                desc[o16[apos] : o16[new]] = b"".join(parts)
                            if fresh is None:
                                for s in posted:
                                    tokens[s] = s
                            if weak:
                                ordering.write_barrier()
                            fl[apos] = h
                            ring.next_avail = new - size if new >= size else new
                            ring.num_free -= total
                            out += k
                            ring.outstanding = out
                            # The kick decision (§2.8.10), as PackedQueue.kick_prepare.
                            fence_acquire()
                            fence_release()
                            ev = dev[1] & RING_EVENT_FLAGS_MASK
                            if ev == RING_EVENT_FLAGS_DISABLE:
                                need = False
                            elif ev == RING_EVENT_FLAGS_DESC and event_idx:
                                # packed_need_event inlined: positions along two laps (wrap counter 1: the even lap).
                                if total >= size:
                                    need = True
                                else:
                                    if bits != AVAIL:
                                        new += size
                                    off = dev[0]
                                    event = (off & 0x7FFF) + (0 if off & 0x8000 else size)
                                    need = (new - event - 1) % (2 * size) < total
                            else:
                                need = True
                        else:  # slots of different lengths, or lengths stored per request
                            need = fc.publish(posted)
                            out = ring.outstanding
                            if fresh is not None:
                                for s in posted:
                                    tokens[s] = idle  # out of flight until the counted completions are checked
                        if need:
                            try:
                                notify()
                            except BaseException:
                                if fresh:  # published: in flight for whoever takes over (a reconnect)
                                    for s in fresh:
                                        tokens[s] = s
                                raise
                            self.kicks += 1
                elif seen:
                    # 3. Take and check the completions: the counted ones, then (the new slots in flight now:
                    # a fast device may have used them already) any used since.
                    left = seen
                    if late and n1:
                        # The counted ones at once (every slot n1 descriptors, so their heads are n1 apart):
                        # their ids and lengths in strided reads (two each when the batch crosses the end of the
                        # ring: the heads before it, then those of the next lap), checked in bulk. A sufficient
                        # test: ids that are slots in flight (an in-flight slot's token is the slot), each once,
                        # every length within the smallest writable size among them. Anything else is left to
                        # the walk below, which checks each one exactly (a length without WRITE is not one,
                        # §2.8.4). The count checked their flags, wrap counter included.
                        if weak:
                            ordering.read_barrier()
                        end = pos + seen * n1
                        nub = ub
                        if end < size:
                            got = ids[pos:end:n1].tolist()
                            lns = lens[pos:end:n1].tolist()
                        else:
                            end -= size
                            nub ^= FLIP
                            q = pos + ((size - 1 - pos) // n1 + 1) * n1 - size  # the first head of the next lap
                            got = ids[pos:size:n1].tolist() + ids[q:end:n1].tolist()
                            lns = lens[pos:size:n1].tolist() + lens[q:end:n1].tolist()
                        if (
                            max(got) < size
                            and list(map(tokens.__getitem__, got)) == got
                            and len(set(got)) == seen
                            and max(lns) <= min(map(wlen.__getitem__, got))
                        ):
                            for bid in got:
                                tokens[bid] = idle
                            done = got
                            nfree = seen * n1
                            pos = end
                            ub = nub
                            out -= seen
                            left = 0
                            if fresh:
                                for s in fresh:
                                    tokens[s] = s
                                fresh = None
                            flags = fl[pos]
                    while True:
                        if flags & FLIP != ub:
                            if out and flags & FLIP != ub ^ USED:  # neither used nor available: a wrong wrap counter
                                done = self._retake(done, fresh, seen if fresh else 1 << 16)  # raises
                                fresh = None
                                nfree = 0
                                out = ring.outstanding
                            else:
                                ring.next_used = pos
                                ring.used_bits = ub
                            break
                        if weak:
                            ordering.read_barrier()
                        bid = ids[pos]
                        # With nothing in flight every token is idle: a used descriptor then fails the token test.
                        if bid >= size or tokens[bid] is idle or (lens[pos] if flags & WRITE else 0) > wlen[bid]:
                            done = self._retake(done, fresh, seen if fresh else 1 << 16)  # raises, or clamped
                            fresh = None
                            nfree = 0
                            out = ring.outstanding
                            break
                        tokens[bid] = idle
                        done.append(bid)
                        n = nd[bid]
                        nfree += n
                        pos += n
                        if pos >= size:
                            pos -= size
                            ub ^= FLIP
                        out -= 1
                        left -= 1
                        if not left and fresh:
                            for s in fresh:
                                tokens[s] = s
                            fresh = None
                        flags = fl[pos]
                    if fresh:  # fewer used than counted (ids that led elsewhere): the new slots are in flight
                        for s in fresh:
                            tokens[s] = s
                    ring.num_free += nfree
                    ring.outstanding = out
            if done and signals:
                # The next used descriptor wanted (§2.8.10), as PackedQueue's reap; after the kick, as the split
                # cycle's used_event: a device that completes first sees the old event and need not signal.
                drv[0] = ring.next_used | (1 if ring.used_bits else 0) << RING_EVENT_WRAP_SHIFT
            spares += done
            if np is None:
                self.posted = posted
                result = done
            else:
                self.posted = np.asarray(posted, dtype=np.intp)
                result = np.asarray(done, dtype=np.intp)

    def _retake(self, done: list[int], fresh: list[int] | None, limit: int) -> list[int]:
        """An anomaly in the batch: put back what this turn took, let the fixed chains' reap re-run it
        (at most ``limit`` entries, the new slots ``fresh`` still out of flight, then in flight)."""
        tokens = self._tokens
        for s in done:
            tokens[s] = s
        again: list[int] = []
        try:
            self._fc.take(limit, again, [])  # raises, or (clamp_used_len) takes the batch
        finally:
            if fresh:
                for s in fresh:
                    tokens[s] = s
        return again


__all__ = ["PackedCycle"]
