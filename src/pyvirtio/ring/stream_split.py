"""The engines' stream on a split ring (``SplitFixedChains.stream``): one slot per avail position.

Theory of operation (the contract: :mod:`pyvirtio.ring.fixed`, ``Stream``;
the closed loop of the same fixed chains: :mod:`pyvirtio.ring.cycle_split`).
:class:`SplitStream` keeps every slot at its own avail position, so a batch
is re-posted with one avail index store (see its docstring), and keeps the
ring's shadow indices and the fixed chains' in-flight table current after
every call, so the plain calls can take over at any time;
:class:`StreamArrays` holds its NumPy views.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import InvalidArgument, QueueStateError
from pyvirtio.ring import ordering

if TYPE_CHECKING:
    from pyvirtio.ring.fixed_split import SplitFixedChains


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
        m = fc.mem
        if fc.nslots != size or any(len(d) != 1 for d in fc.descs):
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
        self._many: StreamArrays | None = None
        self.kicks = 0
        fc.streaming = True

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
            t = self._many = StreamArrays(self._fc, self._expected)
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
        if not fc.streaming:
            return
        ring = self._ring
        size = self._size
        fc.streaming = False
        inflight = {(ring.last_used + k) & (size - 1) for k in range(ring.outstanding)}
        hw1 = fc.hw1
        for pos in range(size):
            h = self._expected[pos]
            hw1[h] = fc.slot_wlen[fc.slot_of[h]] + 1 if pos in inflight else 0


class StreamArrays:
    """The NumPy views of a :class:`SplitStream`."""

    def __init__(self, fc: SplitFixedChains, expected: list[int]) -> None:
        import numpy as np

        size = fc.ring.size
        used = np.frombuffer(fc.mem.used32, dtype="<u4", count=1 + 2 * size)
        self.np = np
        self.array_equal = np.array_equal
        self.ids = used[1::2]
        self.lens = used[2::2]
        self.exp = np.asarray(expected, dtype=np.uint32)
        self.slot_at = np.asarray([fc.slot_of[h] for h in expected], dtype=np.intp)
        self.max_len1 = min(fc.slot_wlen) + 1  # the smallest writable buffer of a slot bounds every length


__all__ = ["SplitStream", "StreamArrays"]
