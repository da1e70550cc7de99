"""The driver side of a split virtqueue (virtio 1.2 §2.7).

Theory of operation. The ring lives in shared memory: a descriptor table,
the avail ring (driver → device) and the used ring (device → driver). The
driver keeps everything it needs in private *shadow* state and never reads
back what it wrote: the free list is linked through ``_next`` (a Python
list), each in-flight chain head remembers its caller token, its number of
ring descriptors, its last descriptor and how many device-writable bytes it
offered. The device can scribble over the descriptor table and the avail
ring without confusing the driver. A completed chain goes back to the head
of the free list (LIFO, as Linux; FIFO only with VIRTIO_F_IN_ORDER), so
requests one at a time reuse one chain (:meth:`SplitQueue.submit3`, the
one-request fast lane).

Building a request follows SPDK's virtqueue API: :meth:`SplitQueue.start`
(token, number of buffers), :meth:`~SplitQueue.add` per buffer, then
:meth:`~SplitQueue.flush` which publishes and returns the *kick decision*
(the queue does no I/O; the transport notifies). Starting a request while
another is open publishes the open one (SPDK v18.04 dropped it). Requests
with many buffers, or more buffers than there are free descriptors, go into
an indirect table when VIRTIO_F_RING_INDIRECT_DESC was negotiated.

Completions are reaped with :meth:`~SplitQueue.reap`. Every used entry is
validated before it is believed (virtio 1.2 §2.7.8: the device writes the
head id and the number of bytes written): an index that moves by more than
is in flight, an id out of range or not the head of an in-flight chain, a
length above what the chain offered. A violation marks the queue broken and
raises :class:`~pyvirtio.errors.DeviceProtocolError`; the free list is
untouched by the bad entry, and completions validated before it travel on
the exception so none is lost. A broken queue refuses all work until
:meth:`~SplitQueue.reset`.

VIRTIO_F_IN_ORDER (``in_order``, virtio 1.2 §2.7.9 "In-order use of
descriptors"): descriptors are used in ring order (§2.7.5: "starting from
offset 0 in the table, and wrapping around"; the free list, FIFO in this
mode, keeps that order, an aborted request gives its descriptors back to the front), so the
chains in flight lie one after another from the oldest. The device may
write "a single used ring entry with the id corresponding to the head entry
of the descriptor chain describing the last buffer in the batch" at the
batch's first used slot and move the used index by the batch size: the
driver completes every chain from the oldest up to that head, in order,
the skipped ones with all their device-writable bytes ("assumed to have been
used ... completely"), and checks that the batch fits the used index's move
(a device that skips or reorders names a head whose batch does not fit, or
one no longer in flight).

Memory ordering: see :mod:`pyvirtio.ring.ordering`. The API and its
semantics are the ring protocol's (:mod:`pyvirtio.ring.base`).

The batch fast path (:mod:`pyvirtio.ring.fixed_split`, behind
:class:`~pyvirtio.ring.fixed.FixedChains`) is this ring's too: it reserves
descriptors (:meth:`SplitQueue.take_descriptors`), works on the ring memory
(:meth:`SplitQueue.shared_views`) and keeps the shadow indices below
(``avail_idx``, ``last_used``, ``outstanding``, ``kick_from``) current after
every call. Nothing above the ring layer uses those two calls.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from pyvirtio.errors import (
    DeviceProtocolError,
    InvalidArgument,
    PyvirtioError,
    QueueBroken,
    QueueFull,
    QueueStateError,
    RequestTooLarge,
)
from pyvirtio.memory import Buffer, MemoryPool
from pyvirtio.ring import ordering
from pyvirtio.ring.base import Completion, RingAddresses
from pyvirtio.ring.ordering import STRONGLY_ORDERED, fence_acquire, fence_release
from pyvirtio.spec.ring import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_F_NO_NOTIFY,
    avail_size,
    is_power_of_two,
    split_layout,
    used_size,
)

END: Final = MAX_QUEUE_SIZE  # never a valid descriptor index (as in the seed)
_DESC3: Final = struct.Struct("<" + "QIHH" * 3)  # three descriptors side by side (virtio 1.2 §2.7.5), submit3
_IDLE: Final = object()  # token slot of a descriptor that is not an in-flight head
_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF

__all__ = ["END", "Completion", "SplitMemory", "SplitQueue"]


@dataclass(frozen=True)
class SplitMemory:
    """A split ring's shared memory as typed views (for the ring package's batch fast path only).

    ``desc64[2 d]`` is descriptor d's address, ``desc32[4 d + 2]`` its
    length, ``desc16[8 d + 6]`` its flags and ``desc16[8 d + 7]`` its next;
    ``avail16[0]`` / ``[1]`` / ``[2 + i]`` the avail flags, index and ring,
    ``avail16[used_event]`` used_event; ``used16[0]`` / ``[1]`` the used
    flags and index, ``used32[1 + 2 i]`` / ``[2 + 2 i]`` entry i's id and
    length, ``used16[avail_event]`` avail_event (virtio 1.2 §2.7).
    """

    desc64: memoryview
    desc32: memoryview
    desc16: memoryview
    avail16: memoryview
    used16: memoryview
    used32: memoryview
    used_event: int
    avail_event: int


class SplitQueue:
    """Driver-side split virtqueue over memory from a :class:`MemoryPool`.

    ``event_idx`` and ``indirect`` say whether VIRTIO_F_RING_EVENT_IDX and
    VIRTIO_F_RING_INDIRECT_DESC were negotiated. ``indirect_threshold`` is
    the number of buffers from which a request always goes indirect;
    ``indirect_max`` bounds the size of one indirect table. ``in_order``
    says VIRTIO_F_IN_ORDER was negotiated (see the module docstring).
    """

    format: ClassVar[str] = "split"
    # Slots, not an instance dict: CPython 3.11 specialises every access to a slot, but to an instance
    # dict only while its class has fewer than 30 names (tests/test_hot_attributes.py).
    __slots__ = (
        "_avail16", "_avail_event_i", "_avail_off", "_desc16", "_desc32", "_desc64", "_desc8", "_indirect_tables",
        "_interrupts", "_last", "_ndescs", "_next", "_req_head", "_req_last", "_req_left", "_req_ndescs",
        "_req_table", "_req_table_n", "_req_token", "_req_wlen", "_ring", "_stash", "_tokens", "_used16", "_used32",
        "_used_event_i", "_used_off", "_wlen", "avail_addr", "avail_idx", "broken", "clamp_used_len", "desc_addr",
        "event_idx", "free_head", "free_tail", "in_order", "index", "indirect", "indirect_max",
        "indirect_threshold", "kick_from", "last_used", "long_used", "num_free", "outstanding", "pool", "size",
        "used_addr",
    )

    def __init__(
        self,
        size: int,
        pool: MemoryPool,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_threshold: int = 8,
        indirect_max: int = 1024,
        in_order: bool = False,
    ) -> None:
        if not is_power_of_two(size) or size > MAX_QUEUE_SIZE:
            raise InvalidArgument(f"queue size must be a power of two up to {MAX_QUEUE_SIZE}, got {size}")
        self.index = index
        self.size = size
        self.pool = pool
        self.event_idx = event_idx
        self.indirect = indirect
        self.indirect_threshold = max(2, indirect_threshold)
        self.indirect_max = indirect_max
        self.in_order = in_order
        avail_off, used_off, total = split_layout(size)
        self._ring: Buffer = pool.allocate(total, align=4096)
        view = self._ring.view
        self.desc_addr = self._ring.addr
        self.avail_addr = self._ring.addr + avail_off
        self.used_addr = self._ring.addr + used_off
        self._avail_off = avail_off
        self._used_off = used_off
        self._desc64 = view[: DESC_SIZE * size].cast("Q")
        self._desc32 = view[: DESC_SIZE * size].cast("I")
        self._desc16 = view[: DESC_SIZE * size].cast("H")
        self._desc8 = view[: DESC_SIZE * size]
        self._avail16 = view[avail_off : avail_off + 2 * (3 + size)].cast("H")
        self._used16 = view[used_off : used_off + 6 + 8 * size].cast("H")
        self._used32 = view[used_off : used_off + 4 + 8 * size].cast("I")
        # Index of used_event in _avail16 and of avail_event in _used16.
        self._used_event_i = 2 + size
        self._avail_event_i = 2 + 4 * size
        self._indirect_tables: dict[int, Buffer] = {}
        self._init_state()

    # -- lifecycle ------------------------------------------------------------

    def _init_state(self) -> None:
        size = self.size
        self._ring.view[:] = bytes(len(self._ring.view))
        for buf in self._indirect_tables.values():
            self.pool.free(buf)
        self._indirect_tables.clear()
        self._next: list[int] = list(range(1, size)) + [END]
        for i in range(size):
            self._desc16[8 * i + 7] = self._next[i] & 0xFFFF if i < size - 1 else 0
        self._tokens: list[object] = [_IDLE] * size
        self._ndescs: list[int] = [0] * size
        self._last: list[int] = [0] * size
        self._wlen: list[int] = [0] * size
        self.free_head = 0
        self.free_tail = size - 1
        self.num_free = size
        self.avail_idx = 0  # next avail index the driver will publish (shadow of avail.idx)
        self.last_used = 0  # next used index the driver will consume
        self.outstanding = 0  # chains published and not yet completed
        self.kick_from = 0  # avail_idx at the last kick decision (the window of the next one starts here)
        self.broken: str | None = None
        #: Tolerate a used length above the device-writable bytes offered (clamped to them, counted in
        #: long_used) instead of breaking the queue. QEMU's virtio-scsi (7.2) reports a write's data-out
        #: bytes in its used length (§2.7.8: bytes written); its driver sets this. Safe: a clamped length
        #: never exceeds the buffers offered. Costs nothing unless a length is too long.
        self.clamp_used_len = False
        self.long_used = 0
        self._interrupts = False
        # The request being built (seed: req_start .. req_end).
        self._req_token: object = _IDLE
        self._req_head = END
        self._req_last = END
        self._req_left = 0
        self._req_ndescs = 0
        self._req_wlen = 0
        self._req_table: Buffer | None = None
        self._req_table_n = 0
        self._stash: list[Completion] = []  # IN_ORDER: validated completions beyond a reap's max_n
        self.disable_interrupts()

    def reset(self) -> list[object]:
        """Re-initialise the ring (device reset or restart); returns the tokens that were in flight."""
        lost = self.in_flight_tokens()
        if self._req_head != END:
            self._abort_open()  # an open indirect request holds a table: give it back to the cache
        self._init_state()
        return lost

    def close(self) -> None:
        """Release the ring memory. The queue cannot be used afterwards."""
        if self._req_head != END:
            self._abort_open()
        for buf in self._indirect_tables.values():
            self.pool.free(buf)
        self._indirect_tables.clear()
        for v in (self._desc64, self._desc32, self._desc16, self._desc8, self._avail16, self._used16, self._used32):
            v.release()
        self.pool.free(self._ring)
        self.broken = "closed"

    def in_flight_tokens(self) -> list[object]:
        """Tokens of published chains not yet returned by :meth:`reap`, in no particular order."""
        return [t for t, _ in self._stash] + [t for t in self._tokens if t is not _IDLE]

    def addresses(self) -> RingAddresses:
        """Descriptor table, avail ring, used ring."""
        size = self.size
        return RingAddresses(
            self.desc_addr, self.avail_addr, self.used_addr, DESC_SIZE * size, avail_size(size), used_size(size)
        )

    @property
    def request_open(self) -> bool:
        """A request was started and not yet published or aborted."""
        return self._req_head != END

    # -- the batch fast path's share (ring/fixed_split.py) -------------------------

    def shared_views(self) -> SplitMemory:
        """The ring memory as typed views, for :mod:`pyvirtio.ring.fixed_split` (not for layers above)."""
        return SplitMemory(
            self._desc64,
            self._desc32,
            self._desc16,
            self._avail16,
            self._used16,
            self._used32,
            self._used_event_i,
            self._avail_event_i,
        )

    def take_descriptors(self, counts: Sequence[int]) -> list[list[int]]:
        """Reserve ``len(counts)`` chains of ``counts[s]`` descriptors off the free list, for fixed chains.

        On a queue whose descriptors are all free, chain s is headed by
        descriptor s, the chains' other descriptors follow in order, and the
        rest of the queue stays on the free list, in order; otherwise the
        chains are taken from the head of the free list. The caller links and
        fills them (next fields included) and gives them back with
        :meth:`give_back_descriptors`. The queue must be idle (nothing in
        flight, no request open) and not VIRTIO_F_IN_ORDER (fixed chains lie
        out of ring order).
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self.outstanding or self._req_head != END:
            raise QueueStateError("fixed chains need an idle queue")
        if self.in_order:
            raise InvalidArgument("fixed chains lie out of ring order: not for a VIRTIO_F_IN_ORDER queue")
        if not counts or min(counts) < 1:
            raise InvalidArgument("every chain needs at least one buffer")
        total = sum(counts)
        if total > self.num_free:
            raise InvalidArgument(f"{len(counts)} chains need {total} descriptors, the queue has {self.num_free}")
        size = self.size
        out: list[list[int]] = []
        if self.num_free == size:
            n = len(counts)
            nxt = n
            for s, k in enumerate(counts):
                out.append([s, *range(nxt, nxt + k - 1)])
                nxt += k - 1
            for i in range(nxt, size):
                self._next[i] = i + 1 if i + 1 < size else END
                self._desc16[8 * i + 7] = i + 1 if i + 1 < size else 0
            self.free_head = nxt if nxt < size else END
            self.free_tail = size - 1
            self.num_free = size - nxt
            return out
        for k in counts:
            taken = []
            for _ in range(k):
                i = self.free_head
                self.free_head = self._next[i]
                self.num_free -= 1
                taken.append(i)
            out.append(taken)
        return out

    def give_back_descriptors(self, chains: Iterable[Sequence[int]]) -> None:
        """Return chains from :meth:`take_descriptors` to the free list (their requests must be done)."""
        for taken in chains:
            self._release_chain(taken[0], taken[-1], len(taken))
            for a, b in zip(taken, taken[1:], strict=False):
                self._next[a] = b

    # -- a new device behind the same ring (vhost-user reconnect) --------------

    def restart_base(self, resubmit: bool = True, in_flight: Iterable[int] | None = None) -> int:
        """Prepare the ring for a new device after the old one went away; returns the ring base.

        The old device's used index U says what completed: the entries from
        ``last_used`` to U stay in the used ring and are reaped as usual (once).
        Every other published chain is in flight, and there are exactly
        ``avail_idx - U`` of them (each publication is either used or in
        flight). With ``resubmit`` their heads are written again, oldest
        first, at avail positions U .. avail_idx - 1, so a device started at
        base U (and used index U, which it reads from the ring) pops exactly
        those: each request not completed is resubmitted once, and none that
        completed is. ``avail_idx`` does not move. Without ``resubmit`` (the
        back end tracks in-flight requests itself, INFLIGHT_SHMFD) the avail
        ring is left alone. A request may therefore be executed twice by the
        device (it completed but the old device died before publishing it),
        which virtio allows across a device reset.

        ``in_flight`` lists the heads in flight when the chains are managed
        outside the queue (:class:`~pyvirtio.ring.fixed.FixedChains`);
        default: every head with a token. Used entries are validated as by
        :meth:`reap`; a violation marks the queue broken.

        "Oldest first" comes from the avail ring itself (driver-written): the
        newest publication of each in-flight head is found scanning back from
        ``avail_idx``; heads published more than ``size`` publications ago
        come first. Virtio orders nothing among requests in flight, so this
        only keeps resubmission close to the original order.
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self.in_order:
            # Batched used entries leave stale slots: take the completions now, reap returns them.
            held = self._stash
            self._stash = []
            self.outstanding -= len(held)
            try:
                got = self._reap_in_order(1 << 30)
            except DeviceProtocolError as exc:
                exc.completed[:0] = held  # nothing validated is lost
                raise
            self._stash = held + got
            self.outstanding += len(self._stash)
        size = self.size
        mask = size - 1
        last = self.last_used
        used_idx = self._used16[1]
        n_used = (used_idx - last) & 0xFFFF
        if n_used > self.outstanding:
            self._break(f"used index moved by {n_used} with only {self.outstanding} requests in flight", [])
        if in_flight is None:
            heads = {h for h, t in enumerate(self._tokens) if t is not _IDLE}
        else:
            heads = set(in_flight)
        ordering.read_barrier()
        used32 = self._used32
        for k in range(n_used):
            head = used32[1 + 2 * ((last + k) & mask)]
            if head not in heads:
                self._break(f"used id {head} is not the head of an in-flight request", [])
            heads.discard(head)  # completed: reaped later, not resubmitted
        if not resubmit:
            return used_idx
        avail = self.avail_idx
        if len(heads) != (avail - used_idx) & 0xFFFF:
            self._break(
                f"{len(heads)} requests in flight but the used index {used_idx} is "
                f"{(avail - used_idx) & 0xFFFF} behind the avail index {avail}",
                [],
            )
        a16 = self._avail16
        newest_first: list[int] = []
        seen: set[int] = set()
        for k in range(1, size + 1 if heads else 1):
            head = a16[2 + ((avail - k) & mask)]
            if head in heads and head not in seen:
                seen.add(head)
                newest_first.append(head)
                if len(seen) == len(heads):
                    break
        order = sorted(heads - seen) + newest_first[::-1]
        for k, head in enumerate(order):
            a16[2 + ((used_idx + k) & mask)] = head
        ordering.write_barrier()
        a16[1] = avail
        self.kick_from = avail  # the caller kicks once the new device is set up
        return used_idx

    # -- request building (seed: virtqueue_req_start / add_iovs / flush / abort)

    def start(self, token: object, n: int) -> None:
        """Begin a request of ``n`` buffers identified by ``token``.

        Raises :class:`RequestTooLarge` if it can never fit, :class:`QueueFull`
        if it does not fit now. A request that is still open is published first.
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self._req_head != END:
            self._finish()
        if n < 1:
            raise InvalidArgument(f"a request needs at least one buffer, got {n}")
        use_indirect = self.indirect and n > 1 and (n >= self.indirect_threshold or n > self.num_free)
        if use_indirect and n > self.indirect_max:
            if n > self.size:
                raise RequestTooLarge(
                    f"{n} buffers exceed both the indirect table limit {self.indirect_max} "
                    f"and queue {self.index} of {self.size} descriptors"
                )
            use_indirect = False  # too many for one table, but the ring itself can hold them
        if use_indirect:
            if self.num_free < 1:
                raise QueueFull(f"queue {self.index}: no free descriptor")
            head = self.free_head
            table = self._indirect_tables.pop(head, None)
            if table is None or table.size < DESC_SIZE * n:
                if table is not None:
                    self.pool.free(table)
                table = self.pool.allocate(DESC_SIZE * max(n, self.indirect_threshold), align=DESC_SIZE)
            self._req_table = table
            self._req_table_n = 0
        else:
            if n > self.size:
                raise RequestTooLarge(
                    f"{n} buffers can never fit queue {self.index} of {self.size} descriptors"
                    + ("" if self.indirect else " (no indirect descriptors negotiated)")
                )
            if n > self.num_free:
                raise QueueFull(f"queue {self.index}: {n} descriptors needed, {self.num_free} free")
        self._req_token = token
        self._req_head = self.free_head
        self._req_last = END
        self._req_left = n
        self._req_ndescs = 0
        self._req_wlen = 0

    def add(self, addr: int, length: int, writable: bool = False) -> None:
        """Add one buffer (device-readable, or device-writable if ``writable``)."""
        if self._req_left <= 0:
            if self._req_head == END:
                raise QueueStateError("add() without start()")
            raise InvalidArgument("more buffers added than announced in start()")
        if not (0 <= length <= _U32 and 0 <= addr <= _U64):
            raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
        flags = DESC_F_WRITE | DESC_F_NEXT if writable else DESC_F_NEXT
        if writable:
            self._req_wlen += length
        self._req_left -= 1
        table = self._req_table
        if table is not None:
            i = self._req_table_n
            self._req_table_n = i + 1
            # Indirect entries are chained 0, 1, 2 ... (virtio 1.2 §2.7.5.3.1).
            table.view[16 * i : 16 * i + 16] = (
                addr.to_bytes(8, "little")
                + length.to_bytes(4, "little")
                + flags.to_bytes(2, "little")
                + (i + 1).to_bytes(2, "little")
            )
            return
        i = self.free_head
        self.free_head = self._next[i]
        self.num_free -= 1
        d16 = self._desc16
        self._desc64[2 * i] = addr
        self._desc32[4 * i + 2] = length
        d16[8 * i + 6] = flags
        d16[8 * i + 7] = self.free_head & 0xFFFF
        self._req_last = i
        self._req_ndescs += 1

    def submit(self, token: object, buffers: Sequence[tuple[int, int, bool]]) -> None:
        """start + add every (addr, length, writable) buffer + publish, in one call.

        The fast path for a whole request: same checks and result as the
        three-step API, with the per-call overhead paid once.
        """
        n = len(buffers)
        if (
            self.broken is not None
            or self._req_head != END
            or n > self.num_free
            or n < 1
            or (self.indirect and n >= self.indirect_threshold)
        ):
            self.start(token, n)
            try:
                for addr, length, writable in buffers:
                    self.add(addr, length, writable)
            except PyvirtioError:
                self._abort_open()  # as on the fast path: a refused request leaves nothing open
                raise
            self._finish()
            return
        d64 = self._desc64
        d32 = self._desc32
        d16 = self._desc16
        nxt = self._next
        head = i = self.free_head
        last = i
        wlen = 0
        for addr, length, writable in buffers:
            if not (0 <= length <= _U32 and 0 <= addr <= _U64):
                # free_head and num_free are untouched until the end: nothing to undo.
                raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
            last = i
            i = nxt[last]
            d64[2 * last] = addr
            d32[4 * last + 2] = length
            if writable:
                wlen += length
                d16[8 * last + 6] = DESC_F_WRITE | DESC_F_NEXT
            else:
                d16[8 * last + 6] = DESC_F_NEXT
            d16[8 * last + 7] = i & 0xFFFF
        d16[8 * last + 6] &= ~DESC_F_NEXT
        self.free_head = i
        self.num_free -= n
        self._ndescs[head] = n
        self._last[head] = last
        self._tokens[head] = token
        self._wlen[head] = wlen
        idx = self.avail_idx
        self._avail16[2 + (idx & (self.size - 1))] = head
        idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        self.outstanding += 1
        ordering.write_barrier()
        self._avail16[1] = idx

    def submit3(self, token: object, a0: int, l0: int, a1: int, l1: int, w1: bool, a2: int, l2: int) -> bool:
        """The one-request fast lane: :meth:`submit` of three buffers, then :meth:`kick_prepare`, in one call.

        The chain is (a0, l0) device-readable, (a1, l1) device-writable if
        ``w1``, (a2, l2) device-writable: virtio-blk's header, data and status,
        virtio-scsi's header, data-out or response, response or data-in. Same
        checks, errors and ring state as ``submit(token, [...])`` followed by
        ``kick_prepare()``; returns the kick decision. A queue that cannot
        take the chain directly (broken, a request open, fewer than three free
        descriptors, indirect from three buffers) goes the general way.
        """
        if self.broken is not None or self._req_head != END or self.num_free < 3 or (
            self.indirect and self.indirect_threshold <= 3
        ):
            self.submit(token, ((a0, l0, False), (a1, l1, w1), (a2, l2, True)))
            return self.kick_prepare()
        if (l0 | l1 | l2) >> 32 or (a0 | a1 | a2) >> 64:  # a negative one or one too large: nonzero
            for addr, length in ((a0, l0), (a1, l1), (a2, l2)):  # the first bad one, as submit names it
                if not (0 <= length <= _U32 and 0 <= addr <= _U64):
                    raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
        nxt = self._next
        i0 = self.free_head
        i1 = nxt[i0]
        i2 = nxt[i1]
        free = nxt[i2]
        f1 = DESC_F_WRITE | DESC_F_NEXT if w1 else DESC_F_NEXT
        if i1 == i0 + 1 and i2 == i0 + 2:  # side by side (a reused chain, LIFO): one store of 48 bytes
            _DESC3.pack_into(
                self._desc8, 16 * i0, a0, l0, DESC_F_NEXT, i1, a1, l1, f1, i2, a2, l2, DESC_F_WRITE, free & 0xFFFF
            )
        else:
            d8 = self._desc8
            DESC.pack_into(d8, 16 * i0, a0, l0, DESC_F_NEXT, i1)
            DESC.pack_into(d8, 16 * i1, a1, l1, f1, i2)
            DESC.pack_into(d8, 16 * i2, a2, l2, DESC_F_WRITE, free & 0xFFFF)
        self.free_head = free
        self.num_free -= 3
        self._ndescs[i0] = 3
        self._last[i0] = i2
        self._tokens[i0] = token
        self._wlen[i0] = l1 + l2 if w1 else l2
        idx = self.avail_idx
        a16 = self._avail16
        a16[2 + (idx & (self.size - 1))] = i0
        idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        self.outstanding += 1
        if not STRONGLY_ORDERED:
            ordering.write_barrier()
        a16[1] = idx
        return self.kick_prepare()

    def add_buffers(self, buffers: Iterable[tuple[int, int, bool]]) -> None:
        """Add several (addr, length, writable) buffers."""
        for addr, length, writable in buffers:
            self.add(addr, length, writable)

    def _finish(self) -> None:
        """Close the open request and publish it in the avail ring."""
        if self._req_left:
            self._abort_open()
            raise InvalidArgument(f"request published with {self._req_left} announced buffers missing")
        head = self._req_head
        table = self._req_table
        if table is not None:
            n = self._req_table_n
            tv = table.view
            off = 16 * (n - 1) + 12  # flags of the last entry: clear NEXT
            tv[off] = tv[off] & ~DESC_F_NEXT
            i = self.free_head
            self.free_head = self._next[i]
            self.num_free -= 1
            self._desc64[2 * i] = table.addr
            self._desc32[4 * i + 2] = DESC_SIZE * n
            self._desc16[8 * i + 6] = DESC_F_INDIRECT
            self._indirect_tables[i] = table
            self._req_table = None
            self._ndescs[head] = 1
            self._last[head] = head
        else:
            last = self._req_last
            self._desc16[8 * last + 6] &= ~DESC_F_NEXT
            self._ndescs[head] = self._req_ndescs
            self._last[head] = last
        self._tokens[head] = self._req_token
        self._wlen[head] = self._req_wlen
        self._req_head = END
        self._req_token = _IDLE
        idx = self.avail_idx
        self._avail16[2 + (idx & (self.size - 1))] = head
        idx = (idx + 1) & 0xFFFF
        self.avail_idx = idx
        self.outstanding += 1
        ordering.write_barrier()
        self._avail16[1] = idx

    def _abort_open(self) -> None:
        head = self._req_head
        self._req_head = END  # closed first: _release_chain puts its own chain back at the head of the list
        if self._req_table is not None:
            self._indirect_tables[head] = self._req_table  # keep it for reuse
            self._req_table = None
        elif self._req_ndescs and self.in_order:
            # The newest descriptors go back to the front: the next chain starts where this one did.
            self.free_head = head
            self.num_free += self._req_ndescs
        elif self._req_ndescs:
            self._release_chain(head, self._req_last, self._req_ndescs)
        self._req_token = _IDLE
        self._req_left = 0

    def abort(self) -> None:
        """Drop the open (unpublished) request, returning its descriptors."""
        if self._req_head == END:
            raise QueueStateError("abort() with no open request")
        self._abort_open()

    def flush(self) -> bool:
        """Publish the open request; return True if the device must be notified.

        The decision follows virtio 1.2 §2.7.10: with EVENT_IDX, notify if
        avail_event lies in the window published since the last decision;
        otherwise notify unless the device set VRING_USED_F_NO_NOTIFY.
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self._req_head != END:
            self._finish()
        return self.kick_prepare()

    def kick_prepare(self) -> bool:
        """The kick decision for everything published since the last one."""
        new = self.avail_idx
        old = self.kick_from
        if new == old:
            return False
        self.kick_from = new
        if self.event_idx and not self._interrupts:
            # Keep the device from ever reaching used_event (seed v18.07+): a
            # size + 1 behind the last used index. Rewritten only once the used
            # index has come half-way round to it, not on every kick decision:
            # the device reads that cache line at every completion, so each
            # store would pull it back across CPUs.
            ue = self._used_event_i
            if (self._avail16[ue] - self.last_used) & 0xFFFF < 0x8000:
                self._avail16[ue] = (self.last_used - self.size - 1) & 0xFFFF
        fence_acquire()  # ordering.full_barrier(), inlined: the avail index before the device's fields
        fence_release()
        if self.event_idx:
            # vring_need_event(avail_event, new, old), inlined (§2.7.10)
            return (new - self._used16[self._avail_event_i] - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._used16[0] & USED_F_NO_NOTIFY

    # -- completions (seed: virtio_recv_pkts) ---------------------------------

    def pending(self) -> int:
        """Completions the device has published and the driver not yet reaped."""
        return len(self._stash) + ((self._used16[1] - self.last_used) & 0xFFFF)

    def reap(self, max_n: int = 1 << 16) -> list[Completion]:
        """Reap up to ``max_n`` used entries as (token, bytes written) pairs."""
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self.in_order:
            return self._reap_in_order(max_n)
        last = self.last_used
        n = (self._used16[1] - last) & 0xFFFF
        if not n:
            return []
        if n > self.outstanding:
            self._break(f"used index moved by {n} with only {self.outstanding} requests in flight", [])
        if not STRONGLY_ORDERED:
            ordering.read_barrier()
        if n > max_n:
            n = max_n
        out: list[Completion] = []
        used32 = self._used32
        tokens = self._tokens
        wlen = self._wlen
        ndescs = self._ndescs
        mask = self.size - 1
        size = self.size
        for _ in range(n):
            slot = 1 + 2 * (last & mask)
            head = used32[slot]
            length = used32[slot + 1]
            if head >= size:
                self._break(f"used id {head} is out of range (queue size {size})", out)
            token = tokens[head]
            if token is _IDLE:
                self._break(f"used id {head} is not the head of an in-flight request", out)
            if length > wlen[head]:
                length = self._long_used(head, length, wlen[head], out)
            tokens[head] = _IDLE
            self._release_chain(head, self._last[head], ndescs[head])  # _free_chain
            ndescs[head] = 0
            last = (last + 1) & 0xFFFF
            self.last_used = last
            out.append((token, length))
        self.outstanding -= len(out)
        if self._interrupts and self.event_idx:
            self._avail16[self._used_event_i] = last
        return out

    def _reap_in_order(self, max_n: int) -> list[Completion]:
        """reap() with VIRTIO_F_IN_ORDER: a used entry completes every chain up to its head (§2.7.9)."""
        out = self._stash[:max_n]
        del self._stash[:max_n]
        last = self.last_used
        n = (self._used16[1] - last) & 0xFFFF
        if len(out) >= max_n or not n:
            self.outstanding -= len(out)
            return out
        left = self.outstanding - len(out)
        if n > left:
            self._break(f"used index moved by {n} with only {left} requests in flight", out)
        ordering.read_barrier()
        used32 = self._used32
        tokens = self._tokens
        wlen = self._wlen
        ndescs = self._ndescs
        mask = self.size - 1
        size = self.size
        oldest = (self.free_tail + 1) & mask  # the first descriptor in ring order that is not free
        while n and len(out) < max_n:
            slot = 1 + 2 * (last & mask)
            head = used32[slot]
            length = used32[slot + 1]
            if head >= size:
                self._break(f"used id {head} is out of range (queue size {size})", out)
            if tokens[head] is _IDLE:
                self._break(f"used id {head} is not the head of an in-flight request", out)
            if length > wlen[head]:
                length = self._long_used(head, length, wlen[head], out)
            k = 1
            h = oldest
            while h != head:  # the chains in flight follow each other in ring order
                h = (h + ndescs[h]) & mask
                k += 1
                if k > n:
                    self._break(
                        f"used id {head} completes {k}+ requests in order but the used index moved by {n}",
                        out,
                    )
            h = oldest
            for _ in range(k):
                token = tokens[h]
                tokens[h] = _IDLE
                nxt = (h + ndescs[h]) & mask
                out.append((token, length if h == head else wlen[h]))  # skipped: "used ... completely"
                self._free_chain(h)
                h = nxt
            oldest = h
            n -= k
            last = (last + k) & 0xFFFF
            self.last_used = last
        if len(out) > max_n:
            self._stash[:0] = out[max_n:]
            del out[max_n:]
        self.outstanding -= len(out)
        if self._interrupts and self.event_idx:
            self._avail16[self._used_event_i] = last
        return out

    def _long_used(self, ident: int, length: int, offered: int, completed: list[Completion]) -> int:
        """A used length above the ``offered`` writable bytes: clamped if tolerated (clamp_used_len), else broken."""
        if not self.clamp_used_len:
            self._break(
                f"used length {length} for id {ident} exceeds the {offered} device-writable bytes offered", completed
            )
        self.long_used += 1
        return offered

    def _break(self, reason: str, completed: list[Completion]) -> None:
        self.outstanding -= len(completed)
        self.broken = reason
        raise DeviceProtocolError(f"queue {self.index}: {reason}", completed)

    def _free_chain(self, head: int) -> None:
        self._release_chain(head, self._last[head], self._ndescs[head])
        self._ndescs[head] = 0

    def _release_chain(self, head: int, last: int, ndescs: int) -> None:
        """Give the chain head..last (ndescs descriptors) back to the free list.

        At its head (LIFO, as Linux's virtio_ring): the next request takes
        the same descriptors again, so requests one at a time keep using one
        chain, which a device that caches checked chains (the embedded back
        ends) and its CPU's cache find unchanged. With VIRTIO_F_IN_ORDER at
        its tail (FIFO, the seed's vq_ring_free_chain): descriptors must be
        used in ring order (module docstring). At its tail too while a
        request is open: its next descriptors are the ones at the head.
        """
        self.num_free += ndescs
        if self.in_order or (self._req_head != END and self.free_head != END):
            # FIFO: with IN_ORDER always; otherwise while a request is open, whose start() / add()
            # take their descriptors one by one from the head of the list (its head descriptor
            # included, taken when it is published): a chain pushed there would cut into it.
            if self.free_head == END:
                self.free_head = head
            else:
                self._next[self.free_tail] = head
                self._desc16[8 * self.free_tail + 7] = head
            self.free_tail = last
            self._next[last] = END
            return
        first = self.free_head
        self._next[last] = first
        if first == END:
            self.free_tail = last
        else:
            self._desc16[8 * last + 7] = first
        self.free_head = head

    # -- interrupt suppression ------------------------------------------------

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (polling mode, the default)."""
        self._interrupts = False
        if self.event_idx:
            self._avail16[self._used_event_i] = (self.last_used - self.size - 1) & 0xFFFF
        else:
            self._avail16[0] = AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used entry; True if entries are already pending.

        A caller that gets True must reap instead of waiting: the device may
        have completed work before it could see the request for interrupts.
        """
        self._interrupts = True
        if self.event_idx:
            self._avail16[self._used_event_i] = self.last_used
        else:
            self._avail16[0] = 0
        ordering.full_barrier()
        return self.pending() != 0

    @property
    def interrupts_enabled(self) -> bool:
        return self._interrupts

    # -- introspection --------------------------------------------------------

    def check_free_list(self) -> int:
        """Walk the shadow free list; return its length (tests and debugging)."""
        count = 0
        i = self.free_head
        seen = set()
        while i != END:
            if i in seen or count > self.size:
                raise AssertionError(f"free list loops at {i}")
            seen.add(i)
            count += 1
            if i == self.free_tail:
                if self._next[i] != END:
                    raise AssertionError("free tail is not the end of the list")
                break
            i = self._next[i]
        return count

    def __repr__(self) -> str:
        return (
            f"SplitQueue(index={self.index}, size={self.size}, free={self.num_free}, "
            f"in_flight={self.outstanding}, broken={self.broken!r})"
        )
