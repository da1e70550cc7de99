"""Fixed chains: the split ring of a batch engine (benchmarks, fixed-shape I/O).

Theory of operation. When every request has the same shape (a virtio-blk
header, one data buffer, a status byte), building chains per request is
wasted work. :class:`FixedChains` takes descriptors from a
:class:`~pyvirtio.ring.split.SplitQueue` once, writes one pre-linked chain
per *slot*, and from then on a request is just "post slot s": its head goes
into the avail ring. Posting many slots publishes the avail index once and
makes one kick decision (EVENT_IDX aware, via the queue's ``kick_prepare``);
reaping takes every used entry at once.

Used entries are validated by the same rules as ``SplitQueue.reap``
(virtio 1.2 §2.7.8): the used index may not move by more than is in flight,
an id must be the head of a slot that is in flight, a length may not exceed
the slot's device-writable bytes. A violation marks the queue broken and
raises :class:`~pyvirtio.errors.DeviceProtocolError` carrying the
(slot, length) completions validated before it.

Two implementations of post and reap share that state: plain Python
(:meth:`post` / :meth:`reap`), cheapest for a handful of requests, and NumPy
(:meth:`post_many` / :meth:`reap_many`), a fixed number of array operations
per batch whatever its size. The NumPy reap checks the whole batch with
vector operations and, if anything is wrong, re-runs the batch through the
Python path, which finds and reports the exact entry.

While a FixedChains is attached, the queue must not be used through
``SplitQueue.start/submit/reap``; :meth:`detach` gives the descriptors back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueBroken, QueueStateError
from pyvirtio.ring import ordering
from pyvirtio.ring.split import END, SplitQueue
from pyvirtio.spec.ring import DESC_F_NEXT, DESC_F_WRITE

if TYPE_CHECKING:
    import numpy as np

SlotCompletion = tuple[int, int]


class FixedChains:
    """Pre-linked chains, one per slot, reserved on ``ring`` (see the module docstring)."""

    def __init__(self, ring: SplitQueue, chains: Sequence[Sequence[tuple[int, int, bool]]]) -> None:
        if ring.outstanding or ring._req_head != END:
            raise QueueStateError("FixedChains needs an idle queue")
        if ring.in_order:
            raise InvalidArgument("FixedChains lays chains out of ring order: not for a VIRTIO_F_IN_ORDER queue")
        total = sum(len(c) for c in chains)
        if not chains or any(not c for c in chains):
            raise InvalidArgument("every chain needs at least one buffer")
        if total > ring.num_free:
            raise InvalidArgument(f"{len(chains)} chains need {total} descriptors, the queue has {ring.num_free}")
        self.ring = ring
        self.nslots = len(chains)
        self.heads: list[int] = []
        self.wlen: list[int] = []
        self._descs: list[list[int]] = []
        self.slot_of: list[int] = [-1] * ring.size
        d64, d32, d16 = ring._desc64, ring._desc32, ring._desc16
        carved = self._carve(ring, [len(c) for c in chains]) if ring.num_free == ring.size else None
        for slot, chain in enumerate(chains):
            taken: list[int] = []
            wlen = 0
            for k, (addr, length, writable) in enumerate(chain):
                if carved is not None:
                    i = carved[slot][k]
                else:
                    i = ring.free_head
                    ring.free_head = ring._next[i]
                    ring.num_free -= 1
                taken.append(i)
                d64[2 * i] = addr
                d32[4 * i + 2] = length
                d16[8 * i + 6] = (DESC_F_WRITE if writable else 0) | DESC_F_NEXT
                if writable:
                    wlen += length
            for a, b in zip(taken, taken[1:], strict=False):
                d16[8 * a + 7] = b
            d16[8 * taken[-1] + 6] &= ~DESC_F_NEXT
            self.heads.append(taken[0])
            self.wlen.append(wlen)
            self._descs.append(taken)
            self.slot_of[taken[0]] = slot
        #: Slot s is headed by descriptor s (always, when the queue had every
        #: descriptor free): callers may then use used ids as slots directly.
        self.heads_are_slots = self.heads == list(range(self.nslots))
        # hw1[h]: 0 unless descriptor h heads an in-flight slot, then its
        # device-writable bytes + 1. One lookup checks "in flight" and bounds
        # the used length (length < hw1[h]); an id >= size raises IndexError.
        self.hw1: list[int] = [0] * ring.size
        self.n_inflight = 0
        self._np: Any = None

    @staticmethod
    def _carve(ring: SplitQueue, lengths: list[int]) -> list[list[int]]:
        """Descriptors for chains on a queue whose descriptors are all free: chain s headed by descriptor s.

        The heads are 0..n-1, the other descriptors of the chains follow in
        order, and the rest of the queue stays on the free list, in order.
        """
        n = len(lengths)
        nxt = n
        out: list[list[int]] = []
        for s, k in enumerate(lengths):
            out.append([s, *range(nxt, nxt + k - 1)])
            nxt += k - 1
        size = ring.size
        for i in range(nxt, size):
            ring._next[i] = i + 1 if i + 1 < size else END
            ring._desc16[8 * i + 7] = i + 1 if i + 1 < size else 0
        ring.free_head = nxt if nxt < size else END
        ring.free_tail = size - 1
        ring.num_free = size - nxt
        return out

    def length_fields(self, k: int = 0) -> tuple[memoryview, list[int]]:
        """(lengths, index): ``lengths[index[s]]`` is the length of buffer ``k`` of slot s's chain.

        For a caller whose device-readable buffer changes length per request
        (a frame to send): it writes the length there while the slot is not
        in flight, then posts the slot.
        """
        return self.ring._desc32, [4 * d[k] + 2 for d in self._descs]

    # -- plain Python ---------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        """Publish ``slots`` (one avail index store); True if the device must be kicked."""
        ring = self.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        if self._np is not None:
            raise QueueStateError("this FixedChains is driven through the NumPy path")
        hw1 = self.hw1
        wlen = self.wlen
        heads = self.heads
        a16 = ring._avail16
        mask = ring.size - 1
        idx = ring.avail_idx
        for s in slots:
            h = heads[s]
            if hw1[h]:
                raise QueueStateError(f"slot {s} is already in flight")
            hw1[h] = wlen[s] + 1
            a16[2 + (idx & mask)] = h
            idx = (idx + 1) & 0xFFFF
        n = len(slots)
        self.n_inflight += n
        ring.outstanding += n
        ring.avail_idx = idx
        ordering.write_barrier()
        a16[1] = idx
        return ring.kick_prepare()

    def reap(self, max_n: int = 1 << 16) -> list[SlotCompletion]:
        """Validated (slot, bytes written) pairs of every used entry (up to ``max_n``)."""
        lengths: list[int] = []
        slots = self.reap_slots(max_n, lengths)
        return list(zip(slots, lengths, strict=True))

    def reap_slots(self, max_n: int = 1 << 16, lengths: list[int] | None = None) -> list[int]:
        """Validated slots of every used entry (up to ``max_n``); lengths appended to ``lengths`` if given."""
        ring = self.ring
        last = ring.last_used
        n = (ring._used16[1] - last) & 0xFFFF
        if not n:
            return []
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        if n > ring.outstanding:
            self._break(f"used index moved by {n} with only {ring.outstanding} requests in flight", [], [])
        ordering.read_barrier()
        if n > max_n:
            n = max_n
        used32 = ring._used32
        mask = ring.size - 1
        slot_of = self.slot_of
        hw1 = self.hw1
        out: list[int] = []
        lens = [] if lengths is None else lengths
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
                if not ring.clamp_used_len:
                    self._break(
                        f"used length {length} for id {head} exceeds the {w - 1} device-writable bytes offered",
                        out,
                        lens,
                    )
                ring.long_used += 1
                length = w - 1
            hw1[head] = 0
            out.append(slot_of[head])
            lens.append(length)
            last = (last + 1) & 0xFFFF
        ring.last_used = last
        self.n_inflight -= n
        ring.outstanding -= n
        if ring._interrupts and ring.event_idx:
            ring._avail16[ring._used_event_i] = last  # keep the next completion signalled
        return out

    def _break(self, reason: str, slots: list[int], lengths: list[int]) -> NoReturn:
        ring = self.ring
        done = len(slots)
        ring.last_used = (ring.last_used + done) & 0xFFFF
        self.n_inflight -= done
        ring.outstanding -= done
        ring.broken = reason
        raise DeviceProtocolError(f"queue {ring.index}: {reason}", list(zip(slots, lengths, strict=True)))

    # -- NumPy ----------------------------------------------------------------
    #
    # The vectorised path keeps its own state in arrays; a FixedChains is used
    # through one path or the other, never both. ``head_wlen1[h]`` is 0 when
    # descriptor h is not an in-flight head, else the chain's device-writable
    # bytes + 1: one gather then checks "in flight" and "length within bounds"
    # together (``lens < head_wlen1[ids]``). Index ``size`` is a permanent 0 so
    # that out-of-range ids, clipped to it, fail the same check.

    def _arrays(self) -> Any:
        if self._np is None:
            if self.n_inflight:
                raise QueueStateError("switch to the NumPy path with nothing in flight")
            import numpy as np

            ring = self.ring
            size = ring.size
            used = np.frombuffer(ring._used32, dtype="<u4", count=1 + 2 * size)
            idx2 = np.arange(2 * size, dtype=np.int64) & (size - 1)
            # The used ring's lengths are uint32: comparing them with uint32 is
            # cheaper than with int64 (no conversion), when every bound fits.
            wdt = np.uint32 if max(self.wlen) + 1 <= 0xFFFFFFFF else np.int64
            self._np = {
                "np": np,
                "avail": np.frombuffer(ring._avail16, dtype="<u2"),
                "used_id": used[1::2],
                "used_len": used[2::2],
                "heads": np.asarray(self.heads, dtype=np.int64),
                "slot_of": np.asarray(self.slot_of + [-1], dtype=np.int64),
                "wlen1": np.asarray([w + 1 for w in self.wlen], dtype=wdt),  # per slot: writable bytes + 1
                "head_wlen1": np.zeros(size + 1, dtype=wdt),
                "arange": np.arange(size, dtype=np.int64),
                # ring positions of k consecutive indices from i: idx2[i & mask : (i & mask) + k]
                "idx2": idx2,
                "avail_pos2": idx2 + 2,
            }
        return self._np

    def post_many(self, slots: np.ndarray, *, check: bool = True) -> bool:
        """Publish an integer array of slots in array operations; True if the device must be kicked.

        ``check=False`` skips the "already in flight" test, for callers that
        only ever post slots they reaped (the benchmark engine).
        """
        ring = self.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        a = self._arrays()
        n = len(slots)
        if not n:
            return False
        heads = a["heads"][slots]
        hw = a["head_wlen1"]
        if check and hw[heads].any():
            raise QueueStateError("a slot posted is already in flight")
        hw[heads] = a["wlen1"][slots]
        idx = ring.avail_idx
        start = idx & (ring.size - 1)
        a["avail"][a["avail_pos2"][start : start + n]] = heads
        idx = (idx + n) & 0xFFFF
        self.n_inflight += n
        ring.outstanding += n
        ring.avail_idx = idx
        ordering.write_barrier()
        ring._avail16[1] = idx
        return ring.kick_prepare()

    def reap_many(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Every used entry as (slots, lengths) arrays, validated in array operations; None if none."""
        ring = self.ring
        last = ring.last_used
        n = (ring._used16[1] - last) & 0xFFFF
        if not n:
            return None
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        a = self._arrays()
        if n > ring.outstanding:
            self._break(f"used index moved by {n} with only {ring.outstanding} requests in flight", [], [])
        ordering.read_barrier()
        start = last & (ring.size - 1)
        pos = a["idx2"][start : start + n]
        ids = a["used_id"][pos]
        lens = a["used_len"][pos]
        hw = a["head_wlen1"]
        np = a["np"]
        if (lens < hw.take(ids, mode="clip")).all():
            hw[ids] = 0
            after = self.n_inflight - n
            if np.count_nonzero(hw) == after:
                self.n_inflight = after
                ring.outstanding -= n
                ring.last_used = (last + n) & 0xFFFF
                if ring._interrupts and ring.event_idx:
                    ring._avail16[ring._used_event_i] = ring.last_used
                return a["slot_of"][ids], lens
            hw[ids] = a["wlen1"][a["slot_of"][ids]]  # a duplicate id: undo
        return self._reap_exact(n)

    def _reap_exact(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Entry-by-entry validation of the NumPy path's batch: finds and reports the bad entry."""
        a = self._arrays()
        np = a["np"]
        ring = self.ring
        hw = a["head_wlen1"]
        last = ring.last_used
        slots: list[int] = []
        lens: list[int] = []
        for k in range(n):
            pos = (last + k) & (ring.size - 1)
            head = int(a["used_id"][pos])
            length = int(a["used_len"][pos])
            if head >= ring.size:
                self._break(f"used id {head} is out of range (queue size {ring.size})", slots, lens)
            if not hw[head]:
                self._break(f"used id {head} is not the head of an in-flight request", slots, lens)
            if length >= hw[head]:
                if not ring.clamp_used_len:
                    self._break(
                        f"used length {length} for id {head} exceeds the {int(hw[head]) - 1} device-writable "
                        "bytes offered",
                        slots,
                        lens,
                    )
                ring.long_used += 1
                length = int(hw[head]) - 1
            hw[head] = 0
            slots.append(int(a["slot_of"][head]))
            lens.append(length)
        ring.last_used = (last + n) & 0xFFFF
        self.n_inflight -= n
        ring.outstanding -= n
        return np.asarray(slots, dtype=np.int64), np.asarray(lens, dtype=np.int64)

    # -- teardown -------------------------------------------------------------

    def detach(self) -> None:
        """Return every chain's descriptors to the queue (nothing may be in flight)."""
        if self.n_inflight and self.ring.broken is None:
            raise QueueStateError(f"{self.n_inflight} slots still in flight")
        ring = self.ring
        for taken in self._descs:
            ring._release_chain(taken[0], taken[-1], len(taken))
            for a, b in zip(taken, taken[1:], strict=False):
                ring._next[a] = b
        self._descs.clear()
        self._np = None
