"""The engines' stream on a packed ring (``PackedFixedChains.stream``): one slot per ring descriptor.

Theory of operation (the contract: :mod:`pyvirtio.ring.fixed`, ``Stream``;
the ring memory and checks: :mod:`pyvirtio.ring.fixed_packed`; the closed
loop of the same fixed chains: :mod:`pyvirtio.ring.cycle_packed`).
:class:`PackedStream` (one one-buffer slot per ring descriptor, all in
flight) keeps each slot at its ring position: a batch is counted and checked
in a few bulk operations (:meth:`~PackedStream.peek`) and re-posted in two
stores (:meth:`~PackedStream.advance`); anything unexpected is left in the
ring for the exact path (its class docstring).
It keeps the packed ring's shadow state current after every call, as the
cycle does, so the plain calls can take over at any time.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import InvalidArgument
from pyvirtio.ring import ordering
from pyvirtio.spec.ring import (
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_DESC_F_WRAP_BITS,
    RING_EVENT_WRAP_SHIFT,
)

if TYPE_CHECKING:
    from pyvirtio.ring.fixed_packed import PackedFixedChains

AVAIL = PACKED_DESC_F_AVAIL
USED = PACKED_DESC_F_USED
FLIP = PACKED_DESC_F_WRAP_BITS
WRITE = DESC_F_WRITE


class PackedStream:
    """:meth:`PackedFixedChains.stream`: slot at ring position p for good, all in flight, batches in bulk.

    Every slot is one descriptor and there are as many slots as ring
    descriptors, so with every slot in flight the used position and the next
    available position are the same slot of the ring, a lap apart: the n
    descriptors the device used from there are exactly where the n slots they
    name are re-posted. Slot p's descriptor therefore stays at position p (or,
    when the stream starts with every slot in flight, wherever the ring put
    it: read back once and used only if it names each slot once).

    :meth:`peek` counts the used descriptors at the used position (they come
    first among the slots in flight: a galloping probe and a bisection of
    their flags find the edge, §2.8.1), then compares their ids and
    flags with the expected ones in one comparison (id = the slot at that
    position, flags = the used wrap counter in AVAIL and USED, and
    VIRTQ_DESC_F_WRITE exactly when the slot is device-writable, §2.8.4:
    without it the length is reserved) and checks the lengths against
    ``min_len`` and the smallest slot's writable bytes. Anything else is -1 /
    ``()`` and stays in the ring for the exact path (:meth:`close`, then
    ``reap_slots``, which raises on a violation). Nothing is taken until
    :meth:`advance`.

    :meth:`advance` re-posts the n descriptors in place: all but the first
    with the flags that make them available, in one store, then the first's
    body with flags that do not (the used pattern the device left), then,
    behind the write barrier, the first's flags. The device starts at the
    first (it processes descriptors in ring order, §2.8 device
    requirements), so the batch becomes available at that one store, its
    bodies already written (§2.8.21.1: a batch is exposed by its first
    descriptor's flags, written last). One
    kick decision per batch (§2.8.10). The ring's tokens never change: every
    slot is in flight from the first :meth:`advance` to :meth:`close`. The
    slots' buffers and lengths (``length_fields``) are read when the stream
    starts.
    """

    def __init__(self, fc: PackedFixedChains, notify: Callable[[], object], min_len: int) -> None:
        ring = fc.ring
        size = ring.size
        sh = fc.sh
        if fc.nslots != size:
            raise InvalidArgument("a stream needs one one-buffer slot per ring descriptor")
        fc.fold()  # the lengths stored through length_fields, into the images
        self._fc = fc
        self._ring = ring
        self._notify = notify
        self._min_len = min_len
        self._size = size
        if ring.outstanding == 0:
            first = ring.next_avail  # the first advance publishes slot k at first + k
            slot_at = [(p - first) % size for p in range(size)]
            self._usable = True
        else:  # every slot in flight: where the ring (or, for used ones, the device) says each one is
            slot_at = [sh.ids[p] for p in range(size)]
            self._usable = sorted(slot_at) == list(range(size))
            if not self._usable:
                slot_at = list(range(size))  # never compared: every batch goes to the exact path
        self._slot_at = slot_at
        self._started = ring.outstanding == size
        desc = sh.desc
        self._desc = desc
        self._idf = sh.desc32[3::4]  # each descriptor's id | flags << 16
        self._fl = sh.flags
        self._lv = sh.lens
        writable = [w > 0 for w in sh.wlen[:size]]
        if any(writable) != all(writable) or (min_len and not all(writable)):
            self._usable = False  # a device-readable slot's length is 0 (§2.8.4): only the exact path judges
        self._wmax = min(sh.wlen[:size]) if all(writable) else 0  # 0: no length to check
        # Per used wrap counter (0 / FLIP): the expected id | flags of each position.
        self._exp: dict[int, memoryview] = {}
        for ub in (0, FLIP):
            exp = array("I", (slot_at[p] | (ub | (WRITE if writable[slot_at[p]] else 0)) << 16 for p in range(size)))
            self._exp[ub] = memoryview(exp)
        # Per lap (the avail bits): the bodies, their flags saying "not available" (§2.8.1).
        self._img: dict[int, memoryview] = {
            AVAIL: memoryview(b"".join(fc.img1[slot_at[p]] for p in range(size))),
            USED: memoryview(b"".join(fc.img0[slot_at[p]] for p in range(size))),
        }
        # The same with every descriptor's available flags (for all but a batch's first descriptor), and the
        # flags that make a batch's first descriptor available.
        self._live: dict[int, memoryview] = {
            AVAIL: memoryview(b"".join(fc.av1[slot_at[p]] for p in range(size))),
            USED: memoryview(b"".join(fc.av0[slot_at[p]] for p in range(size))),
        }
        self._hf: dict[int, list[int]] = {
            AVAIL: [fc.hf1[slot_at[p]] for p in range(size)],
            USED: [fc.hf0[slot_at[p]] for p in range(size)],
        }
        self._drv16 = sh.driver16
        self._weak = not ordering.STRONGLY_ORDERED
        self._ok = 0  # completions validated by the last peek, not yet advanced past
        self._many: Any = None
        self.kicks = 0
        fc.streaming = True

    def _count(self) -> tuple[int, int]:
        """The used descriptors at the used position: (before the end of the ring, after it); (-1, 0): the
        descriptor there is neither used nor available in its lap (a wrong wrap counter, §2.8.1)."""
        if not self._started:
            return 0, 0
        ring = self._ring
        pos = ring.next_used
        ub = ring.used_bits
        fl = self._fl
        f = fl[pos] & FLIP
        if f != ub:
            return (0, 0) if f == ub ^ USED else (-1, 0)
        size = self._size
        n1 = self._run(fl, pos, size, ub)
        if pos + n1 < size or not pos:
            return n1, 0
        if fl[0] & FLIP != ub ^ FLIP:
            return n1, 0
        return n1, self._run(fl, 0, pos, ub ^ FLIP)

    @staticmethod
    def _run(fl: memoryview, lo: int, end: int, ub: int) -> int:
        """How many descriptors from ``lo`` (used) on, before ``end``, are used: they come first in the
        slots in flight, the rest still available, so a galloping probe then a bisection find the edge
        (a few reads, however long the batch). A descriptor still on its way inside the run (a device
        may write a batch's flags in any order) ends the batch at the comparison that follows
        (:meth:`_prefix`)."""
        step = 1
        while lo + step < end and fl[lo + step] & FLIP == ub:
            step <<= 1
        good = lo + (step >> 1)  # used
        bad = min(lo + step, end)  # not used, or the end
        while bad - good > 1:
            mid = (good + bad) >> 1
            if fl[mid] & FLIP == ub:
                good = mid
            else:
                bad = mid
        return bad - lo

    def _checked(self) -> int:
        """The completions at the used position if their ids and flags are the expected ones; -1 otherwise."""
        ring = self._ring
        if ring.broken is not None:
            self._fc.check_broken()
        n1, n2 = self._count()
        if n1 <= 0:
            return n1
        if not self._usable:
            return -1
        if self._weak:
            ordering.read_barrier()  # the flags seen before the ids and lengths are read
        pos = ring.next_used
        ub = ring.used_bits
        n1 = self._prefix(pos, n1, ub)
        if not n1:
            return -1  # the descriptor at the used position is used, but not as expected
        if n2 and pos + n1 == self._size:
            return n1 + self._prefix(0, n2, ub ^ FLIP)
        return n1

    def _prefix(self, lo: int, n: int, ub: int) -> int:
        """How many of the ``n`` descriptors from ``lo`` hold the expected id and flags, from the first on.

        One comparison when all do. A device may set used flags out of order
        within a batch (§2.8: it MAY reorder descriptor writes once started),
        so a descriptor counted from its neighbours can still be on its way:
        the batch then ends before it, and the next peek sees it (a lie there
        is -1 then)."""
        idf = self._idf
        exp = self._exp[ub]
        if idf[lo : lo + n] == exp[lo : lo + n]:
            return n
        k = lo
        end = lo + n
        while k < end and idf[k] == exp[k]:  # bounded: the hole may have been filled since the comparison
            k += 1
        return k - lo

    def peek(self) -> int:
        n = self._checked()
        if n > 0 and self._wmax:
            pos = self._ring.next_used
            lv = self._lv
            lens = list(lv[pos : pos + n])
            if pos + n > self._size:
                lens += lv[: pos + n - self._size]
            if min(lens) < self._min_len or max(lens) > self._wmax:
                return -1
        self._ok = max(n, 0)
        return n

    def peek_many(self) -> tuple[Any, ...] | None:
        n = self._checked()
        if not n:
            return None
        if n < 0:
            return ()
        t = self._many
        if t is None:
            import numpy as np

            t = self._many = (
                np,
                np.frombuffer(self._desc, dtype="<u4")[2::4],  # the lengths
                np.asarray(self._slot_at, dtype=np.intp),
            )
        np, lv, slot_at = t
        pos = self._ring.next_used
        end = pos + n
        if end <= self._size:
            slots = slot_at[pos:end]
            lens = lv[pos:end].astype(np.int64)
        else:
            end -= self._size
            slots = np.concatenate((slot_at[pos:], slot_at[:end]))
            lens = np.concatenate((lv[pos:], lv[:end])).astype(np.int64)
        if self._wmax and (int(lens.min()) < self._min_len or int(lens.max()) > self._wmax):
            return ()
        self._ok = n
        return slots, lens

    def advance(self, n: int) -> None:
        fc = self._fc
        ring = self._ring
        if not self._started:  # the first advance publishes every slot, in position order
            self._started = True
            first = ring.next_avail
            size = self._size
            if fc.publish([self._slot_at[(first + k) % size] for k in range(size)]):
                self._notify()
                self.kicks += 1
            return
        if n <= 0:
            return
        if n > self._ok:
            raise InvalidArgument(f"advance({n}): only {self._ok} completions were peeked")
        self._ok -= n
        size = self._size
        pos = ring.next_avail  # == the used position: every slot is in flight
        bits = ring.avail_bits
        desc = self._desc
        live = self._live
        end = pos + n
        # The batch after its first descriptor with the flags that make it available, the first one's body
        # with flags that do not, then (barrier) the first one's flags: the device starts at the first
        # (§2.8.21.1: a batch is exposed by its first descriptor's flags, written last).
        if end > size:
            end -= size
            desc[16 * pos + 16 : 16 * size] = live[bits][16 * pos + 16 :]
            desc[: 16 * end] = live[bits ^ FLIP][: 16 * end]
        elif n > 1:
            desc[16 * pos + 16 : 16 * end] = live[bits][16 * pos + 16 : 16 * end]
        desc[16 * pos : 16 * pos + 16] = self._img[bits][16 * pos : 16 * pos + 16]
        if self._weak:
            ordering.write_barrier()
        self._fl[pos] = self._hf[bits][pos]
        if end >= size:
            end -= size
        if end <= pos:
            bits ^= FLIP
        ring.next_avail = end
        ring.avail_bits = bits
        ring.next_used = end
        ub = ring.used_bits = FLIP if bits == USED else 0  # the lap before the next publication's
        if fc.kick_needed(n):
            self._notify()
            self.kicks += 1
        if ring.interrupts_enabled and ring.event_idx:  # the next used descriptor wanted (§2.8.10), after the kick
            self._drv16[0] = end | (1 if ub else 0) << RING_EVENT_WRAP_SHIFT

    def close(self) -> None:
        """Back to the plain path: every slot is in flight, a batch not advanced past is still in the ring."""
        self._fc.streaming = False
        self._ok = 0


__all__ = ["PackedStream"]
