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
from typing import TYPE_CHECKING, Any

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
        for slot, chain in enumerate(chains):
            taken: list[int] = []
            wlen = 0
            for addr, length, writable in chain:
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
        self.inflight = bytearray(self.nslots)
        self.n_inflight = 0
        self._np: Any = None

    # -- plain Python ---------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        """Publish ``slots`` (one avail index store); True if the device must be kicked."""
        ring = self.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        inflight = self.inflight
        heads = self.heads
        a16 = ring._avail16
        mask = ring.size - 1
        idx = ring.avail_idx
        for s in slots:
            if inflight[s]:
                raise QueueStateError(f"slot {s} is already in flight")
            inflight[s] = 1
            a16[2 + (idx & mask)] = heads[s]
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
        ring = self.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        last = ring.last_used
        n = (ring._used16[1] - last) & 0xFFFF
        if not n:
            return []
        if n > ring.outstanding:
            self._break(f"used index moved by {n} with only {ring.outstanding} requests in flight", [])
        ordering.read_barrier()
        if n > max_n:
            n = max_n
        used32 = ring._used32
        mask = ring.size - 1
        size = ring.size
        slot_of = self.slot_of
        inflight = self.inflight
        wlen = self.wlen
        out: list[SlotCompletion] = []
        for _ in range(n):
            pos = 1 + 2 * (last & mask)
            head = used32[pos]
            length = used32[pos + 1]
            if head >= size:
                self._break(f"used id {head} is out of range (queue size {size})", out)
            s = slot_of[head]
            if s < 0 or not inflight[s]:
                self._break(f"used id {head} is not the head of an in-flight request", out)
            if length > wlen[s]:
                self._break(f"used length {length} for id {head} exceeds the {wlen[s]} device-writable bytes offered", out)
            inflight[s] = 0
            out.append((s, length))
            last = (last + 1) & 0xFFFF
        ring.last_used = last
        self.n_inflight -= len(out)
        ring.outstanding -= len(out)
        return out

    def _break(self, reason: str, completed: list[SlotCompletion]) -> None:
        ring = self.ring
        ring.last_used = (ring.last_used + len(completed)) & 0xFFFF
        self.n_inflight -= len(completed)
        ring.outstanding -= len(completed)
        ring.broken = reason
        raise DeviceProtocolError(f"queue {ring.index}: {reason}", list(completed))

    # -- NumPy ----------------------------------------------------------------

    def _arrays(self) -> Any:
        if self._np is None:
            import numpy as np

            ring = self.ring
            size = ring.size
            used = np.frombuffer(ring._used32, dtype="<u4", count=1 + 2 * size)
            self._np = {
                "np": np,
                "avail": np.frombuffer(ring._avail16, dtype="<u2"),
                "used_id": used[1::2],
                "used_len": used[2::2],
                "heads": np.asarray(self.heads, dtype=np.uint16),
                "slot_of": np.asarray(self.slot_of, dtype=np.int64),
                "wlen": np.asarray(self.wlen, dtype=np.int64),
                "inflight": np.frombuffer(self.inflight, dtype=np.uint8),
                "arange": np.arange(size, dtype=np.int64),
            }
        return self._np

    def post_many(self, slots: np.ndarray) -> bool:
        """:meth:`post` for an integer array of slots, in array operations."""
        ring = self.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        a = self._arrays()
        n = len(slots)
        if not n:
            return False
        inflight = a["inflight"]
        if inflight[slots].any():
            raise QueueStateError("a slot posted is already in flight")
        inflight[slots] = 1
        idx = ring.avail_idx
        mask = ring.size - 1
        a["avail"][2 + ((idx + a["arange"][:n]) & mask)] = a["heads"][slots]
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
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        last = ring.last_used
        n = (ring._used16[1] - last) & 0xFFFF
        if not n:
            return None
        a = self._arrays()
        np = a["np"]
        if n <= ring.outstanding:
            ordering.read_barrier()
            pos = (last + a["arange"][:n]) & (ring.size - 1)
            ids = a["used_id"][pos]
            lens = a["used_len"][pos]
            if int(ids.max()) < ring.size:
                slots = a["slot_of"][ids]
                inflight = a["inflight"]
                if int(slots.min()) >= 0 and inflight[slots].all() and not (lens > a["wlen"][slots]).any():
                    inflight[slots] = 0
                    after = self.n_inflight - n
                    if int(np.count_nonzero(inflight)) == after:
                        self.n_inflight = after
                        ring.outstanding -= n
                        ring.last_used = (last + n) & 0xFFFF
                        return slots, lens
                    inflight[slots] = 1  # a duplicate id: undo, let the exact path report it
        # Something is wrong: the Python path finds the entry and raises.
        self.wlen = [int(x) for x in a["wlen"]]
        done = self.reap(n)
        if not done:
            return None
        return (np.asarray([s for s, _ in done], dtype=np.int64), np.asarray([n for _, n in done], dtype=np.int64))

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
