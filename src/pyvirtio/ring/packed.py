"""The driver side of a packed virtqueue (virtio 1.2 §2.8).

Theory of operation. One ring of ``size`` descriptors (any size up to 2^15,
not only powers of two) is written by both sides. The driver fills
descriptors in ring order from ``next_avail``; a descriptor is *available*
when its AVAIL flag equals the driver's wrap counter and its USED flag does
not (§2.8.1). The device overwrites them, in the order it finishes, with
*used* descriptors (both flags equal to the device's wrap counter) from the
same starting point; the driver reads them from ``next_used``. Each wrap
counter starts at 1 and flips when its side passes the end of the ring.

A request is a *buffer* with an id chosen by the driver (§2.8.21.1: "get
the next free buffer id"), independent of where its descriptors sit: ids
come from a free id list, and everything the driver needs about an id lives
in private *shadow* state (its token, the ring descriptors it holds, the
device-writable bytes it offered, its buffers for a resubmission). The
driver never reads back what it wrote: the device can scribble over the
ring without confusing it. A used descriptor names an id; the driver then
skips as many ring slots as that buffer held (§2.8.6).

Publishing (§2.8.21.1). A chain's descriptors are written in full, the head's
flags last, behind a release barrier (:func:`~pyvirtio.ring.ordering.write_barrier`):
the device polls the next head, so it never sees part of a chain (§2.8.17:
"MUST NOT make the first descriptor in the list available before all
subsequent descriptors"). Descriptors written but not published (a refused
buffer) are *retracted*: their flags rewritten to "not available" for their
lap, so the device can never take a stale one as the next head. Indirect
requests (VIRTIO_F_RING_INDIRECT_DESC) hold one ring slot pointing at a
table of packed descriptors (§2.8.7); only VIRTQ_DESC_F_WRITE is set in it.

Event suppression (§2.8.10). Each side owns a ``struct pvirtq_event_suppress``
{off_wrap, flags}: the kick decision (:meth:`PackedQueue.kick_prepare`)
reads the device's: DISABLE never kicks, ENABLE always does, DESC (with
VIRTIO_F_RING_EVENT_IDX) kicks when the descriptor it names was made
available since the last decision (:func:`~pyvirtio.spec.ring.packed_need_event`).
Interrupts on/off write the driver's (DESC at ``next_used`` with EVENT_IDX).

Validation of used descriptors (the device is not trusted), as in
:mod:`pyvirtio.ring.split`. A slot is used when AVAIL and USED both equal
the used wrap counter (§2.8.1); with buffers in flight the slot at
``next_used`` was written by the driver this lap, so it must hold either
that or the available flags the driver wrote: anything else is a used
descriptor with the wrong wrap counter or AVAIL/USED garbage. (With nothing
in flight the slot may hold anything of an earlier lap, e.g. the
unoverwritten tail of a chain, and is not looked at.) Then: a used
descriptor with nothing in flight, an id out of range or not in flight, a
length above the device-writable bytes the buffer offered (checked when
VIRTQ_DESC_F_WRITE is set; without it the length is reserved and reported
as 0, §2.8.4). A violation marks the queue broken and raises
:class:`~pyvirtio.errors.DeviceProtocolError` carrying the completions
validated before it; the bad descriptor's buffer stays in flight.

VIRTIO_F_IN_ORDER (``in_order``, §2.8.8 "In-order use of descriptors"): ids
are handed out in cyclic order, so the buffers in flight are the ids
``oldest .. oldest + n - 1``; a used descriptor naming id X completes every
buffer from the oldest up to X, in order, the skipped ones with all their
device-writable bytes ("assumed to have been used ... completely"), and the
driver skips the ring slots of the whole batch. A device that completes a
later buffer before an earlier one is caught when it reports the earlier
(no longer in flight).

Reconnect (:meth:`PackedQueue.restart_base`): the ring base of a packed ring
carries positions and wrap counters (vhost-user.rst, "Vring descriptor
indices for packed virtqueues"; :func:`~pyvirtio.spec.ring.packed_base`).

Bases in lap 0 (``zero_wrap``): both wrap counters start at 1 (§2.8.1), so
a fresh ring's base has bit 15 set. A vhost-user frontend may hand the back
end any ring state in SET_VRING_BASE, and DPDK's vhost_blk example (22.11)
needs that bit clear: it takes the 16-bit value DPDK's vhost library
reports, wrap counter included, as its ring position, and never reads the
wrap counters otherwise (it starts them at 0). With ``zero_wrap`` the ring
starts in lap 0 (every descriptor's AVAIL and USED set: neither available
nor newly used in that lap), and :meth:`restart_base` moves a ring whose
used side is in lap 1 to lap 0 before it names the base (:meth:`_relap`:
the wrap bits of the slots in flight flipped, the free slots marked stale),
so every base it hands out has both wrap counters 0. A peer that reads the
base as vhost-user.rst says sees an ordinary ring state either way.

Memory ordering: see :mod:`pyvirtio.ring.ordering`. The API and its
semantics are the ring protocol's (:mod:`pyvirtio.ring.base`).

The batch fast path (:mod:`pyvirtio.ring.fixed_packed`, behind
:class:`~pyvirtio.ring.fixed.FixedChains`) is this ring's too: it reserves
buffer ids 0 .. n-1 (:meth:`PackedQueue.reserve_ids`, which shares the ring
memory and the per-id shadow lists, :class:`PackedShared`) and keeps the
shadow state below (``next_avail``, ``avail_bits``, ``next_used``,
``used_bits``, ``num_free``, ``outstanding``, each id's token) current after
every call, so this ring's reap, ``restart_base`` and ``reset`` can take
over. A reserved id a reap completes stays idle, off the free id list.
Nothing above the ring layer uses ``reserve_ids`` / ``give_back_ids``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
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
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESS_SIZE,
    MAX_QUEUE_SIZE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_DESC_F_WRAP_BITS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    RING_EVENT_FLAGS_MASK,
    RING_EVENT_WRAP_SHIFT,
    packed_base,
    packed_layout,
    packed_need_event,
)

_IDLE: Final = object()  # token of an id that is not in flight
_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF
_AVAIL: Final = PACKED_DESC_F_AVAIL
_USED: Final = PACKED_DESC_F_USED
_FLIP: Final = PACKED_DESC_F_WRAP_BITS
_NEXT: Final = DESC_F_NEXT
_WRITE: Final = DESC_F_WRITE
_WN: Final = DESC_F_WRITE | DESC_F_NEXT

Buffers = Sequence[tuple[int, int, bool]]


@dataclass(frozen=True)
class PackedShared:
    """The ring memory and shadow lists of a :class:`PackedQueue`, shared with its batch fast path.

    ``desc`` is the descriptor ring as bytes, ``desc16``/``desc32`` the same
    as 16/32-bit fields, ``flags``/``ids``/``lens`` one field of every
    descriptor indexed by ring slot; ``driver16``/``device16`` the two event suppression
    structures. ``tokens``, ``ndescs``, ``wlen``, ``bufs`` are the per-id
    shadow lists (``idle`` is the token of an id not in flight); ``stash``
    the validated completions a reconnect left for the next reap.
    """

    desc: memoryview
    desc16: memoryview
    desc32: memoryview
    flags: memoryview
    ids: memoryview
    lens: memoryview
    driver16: memoryview
    device16: memoryview
    tokens: list[object]
    ndescs: list[int]
    wlen: list[int]
    bufs: list[Buffers | None]
    stash: list[Completion]
    idle: object


class PackedQueue:
    """Driver-side packed virtqueue over memory from a :class:`MemoryPool`.

    ``event_idx``, ``indirect`` and ``in_order`` say whether
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC and VIRTIO_F_IN_ORDER
    were negotiated; ``indirect_threshold`` is the number of buffers from
    which a request always goes indirect, ``indirect_max`` bounds one table.
    """

    format: ClassVar[str] = "packed"
    # Slots, not an instance dict: CPython 3.11 specialises every access to a slot, but to an instance
    # dict only while its class has fewer than 30 names (tests/test_hot_attributes.py).
    __slots__ = (
        "_bufs", "_desc16", "_desc32", "_desc64", "_dev16", "_drv16", "_flags16", "_free_ids", "_ids16",
        "_interrupts", "_kick_navail", "_lens32", "_navail", "_ndescs", "_oldest_id", "_release_id", "_req_bufs",
        "_req_id", "_req_left", "_req_table", "_req_token", "_req_wlen", "_ring", "_stash", "_table_len", "_tables",
        "_take_id", "_tokens", "_untake_id", "_wlen", "avail_bits", "broken", "clamp_used_len", "desc_addr",
        "device_addr", "driver_addr", "event_idx", "in_order", "index", "indirect", "indirect_max",
        "indirect_threshold", "long_used", "next_avail", "next_used", "num_free", "outstanding", "pool",
        "reserved_ids", "size", "used_bits", "zero_wrap",
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
        zero_wrap: bool = False,
    ) -> None:
        if not 1 <= size <= MAX_QUEUE_SIZE:
            raise InvalidArgument(f"packed queue size must be 1..{MAX_QUEUE_SIZE}, got {size}")
        self.index = index
        self.size = size
        self.pool = pool
        self.event_idx = event_idx
        self.indirect = indirect
        self.indirect_threshold = max(2, indirect_threshold)
        self.indirect_max = indirect_max
        self.in_order = in_order
        self.zero_wrap = zero_wrap
        driver_off, device_off, total = packed_layout(size)
        self._ring: Buffer = pool.allocate(total, align=4096)
        view = self._ring.view
        self.desc_addr = self._ring.addr
        self.driver_addr = self._ring.addr + driver_off
        self.device_addr = self._ring.addr + device_off
        n = DESC_SIZE * size
        self._desc64 = view[:n].cast("Q")
        self._desc32 = view[:n].cast("I")
        self._desc16 = view[:n].cast("H")
        # One field of every descriptor, indexed by ring slot (strided views): the batch fast path's (PackedShared).
        self._flags16 = self._desc16[7::8]
        self._ids16 = self._desc16[6::8]
        self._lens32 = self._desc32[2::4]
        # Event suppression: [0] desc_event_off_wrap, [1] desc_event_flags.
        self._drv16 = view[driver_off : driver_off + EVENT_SUPPRESS_SIZE].cast("H")  # ours
        self._dev16 = view[device_off : device_off + EVENT_SUPPRESS_SIZE].cast("H")  # the device's
        self._tables: dict[int, Buffer] = {}  # indirect tables by buffer id, kept for reuse
        self._init_state()

    # -- lifecycle ------------------------------------------------------------

    def _init_state(self) -> None:
        size = self.size
        self._ring.view[:] = bytes(len(self._ring.view))  # §2.8.13: "zero-initialized"
        for buf in self._tables.values():
            self.pool.free(buf)
        self._tables.clear()
        self._tokens: list[object] = [_IDLE] * size
        self._ndescs: list[int] = [0] * size  # ring slots held, by id
        self._wlen: list[int] = [0] * size  # device-writable bytes offered, by id
        # Buffers of a direct chain (kept for a resubmission); None for an indirect one.
        self._bufs: list[Buffers | None] = [None] * size
        self._table_len: dict[int, int] = {}  # bytes of the indirect table of an id in flight
        # Free ids: a stack, or with IN_ORDER a FIFO (ids in flight stay a cyclic range).
        ids: deque[int] = deque(range(size)) if self.in_order else deque(range(size - 1, -1, -1))
        self._free_ids = ids
        self._take_id: Callable[[], int] = ids.popleft if self.in_order else ids.pop
        self._untake_id: Callable[[int], None] = ids.appendleft if self.in_order else ids.append
        self._release_id: Callable[[int], None] = ids.append  # a reaped id back to the free list
        self.reserved_ids = 0  # ids 0 .. reserved_ids - 1 belong to the batch fast path (reserve_ids)
        self._oldest_id = 0  # IN_ORDER: the id in flight the longest
        self.next_avail = 0  # ring slot of the next descriptor the driver writes
        self.avail_bits = _AVAIL  # AVAIL/USED bits of an available descriptor this lap (wrap 1)
        self.next_used = 0  # ring slot where the device writes the next used descriptor
        self.used_bits = _FLIP  # AVAIL|USED of a used descriptor this lap: both = wrap counter 1
        if self.zero_wrap:  # lap 0 (module docstring): every slot stale, as if used in lap 1
            for i in range(size):
                self._desc16[8 * i + 7] = _FLIP
            self.avail_bits = _USED
            self.used_bits = 0
        self.num_free = size  # ring slots not held by a published buffer
        self.outstanding = 0  # buffers published and not yet returned by reap()
        self._navail = 0  # descriptors made available, free-running (kick windows)
        self._kick_navail = 0  # _navail at the last kick decision
        self._stash: list[Completion] = []  # validated completions not yet returned (oldest first)
        self.broken: str | None = None
        #: Tolerate a used length above the device-writable bytes offered (clamped to them, counted in
        #: long_used) instead of breaking the queue. QEMU's virtio-scsi (7.2) reports a write's data-out
        #: bytes in its used length (§2.7.8: bytes written); its driver sets this. Safe: a clamped length
        #: never exceeds the buffers offered. Costs nothing unless a length is too long.
        self.clamp_used_len = False
        self.long_used = 0
        self._interrupts = False
        # The request being built: its buffers are written when it is published.
        self._req_bufs: list[tuple[int, int, bool]] | None = None
        self._req_token: object = _IDLE
        self._req_id = 0
        self._req_left = 0
        self._req_table: Buffer | None = None
        self._req_wlen = 0
        self.disable_interrupts()

    def reset(self) -> list[object]:
        """Re-initialise the ring (device reset); returns the tokens that were in flight."""
        lost = self.in_flight_tokens()
        if self._req_bufs is not None:
            self._abort_open()
        self._init_state()
        return lost

    def close(self) -> None:
        """Release the ring memory. The queue cannot be used afterwards."""
        if self._req_bufs is not None:
            self._abort_open()
        for buf in self._tables.values():
            self.pool.free(buf)
        self._tables.clear()
        for v in (self._flags16, self._ids16, self._lens32, self._desc64, self._desc32, self._desc16, self._drv16,
                  self._dev16):
            v.release()
        self.pool.free(self._ring)
        self.broken = "closed"

    def addresses(self) -> RingAddresses:
        """Descriptor ring, driver and device event suppression structures."""
        return RingAddresses(
            self.desc_addr,
            self.driver_addr,
            self.device_addr,
            DESC_SIZE * self.size,
            EVENT_SUPPRESS_SIZE,
            EVENT_SUPPRESS_SIZE,
        )

    def in_flight_tokens(self) -> list[object]:
        """Tokens published and not yet returned by :meth:`reap`, in no particular order."""
        return [t for t, _ in self._stash] + [t for t in self._tokens if t is not _IDLE]

    @property
    def initial_base(self) -> int:
        """The ring base of a fresh ring (SET_VRING_BASE): position 0, both wrap counters 1, or 0 with ``zero_wrap``."""
        wrap = 0 if self.zero_wrap else 1
        return packed_base(0, wrap, 0, wrap)

    @property
    def avail_wrap(self) -> int:
        """The Driver Ring Wrap Counter (§2.8.1)."""
        return 1 if self.avail_bits == _AVAIL else 0

    @property
    def used_wrap(self) -> int:
        """The wrap counter the next used descriptor must carry."""
        return 1 if self.used_bits else 0

    # -- request building -------------------------------------------------------

    def start(self, token: object, n: int) -> None:
        """Begin a request of ``n`` buffers identified by ``token``.

        Raises :class:`RequestTooLarge` if it can never fit, :class:`QueueFull`
        if it does not fit now. A request that is still open is published first.
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self._req_bufs is not None:
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
            use_indirect = False
        need = 1 if use_indirect else n
        if not use_indirect and n > self.size:
            raise RequestTooLarge(
                f"{n} buffers can never fit queue {self.index} of {self.size} descriptors"
                + ("" if self.indirect else " (no indirect descriptors negotiated)")
            )
        if need > self.num_free:
            raise QueueFull(f"queue {self.index}: {need} descriptors needed, {self.num_free} free")
        bid = self._take_id()  # cannot fail: fewer buffers in flight than ring slots
        if use_indirect:
            table = self._tables.pop(bid, None)
            if table is None or table.size < DESC_SIZE * n:
                if table is not None:
                    self.pool.free(table)
                table = self.pool.allocate(DESC_SIZE * max(n, self.indirect_threshold), align=DESC_SIZE)
            self._req_table = table
        self._req_id = bid
        self._req_token = token
        self._req_left = n
        self._req_wlen = 0
        self._req_bufs = []

    def add(self, addr: int, length: int, writable: bool = False) -> None:
        """Add one buffer (device-readable, or device-writable if ``writable``)."""
        bufs = self._req_bufs
        if bufs is None:
            raise QueueStateError("add() without start()")
        if self._req_left <= 0:
            raise InvalidArgument("more buffers added than announced in start()")
        if not (0 <= length <= _U32 and 0 <= addr <= _U64):
            raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
        table = self._req_table
        if table is not None:
            # §2.8.7: a table of packed descriptors, VIRTQ_DESC_F_WRITE the only flag; id reserved.
            PACKED_DESC.pack_into(table.view, DESC_SIZE * len(bufs), addr, length, 0, _WRITE if writable else 0)
        if writable:
            self._req_wlen += length
        self._req_left -= 1
        bufs.append((addr, length, writable))

    def add_buffers(self, buffers: Iterable[tuple[int, int, bool]]) -> None:
        """Add several (addr, length, writable) buffers."""
        for addr, length, writable in buffers:
            self.add(addr, length, writable)

    def submit(self, token: object, buffers: Buffers) -> None:
        """start + add every (addr, length, writable) buffer + publish, in one call.

        The fast path for a whole request; same checks and result as the
        three-step API. ``buffers`` is kept (not copied) until the request
        completes: a reconnect resubmits from it, so do not mutate it.
        """
        n = len(buffers)
        if (
            self.broken is not None
            or self._req_bufs is not None
            or not 0 < n <= self.num_free
            or (self.indirect and n >= self.indirect_threshold)
        ):
            self.start(token, n)
            try:
                self.add_buffers(buffers)
            except PyvirtioError:
                self._abort_open()
                raise
            self._finish()
            return
        # _write_chain inlined: the hot path of every engine.
        bid = self._take_id()
        d64 = self._desc64
        d32 = self._desc32
        d16 = self._desc16
        size = self.size
        head = pos = self.next_avail
        bits = head_bits = self.avail_bits
        hflags = f = 0
        last = pos
        wlen = 0
        for addr, length, writable in buffers:
            if not (0 <= length <= _U32 and 0 <= addr <= _U64):
                self._retract(head, head_bits, pos)
                self._untake_id(bid)
                raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
            d64[2 * pos] = addr
            d32[4 * pos + 2] = length
            d16[8 * pos + 6] = bid
            if writable:
                wlen += length
                f = bits | _WN
            else:
                f = bits | _NEXT
            if pos == head:
                hflags = f
            else:
                d16[8 * pos + 7] = f
            last = pos
            pos += 1
            if pos == size:
                pos = 0
                bits ^= _FLIP
        if last == head:
            hflags ^= _NEXT
        else:
            d16[8 * last + 7] = f ^ _NEXT
        self._tokens[bid] = token
        self._ndescs[bid] = n
        self._wlen[bid] = wlen
        self._bufs[bid] = buffers
        self.next_avail = pos
        self.avail_bits = bits
        self.num_free -= n
        self._navail += n
        self.outstanding += 1
        ordering.write_barrier()  # the chain before its head's flags (§2.8.21.1.1)
        d16[8 * head + 7] = hflags

    def submit3(self, token: object, a0: int, l0: int, a1: int, l1: int, w1: bool, a2: int, l2: int) -> bool:
        """The one-request fast lane: :meth:`submit` of three buffers, then :meth:`kick_prepare`, in one call.

        The chain is (a0, l0) device-readable, (a1, l1) device-writable if
        ``w1``, (a2, l2) device-writable (virtio-blk's header, data, status;
        virtio-scsi's header, data-out or response, response or data-in).
        Same checks, errors and ring state as ``submit(token, [...])``
        followed by ``kick_prepare()``; returns the kick decision. A queue
        that cannot take the chain directly (broken, a request open, fewer
        than three free slots, indirect from three buffers) goes the general way.
        """
        bufs = ((a0, l0, False), (a1, l1, w1), (a2, l2, True))  # kept for a resubmission, as submit keeps its own
        if self.broken is not None or self._req_bufs is not None or self.num_free < 3 or (
            self.indirect and self.indirect_threshold <= 3
        ):
            self.submit(token, bufs)
            return self.kick_prepare()
        if (l0 | l1 | l2) >> 32 or (a0 | a1 | a2) >> 64:  # a negative one or one too large: nonzero
            for addr, length, _w in bufs:  # the first bad one, as submit names it; nothing written yet
                if not (0 <= length <= _U32 and 0 <= addr <= _U64):
                    raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
        bid = self._take_id()
        d64 = self._desc64
        d32 = self._desc32
        d16 = self._desc16
        size = self.size
        head = self.next_avail
        bits = self.avail_bits
        p1 = head + 1
        b1 = bits
        if p1 == size:
            p1 = 0
            b1 ^= _FLIP
        p2 = p1 + 1
        b2 = b1
        if p2 == size:
            p2 = 0
            b2 ^= _FLIP
        pos = p2 + 1
        bn = b2
        if pos == size:
            pos = 0
            bn ^= _FLIP
        d64[2 * head] = a0
        d32[4 * head + 2] = l0
        d16[8 * head + 6] = bid
        d64[2 * p1] = a1
        d32[4 * p1 + 2] = l1
        d16[8 * p1 + 6] = bid
        d16[8 * p1 + 7] = b1 | _WN if w1 else b1 | _NEXT
        d64[2 * p2] = a2
        d32[4 * p2 + 2] = l2
        d16[8 * p2 + 6] = bid
        d16[8 * p2 + 7] = b2 | _WRITE
        self._tokens[bid] = token
        self._ndescs[bid] = 3
        self._wlen[bid] = l1 + l2 if w1 else l2
        self._bufs[bid] = bufs
        self.next_avail = pos
        self.avail_bits = bn
        self.num_free -= 3
        self._navail += 3
        self.outstanding += 1
        if not STRONGLY_ORDERED:
            ordering.write_barrier()  # the chain before its head's flags (§2.8.21.1.1)
        d16[8 * head + 7] = bits | _NEXT
        return self.kick_prepare()

    def _write_chain(self, pos: int, bits: int, bid: int, buffers: Buffers) -> tuple[int, int, int, int]:
        """Write a direct chain from slot ``pos`` (lap bits ``bits``), all but the head's flags.

        Returns (next slot, its lap bits, device-writable bytes, the head's
        flags). A bad buffer raises InvalidArgument after retracting what was
        written.
        """
        d64 = self._desc64
        d32 = self._desc32
        d16 = self._desc16
        size = self.size
        head = pos
        head_bits = bits
        hflags = f = 0
        last = pos
        wlen = 0
        for addr, length, writable in buffers:
            if not (0 <= length <= _U32 and 0 <= addr <= _U64):
                self._retract(head, head_bits, pos)
                raise InvalidArgument(f"bad buffer addr=0x{addr:x} length={length}")
            d64[2 * pos] = addr
            d32[4 * pos + 2] = length
            d16[8 * pos + 6] = bid
            if writable:
                wlen += length
                f = bits | _WN
            else:
                f = bits | _NEXT
            if pos == head:
                hflags = f
            else:
                d16[8 * pos + 7] = f
            last = pos
            pos += 1
            if pos == size:
                pos = 0
                bits ^= _FLIP
        if last == head:
            hflags ^= _NEXT
        else:
            d16[8 * last + 7] = f ^ _NEXT
        return pos, bits, wlen, hflags

    def _retract(self, head: int, bits: int, end: int) -> None:
        """Make the slots after ``head`` up to ``end`` (exclusive) not available again.

        Flags with AVAIL and USED both the inverse of the lap's wrap counter
        look like a used descriptor of the previous lap: never available.
        """
        d16 = self._desc16
        pos = head
        while pos != end:
            pos += 1
            if pos == self.size:
                pos = 0
                bits ^= _FLIP
            if pos != end:
                d16[8 * pos + 7] = bits ^ _AVAIL

    def _finish(self) -> None:
        """Publish the open request."""
        if self._req_left:
            self._abort_open()
            raise InvalidArgument(f"request published with {self._req_left} announced buffers missing")
        bufs = self._req_bufs
        assert bufs is not None
        bid = self._req_id
        table = self._req_table
        head = self.next_avail
        bits = self.avail_bits
        if table is not None:
            n = 1
            nbytes = DESC_SIZE * len(bufs)
            pos, bits, hflags = self._write_indirect(head, bits, bid, table, nbytes)
            self._tables[bid] = table
            self._table_len[bid] = nbytes
            self._bufs[bid] = None
            wlen = self._req_wlen
        else:
            n = len(bufs)
            pos, bits, wlen, hflags = self._write_chain(head, bits, bid, bufs)  # checked by add(): no raise
            self._bufs[bid] = bufs
        self._tokens[bid] = self._req_token
        self._ndescs[bid] = n
        self._wlen[bid] = wlen
        self._req_bufs = None
        self._req_table = None
        self._req_token = _IDLE
        self.next_avail = pos
        self.avail_bits = bits
        self.num_free -= n
        self._navail += n
        self.outstanding += 1
        ordering.write_barrier()
        self._desc16[8 * head + 7] = hflags

    def _write_indirect(self, pos: int, bits: int, bid: int, table: Buffer, nbytes: int) -> tuple[int, int, int]:
        """Write the ring slot of an indirect request but its flags; returns (next slot, lap bits, head flags)."""
        self._desc64[2 * pos] = table.addr
        self._desc32[4 * pos + 2] = nbytes
        self._desc16[8 * pos + 6] = bid
        hflags = bits | DESC_F_INDIRECT
        pos += 1
        if pos == self.size:
            pos = 0
            bits ^= _FLIP
        return pos, bits, hflags

    def _abort_open(self) -> None:
        if self._req_table is not None:
            self._tables[self._req_id] = self._req_table  # keep it for reuse
            self._req_table = None
        if self._req_bufs is not None:
            self._untake_id(self._req_id)
        self._req_bufs = None
        self._req_token = _IDLE
        self._req_left = 0

    def abort(self) -> None:
        """Drop the open (unpublished) request."""
        if self._req_bufs is None:
            raise QueueStateError("abort() with no open request")
        self._abort_open()

    @property
    def request_open(self) -> bool:
        """A request was started and not yet published or aborted."""
        return self._req_bufs is not None

    def flush(self) -> bool:
        """Publish the open request; return True if the device must be notified (§2.8.21.2)."""
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self._req_bufs is not None:
            self._finish()
        return self.kick_prepare()

    def kick_prepare(self) -> bool:
        """The kick decision for everything made available since the last one (§2.8.10)."""
        new = self._navail
        count = new - self._kick_navail
        if not count:
            return False
        self._kick_navail = new
        # §2.8.21.3.1: a barrier between exposing the flags and reading the device's structure
        # (ordering.full_barrier(), inlined).
        fence_acquire()
        fence_release()
        dev = self._dev16
        flags = dev[1] & RING_EVENT_FLAGS_MASK
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            return packed_need_event(dev[0], self.next_avail, self.avail_wrap, count, self.size)
        return True  # ENABLE; DESC without EVENT_IDX and the reserved value: notify (always safe)

    # -- completions --------------------------------------------------------------

    def pending(self) -> int:
        """Completions ready to reap (used descriptors are counted up to the first malformed one)."""
        count = len(self._stash)
        d16 = self._desc16
        size = self.size
        pos, ub = self.next_used, self.used_bits
        left = self.outstanding - count
        oldest = self._oldest_id
        while left > 0 and d16[8 * pos + 7] & _FLIP == ub:
            bid = d16[8 * pos + 6]
            if bid >= size or self._tokens[bid] is _IDLE:
                break
            batch = [(oldest + k) % size for k in range((bid - oldest) % size + 1)] if self.in_order else [bid]
            if len(batch) > left:
                break
            oldest = (bid + 1) % size
            count += len(batch)
            left -= len(batch)
            pos += sum(self._ndescs[i] for i in batch)
            if pos >= size:
                pos -= size
                ub ^= _FLIP
        return count

    def _not_used(self, pos: int, flags: int, ub: int, left: int, nfree: int, out: list[Completion]) -> None:
        """The descriptor at ``next_used`` is not used: check it is what the driver left there.

        With buffers in flight the driver wrote this slot in the current lap,
        so it holds the available flags it wrote (AVAIL = wrap, USED = !wrap)
        or a used descriptor (both = wrap). Anything else is the device's: a
        used descriptor with the wrong wrap counter, or AVAIL/USED garbage.
        With nothing in flight the slot may hold anything of an earlier lap.
        """
        if left and flags & _FLIP != ub ^ _USED:
            self._used_at(pos, ub, nfree)
            self._break(
                f"descriptor at {pos} has flags 0x{flags:04x}: neither available nor used with the "
                f"current wrap counter {1 if ub else 0} (a wrong wrap counter, or AVAIL differing from USED)",
                out,
            )

    def reap(self, max_n: int = 1 << 16) -> list[Completion]:
        """Reap up to ``max_n`` completions as (token, bytes written) pairs."""
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        out: list[Completion] = []
        if self._stash:
            out = self._stash[:max_n]
            del self._stash[:max_n]
            if len(out) >= max_n:
                self.outstanding -= len(out)
                return out
        if self.in_order:
            return self._reap_in_order(max_n, out)
        d16 = self._desc16
        pos = self.next_used
        flags = d16[8 * pos + 7]
        ub = self.used_bits
        left = self.outstanding - len(out)
        if flags & _FLIP != ub:
            self._not_used(pos, flags, ub, left, 0, out)
            self.outstanding -= len(out)
            return out
        weak = not ordering.STRONGLY_ORDERED  # a barrier per descriptor costs a call: only where it is one
        d32 = self._desc32
        tokens = self._tokens
        ndescs = self._ndescs
        wlen = self._wlen
        free_id = self._release_id
        size = self.size
        nfree = 0
        while True:
            if not left:
                self._used_at(pos, ub, nfree)
                self._break(f"used descriptor at {pos} with no request in flight", out)
            if weak:
                ordering.read_barrier()  # the flags before the rest of the descriptor
            bid = d16[8 * pos + 6]
            length = d32[4 * pos + 2]
            if bid >= size:
                self._used_at(pos, ub, nfree)
                self._break(f"used id {bid} is out of range (queue size {size})", out)
            token = tokens[bid]
            if token is _IDLE:
                self._used_at(pos, ub, nfree)
                self._break(f"used id {bid} is not in flight", out)
            if not flags & _WRITE:
                length = 0  # §2.8.4: reserved without VIRTQ_DESC_F_WRITE
            elif length > wlen[bid]:
                if not self.clamp_used_len:
                    self._used_at(pos, ub, nfree)
                length = self._long_used(bid, length, wlen[bid], out)
            tokens[bid] = _IDLE
            free_id(bid)
            nd = ndescs[bid]
            nfree += nd
            pos += nd
            if pos >= size:
                pos -= size
                ub ^= _FLIP
            out.append((token, length))
            left -= 1
            if len(out) >= max_n:
                break
            flags = d16[8 * pos + 7]
            if flags & _FLIP != ub:
                self._not_used(pos, flags, ub, left, nfree, out)
                break
        self._used_at(pos, ub, nfree)
        self.outstanding -= len(out)
        return out

    def _used_at(self, pos: int, ub: int, nfree: int) -> None:
        """Commit the used side: next used slot, its wrap bits, ring slots given back."""
        self.next_used = pos
        self.used_bits = ub
        self.num_free += nfree
        if self._interrupts and self.event_idx:
            self._drv16[0] = pos | (1 if ub else 0) << RING_EVENT_WRAP_SHIFT

    def _reap_in_order(self, max_n: int, out: list[Completion]) -> list[Completion]:
        """reap() with VIRTIO_F_IN_ORDER: a used descriptor completes every buffer up to its id (§2.8.8)."""
        d16 = self._desc16
        d32 = self._desc32
        tokens = self._tokens
        ndescs = self._ndescs
        wlen = self._wlen
        free_id = self._release_id
        size = self.size
        pos, ub = self.next_used, self.used_bits
        left = self.outstanding - len(out)
        nfree = 0
        while len(out) < max_n:
            flags = d16[8 * pos + 7]
            if flags & _FLIP != ub:
                self._not_used(pos, flags, ub, left, nfree, out)
                break
            if not left:
                self._used_at(pos, ub, nfree)
                self._break(f"used descriptor at {pos} with no request in flight", out)
            ordering.read_barrier()
            bid = d16[8 * pos + 6]
            length = d32[4 * pos + 2]
            if bid >= size:
                self._used_at(pos, ub, nfree)
                self._break(f"used id {bid} is out of range (queue size {size})", out)
            if tokens[bid] is _IDLE:
                self._used_at(pos, ub, nfree)
                self._break(f"used id {bid} is not in flight", out)
            if not flags & _WRITE:
                length = 0
            elif length > wlen[bid]:
                if not self.clamp_used_len:
                    self._used_at(pos, ub, nfree)
                length = self._long_used(bid, length, wlen[bid], out)
            # The ids in flight are oldest .. oldest + left - 1 (cyclic): bid is among them.
            i = self._oldest_id
            while True:
                token = tokens[i]
                tokens[i] = _IDLE
                free_id(i)
                nd = ndescs[i]
                nfree += nd
                pos += nd
                if pos >= size:
                    pos -= size
                    ub ^= _FLIP
                left -= 1
                if i == bid:
                    out.append((token, length))
                    break
                out.append((token, wlen[i]))  # skipped: "used ... completely"
                i = i + 1 if i + 1 < size else 0
            self._oldest_id = bid + 1 if bid + 1 < size else 0
        self._used_at(pos, ub, nfree)
        if len(out) > max_n:
            self._stash[:0] = out[max_n:]
            del out[max_n:]
        self.outstanding -= len(out)
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

    # -- interrupt suppression (the driver's event suppression structure) ---------

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (polling mode, the default)."""
        self._interrupts = False
        self._drv16[1] = RING_EVENT_FLAGS_DISABLE

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used descriptor; True if completions are already pending."""
        self._interrupts = True
        drv = self._drv16
        if self.event_idx:
            drv[0] = self.next_used | self.used_wrap << RING_EVENT_WRAP_SHIFT
            ordering.write_barrier()
            drv[1] = RING_EVENT_FLAGS_DESC
        else:
            drv[1] = RING_EVENT_FLAGS_ENABLE
        ordering.full_barrier()
        return bool(self._stash) or self._desc16[8 * self.next_used + 7] & _FLIP == self.used_bits

    @property
    def interrupts_enabled(self) -> bool:
        return self._interrupts

    # -- a new device behind the same ring (vhost-user reconnect) -------------------

    def restart_base(self, resubmit: bool = True) -> int:
        """Prepare the ring for a new device after the old one went away; returns the ring base.

        Used descriptors the old device wrote are validated as by :meth:`reap`
        and kept for the next reap (each completion is returned once). The
        slots from ``next_used`` to ``next_avail`` then hold exactly the
        buffers still in flight (the ring accounting: each used descriptor
        gave back the slots of the buffer it named). With ``resubmit`` they
        are written again there, oldest first, from the driver's shadow
        copies (the device may have overwritten some with used descriptors),
        each head's flags last; a device started at the returned base pops
        exactly those, once. Without ``resubmit`` (the back end tracks its
        requests itself, INFLIGHT_SHMFD) the ring is left as it is: note that
        the slots from ``next_used`` may still hold the descriptors of
        buffers that completed out of order (the device wrote their used
        descriptor elsewhere), so a back end must not pop them blindly from
        that base; it resubmits from its inflight area.

        The base is :func:`~pyvirtio.spec.ring.packed_base` with both halves
        at ``next_used`` and its wrap counter: the new device has nothing in
        flight. On a fresh ring: :attr:`initial_base`. With ``zero_wrap`` the
        ring is first moved to lap 0 (:meth:`_relap`), so the base's wrap
        counters are 0.
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        held = self._stash[:]  # the list itself stays (the batch fast path holds it, shared_state)
        del self._stash[:]
        self.outstanding -= len(held)
        try:
            got = self.reap(1 << 30)
        except DeviceProtocolError as exc:
            exc.completed[:0] = held  # nothing validated is lost
            raise
        self._stash[:] = held + got
        self.outstanding += len(self._stash)
        if self.zero_wrap and self.used_bits:
            self._relap()
        if resubmit and self.outstanding > len(self._stash):
            self._rewrite_in_flight()
        self._kick_navail = self._navail  # the caller kicks once the new device is set up
        return packed_base(self.next_used, self.used_wrap, self.next_used, self.used_wrap)

    def _relap(self) -> None:
        """Flip the lap the ring is in, with no device attached (``zero_wrap``, module docstring).

        The slots from ``next_used`` to ``next_avail`` hold the chains in
        flight, each written with the AVAIL/USED bits of its lap: flipping
        both bits of each keeps them available in the flipped lap. Every
        other slot is the driver's to reuse and is marked stale for the lap
        in which the device will next reach it (AVAIL and USED both the
        inverse of that lap's wrap counter, as a used descriptor of the lap
        before), so the new device sees nothing available past
        ``next_avail``. The driver's wrap counters flip with them, and its
        event suppression structure is written again for the new lap.
        """
        size = self.size
        d16 = self._desc16
        held = size - self.num_free
        self.avail_bits ^= _FLIP
        self.used_bits ^= _FLIP
        # Stale bits for a free slot at or after next_avail (in the avail lap), and before it (the lap after).
        stale_here = 0 if self.avail_bits == _AVAIL else _FLIP
        stale_next = stale_here ^ _FLIP
        pos = self.next_used
        for k in range(size):
            i = 8 * pos + 7
            if k < held:
                d16[i] ^= _FLIP
            else:
                d16[i] = (d16[i] & ~_FLIP) | (stale_here if pos >= self.next_avail else stale_next)
            pos = pos + 1 if pos + 1 < size else 0
        if self._interrupts:
            self.enable_interrupts()

    def _in_flight_order(self) -> list[int]:
        """The ids in flight, oldest first.

        IN_ORDER: the cyclic range from the oldest. Otherwise the order in
        which ids appear in the ring from ``next_used`` (driver-written slots
        the device has not overwritten; used only for ordering, as split's
        restart does with its avail ring), then any others by id.
        """
        size = self.size
        tokens = self._tokens
        n = self.outstanding - len(self._stash)
        if self.in_order:
            return [(self._oldest_id + k) % size for k in range(n)]
        order: list[int] = []
        seen: set[int] = set()
        pos = self.next_used
        for _ in range(size - self.num_free):
            bid = self._desc16[8 * pos + 6]
            if bid < size and tokens[bid] is not _IDLE and bid not in seen:
                seen.add(bid)
                order.append(bid)
            pos = pos + 1 if pos + 1 < size else 0
        order += [i for i in range(size) if tokens[i] is not _IDLE and i not in seen]
        return order

    def _rewrite_in_flight(self) -> None:
        pos = self.next_used
        bits = _AVAIL if self.used_bits else _USED  # the lap the device's used side is in
        d16 = self._desc16
        for bid in self._in_flight_order():
            head = pos
            bufs = self._bufs[bid]
            if bufs is None:
                pos, bits, hflags = self._write_indirect(pos, bits, bid, self._tables[bid], self._table_len[bid])
            else:
                pos, bits, _wlen, hflags = self._write_chain(pos, bits, bid, bufs)
            ordering.write_barrier()
            d16[8 * head + 7] = hflags
        if (pos, bits) != (self.next_avail, self.avail_bits):
            raise AssertionError(f"resubmission ended at {pos}, the driver's next slot is {self.next_avail}")

    # -- the batch fast path's surface (pyvirtio.ring.fixed_packed; not for layers above) ----------

    def reserve_ids(self, n: int) -> PackedShared:
        """Reserve buffer ids 0 .. n-1 for :mod:`pyvirtio.ring.fixed_packed` and share the shadow state.

        The queue must be idle, without VIRTIO_F_IN_ORDER (whose ids must
        stay a cyclic range). The reserved ids leave the free id list and
        never come back to it while reserved (a reap of one leaves it
        idle, not free); the fast path owns them: it sets their shadow
        entries (token, ring slots, device-writable bytes, buffers) itself,
        so this queue's reap, ``restart_base``, ``in_flight_tokens`` and
        ``reset`` see the truth. :meth:`give_back_ids` ends it. A
        :meth:`reset` rebuilds the shadow state: the lists shared here are
        then stale.
        """
        if self.broken is not None:
            raise QueueBroken(f"queue {self.index} is broken: {self.broken}")
        if self.outstanding or self._req_bufs is not None or self.reserved_ids:
            raise QueueStateError("the batch fast path needs an idle queue")
        if self.in_order:
            raise InvalidArgument("reserved ids would break the cyclic ids of a VIRTIO_F_IN_ORDER queue")
        if not 1 <= n <= self.size:
            raise InvalidArgument(f"{n} ids asked of a queue of {self.size}")
        self.reserved_ids = n
        ids = self._free_ids
        ids.clear()
        ids.extend(range(self.size - 1, n - 1, -1))

        def release(i: int, append: Callable[[int], None] = ids.append) -> None:
            if i >= n:
                append(i)

        self._release_id = release
        return PackedShared(
            self._ring.view[: DESC_SIZE * self.size],
            self._desc16,
            self._desc32,
            self._flags16,
            self._ids16,
            self._lens32,
            self._drv16,
            self._dev16,
            self._tokens,
            self._ndescs,
            self._wlen,
            self._bufs,
            self._stash,
            _IDLE,
        )

    def give_back_ids(self) -> None:
        """End :meth:`reserve_ids`: the reserved ids not in flight go back on the free list."""
        n = self.reserved_ids
        if not n:
            return
        self.reserved_ids = 0
        ids = self._free_ids
        ids.extend(i for i in range(n - 1, -1, -1) if self._tokens[i] is _IDLE)
        self._release_id = ids.append

    # -- introspection --------------------------------------------------------------

    def check_ids(self) -> int:
        """Check the shadow id bookkeeping; return the number of free ids (tests and debugging)."""
        free = list(self._free_ids)
        busy = [i for i in range(self.size) if self._tokens[i] is not _IDLE]
        if len(set(free)) != len(free) or set(free) & set(busy):
            raise AssertionError("an id is both free and in flight, or free twice")
        if min(free, default=self.reserved_ids) < self.reserved_ids:
            raise AssertionError("an id reserved for the batch fast path is on the free list")
        idle_reserved = sum(1 for i in range(self.reserved_ids) if self._tokens[i] is _IDLE)
        if len(free) + len(busy) + idle_reserved != self.size - (1 if self._req_bufs is not None else 0):
            raise AssertionError(f"{len(free)} free + {len(busy)} in flight ids != {self.size}")
        held = sum(self._ndescs[i] for i in busy)
        if held + self.num_free != self.size:
            raise AssertionError(f"{held} slots held + {self.num_free} free != {self.size}")
        used = (self.next_avail - self.next_used) % self.size
        if held and used == 0:
            used = self.size  # a full ring
        if used != held:
            raise AssertionError(f"ring from {self.next_used} to {self.next_avail} != {held} slots held")
        return len(free)

    def __repr__(self) -> str:
        return (
            f"PackedQueue(index={self.index}, size={self.size}, free={self.num_free}, "
            f"in_flight={self.outstanding}, broken={self.broken!r})"
        )
