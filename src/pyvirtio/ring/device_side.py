"""The device's view of a split virtqueue, for back ends and tests.

Theory of operation. A device pops *available* chains (the driver published
their head in the avail ring), does the work, and pushes *used* entries
(head id, bytes written). Nothing the driver wrote is trusted: each field
of shared memory is read once into a local, every descriptor index is
range-checked, every buffer address is translated through the
:class:`~pyvirtio.memory.MemoryTable` (so a device never touches memory it
was not given), a chain walk stops after ``size`` descriptors (a loop is an
error, not a hang), and indirect tables are followed one level only.

Violations raise :class:`ChainError` (a
:class:`~pyvirtio.errors.DriverProtocolError`). The avail entry is consumed
before the chain is walked, so a back end can complete the bad request with
an error (``head`` is set when it is a valid index) and carry on, or treat
the queue as broken: its choice.

Notification decisions are returned, never performed: :meth:`DeviceQueue.flush_used`
says whether to signal the call eventfd (virtio 1.2 §2.7.7.2).

VIRTIO_F_IN_ORDER (``in_order``, §2.7.9): the device uses buffers in the order
it popped them (``add_used`` refuses another order: the back end's bug) and
batches: :meth:`DeviceQueue.flush_used` writes one used entry for each run of
buffers in which every buffer but the last was used completely (its length
is all its device-writable bytes, what the driver assumes of a skipped
buffer), naming the run's last head, at the run's first used slot, and moves
the used index by the run's size.

The packed ring's device side is :class:`~pyvirtio.ring.device_packed.PackedDeviceQueue`
(re-exported here); both implement :class:`~pyvirtio.ring.base.DeviceRing`.
:func:`open_device_ring` maps either format from the three ring addresses
(the one place transports and back ends build a device ring).
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

from pyvirtio.errors import DriverProtocolError, InvalidArgument
from pyvirtio.memory import MemoryTable
from pyvirtio.ring import ordering
from pyvirtio.ring.base import DeviceRing
from pyvirtio.ring.chain import Chain, ChainError
from pyvirtio.ring.device_packed import PackedDeviceQueue
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
    desc_table_size,
    is_power_of_two,
    used_size,
    vring_need_event,
)

#: A direct chain as walked: (index, first and second 8 bytes) of each descriptor, its
#: readable and writable buffers.
_CachedChain = tuple[list[tuple[int, int, int]], list[memoryview], list[memoryview]]


class DeviceQueue:
    """Device side of a split ring whose three parts are given as memoryviews."""

    format: ClassVar[str] = "split"
    # Slots, not an instance dict: CPython 3.11 specialises every access to a slot, but to an instance
    # dict only while its class has fewer than 30 names (tests/test_hot_attributes.py).
    __slots__ = (
        "_avail16", "_avail_event_i", "_batch", "_chains", "_desc", "_desc64", "_popped", "_signalled_from",
        "_used16", "_used32", "_used_bytes", "_used_event_i", "event_idx", "in_order", "index", "indirect",
        "last_avail", "max_chain", "memory", "size", "used_idx",
    )

    def __init__(
        self,
        size: int,
        memory: MemoryTable,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        index: int = 0,
        event_idx: bool = False,
        indirect: bool = True,
        last_avail: int = 0,
        max_chain: int | None = None,
        in_order: bool = False,
    ) -> None:
        if not is_power_of_two(size) or size > MAX_QUEUE_SIZE:
            raise InvalidArgument(f"queue size must be a power of two up to {MAX_QUEUE_SIZE}, got {size}")
        if len(desc) < desc_table_size(size) or len(avail) < avail_size(size) or len(used) < used_size(size):
            raise InvalidArgument("ring memory is smaller than the queue size needs")
        self.index = index
        self.size = size
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.in_order = in_order
        # IN_ORDER: (head, device-writable bytes) of chains popped and not yet used, oldest first,
        # and the (head, length, writable bytes) added but not yet written.
        self._popped: deque[tuple[int, int]] | None = deque() if in_order else None
        self._batch: list[tuple[int, int, int]] = []
        # Longest indirect chain accepted. The spec's limit is the queue size;
        # the default is QEMU's (VIRTQUEUE_MAX_SIZE, 1024), which Linux-style
        # drivers rely on for small rings. Either way a walk stays bounded.
        self.max_chain = max(size, 1024) if max_chain is None else max_chain
        self._desc = desc[: desc_table_size(size)]
        # Direct chains as last walked, by head: (index, descriptor) pairs and the
        # buffers they gave. A chain whose descriptors are unchanged is not walked
        # and translated again (a driver with fixed chains reposts the same ones).
        self._chains: dict[int, _CachedChain] = {}
        self._desc64 = self._desc.cast("Q")
        self._avail16 = avail[: avail_size(size)].cast("H")
        self._used_bytes = used[: used_size(size)]
        self._used16 = self._used_bytes[: 4 + 8 * size + 2].cast("H")
        self._used32 = self._used_bytes[: 4 + 8 * size].cast("I")
        self._used_event_i = 2 + size
        self._avail_event_i = 2 + 4 * size
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = self._used16[1]
        self._signalled_from = self.used_idx

    @classmethod
    def from_addresses(
        cls,
        memory: MemoryTable,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        user_addresses: bool = True,
        **kw: object,
    ) -> DeviceQueue:
        """Map the ring from frontend virtual addresses (vhost-user) or guest physical ones."""
        tr = memory.uva if user_addresses else memory.gpa
        return cls(
            size,
            memory,
            tr(desc_addr, desc_table_size(size)),
            tr(avail_addr, avail_size(size)),
            tr(used_addr, used_size(size)),
            **kw,  # type: ignore[arg-type]
        )

    # -- available side -------------------------------------------------------

    def avail_pending(self) -> int:
        """Chains the driver has published and the device not yet popped."""
        return (self._avail16[1] - self.last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises :class:`ChainError` for a bad one."""
        avail_idx = self._avail16[1]
        last = self.last_avail
        if avail_idx == last:
            return None
        if (avail_idx - last) & 0xFFFF > self.size:
            # virtio 1.2 §2.7.6: at most size entries can be outstanding.
            moved = (avail_idx - last) & 0xFFFF
            raise ChainError(f"queue {self.index}: avail index moved {moved} > size", None)
        ordering.read_barrier()
        head = self._avail16[2 + (last & (self.size - 1))]
        self.last_avail = (last + 1) & 0xFFFF
        if head >= self.size:
            raise ChainError(f"queue {self.index}: avail head {head} out of range", None)
        chain = self._walk(head)
        if self._popped is not None:
            self._popped.append((head, chain.writable_len))
        return chain

    @property
    def base(self) -> int:
        """The GET_VRING_BASE value: the next avail index to process."""
        return self.last_avail

    def walk(self, head: int) -> Chain:
        """The chain at ``head``, checked as :meth:`pop` checks it, the avail ring left alone.

        For a back end resubmitting what a predecessor popped (inflight I/O
        tracking): the head comes from shared memory, so it is range-checked.
        With IN_ORDER the chain counts as popped now (used after those popped
        before it).
        """
        if not 0 <= head < self.size:
            raise ChainError(f"queue {self.index}: head {head} out of range", None)
        chain = self._walk(head)
        if self._popped is not None:
            self._popped.append((head, chain.writable_len))
        return chain

    def _walk(self, head: int) -> Chain:
        d64 = self._desc64  # native byte order: little-endian (x86-64, ring/ordering.py)
        cached = self._chains.get(head)
        if cached is not None:
            entries, readable, writable = cached
            for i, w0, w1 in entries:
                if d64[2 * i] != w0 or d64[2 * i + 1] != w1:
                    break
            else:
                # The same descriptors as when this chain was checked and translated.
                return Chain(head, readable.copy(), writable.copy())
        size = self.size
        gpa = self.memory.gpa
        readable = []
        writable = []
        entries = []
        i = head
        count = 0
        while True:
            count += 1
            if count > size:
                raise ChainError(f"queue {self.index}: descriptor chain from {head} loops or exceeds the ring", head)
            # One read of the descriptor: what is checked is what is cached.
            addr = d64[2 * i]
            w1 = d64[2 * i + 1]
            entries.append((i, addr, w1))
            length = w1 & 0xFFFFFFFF
            flags = w1 >> 32 & 0xFFFF
            nxt = w1 >> 48
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(f"queue {self.index}: indirect descriptor without RING_INDIRECT_DESC", head)
                # virtio 1.2 §2.7.5.3.1: INDIRECT and NEXT together are forbidden,
                # and an indirect table is the only descriptor of its chain.
                if flags & DESC_F_NEXT or count != 1:
                    raise ChainError(f"queue {self.index}: indirect descriptor {i} inside a chain", head)
                if length == 0 or length % DESC_SIZE:
                    raise ChainError(f"queue {self.index}: indirect table length {length} is invalid", head)
                try:
                    table = gpa(addr, length)
                except DriverProtocolError as exc:
                    raise ChainError(f"queue {self.index}: {exc}", head) from None
                self._walk_indirect(head, table, length // DESC_SIZE, readable, writable)
                return Chain(head, readable, writable)  # not cached: the table may change
            try:
                buf = gpa(addr, length)
            except DriverProtocolError as exc:
                raise ChainError(f"queue {self.index}: descriptor {i}: {exc}", head) from None
            if flags & DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                # virtio 1.2 §2.7.4.2: readable descriptors come before writable ones.
                raise ChainError(f"queue {self.index}: readable descriptor {i} after a writable one", head)
            else:
                readable.append(buf)
            if not flags & DESC_F_NEXT:
                break
            if nxt >= size:
                raise ChainError(f"queue {self.index}: next index {nxt} out of range", head)
            i = nxt
        self._chains[head] = (entries, readable, writable)
        return Chain(head, readable.copy(), writable.copy())

    def _walk_indirect(
        self, head: int, table: memoryview, n: int, readable: list[memoryview], writable: list[memoryview]
    ) -> None:
        gpa = self.memory.gpa
        unpack = DESC.unpack_from
        i = 0
        # Bounded by the table and by max_chain (virtio 1.2 §2.7.5.3.1: "A driver
        # MUST NOT create a descriptor chain longer than the Queue Size").
        for _ in range(min(n, self.max_chain)):
            addr, length, flags, nxt = unpack(table, DESC_SIZE * i)
            if flags & DESC_F_INDIRECT:
                raise ChainError(f"queue {self.index}: nested indirect descriptor", head)
            try:
                buf = gpa(addr, length)
            except DriverProtocolError as exc:
                raise ChainError(f"queue {self.index}: indirect entry {i}: {exc}", head) from None
            if flags & DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                raise ChainError(f"queue {self.index}: readable indirect entry {i} after a writable one", head)
            else:
                readable.append(buf)
            if not flags & DESC_F_NEXT:
                return
            if nxt >= n:
                raise ChainError(f"queue {self.index}: indirect next {nxt} out of range", head)
            i = nxt
        raise ChainError(
            f"queue {self.index}: indirect chain from {head} loops, or exceeds its table or "
            f"{self.max_chain} descriptors",
            head,
        )

    # -- used side ------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Write one used entry (not yet visible: call :meth:`flush_used`)."""
        if self._popped is not None:
            self._add_used_in_order(head, length)
            return
        slot = 1 + 2 * (self.used_idx & (self.size - 1))
        self._used32[slot] = head
        self._used32[slot + 1] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def used_id(self, position: int) -> int:
        """The id written in used ring entry ``position`` (taken modulo the ring size)."""
        return int(self._used32[1 + 2 * (position & (self.size - 1))])

    def _add_used_in_order(self, head: int, length: int) -> None:
        popped = self._popped
        assert popped is not None
        if not popped or popped[0][0] != head:
            oldest = f"the oldest popped is {popped[0][0]}" if popped else "nothing is popped"
            raise InvalidArgument(f"queue {self.index} is in order: add_used({head}) but {oldest}")
        _head, wlen = popped.popleft()
        self._batch.append((head, length, wlen))

    def _write_batches(self) -> None:
        """IN_ORDER: one used entry per run whose buffers but the last were used completely (§2.7.9)."""
        batch = self._batch
        used32 = self._used32
        mask = self.size - 1
        idx = self.used_idx
        start = 0
        for k, (head, length, wlen) in enumerate(batch):
            if length == wlen and k + 1 < len(batch):
                continue  # may be skipped: the driver assumes all its writable bytes
            slot = 1 + 2 * (idx & mask)  # the slot of the run's first buffer
            used32[slot] = head
            used32[slot + 1] = length
            idx = (idx + k + 1 - start) & 0xFFFF
            start = k + 1
        batch.clear()
        self.used_idx = idx

    def flush_used(self) -> bool:
        """Publish the used entries added so far; True if the driver must be signalled."""
        if self._batch:
            self._write_batches()
        new = self.used_idx
        old = self._signalled_from
        ordering.write_barrier()
        self._used16[1] = new
        if new == old:
            return False
        self._signalled_from = new
        ordering.full_barrier()
        if self.event_idx:
            return vring_need_event(self._avail16[self._used_event_i], new, old)
        return not self._avail16[0] & AVAIL_F_NO_INTERRUPT

    def push_used(self, head: int, length: int) -> bool:
        """add_used + flush_used."""
        self.add_used(head, length)
        return self.flush_used()

    # -- kick suppression -----------------------------------------------------

    def enable_notifications(self) -> bool:
        """Ask the driver to kick on new work; True if work is already pending (don't sleep)."""
        if self.event_idx:
            self._used16[self._avail_event_i] = self.last_avail
        else:
            self._used16[0] = 0
        ordering.full_barrier()
        return self.avail_pending() != 0

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed (the device is polling)."""
        if not self.event_idx:
            self._used16[0] = USED_F_NO_NOTIFY
        # With EVENT_IDX, avail_event is simply left behind last_avail.

    def release(self) -> None:
        """Drop the views into ring memory (before the memory is unmapped)."""
        self._chains.clear()
        self._batch.clear()
        for v in (self._avail16, self._used16, self._used32, self._used_bytes, self._desc64, self._desc):
            v.release()


def open_device_ring(
    ring_format: str,
    memory: MemoryTable,
    size: int,
    desc_addr: int,
    driver_addr: int,
    device_addr: int,
    *,
    base: int,
    user_addresses: bool = True,
    index: int = 0,
    event_idx: bool = False,
    indirect: bool = True,
    in_order: bool = False,
    max_chain: int | None = None,
) -> DeviceRing:
    """The device side of a ``"split"`` or ``"packed"`` ring at the given addresses.

    ``driver_addr`` / ``device_addr`` are the Driver and Device Areas (split:
    avail and used ring; packed: the event suppression structures), ``base``
    the ring base (split: the next avail index; packed:
    :func:`~pyvirtio.spec.ring.packed_base`). Raises
    :class:`~pyvirtio.errors.DriverProtocolError` for addresses outside
    ``memory`` or a base outside the ring, ``InvalidArgument`` for a size the
    format does not allow.
    """
    if ring_format == "packed":
        return PackedDeviceQueue.from_addresses(
            memory, size, desc_addr, driver_addr, device_addr, user_addresses=user_addresses, index=index,
            event_idx=event_idx, indirect=indirect, in_order=in_order, base=base, max_chain=max_chain,
        )
    if ring_format != "split":
        raise InvalidArgument(f"unknown ring format {ring_format!r}")
    return DeviceQueue.from_addresses(
        memory, size, desc_addr, driver_addr, device_addr, user_addresses=user_addresses, index=index,
        event_idx=event_idx, indirect=indirect, in_order=in_order, last_avail=base, max_chain=max_chain,
    )


__all__ = ["Chain", "ChainError", "DeviceQueue", "PackedDeviceQueue", "open_device_ring"]
