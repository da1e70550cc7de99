"""The device's view of a packed virtqueue (virtio 1.2 §2.8), for back ends and tests.

Theory of operation. The device keeps two cursors over the one descriptor
ring, each with its wrap counter (both start at slot 0, counter 1, §2.8.1):
``last_avail``, where it reads the next available chain, and ``used_pos``,
where it writes the next used descriptor. A descriptor is available when its
AVAIL flag equals the avail wrap counter and its USED flag does not. A chain
is the run of descriptors linked by VIRTQ_DESC_F_NEXT; its buffer id sits in
the last one (§2.8.6). Using a buffer writes one descriptor at ``used_pos``
(id, bytes written, both wrap flags = the used wrap counter) and moves
``used_pos`` on by the number of descriptors the chain held, so the device
remembers, per id in flight, how many that was.

Nothing the driver wrote is trusted (as in :mod:`pyvirtio.ring.device_side`):
each descriptor is read once into locals; a chain walk stops after ``size``
descriptors; every descriptor of a chain must itself be available (§2.8.6:
"all flags ... must be set/cleared correctly in all descriptors in the
list"); every buffer is translated through the
:class:`~pyvirtio.memory.MemoryTable`; an indirect table (§2.8.7) is only
allowed as the sole descriptor of its list (§2.8.19), holds whole
descriptors and at most ``max_chain`` of them; readable buffers come before
writable ones (§2.8.17); an id already in flight is refused (the device
could not tell the two buffers apart).

Violations raise :class:`~pyvirtio.ring.chain.ChainError`. Its ``head`` tells
what happened to the ring: an id when the chain's extent was known (its
descriptors are consumed and the id is in flight, so the back end can
complete it with an error and carry on), None when it was not (an
unavailable descriptor inside the list, a list longer than the ring, flags
no driver writes, a duplicate id): nothing was consumed and the queue cannot
make progress, the back end must treat it as broken.

Remembered lists (the split side's chain cache, for a ring whose lists move):
a direct list that was walked is kept by the bytes of its first descriptor
but the id (address + second word), with its translated buffers and the
exact bytes all its descriptors had when they were checked. A list in a
later lap whose first descriptor has those bytes, wherever in the ring it
lies, is taken without a walk when its descriptors are those bytes (one
struct read and one comparison: every descriptor available with the wrap
bits checked then, the same addresses and lengths through the same table,
the same id; nothing checked depends on the list's place in the ring but
crossing its end), or, failing that, when every word but the ids matches (a
driver that hands out ids from a free list); anything else is walked with
every check, and so is every list across the end of the ring (its
descriptors lie in two laps). An id in flight is refused on every path. A
driver with fixed chains (:mod:`pyvirtio.ring.fixed_packed`) writes the same
bytes per slot and lap parity, whatever ring position its lists land on, so
after two laps its lists are all remembered. The store is bounded (cleared
when a driver's lists keep changing).

Used descriptors: :meth:`PackedDeviceQueue.add_used` writes each used
descriptor at once, the first of a batch but its flags (length, id and
flags of the later ones in one store each: a driver reads used descriptors
in ring order, so it looks at them only once the first is used);
:meth:`~PackedDeviceQueue.flush_used` writes the first's flags behind the
write barrier, so a driver polling the first sees the whole batch at once
(§2.8.9, "Multi-buffer requests"; §2.8.21). With VIRTIO_F_IN_ORDER the device uses buffers in
the order it popped them and batches as the split side does (§2.8.8): one
used descriptor per run whose buffers but the last were used completely,
naming the run's last id, at the run's first slot; flush_used lays them out
the same way.

Event suppression (§2.8.10): ``flush_used`` returns the notify decision from
the driver's structure (DISABLE, ENABLE, or DESC with EVENT_IDX: the named
descriptor was used in this flush: :func:`~pyvirtio.spec.ring.packed_need_event`, inlined, as the
barriers are: a call each costs as much as the rest of a flush); ``enable_notifications`` /
``disable_notifications`` write the device's. ``base`` is the ring state for
GET_VRING_BASE (:func:`~pyvirtio.spec.ring.packed_base`).
"""

from __future__ import annotations

import struct
from collections import deque
from typing import ClassVar, Final

from pyvirtio.errors import DriverProtocolError, InvalidArgument
from pyvirtio.memory import MemoryTable
from pyvirtio.ring import ordering
from pyvirtio.ring.chain import Chain, ChainError
from pyvirtio.ring.ordering import STRONGLY_ORDERED, fence_acquire, fence_release
from pyvirtio.spec.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESS_SIZE,
    MAX_QUEUE_SIZE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_INITIAL_BASE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    RING_EVENT_FLAGS_MASK,
    RING_EVENT_WRAP_SHIFT,
    packed_base,
    parse_packed_base,
)

_AVAIL: Final = PACKED_DESC_F_AVAIL
_USED: Final = PACKED_DESC_F_USED
_BOTH: Final = _AVAIL | _USED
# In the second 8 bytes of a descriptor (len | id << 32 | flags << 48): the bits a cached
# chain must match (length and flags but the two wrap bits), the wrap bits, the id.
_KEEP: Final = 0x7F7F_0000_FFFF_FFFF
_W_AVAIL: Final = _AVAIL << 48
_W_USED: Final = _USED << 48
_W_CHECK: Final = _KEEP | _W_AVAIL | _W_USED
_W_NOID: Final = 0xFFFF_0000_FFFF_FFFF  # the second word but the id
_EVENT_WRAP: Final = 1 << RING_EVENT_WRAP_SHIFT  # the wrap counter's bit in desc_event_off_wrap
_EVENT_OFF: Final = _EVENT_WRAP - 1  # the offset's bits in it
# On the per-request path, fields that do not overlap are combined with + (a specialised operation in
# CPython 3.11, shared with the rest of the server), not | or ^ (generic calls only this path would
# bring into the instruction cache: 37 of its misses per request, callgrind's cache simulation).

#: A direct chain as walked, by its first descriptor's address + second word but the id: its
#: descriptors' bytes as read, the struct that reads that many, (2 * place in the list, addr, second
#: word & _W_CHECK) of each descriptor, its readable and writable buffers, its length, its buffer id,
#: its writable bytes.
_CachedChain = tuple[
    bytes, struct.Struct, list[tuple[int, int, int]], list[memoryview], list[memoryview], int, int, int
]

#: Structs reading n whole descriptors as one bytes object, by n (shared by every queue).
_IMAGES: dict[int, struct.Struct] = {}


def _image_struct(n: int) -> struct.Struct:
    st = _IMAGES.get(n)
    if st is None:
        st = _IMAGES[n] = struct.Struct(f"{DESC_SIZE * n}s")
    return st


class PackedDeviceQueue:
    """Device side of a packed ring given as memoryviews (descriptor ring, driver and device areas)."""

    format: ClassVar[str] = "packed"
    # Slots, not an instance dict: CPython 3.11 specialises every access to a slot, but to an instance
    # dict only while its class has fewer than 30 names (tests/test_hot_attributes.py).
    __slots__ = (
        "_avail_bad", "_avail_want", "_batch", "_chains", "_chains_max", "_d16", "_d32", "_d64", "_desc", "_dev16",
        "_drv16", "_first", "_first_flags", "_fl", "_ids", "_inflight", "_lens", "_order", "_signalled",
        "_used_bits", "_w1", "event_idx", "in_order", "index", "indirect", "last_avail", "max_chain", "memory",
        "size", "used_pos",
    )

    def __init__(
        self,
        size: int,
        memory: MemoryTable,
        desc: memoryview,
        driver_event: memoryview,
        device_event: memoryview,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = True,
        in_order: bool = False,
        base: int = PACKED_INITIAL_BASE,
        max_chain: int | None = None,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise InvalidArgument(f"packed queue size must be 1..{MAX_QUEUE_SIZE}, got {size}")
        if len(desc) < DESC_SIZE * size or len(driver_event) < EVENT_SUPPRESS_SIZE or len(device_event) < 4:
            raise InvalidArgument("ring memory is smaller than the queue size needs")
        avail_pos, avail_wrap, used_pos, used_wrap = parse_packed_base(base)
        if avail_pos >= size or used_pos >= size:
            raise DriverProtocolError(f"queue {index}: ring base 0x{base:08x} points outside {size} descriptors")
        self.index = index
        self.size = size
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.in_order = in_order
        self.max_chain = max(size, 1024) if max_chain is None else max_chain  # as the split side
        self._desc = desc[: DESC_SIZE * size]
        self._d64 = self._desc.cast("Q")
        self._d32 = self._desc.cast("I")
        self._d16 = self._desc.cast("H")
        # One field of every descriptor, by ring slot: flags, id, len, and the second 8 bytes (len | id | flags).
        self._fl = self._d16[7::8]
        self._ids = self._d16[6::8]
        self._lens = self._d32[2::4]
        self._w1 = self._d64[1::2]
        self._drv16 = driver_event[:EVENT_SUPPRESS_SIZE].cast("H")  # the driver's: read only
        self._dev16 = device_event[:EVENT_SUPPRESS_SIZE].cast("H")  # ours
        self.last_avail = avail_pos
        self._avail_want = _AVAIL if avail_wrap else _USED  # AVAIL/USED of an available descriptor now
        self._avail_bad = _BOTH if avail_wrap else 0  # AVAIL/USED no driver writes now (both = the wrap counter)
        self.used_pos = used_pos
        self._used_bits = _BOTH if used_wrap else 0  # AVAIL/USED of a used descriptor now
        self._inflight: dict[int, int] = {}  # id -> ring descriptors of a chain popped, not used
        self._order: deque[tuple[int, int]] = deque()  # IN_ORDER: (id, writable bytes) popped, oldest first
        # The slot of the batch's first used descriptor (-1: none), whose flags flush_used writes.
        self._first = -1
        self._first_flags = 0
        # IN_ORDER: add_used collects (descriptors, id, length, writable bytes), laid out at flush.
        self._batch: list[tuple[int, int, int, int]] = []
        # The used position along two laps (wrap counter 1: the even lap) at the last notification decision.
        self._signalled = used_pos if used_wrap else used_pos + size
        self._chains: dict[int, _CachedChain] = {}  # remembered lists (module docstring)
        self._chains_max = 4 * size + 64  # fixed chains need 2 per slot (one per lap parity)

    @classmethod
    def from_addresses(
        cls,
        memory: MemoryTable,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        user_addresses: bool = True,
        **kw: object,
    ) -> PackedDeviceQueue:
        """Map the ring from frontend virtual addresses (vhost-user) or guest physical ones."""
        tr = memory.uva if user_addresses else memory.gpa
        return cls(
            size,
            memory,
            tr(desc_addr, DESC_SIZE * size),
            tr(driver_addr, EVENT_SUPPRESS_SIZE),
            tr(device_addr, EVENT_SUPPRESS_SIZE),
            **kw,  # type: ignore[arg-type]
        )

    @property
    def base(self) -> int:
        """The GET_VRING_BASE value: next avail and next used slot with their wrap counters."""
        return packed_base(self.last_avail, self.avail_wrap, self.used_pos, self.used_wrap)

    @property
    def avail_wrap(self) -> int:
        """The wrap counter the next available descriptor must carry."""
        return 1 if self._avail_want == _AVAIL else 0

    @property
    def used_wrap(self) -> int:
        """The Device Ring Wrap Counter (§2.8.1)."""
        return 1 if self._used_bits else 0

    @property
    def in_flight(self) -> int:
        """Buffers popped and not yet used."""
        return len(self._inflight)

    # -- available side -------------------------------------------------------

    def avail_pending(self) -> int:
        """1 if the next descriptor is available, else 0 (a packed ring keeps no count)."""
        return 1 if self._fl[self.last_avail] & _BOTH == self._avail_want else 0

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises :class:`ChainError` for a bad one (module docstring)."""
        pos = self.last_avail
        want = self._avail_want
        bits = self._fl[pos] & _BOTH
        if bits != want:  # available: AVAIL == the wrap counter != USED (§2.8.1)
            if bits != self._avail_bad:
                return None
            raise ChainError(
                f"queue {self.index}: descriptor {pos} has flags 0x{self._fl[pos]:04x}: AVAIL and USED equal "
                "the wrap counter, which no driver writes",
                None,
            )
        if not STRONGLY_ORDERED:
            ordering.read_barrier()  # the flags before the rest of the chain
        # Remembered lists, by their first descriptor's bytes but the id (module docstring).
        d64 = self._d64
        j = 2 * pos
        cached = self._chains.get(d64[j] + (d64[j + 1] & _W_NOID))
        if cached is not None:
            image, reader, entries, readable, writable, n, bid, wlen = cached
            if pos + n > self.size:
                return self._walk(pos, 1 if want == _AVAIL else 0)  # now across the end of the ring
            if reader.unpack_from(self._desc, DESC_SIZE * pos)[0] != image:
                # Not the same bytes: the same descriptors but the ids, all available, as when this
                # list was checked and translated? (A driver that hands out ids from a free list.)
                w1 = 0
                for k, w0, w1_checked in entries:
                    w1 = d64[j + k + 1]
                    if d64[j + k] != w0 or w1 & _W_CHECK != w1_checked:
                        return self._walk(pos, 1 if want == _AVAIL else 0)
                bid = w1 >> 32 & 0xFFFF
            # else: the very bytes this list had when it was checked and translated (§2.8.6: each
            # descriptor of it available, the id in the last, addresses through the memory table)
            inflight = self._inflight
            if bid not in inflight:  # else _walk reports it
                inflight[bid] = n
                pos += n
                if pos >= self.size:
                    pos -= self.size
                    self._avail_want = want ^ _BOTH
                    self._avail_bad ^= _BOTH
                self.last_avail = pos
                if self.in_order:
                    self._order.append((bid, wlen))
                return Chain(bid, readable.copy(), writable.copy())
        return self._walk(pos, 1 if want == _AVAIL else 0)

    def _walk(self, head: int, w: int) -> Chain:
        d64 = self._d64
        size = self.size
        gpa = self.memory.gpa
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        entries: list[tuple[int, int, int, int]] = []  # (slot, addr, second word, lap)
        i = head
        lap = 0
        while True:
            # One read of each word: what is checked is what is cached.
            addr = d64[2 * i]
            w1 = d64[2 * i + 1]
            flags = w1 >> 48
            if entries and (flags >> 7 & 1 != w ^ lap or flags >> 15 & 1 == w ^ lap):
                raise ChainError(
                    f"queue {self.index}: descriptor {i} in the list from {head} is not available "
                    f"(flags 0x{flags:04x})",
                    None,
                )
            entries.append((i, addr, w1, lap))
            if flags & DESC_F_INDIRECT:
                return self._walk_indirect(head, w, entries, addr, w1)
            try:
                buf = gpa(addr, w1 & 0xFFFFFFFF)
            except DriverProtocolError as exc:
                return self._bad(head, w, entries, flags, f"descriptor {i}: {exc}")
            if flags & DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                return self._bad(head, w, entries, flags, f"readable descriptor {i} after a writable one")
            else:
                readable.append(buf)
            if not flags & DESC_F_NEXT:
                break
            if len(entries) >= size:
                raise ChainError(f"queue {self.index}: the list from {head} is longer than the ring", None)
            i += 1
            if i == size:
                i = 0
                lap = 1
        n = len(entries)
        bid = w1 >> 32 & 0xFFFF
        if not lap:  # a list across the end of the ring lies in two laps: walked every time
            chains = self._chains
            if len(chains) >= self._chains_max:
                chains.clear()  # a driver whose lists keep changing: start over
            _i, a0, x0, _lap = entries[0]
            chains[a0 + (x0 & _W_NOID)] = (
                # The bytes of the list as read and checked above.
                struct.pack(f"<{2 * n}Q", *[v for _i, a, x, _lap in entries for v in (a, x)]),
                _image_struct(n),
                [(2 * k, a, x & _W_CHECK) for k, (_i, a, x, _lap) in enumerate(entries)],
                readable,
                writable,
                n,
                bid,
                sum(map(len, writable)),
            )
        return self._take(head, n, bid, Chain(0, readable.copy(), writable.copy()))

    def _take(self, head: int, n: int, bid: int, chain: Chain) -> Chain:
        """Consume the chain of ``n`` descriptors at ``head``: its id is now in flight."""
        if bid in self._inflight:
            raise ChainError(f"queue {self.index}: buffer id {bid} at descriptor {head} is already in flight", None)
        self._inflight[bid] = n
        pos = head + n
        if pos >= self.size:
            pos -= self.size
            self._avail_want ^= _BOTH
            self._avail_bad ^= _BOTH
        self.last_avail = pos
        chain.head = bid
        if self.in_order:
            self._order.append((bid, sum(map(len, chain.writable))))
        return chain

    def _bad(self, head: int, w: int, entries: list[tuple[int, int, int, int]], flags: int, why: str) -> Chain:
        """A malformed list: find its end (and id) to consume it, then raise."""
        size = self.size
        d64 = self._d64
        i, _addr, _w1, lap = entries[-1]
        w1 = d64[2 * i + 1]
        while flags & DESC_F_NEXT:
            if len(entries) >= size:
                raise ChainError(f"queue {self.index}: {why}; the list from {head} is longer than the ring", None)
            i += 1
            if i == size:
                i = 0
                lap = 1
            w1 = d64[2 * i + 1]
            flags = w1 >> 48
            if flags >> 7 & 1 != w ^ lap or flags >> 15 & 1 == w ^ lap:
                raise ChainError(f"queue {self.index}: {why}; descriptor {i} of its list is not available", None)
            entries.append((i, 0, 0, lap))
        bid = w1 >> 32 & 0xFFFF
        self._take(head, len(entries), bid, Chain(0, [], []))
        raise ChainError(f"queue {self.index}: {why}", bid)

    def _walk_indirect(
        self, head: int, w: int, entries: list[tuple[int, int, int, int]], addr: int, w1: int
    ) -> Chain:
        flags = w1 >> 48
        length = w1 & 0xFFFFFFFF
        if not self.indirect:
            return self._bad(head, w, entries, flags, "indirect descriptor without RING_INDIRECT_DESC")
        # §2.8.19: no INDIRECT inside a list linked by NEXT (so: alone, with no NEXT).
        if flags & DESC_F_NEXT or len(entries) != 1:
            return self._bad(head, w, entries, flags, f"indirect descriptor {entries[-1][0]} inside a list")
        if length == 0 or length % DESC_SIZE:
            return self._bad(head, w, entries, flags, f"indirect table length {length} is invalid")
        n = length // DESC_SIZE
        if n > self.max_chain:
            return self._bad(head, w, entries, flags, f"indirect table of {n} > {self.max_chain} descriptors")
        gpa = self.memory.gpa
        try:
            table = gpa(addr, length)
        except DriverProtocolError as exc:
            return self._bad(head, w, entries, flags, str(exc))
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        unpack = PACKED_DESC.unpack_from
        for k in range(n):
            # §2.8.7: VIRTQ_DESC_F_WRITE is the only valid flag, the id is reserved: the rest is ignored.
            baddr, blen, _id, bflags = unpack(table, DESC_SIZE * k)
            try:
                buf = gpa(baddr, blen)
            except DriverProtocolError as exc:
                return self._bad(head, w, entries, flags, f"indirect entry {k}: {exc}")
            if bflags & DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                return self._bad(head, w, entries, flags, f"readable indirect entry {k} after a writable one")
            else:
                readable.append(buf)
        return self._take(head, 1, w1 >> 32 & 0xFFFF, Chain(0, readable, writable))  # not cached

    def adopt(self, bid: int, descs: list[tuple[int, int, int]]) -> Chain:
        """Buffer ``bid`` as a previous device popped it: its ring descriptors (addr, len, flags) as recorded.

        For a back end resubmitting what a predecessor left in flight (the
        inflight area of vhost-user.rst keeps copies of the descriptors, since
        used descriptors may have overwritten the ring slots). The record comes
        from shared memory, so it is checked as :meth:`pop` checks a list
        (addresses through the memory table, at most ``size`` descriptors,
        NEXT on all but the last, an indirect table alone and bounded,
        readable before writable); the id becomes in flight holding
        ``len(descs)`` ring slots (and, with IN_ORDER, used after those popped
        before it). The avail position does not move. A bad record raises
        :class:`~pyvirtio.ring.chain.ChainError` (``head`` None).
        """
        where = f"queue {self.index}: resubmitted buffer {bid}"
        if not 0 <= bid <= 0xFFFF or bid in self._inflight:
            raise ChainError(f"{where}: a bad id, or already in flight", None)
        if not 1 <= len(descs) <= self.size:
            raise ChainError(f"{where}: {len(descs)} descriptors for a ring of {self.size}", None)
        gpa = self.memory.gpa
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        try:
            for k, (addr, length, flags) in enumerate(descs):
                if bool(flags & DESC_F_NEXT) != (k + 1 < len(descs)):
                    raise ChainError(f"{where}: NEXT set on the last descriptor or missing before it", None)
                if flags & DESC_F_INDIRECT:
                    n = length // DESC_SIZE
                    if not self.indirect or len(descs) != 1 or not length or length % DESC_SIZE or n > self.max_chain:
                        raise ChainError(f"{where}: an indirect table not allowed here ({length} bytes)", None)
                    table = gpa(addr, length)
                    for j in range(n):
                        baddr, blen, _id, bflags = PACKED_DESC.unpack_from(table, DESC_SIZE * j)
                        self._append(where, gpa(baddr, blen), bool(bflags & DESC_F_WRITE), readable, writable)
                else:
                    self._append(where, gpa(addr, length), bool(flags & DESC_F_WRITE), readable, writable)
        except DriverProtocolError as exc:
            if isinstance(exc, ChainError):
                raise
            raise ChainError(f"{where}: {exc}", None) from None
        self._inflight[bid] = len(descs)
        if self.in_order:
            self._order.append((bid, sum(map(len, writable))))
        return Chain(bid, readable, writable)

    @staticmethod
    def _append(
        where: str, buf: memoryview, is_writable: bool, readable: list[memoryview], writable: list[memoryview]
    ) -> None:
        if is_writable:
            writable.append(buf)
        elif writable:
            raise ChainError(f"{where}: a readable buffer after a writable one", None)
        else:
            readable.append(buf)

    # -- used side ------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Use buffer ``head`` (its id) with ``length`` bytes written; visible at :meth:`flush_used`."""
        n = self._inflight.pop(head, None)
        if n is None:
            raise InvalidArgument(f"queue {self.index}: add_used({head}): no such buffer in flight")
        if self.in_order:
            order = self._order
            if order[0][0] != head:
                self._inflight[head] = n
                raise InvalidArgument(
                    f"queue {self.index} is in order: add_used({head}) but the oldest popped is {order[0][0]}"
                )
            self._batch.append((n, head, length, order.popleft()[1]))
            return
        pos = self.used_pos
        bits = self._used_bits
        if self._first < 0:
            # The batch's first: its id and length now, its flags at flush_used.
            self._lens[pos] = length
            self._ids[pos] = head
            self._first = pos
            self._first_flags = bits + DESC_F_WRITE if length else bits
        else:
            # A later one, written whole now: the driver reads used descriptors in ring order, so
            # it looks at this one only after the first's flags.
            self._w1[pos] = length + (head << 32) + ((bits + DESC_F_WRITE if length else bits) << 48)
        pos += n
        if pos >= self.size:
            pos -= self.size
            self._used_bits = bits ^ _BOTH
        self.used_pos = pos

    def _lay_out_in_order(self) -> None:
        """IN_ORDER: one used descriptor per run of buffers used completely but its last (§2.8.8)."""
        batch = self._batch
        pos = self.used_pos
        start = pos
        skip = 0
        for k, (n, head, length, wlen) in enumerate(batch):
            skip += n
            if length == wlen and k + 1 < len(batch):
                continue  # may be skipped: the driver assumes all its writable bytes
            bits = self._used_bits
            flags = bits | DESC_F_WRITE if length else bits
            if self._first < 0:  # as add_used: the first's flags at flush
                self._lens[start] = length
                self._ids[start] = head
                self._first = start
                self._first_flags = flags
            else:
                self._w1[start] = length | head << 32 | flags << 48
            pos += skip
            skip = 0
            if pos >= self.size:
                pos -= self.size
                self._used_bits ^= _BOTH
            start = pos
        self.used_pos = pos
        batch.clear()

    def flush_used(self) -> bool:
        """Publish the used descriptors added so far; True if the driver must be signalled."""
        if self._batch:
            self._lay_out_in_order()
        pos = self._first
        if pos < 0:
            return False  # nothing used since the last flush: nothing to publish or to signal
        # The first's flags last, behind the write barrier: the batch appears at once (§2.8.9
        # "Multi-buffer requests", §2.8.21).
        if not STRONGLY_ORDERED:
            ordering.write_barrier()
        self._fl[pos] = self._first_flags
        self._first = -1
        # Descriptors used since the last decision: positions along two laps (wrap counter 1: the
        # even lap). At most a ring's worth: the driver cannot make more available before it saw
        # these used. (Differences of positions are brought into the two laps by one addition, not
        # a modulo: fewer distinct operations on the path.)
        size = self.size
        new = self.used_pos if self._used_bits else self.used_pos + size
        count = new - self._signalled
        if count < 0:
            count += 2 * size
        self._signalled = new
        fence_acquire()  # a full barrier: the flags before reading the driver's structure
        fence_release()
        drv = self._drv16
        flags = drv[1] & RING_EVENT_FLAGS_MASK
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            # §2.8.10: notify iff the descriptor the driver named (offset, wrap counter) was used in this
            # window of ``count`` descriptors; positions along two laps (wrap counter 1: the even lap),
            # so a window shorter than the ring is unambiguous (spec.ring.packed_need_event, inlined).
            if count >= size:
                return True
            off = drv[0]
            behind = new - (off & _EVENT_OFF) - (0 if off & _EVENT_WRAP else size) - 1
            if behind < 0:
                behind += 2 * size  # still negative for an offset past both laps (the driver's error): notify
            return behind < count
        return True  # ENABLE; DESC without EVENT_IDX and the reserved value: notify (always safe)

    def push_used(self, head: int, length: int) -> bool:
        """add_used + flush_used."""
        self.add_used(head, length)
        return self.flush_used()

    # -- kick suppression (the device's event suppression structure) ----------

    def enable_notifications(self) -> bool:
        """Ask the driver to kick on new work; True if work is already pending (don't sleep)."""
        dev = self._dev16
        pos = self.last_avail
        want = self._avail_want
        if self.event_idx:
            dev[0] = pos + (_EVENT_WRAP if want == _AVAIL else 0)  # this descriptor, this wrap counter (§2.8.10)
            if not STRONGLY_ORDERED:
                ordering.write_barrier()
            dev[1] = RING_EVENT_FLAGS_DESC
        else:
            dev[1] = RING_EVENT_FLAGS_ENABLE
        fence_acquire()  # a full barrier: our structure before the driver's next descriptor
        fence_release()
        return self._fl[pos] & _BOTH == want

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed (the device is polling)."""
        self._dev16[1] = RING_EVENT_FLAGS_DISABLE

    def release(self) -> None:
        """Drop the views into ring memory (before the memory is unmapped)."""
        self._chains.clear()
        self._batch.clear()
        for v in (self._fl, self._ids, self._lens, self._w1, self._d64, self._d32, self._d16, self._drv16,
                  self._dev16, self._desc):
            v.release()
