"""Inflight I/O tracking for the embedded back ends (vhost-user.rst, "Inflight I/O tracking").

Theory of operation. A back end that crashes loses what it had popped from
the ring and not yet completed; the ring cannot tell it again, because
requests complete out of order: split avail entries get reused, and packed
descriptors get overwritten by used ones. So the back end keeps a record in
a shared area that outlives it: it creates the area (a memfd) when the
frontend asks (GET_INFLIGHT_FD), the frontend keeps the fd and hands it to
every later back end (SET_INFLIGHT_FD), and a restarted back end reads there
what its predecessor had in flight and resubmits it, oldest first. One
region per queue, 64-byte aligned, its layout the ring format's
(:func:`queue_region_size`); the format is the one negotiated when the ring
starts.

**Split rings** (:class:`QueueInflight`; the layout of libvhost-user and DPDK)::

    header   features u64 (0), version u16 (1; 0 = not initialised yet),
             desc_num u16 (entries), last_batch_head u16, used_idx u16
    desc[i]  inflight u8, padding[5], next u16, counter u64     (16 bytes each)

When a chain is popped, ``desc[head].counter`` takes the next value of a
counter and ``desc[head].inflight`` is set; after the used entries of a
batch are published (used index stored), their flags are cleared and
``used_idx`` is set to the used index. A back end that died between those
two steps leaves ``used_idx`` behind the ring's used index;
:meth:`QueueInflight.recover` then clears the flags of the used entries in
between (read from the used ring itself, so a batch of any size is covered,
where libvhost-user's ``last_batch_head`` covers one entry; with
VIRTIO_F_IN_ORDER, whose batches leave used slots stale, the oldest heads by
counter: an in-order device completes in pop order), and the heads still in
flight are resubmitted ordered by counter. The ring resumes at
``used_idx + len(heads)``.

**Packed rings** (:class:`PackedQueueInflight`): descriptor-level entries,
since the ring slots of a buffer in flight may be overwritten::

    header   features u64, version u16, desc_num u16, free_head u16,
             old_free_head u16, used_idx u16, old_used_idx u16,
             used_wrap_counter u8, old_used_wrap_counter u8, padding[7]  (32 bytes)
    desc[i]  inflight u8, padding u8, next u16, last u16, num u16, counter u64,
             id u16, flags u16, len u32, addr u64                         (32 bytes each)

The entries not in use form a free list linked by ``next``. Popping a list
of descriptors copies each into the entry at ``free_head`` and follows
``next``; the first entry also gets the counter, ``inflight``, the count
``num`` and ``last``; ``old_free_head`` moves past the list when it is
complete. Using a batch gives its entry lists back to the free list and
moves ``used_idx`` (with its wrap counter) by the batch's descriptors
*before* the used descriptors are published; afterwards their ``inflight``
flags are cleared and the ``old_*`` fields committed. A successor
(:meth:`PackedQueueInflight.recover`) finds ``used_idx`` differing from
``old_used_idx`` when its predecessor died in between, and looks at the ring
slot at ``old_used_idx``: no longer available means the batch was published
(commit), else roll back to the ``old_*`` fields; then entries on the free
list lose their flag, and the flagged lists are resubmitted by counter
(:meth:`~pyvirtio.ring.device_packed.PackedDeviceQueue.adopt`).

The ring base is the area's: a packed ring's used position is not in shared
memory, and the frontend's base cannot say where the avail side must resume
(the frontend does not know which buffers its device had popped). As DPDK's
vhost_blk does, the used position is the area's (``used_idx`` and its wrap
counter), and the avail position follows it by the descriptors of the lists
in flight (each used descriptor gave back exactly the slots of its buffer,
so the slots in flight lie right after the used position). A frontend's
base that disagrees is logged. What the frontend's ring holds after that
position (descriptors of buffers that completed out of order) is never
popped: the device's avail position is past it.

The area is written by the frontend's process too (it holds the fd), so it
is not trusted: every index read from it is range-checked, a free list or
entry list is walked at most ``desc_num`` steps, resubmitted chains are
checked as freshly popped ones, and the sizes in SET_INFLIGHT_FD are checked
against the file. Only :mod:`pyvirtio.memory` maps it.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Iterator
from typing import Protocol

from pyvirtio.errors import ChainError, DriverProtocolError, PyvirtioError
from pyvirtio.memory import PAGE_SIZE, Region
from pyvirtio.protocol.vhost_user import InflightInfo
from pyvirtio.ring import ordering
from pyvirtio.ring.base import DeviceRing
from pyvirtio.ring.chain import Chain
from pyvirtio.ring.device_side import DeviceQueue, PackedDeviceQueue
from pyvirtio.spec.ring import (
    MAX_QUEUE_SIZE,
    PACKED_BASE_EXACT,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    packed_base,
    parse_packed_base,
)

log = logging.getLogger("pyvirtio.backends")

HEADER_SIZE = 16
ENTRY_SIZE = 16
PACKED_HEADER_SIZE = 32
PACKED_ENTRY_SIZE = 32
VERSION = 1
_ALIGN = 64
_BOTH = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED

#: DescStatePacked: inflight, padding, next, last, num, counter, id, flags, len, addr.
PACKED_ENTRY = struct.Struct("<BxHHHQHHIQ")
#: QueueRegionPacked's header fields after ``features``: version .. old_used_wrap_counter.
PACKED_HEADER = struct.Struct("<8xHHHHHHBB7x")
_DESC_COPY = struct.Struct("<HHIQ")  # id, flags, len, addr (offset 16 of an entry)
_FIRST = struct.Struct("<HHQ")  # last, num, counter (offset 4 of a list's first entry)
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
# 16-bit fields of a packed entry e in the region seen as u16 words: word index + _E16 * e.
_E16 = PACKED_ENTRY_SIZE // 2
_NEXT16 = (PACKED_HEADER_SIZE + 2) // 2
_LAST16 = (PACKED_HEADER_SIZE + 4) // 2
_NUM16 = (PACKED_HEADER_SIZE + 6) // 2
#: free_head and old_free_head (header bytes 12..15, see PACKED_HEADER), and old_free_head as a u16 word.
_FREE_HEAD_AT = 12
_FREE_HEADS = struct.Struct("<HH")
_OLD_FREE16 = 7


def queue_region_size(queue_size: int, ring_format: str = "split") -> int:
    """Bytes of one queue's region for ``queue_size`` descriptors (header + entries, 64-byte aligned)."""
    if ring_format == "packed":
        raw = PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * queue_size
    else:
        raw = HEADER_SIZE + ENTRY_SIZE * queue_size
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


class RingTracker(Protocol):
    """What the data path calls on a ring's tracker (either format), bound to the ring's queue."""

    def pop(self) -> Chain | None:
        """The queue's next chain, recorded as in flight (None: nothing available)."""
        ...

    def resubmissions(self) -> Iterator[Chain]:
        """The chains a predecessor left in flight, oldest first (once); each is in flight on the queue."""
        ...

    def publishing(self, heads: list[int]) -> None:
        """Used entries of ``heads`` were added and are about to be published (``flush_used``)."""
        ...

    def published(self, heads: list[int]) -> None:
        """The used entries of ``heads`` are published."""
        ...

    def detach(self) -> None:
        """The queue stops: forget it (the record in the area stays)."""
        ...


class QueueInflight:
    """One split queue's region of the area: mark popped heads, clear completed ones, recover."""

    __slots__ = ("index", "desc_num", "_bytes", "_h16", "_q64", "counter", "_queue", "_resubmit")

    def __init__(self, view: memoryview, index: int, desc_num: int) -> None:
        self.index = index
        self.desc_num = desc_num
        self._bytes = view
        self._h16 = view[:HEADER_SIZE].cast("H")  # [4] version, [5] desc_num, [6] last_batch_head, [7] used_idx
        self._q64 = view.cast("Q")  # counter of entry i at 3 + 2 * i
        self.counter = 0
        self._queue: DeviceQueue | None = None
        self._resubmit: list[int] = []

    @property
    def used_idx(self) -> int:
        return int(self._h16[7])

    def begin(self, head: int) -> None:
        """``head`` was popped: it is in flight from now on."""
        self._q64[3 + 2 * head] = self.counter
        self.counter += 1
        ordering.write_barrier()  # the counter before the flag that makes it count
        self._bytes[HEADER_SIZE + ENTRY_SIZE * head] = 1

    def end(self, heads: list[int], used_idx: int) -> None:
        """``heads`` were published in the used ring, whose index is now ``used_idx``."""
        b = self._bytes
        for head in heads:
            b[HEADER_SIZE + ENTRY_SIZE * head] = 0
        if heads:
            self._h16[6] = heads[-1]
        ordering.write_barrier()
        self._h16[7] = used_idx

    def recover(self, queue: DeviceQueue) -> list[int]:
        """Heads the previous back end left in flight on ``queue``, oldest first (see the module docstring)."""
        size = queue.size
        h16 = self._h16
        b = self._bytes
        if h16[4] == 0:  # a fresh area: nothing was ever in flight
            h16[4] = VERSION
            h16[5] = self.desc_num
            h16[7] = queue.used_idx
            self.counter = 0
            return []
        q64 = self._q64
        used_idx = queue.used_idx
        behind = (used_idx - h16[7]) & 0xFFFF
        if behind:
            # Died after publishing used entries, before clearing their flags.
            if queue.in_order:
                # Batched used entries leave stale slots; an in-order device used the oldest popped.
                flagged = [h for h in range(min(self.desc_num, size)) if b[HEADER_SIZE + ENTRY_SIZE * h]]
                flagged.sort(key=lambda h: q64[3 + 2 * h])
                done = flagged[:behind]
            else:
                done = [queue.used_id(h16[7] + k) for k in range(min(behind, size))]
            for head in done:
                if head < self.desc_num:
                    b[HEADER_SIZE + ENTRY_SIZE * head] = 0
            h16[7] = used_idx
        heads = []
        top = -1
        for head in range(self.desc_num):
            if b[HEADER_SIZE + ENTRY_SIZE * head]:
                if head >= size:
                    b[HEADER_SIZE + ENTRY_SIZE * head] = 0  # outside the ring: cannot be a request of it
                    continue
                heads.append(head)
                top = max(top, q64[3 + 2 * head])
        heads.sort(key=lambda h: q64[3 + 2 * h])
        self.counter = top + 1
        return heads

    # -- the RingTracker calls --------------------------------------------------------

    def start(self, queue: DeviceRing) -> None:
        """The ring starts on ``queue``: recover (the avail side resumes after what was popped) and track."""
        if not isinstance(queue, DeviceQueue):
            raise TypeError("a split inflight region tracks a split ring")
        heads = self.recover(queue)
        if heads:
            # vhost-user.rst: the ring resumes after what was popped (completed + in flight).
            queue.last_avail = (queue.used_idx + len(heads)) & 0xFFFF
            log.info("ring %d: resubmitting %d request(s) left in flight", self.index, len(heads))
        self._queue = queue
        self._resubmit = heads

    def pop(self) -> Chain | None:
        queue = self._queue
        assert queue is not None
        chain = queue.pop()
        if chain is not None:
            self.begin(chain.head)
        return chain

    def resubmissions(self) -> Iterator[Chain]:
        queue = self._queue
        assert queue is not None
        pending, self._resubmit = self._resubmit, []
        for head in pending:  # still marked in flight, with their old counters
            yield queue.walk(head)

    def publishing(self, heads: list[int]) -> None:
        pass  # the used index in the ring tells a successor what was published

    def published(self, heads: list[int]) -> None:
        queue = self._queue
        assert queue is not None
        self.end(heads, queue.used_idx)

    def detach(self) -> None:
        self._queue = None
        self._resubmit = []

    def release(self) -> None:
        self.detach()
        for v in (self._h16, self._q64, self._bytes):
            v.release()


class PackedQueueInflight:
    """One packed queue's region of the area: descriptor-level entries (see the module docstring).

    The free list ends at entry ``desc_num`` (an index no entry has): it is
    never exhausted by a well-behaved ring, which holds at most ``size <=
    desc_num`` descriptors in flight.
    """

    def __init__(self, view: memoryview, index: int, desc_num: int) -> None:
        self.index = index
        self.desc_num = desc_num
        self._bytes = view
        self._w16 = view.cast("H")  # the same bytes as u16 words (entries' next / last / num: _NEXT16 ...)
        self.counter = 0
        self._queue: PackedDeviceQueue | None = None
        self._ring: memoryview | None = None  # the descriptor ring, as 64-bit words
        self._size = 0
        self._entry_of: dict[int, int] = {}  # buffer id -> its first entry, while in flight
        self._resubmit: list[int] = []  # first entries of the lists to resubmit, oldest first

    # -- the area's fields (header: see PACKED_HEADER; an entry: PACKED_ENTRY) -----------

    def _header(self) -> list[int]:
        """[version, desc_num, free_head, old_free_head, used_idx, old_used_idx, wrap, old_wrap]."""
        return list(PACKED_HEADER.unpack_from(self._bytes, 0))

    def _set_header(self, h: list[int]) -> None:
        PACKED_HEADER.pack_into(self._bytes, 0, *h)

    def _at(self, e: int) -> int:
        return PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * e

    def _u16(self, e: int, offset: int) -> int:
        value: int = _U16.unpack_from(self._bytes, self._at(e) + offset)[0]
        return value

    def _next(self, e: int) -> int:
        """The entry after ``e`` (``desc_num``: the free list's end); checked."""
        nxt = self._u16(e, 2)
        if nxt > self.desc_num:
            raise DriverProtocolError(f"ring {self.index}: the inflight area's entry {e} links to {nxt}")
        return nxt

    def _counter(self, e: int) -> int:
        value: int = _U64.unpack_from(self._bytes, self._at(e) + 8)[0]
        return value

    # -- start: recover what a predecessor left ------------------------------------------

    def recover(self, ring: memoryview, size: int, base: int) -> int:
        """Check and repair the region for a ring of ``size`` descriptors; returns the base to resume at.

        ``ring`` is the descriptor ring (bytes); ``base`` the frontend's
        SET_VRING_BASE value, used for a fresh area. Raises
        :class:`~pyvirtio.errors.DriverProtocolError` for a region that
        cannot be believed.
        """
        n = self.desc_num
        b = self._bytes
        self._size = size
        self._resubmit = []
        h = self._header()
        if h[0] == 0:  # fresh: every entry free, the used side where the frontend says
            _ap, _aw, used, wrap = parse_packed_base(base)
            for e in range(n):
                b[self._at(e)] = 0
                _U16.pack_into(b, self._at(e) + 2, e + 1)
            self._set_header([VERSION, n, 0, 0, used, used, wrap, wrap])
            self.counter = 0
            return base
        _v, _n, free, old_free, used, old_used, wrap, old_wrap = h
        if max(free, old_free) > n or max(used, old_used) >= size or wrap > 1 or old_wrap > 1:
            raise DriverProtocolError(f"ring {self.index}: the inflight area's header is out of range")
        if (used, wrap) != (old_used, old_wrap):
            # Died between moving used_idx and committing: was the batch published?
            flags = _U16.unpack_from(ring, 16 * old_used + 14)[0]
            if flags & _BOTH != (PACKED_DESC_F_AVAIL if old_wrap else PACKED_DESC_F_USED):
                old_free, old_used, old_wrap = free, used, wrap  # no longer available: published, commit
        self._set_header([VERSION, n, old_free, old_free, old_used, old_used, old_wrap, old_wrap])  # roll back
        e = old_free
        for _ in range(n):  # entries on the free list are not in flight
            if e == n:
                break
            b[self._at(e)] = 0
            e = self._next(e)
        firsts = [e for e in range(n) if b[self._at(e)]]
        firsts.sort(key=self._counter)
        slots = 0
        for e in firsts:
            num = self._u16(e, 6)
            if not 1 <= num <= size:
                raise DriverProtocolError(f"ring {self.index}: the inflight area's entry {e} holds {num} descriptors")
            slots += num
        if slots > size:
            raise DriverProtocolError(f"ring {self.index}: the inflight area holds {slots} descriptors in flight")
        self.counter = 1 + max((self._counter(e) for e in firsts), default=-1)
        self._resubmit = firsts
        avail, avail_wrap = old_used + slots, old_wrap
        if avail >= size:
            avail -= size
            avail_wrap ^= 1
        resumed = packed_base(avail, avail_wrap, old_used, old_wrap)
        if firsts:
            log.info("ring %d: resubmitting %d request(s) left in flight", self.index, len(firsts))
        if resumed != base:
            log.info(
                "ring %d: resuming at 0x%08x from the inflight area (the frontend's base was 0x%08x)",
                self.index, resumed, base,
            )
        return resumed | PACKED_BASE_EXACT  # used at 0 in lap 0 is not "used = avail"

    def start(self, queue: DeviceRing, ring: memoryview) -> None:
        """Track ``queue`` (started at :meth:`recover`'s base); ``ring`` is its descriptor ring (bytes)."""
        if not isinstance(queue, PackedDeviceQueue):
            raise TypeError("a packed inflight region tracks a packed ring")
        self._queue = queue
        self._ring = ring.cast("Q")
        self._size = queue.size
        self._entry_of = {}

    # -- the RingTracker calls --------------------------------------------------------

    def pop(self) -> Chain | None:
        queue = self._queue
        d64 = self._ring
        assert queue is not None and d64 is not None
        start = queue.last_avail
        chain = queue.pop()
        if chain is None:
            return None
        size = self._size
        count = (queue.last_avail - start) % size or size
        b = self._bytes
        w16 = self._w16
        desc_num = self.desc_num
        first = free = w16[_OLD_FREE16]  # old_free_head == free_head between lists
        pos = start
        last = first
        for _ in range(count):
            if free >= desc_num:
                raise DriverProtocolError(f"ring {self.index}: the inflight area's free list is exhausted")
            w1 = d64[2 * pos + 1]
            # id, flags, len, addr of the descriptor as the device read it
            _DESC_COPY.pack_into(b, PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * free + 16, w1 >> 32 & 0xFFFF, w1 >> 48,
                                 w1 & 0xFFFFFFFF, d64[2 * pos])
            last = free
            free = w16[_NEXT16 + _E16 * free]  # as _next: checked
            if free > desc_num:
                raise DriverProtocolError(f"ring {self.index}: the inflight area's entry {last} links to {free}")
            pos = pos + 1 if pos + 1 < size else 0
        at = PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * first
        _FIRST.pack_into(b, at + 4, last, count, self.counter)  # last, num, counter
        self.counter += 1
        b[at] = 1
        ordering.write_barrier()  # the whole list before it counts
        _FREE_HEADS.pack_into(b, _FREE_HEAD_AT, free, free)  # free_head, old_free_head: one store
        self._entry_of[chain.head] = first
        return chain

    def resubmissions(self) -> Iterator[Chain]:
        queue = self._queue
        assert queue is not None
        pending, self._resubmit = self._resubmit, []
        for first in pending:
            descs: list[tuple[int, int, int]] = []
            bid = -1
            e = first
            for k in range(self._u16(first, 6)):
                if k:
                    e = self._next(e)
                    if e == self.desc_num:
                        raise ChainError(f"ring {self.index}: the inflight record {first} is cut short", None)
                _f, _n, _l, _c, _k, bid, flags, length, addr = PACKED_ENTRY.unpack_from(self._bytes, self._at(e))
                descs.append((addr, length, flags))
            chain = queue.adopt(bid, descs)
            self._entry_of[bid] = first
            yield chain

    def publishing(self, heads: list[int]) -> None:
        """Give the batch's entries back and move used_idx, before the used descriptors are published."""
        h = self._header()
        free, used, wrap = h[2], h[4], h[6]
        size = self._size
        w16 = self._w16
        entry_of = self._entry_of
        for bid in heads:
            e = entry_of[bid]
            w16[_NEXT16 + _E16 * w16[_LAST16 + _E16 * e]] = free  # desc[e.last].next = free_head
            free = e
            used += w16[_NUM16 + _E16 * e]
            if used >= size:
                used -= size
                wrap ^= 1
        h[2], h[4], h[6] = free, used, wrap
        self._set_header(h)
        ordering.write_barrier()  # the area before the ring

    def published(self, heads: list[int]) -> None:
        """Clear the batch's flags and commit the old_* fields."""
        b = self._bytes
        entry_of = self._entry_of
        for bid in heads:
            b[PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * entry_of.pop(bid)] = 0
        ordering.write_barrier()
        h = self._header()
        h[3], h[5], h[7] = h[2], h[4], h[6]
        self._set_header(h)

    def detach(self) -> None:
        if self._ring is not None:
            self._ring.release()
            self._ring = None
        self._queue = None
        self._entry_of = {}
        self._resubmit = []

    def release(self) -> None:
        self.detach()
        self._w16.release()
        self._bytes.release()


class InflightArea:
    """The shared area of every queue, mapped from the fd of GET/SET_INFLIGHT_FD."""

    def __init__(self, region: Region, num_queues: int, queue_size: int) -> None:
        self.region = region
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._queues: dict[int, QueueInflight | PackedQueueInflight] = {}

    @classmethod
    def create(cls, num_queues: int, queue_size: int, ring_format: str = "split") -> InflightArea:
        """A new zeroed area (memfd) for GET_INFLIGHT_FD, laid out for ``ring_format``."""
        size = num_queues * queue_region_size(queue_size, ring_format)
        region = Region.create(size, name="pyvirtio-inflight")
        return cls(region, num_queues, queue_size)

    @classmethod
    def attach(
        cls, fd: int, info: InflightInfo, error: type[PyvirtioError] = DriverProtocolError
    ) -> InflightArea:
        """Map the area a frontend sent with SET_INFLIGHT_FD; takes ``fd`` (closed on failure).

        The size is checked against the split layout (the smaller); a packed
        ring checks its own when it starts (:meth:`queue`).
        """
        try:
            if not 1 <= info.num_queues <= 0xFFFF or not 1 <= info.queue_size <= MAX_QUEUE_SIZE:
                raise error(f"SET_INFLIGHT_FD: {info.num_queues} queues of {info.queue_size} descriptors")
            need = info.num_queues * queue_region_size(info.queue_size)
            if info.mmap_size < need:
                raise error(f"SET_INFLIGHT_FD: {info.mmap_size} bytes for {need} needed")
            if info.mmap_offset % PAGE_SIZE:
                raise error(f"SET_INFLIGHT_FD: mmap_offset 0x{info.mmap_offset:x} is not page aligned")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise error("SET_INFLIGHT_FD: the fd is not a regular file (memfd, tmpfs)")
            if st.st_size < info.mmap_offset + info.mmap_size:
                raise error(
                    f"SET_INFLIGHT_FD: {info.mmap_size} bytes at {info.mmap_offset} exceed the file ({st.st_size})"
                )
            try:
                region = Region(fd, info.mmap_size, fd_offset=info.mmap_offset, owns_fd=True)
            except (OSError, ValueError, OverflowError) as exc:
                raise error(f"SET_INFLIGHT_FD: cannot map the area: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(region, info.num_queues, info.queue_size)

    @property
    def fd(self) -> int:
        return self.region.fd

    @property
    def info(self) -> InflightInfo:
        return InflightInfo(self.region.size, 0, self.num_queues, self.queue_size)

    def queue(self, index: int, ring_format: str = "split") -> QueueInflight | PackedQueueInflight | None:
        """Queue ``index``'s region for a ring of ``ring_format``, or None if the area has none for it."""
        if not 0 <= index < self.num_queues:
            return None
        q = self._queues.get(index)
        packed = ring_format == "packed"
        if q is not None and isinstance(q, PackedQueueInflight) == packed:
            return q
        if q is not None:  # the format changed (a new negotiation): a new view
            q.release()
            del self._queues[index]
        size = queue_region_size(self.queue_size, ring_format)
        if (index + 1) * size > self.region.size:
            return None  # an area laid out for split rings has no room for packed regions
        view = self.region.view[index * size : (index + 1) * size]
        q = PackedQueueInflight(view, index, self.queue_size) if packed else QueueInflight(view, index, self.queue_size)
        self._queues[index] = q
        return q

    def close(self) -> None:
        for q in self._queues.values():
            q.release()
        self._queues.clear()
        self.region.close()


__all__ = [
    "ENTRY_SIZE",
    "HEADER_SIZE",
    "PACKED_ENTRY",
    "PACKED_ENTRY_SIZE",
    "PACKED_HEADER",
    "PACKED_HEADER_SIZE",
    "InflightArea",
    "PackedQueueInflight",
    "QueueInflight",
    "RingTracker",
    "VERSION",
    "queue_region_size",
]
