"""The engines' loops on a packed ring: the cycle and stream of :class:`~pyvirtio.ring.fixed_packed.PackedFixedChains`.

Theory of operation (the contract: :mod:`pyvirtio.ring.fixed`, ``Cycle`` and
``Stream``; the ring memory and checks: :mod:`pyvirtio.ring.fixed_packed`).
Both keep the packed ring's shadow state current after every call, so the
plain calls, ``pending`` and ``restart_base`` can take over at any time.

:class:`PackedCycle` turns: (1) take the used descriptors at the used
position, checked as the fixed chains' reap checks them (§2.8.4, §2.8.6:
wrap bits, id in flight, length within the slot's device-writable bytes),
inlined; on any anomaly the entries taken in this turn are put back and
:meth:`PackedFixedChains.take
<pyvirtio.ring.fixed_packed.PackedFixedChains.take>` re-runs them, which
raises :class:`~pyvirtio.errors.DeviceProtocolError` naming the bad one with
the completions validated before it (or clamps, ``clamp_used_len``); (2)
publish one spare per completion (and any shortfall): when every slot has as
many descriptors and the batch ends before the end of the ring, the slots'
prepared descriptors in one store, then each head's flags in order
(§2.8.21.1; a head's flags in its image say "not available"), otherwise
:meth:`PackedFixedChains.publish
<pyvirtio.ring.fixed_packed.PackedFixedChains.publish>` slot by slot; (3) one
kick decision from the device's event suppression structure (§2.8.10). Unlike the split cycle,
which publishes before it validates (its used index says how many
completions there are), a packed ring's completions are counted by walking
them, so this one validates first; an entry can then never name a slot
published in the same turn. With ``vectorised`` it hands out NumPy arrays
(the work stays per descriptor).

:class:`PackedStream` (one-buffer slots, all in flight) takes a batch of
validated completions in :meth:`~PackedStream.peek` and re-posts it in
:meth:`~PackedStream.advance`; a batch it does not expect (a length below
``min_len``) goes back to the ring's stash at :meth:`~PackedStream.close`,
where ``reap_slots`` finds it first.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def stepper(self) -> Callable[[int], Any]:
        return self.turn

    def turn(self, spins: int = 1) -> Any:
        ring = self._ring
        if ring.broken is not None:
            self._fc.check_broken()
        fl = self._fl
        pos = ring.next_used
        ub = ring.used_bits
        flags = fl[pos]
        used = flags & FLIP == ub
        out = ring.outstanding
        depth = self._depth
        stash = self._stash
        if not used and not stash and out == depth:
            while spins > 1:  # poll again with everything in locals
                spins -= 1
                flags = fl[pos]
                if flags & FLIP == ub:
                    used = True
                    break
            else:
                if flags & FLIP != ub ^ USED:
                    self._fc.take(1 << 16, [], [])  # raises: neither used nor available (wrong wrap counter)
                return None
        fc = self._fc
        tokens = self._tokens
        idle = self._idle
        size = self._size
        nd = self._nd
        done: list[int] = []
        nfree = 0
        # 1. Take and check the completions.
        if stash:
            fc.take(1 << 16, done, [])  # a reconnect's completions first (committed by take)
            out = ring.outstanding
        elif used:
            ids = self._ids
            lens = self._lv
            wlen = self._wlen
            weak = self._weak
            while True:
                if weak:
                    ordering.read_barrier()
                bid = ids[pos]
                # With nothing in flight every token is idle: a used descriptor then fails the token test.
                if bid >= size or tokens[bid] is idle or (lens[pos] if flags & WRITE else 0) > wlen[bid]:
                    done = self._retake(done)  # raises, or clamped lengths were accepted (committed)
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
                flags = fl[pos]
                if flags & FLIP != ub:
                    if out and flags & FLIP != ub ^ USED:  # neither used nor available: a wrong wrap counter
                        done = self._retake(done)  # raises
                        nfree = 0
                        out = ring.outstanding
                    else:
                        ring.next_used = pos
                        ring.used_bits = ub
                        if self._signals:  # the next used descriptor wanted (§2.8.10), as PackedQueue's reap
                            self._drv16[0] = pos | (1 if ub else 0) << RING_EVENT_WRAP_SHIFT
                    break
        # 2. Publish one spare per completion (and any shortfall).
        spares = self._spares
        want = depth - out
        posted = spares[:want]
        if posted:
            del spares[:want]
            pos = ring.next_avail
            bits = ring.avail_bits
            n1 = fc.n1
            k = len(posted)
            if n1 and fc.vol is None and pos + n1 * k < size:
                # Every slot n1 descriptors, the batch before the end of the ring: its bodies in one store
                # (a head's flags in its image say "not available"), then each head's flags, in order.
                img, hf = (fc.img1, fc.hf1) if bits == AVAIL else (fc.img0, fc.hf0)
                total = n1 * k
                o16 = self._o16
                self._desc[o16[pos] : o16[pos + total]] = (
                    img[posted[0]] if k == 1 else b"".join(map(img.__getitem__, posted))
                )
                if self._weak:
                    ordering.write_barrier()
                for s in posted:
                    tokens[s] = s
                    fl[pos] = hf[s]  # the head's flags last (§2.8.21.1)
                    pos += n1
                ring.next_avail = pos
                ring.num_free += nfree - total
                ring.outstanding = out + k
                # 3. The kick decision (§2.8.10), as PackedQueue.kick_prepare.
                ordering.fence_acquire()
                ordering.fence_release()
                dev = self._dev16
                ev = dev[1] & RING_EVENT_FLAGS_MASK
                if ev == RING_EVENT_FLAGS_DISABLE:
                    need = False
                elif ev == RING_EVENT_FLAGS_DESC and self._event_idx:
                    # packed_need_event inlined: positions along two laps (wrap counter 1: the even lap).
                    if total >= size:
                        need = True
                    else:
                        new = pos if bits == AVAIL else pos + size
                        off = dev[0]
                        event = (off & 0x7FFF) + (0 if off & 0x8000 else size)
                        need = (new - event - 1) % (2 * size) < total
                else:
                    need = True
            else:  # across the end of the ring, slots of different lengths, or lengths stored per request
                ring.num_free += nfree
                ring.outstanding = out
                need = fc.publish(posted)
            if need:
                self._notify()
                self.kicks += 1
        elif nfree:
            ring.num_free += nfree
            ring.outstanding = out
        spares += done
        np = self.np
        if np is None:
            self.posted = posted
            return done
        self.posted = np.asarray(posted, dtype=np.intp)
        return np.asarray(done, dtype=np.intp)

    def _retake(self, done: list[int]) -> list[int]:
        """An anomaly in the batch: put back what this turn took, let the fixed chains' reap re-run it."""
        tokens = self._tokens
        for s in done:
            tokens[s] = s
        again: list[int] = []
        self._fc.take(1 << 16, again, [])  # raises, or (clamp_used_len) takes the batch
        return again


class PackedStream:
    """:meth:`PackedFixedChains.stream`: every one-buffer slot in flight, re-posted as it completes."""

    def __init__(self, fc: PackedFixedChains, notify: Callable[[], object], min_len: int) -> None:
        self._fc = fc
        self._ring = fc.ring
        self._notify = notify
        self._min_len = min_len
        self._slots: list[int] = []  # the batch taken and not yet advanced past
        self._lens: list[int] = []
        self._started = False  # the first advance publishes every slot not in flight
        self.kicks = 0
        fc.streaming = True

    def peek(self) -> int:
        slots = self._slots
        if not slots:
            self._fc.take(1 << 16, slots, self._lens)
            if not slots:
                return 0
        if min(self._lens) < self._min_len:
            return -1
        return len(slots)

    def peek_many(self) -> tuple[Any, ...] | None:
        n = self.peek()
        if not n:
            return None
        if n < 0:
            return ()
        import numpy as np

        return np.asarray(self._slots, dtype=np.intp), np.asarray(self._lens, dtype=np.int64)

    def advance(self, n: int) -> None:
        fc = self._fc
        if self._started:
            slots = self._slots[:n]  # the slots just taken: the only ones not in flight
        else:
            self._started = True
            idle = fc.sh.idle
            tokens = fc.sh.tokens
            slots = [s for s in range(fc.nslots) if tokens[s] is idle]
        del self._slots[:n]
        del self._lens[:n]
        if slots and fc.publish(slots):
            self._notify()
            self.kicks += 1

    def close(self) -> None:
        fc = self._fc
        if not fc.streaming:
            return
        fc.streaming = False
        batch = list(zip(self._slots, self._lens, strict=True))
        if batch:  # back to the ring's validated completions: reap_slots returns them first
            fc.sh.stash[:0] = batch
            self._ring.outstanding += len(batch)
        self._slots = []
        self._lens = []


__all__ = ["PackedCycle", "PackedStream"]
