"""Peers that break the rules on purpose: a hostile device and a raw driver.

:class:`HostileDevice` plays the device side of a driver's
:class:`~pyvirtio.ring.split.SplitQueue` by writing straight into its used
ring (found at ``ring.used_addr`` through ``pool.translate``): any id, any
length, any index. It is how the driver's validation of used entries
(virtio 1.2 §2.7.8) is tested, and it can also play an honest device
(:meth:`HostileDevice.complete_available`) so that tests can mix good and bad
entries.

:class:`RawDriver` is the mirror image for
:class:`~pyvirtio.ring.device_side.DeviceQueue`: it owns a split ring in a
pool and writes descriptors, indirect tables and avail entries exactly as
told, with no checks, so that device-side chain validation can be tested
against loops, bad indices, bad addresses and bad flags.

:class:`HostilePackedDevice` and :class:`RawPackedDriver` are the same two
for packed rings (:class:`~pyvirtio.ring.packed.PackedQueue`,
:class:`~pyvirtio.ring.device_packed.PackedDeviceQueue`; virtio 1.2 §2.8).

Neither class validates anything: that is their point.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from pyvirtio.memory import Buffer, MemoryPool, MemoryTable
from pyvirtio.ring.device_side import DeviceQueue, PackedDeviceQueue
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue
from pyvirtio.spec.ring import (
    AVAIL_F_NO_INTERRUPT,
    AVAIL_OFF_FLAGS,
    AVAIL_OFF_IDX,
    AVAIL_OFF_RING,
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESS,
    EVENT_SUPPRESS_SIZE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_DESC_OFF_FLAGS,
    PACKED_INITIAL_BASE,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    USED_OFF_FLAGS,
    USED_OFF_IDX,
    USED_OFF_RING,
    avail_event_offset,
    avail_size,
    packed_layout,
    split_layout,
    used_event_offset,
    used_size,
)

_U16 = struct.Struct("<H")

#: One raw descriptor: (addr, len, flags, next).
RawDesc = tuple[int, int, int, int]


class HostileDevice:
    """Writes used entries of its choosing into a driver's split ring.

    Nothing is validated: ids, lengths and the used index are written as
    given (lengths and ids are masked to 32 bits, the index to 16).
    """

    def __init__(self, ring: SplitQueue, pool: MemoryPool | None = None) -> None:
        pool = pool if pool is not None else ring.pool
        self.ring = ring
        self.size = ring.size
        self._used = pool.translate(ring.used_addr, used_size(ring.size))
        self._avail = pool.translate(ring.avail_addr, avail_size(ring.size))
        self.last_avail = 0

    # -- used ring ------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return int(_U16.unpack_from(self._used, USED_OFF_IDX)[0])

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        _U16.pack_into(self._used, USED_OFF_IDX, value & 0xFFFF)

    def write_entry(self, position: int, id_: int, length: int) -> None:
        """Write used.ring[position % size] = (id, len), without publishing it."""
        slot = position & (self.size - 1)
        off = USED_OFF_RING + USED_ELEM.size * slot
        USED_ELEM.pack_into(self._used, off, id_ & 0xFFFFFFFF, length & 0xFFFFFFFF)

    def complete(self, *entries: tuple[int, int]) -> None:
        """Write (id, len) entries after the current used index, then publish them all."""
        idx = self.used_idx
        for k, (id_, length) in enumerate(entries):
            self.write_entry(idx + k, id_, length)
        self.used_idx = idx + len(entries)

    def write_garbage(self, idx: int, entries: Sequence[tuple[int, int]]) -> None:
        """Fill ring slots from the current used index with ``entries``, then set used.idx to ``idx``."""
        start = self.used_idx
        for k, (id_, length) in enumerate(entries[: self.size]):
            self.write_entry(start + k, id_, length)
        self.used_idx = idx

    def set_no_notify(self, on: bool) -> None:
        """Set or clear VRING_USED_F_NO_NOTIFY (what the driver reads without EVENT_IDX)."""
        _U16.pack_into(self._used, USED_OFF_FLAGS, USED_F_NO_NOTIFY if on else 0)

    @property
    def avail_event(self) -> int:
        return int(_U16.unpack_from(self._used, avail_event_offset(self.size))[0])

    @avail_event.setter
    def avail_event(self, value: int) -> None:
        _U16.pack_into(self._used, avail_event_offset(self.size), value & 0xFFFF)

    # -- avail ring (read only: what the driver published) ----------------------

    @property
    def avail_idx(self) -> int:
        return int(_U16.unpack_from(self._avail, AVAIL_OFF_IDX)[0])

    @property
    def avail_flags(self) -> int:
        return int(_U16.unpack_from(self._avail, AVAIL_OFF_FLAGS)[0])

    @property
    def used_event(self) -> int:
        return int(_U16.unpack_from(self._avail, used_event_offset(self.size))[0])

    def available_heads(self) -> list[int]:
        """Heads the driver published since the last call (no validation)."""
        heads: list[int] = []
        idx = self.avail_idx
        while self.last_avail != idx:
            slot = self.last_avail & (self.size - 1)
            heads.append(int(_U16.unpack_from(self._avail, AVAIL_OFF_RING + 2 * slot)[0]))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return heads

    def complete_available(self, length: int = 0) -> list[int]:
        """Behave: complete every newly published head with ``length`` bytes; returns the heads."""
        heads = self.available_heads()
        self.complete(*((h, length) for h in heads))
        return heads

    def release(self) -> None:
        """Drop the views into ring memory."""
        self._used.release()
        self._avail.release()


class RawDriver:
    """A split ring in ``pool`` whose descriptors and avail ring are written verbatim."""

    def __init__(self, pool: MemoryPool, size: int) -> None:
        self.pool = pool
        self.size = size
        avail_off, used_off, total = split_layout(size)
        self._ring = pool.allocate(total, align=4096)
        self._ring.view[:] = bytes(total)
        self.desc_addr = self._ring.addr
        self.avail_addr = self._ring.addr + avail_off
        self.used_addr = self._ring.addr + used_off
        self._desc = self._ring.view[: DESC_SIZE * size]
        self._avail = self._ring.view[avail_off : avail_off + avail_size(size)]
        self._used = self._ring.view[used_off : used_off + used_size(size)]
        self._tables: list[Buffer] = []
        self.avail_idx = 0

    # -- descriptors ----------------------------------------------------------

    def desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        """Write descriptor ``i`` (no checks beyond what struct packing needs)."""
        DESC.pack_into(self._desc, DESC_SIZE * i, addr, length, flags, next_)

    def chain(self, first: int, descs: Iterable[tuple[int, int, int]]) -> None:
        """Write (addr, len, flags) descriptors at first, first+1, ... each NEXT to the next but the last."""
        items = list(descs)
        for k, (addr, length, flags) in enumerate(items):
            more = k + 1 < len(items)
            self.desc(
                first + k, addr, length, flags | (DESC_F_NEXT if more else 0), first + k + 1 if more else 0
            )

    def table(self, entries: Sequence[RawDesc], length: int | None = None) -> tuple[int, int]:
        """Write an indirect table; returns (addr, byte length) for the descriptor that points at it."""
        nbytes = max(DESC_SIZE * len(entries), DESC_SIZE)
        buf = self.pool.allocate(nbytes, align=DESC_SIZE)
        self._tables.append(buf)
        for k, entry in enumerate(entries):
            DESC.pack_into(buf.view, DESC_SIZE * k, *entry)
        return buf.addr, DESC_SIZE * len(entries) if length is None else length

    # -- avail ring -----------------------------------------------------------

    def publish(self, *heads: int) -> None:
        """Put ``heads`` in the avail ring and advance avail.idx past them."""
        for h in heads:
            slot = self.avail_idx & (self.size - 1)
            _U16.pack_into(self._avail, AVAIL_OFF_RING + 2 * slot, h & 0xFFFF)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _U16.pack_into(self._avail, AVAIL_OFF_IDX, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write avail.idx directly (the ring entries are left as they are)."""
        self.avail_idx = value & 0xFFFF
        _U16.pack_into(self._avail, AVAIL_OFF_IDX, self.avail_idx)

    def set_no_interrupt(self, on: bool) -> None:
        _U16.pack_into(self._avail, AVAIL_OFF_FLAGS, AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        _U16.pack_into(self._avail, used_event_offset(self.size), value & 0xFFFF)

    # -- used ring (read only: what the device wrote) -------------------------

    @property
    def used_idx(self) -> int:
        return int(_U16.unpack_from(self._used, USED_OFF_IDX)[0])

    @property
    def used_flags(self) -> int:
        return int(_U16.unpack_from(self._used, USED_OFF_FLAGS)[0])

    @property
    def avail_event(self) -> int:
        return int(_U16.unpack_from(self._used, avail_event_offset(self.size))[0])

    def set_used_idx(self, value: int) -> None:
        """Write used.idx (as a device that resumes a ring finds it)."""
        _U16.pack_into(self._used, USED_OFF_IDX, value & 0xFFFF)

    def used_entry(self, position: int) -> tuple[int, int]:
        slot = position & (self.size - 1)
        id_, length = USED_ELEM.unpack_from(self._used, USED_OFF_RING + USED_ELEM.size * slot)
        return int(id_), int(length)

    # -- plumbing -------------------------------------------------------------

    def device_queue(
        self,
        table: MemoryTable | None = None,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        index: int = 0,
    ) -> DeviceQueue:
        """A DeviceQueue over this ring (``table`` defaults to one over the whole pool)."""
        memory = table if table is not None else MemoryTable.from_pool(self.pool)
        return DeviceQueue(
            self.size,
            memory,
            memory.uva(self.desc_addr, DESC_SIZE * self.size),
            memory.uva(self.avail_addr, avail_size(self.size)),
            memory.uva(self.used_addr, used_size(self.size)),
            index=index,
            event_idx=event_idx,
            indirect=indirect,
        )

    def close(self) -> None:
        for v in (self._desc, self._avail, self._used):
            v.release()
        for buf in self._tables:
            self.pool.free(buf)
        self._tables.clear()
        self.pool.free(self._ring)


# -- packed rings ---------------------------------------------------------------------


def packed_avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available in a lap with driver wrap counter ``wrap``."""
    return PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED


def packed_used_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made used with device wrap counter ``wrap``."""
    return PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED if wrap else 0


class HostilePackedDevice:
    """Writes used descriptors of its choosing into a driver's packed ring.

    It keeps a device's two cursors (``avail_pos``/``avail_wrap`` for reading
    what the driver published, ``used_pos``/``used_wrap`` for writing) but
    checks nothing: :meth:`write_used` puts any id, length and flags at any
    slot; :meth:`use` writes a well-formed used descriptor at the used cursor
    and moves it by the number of slots it is told; :meth:`complete_available`
    plays an honest device.
    """

    def __init__(self, ring: PackedQueue, pool: MemoryPool | None = None) -> None:
        pool = pool if pool is not None else ring.pool
        self.ring = ring
        self.size = ring.size
        self._desc = pool.translate(ring.desc_addr, DESC_SIZE * ring.size)
        self._driver = pool.translate(ring.driver_addr, EVENT_SUPPRESS_SIZE)
        self._device = pool.translate(ring.device_addr, EVENT_SUPPRESS_SIZE)
        self.avail_pos, self.avail_wrap = 0, 1
        self.used_pos, self.used_wrap = 0, 1

    def read(self, pos: int) -> tuple[int, int, int, int]:
        """The descriptor at ``pos``: (addr, len, id, flags)."""
        addr, length, id_, flags = PACKED_DESC.unpack_from(self._desc, DESC_SIZE * pos)
        return int(addr), int(length), int(id_), int(flags)

    def write_used(self, pos: int, id_: int, length: int, flags: int) -> None:
        """Write descriptor ``pos`` as told: id and length first, flags last."""
        PACKED_DESC.pack_into(self._desc, DESC_SIZE * pos, 0, length & 0xFFFFFFFF, id_ & 0xFFFF, 0)
        _U16.pack_into(self._desc, DESC_SIZE * pos + PACKED_DESC_OFF_FLAGS, flags & 0xFFFF)

    def use(self, id_: int, length: int, ndescs: int = 1, *, write: bool = True) -> None:
        """A well-formed used descriptor at the used cursor (WRITE set if ``write``); skip ``ndescs`` slots."""
        flags = packed_used_flags(self.used_wrap) | (DESC_F_WRITE if write else 0)
        self.write_used(self.used_pos, id_, length, flags)
        self.used_pos += ndescs
        while self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap ^= 1

    def available(self) -> list[tuple[int, int]]:
        """Chains the driver made available since the last call, as (id, descriptors); no validation."""
        out: list[tuple[int, int]] = []
        while True:
            _a, _l, _i, flags = self.read(self.avail_pos)
            w = self.avail_wrap
            if bool(flags & PACKED_DESC_F_AVAIL) != bool(w) or bool(flags & PACKED_DESC_F_USED) == bool(w):
                return out
            n = 1
            pos = self.avail_pos
            while flags & DESC_F_NEXT and n < self.size:
                pos = (pos + 1) % self.size
                _a, _l, _i, flags = self.read(pos)
                n += 1
            out.append((_i, n))
            self.avail_pos += n
            while self.avail_pos >= self.size:
                self.avail_pos -= self.size
                self.avail_wrap ^= 1

    def complete_available(self, length: int = 0) -> list[int]:
        """Behave: use every newly available chain with ``length`` bytes, in order; returns the ids."""
        chains = self.available()
        for id_, n in chains:
            self.use(id_, length, n, write=bool(length))
        return [id_ for id_, _ in chains]

    # -- event suppression ---------------------------------------------------------

    def set_event(self, flags: int, off_wrap: int = 0) -> None:
        """Write the device's event suppression structure (what the driver's kick decision reads)."""
        EVENT_SUPPRESS.pack_into(self._device, 0, off_wrap & 0xFFFF, flags & 0xFFFF)

    @property
    def driver_event(self) -> tuple[int, int]:
        """The driver's event suppression structure: (off_wrap, flags)."""
        off_wrap, flags = EVENT_SUPPRESS.unpack_from(self._driver, 0)
        return int(off_wrap), int(flags)

    def release(self) -> None:
        for v in (self._desc, self._driver, self._device):
            v.release()


class RawPackedDriver:
    """A packed ring in ``pool`` whose descriptors and event structures are written verbatim."""

    def __init__(self, pool: MemoryPool, size: int) -> None:
        self.pool = pool
        self.size = size
        driver_off, device_off, total = packed_layout(size)
        self._ring = pool.allocate(total, align=4096)
        self._ring.view[:] = bytes(total)
        self.desc_addr = self._ring.addr
        self.driver_addr = self._ring.addr + driver_off
        self.device_addr = self._ring.addr + device_off
        self._desc = self._ring.view[: DESC_SIZE * size]
        self._driver = self._ring.view[driver_off : driver_off + EVENT_SUPPRESS_SIZE]
        self._device = self._ring.view[device_off : device_off + EVENT_SUPPRESS_SIZE]
        self._tables: list[Buffer] = []
        self.pos, self.wrap = 0, 1  # where publish() writes next

    def desc(self, i: int, addr: int, length: int, id_: int = 0, flags: int = 0) -> None:
        """Write descriptor ``i`` (flags included, in one pass: use :meth:`publish` for order)."""
        PACKED_DESC.pack_into(self._desc, DESC_SIZE * i, addr, length, id_, flags)

    def read(self, i: int) -> tuple[int, int, int, int]:
        addr, length, id_, flags = PACKED_DESC.unpack_from(self._desc, DESC_SIZE * i)
        return int(addr), int(length), int(id_), int(flags)

    def publish(self, id_: int, descs: Sequence[tuple[int, int, int]], *, head_flags: int | None = None) -> int:
        """Make a list of (addr, len, flags) available at the cursor, NEXT linked, id in every one.

        The AVAIL/USED bits come from the cursor's wrap counter; the head is
        written last (``head_flags`` replaces its flags if given). Returns the head slot.
        """
        head = self.pos
        first = 0
        for k, (addr, length, flags) in enumerate(descs):
            more = DESC_F_NEXT if k + 1 < len(descs) else 0
            f = flags | more | packed_avail_flags(self.wrap)
            if k:
                self.desc(self.pos, addr, length, id_, f)
            else:
                self.desc(self.pos, addr, length, id_, 0)
                first = f
            self.pos += 1
            if self.pos == self.size:
                self.pos = 0
                self.wrap ^= 1
        _U16.pack_into(
            self._desc, DESC_SIZE * head + PACKED_DESC_OFF_FLAGS, first if head_flags is None else head_flags
        )
        return head

    def table(self, entries: Sequence[tuple[int, int, int]], length: int | None = None) -> tuple[int, int]:
        """Write an indirect table of (addr, len, flags); returns (addr, byte length) for its descriptor."""
        nbytes = max(DESC_SIZE * len(entries), DESC_SIZE)
        buf = self.pool.allocate(nbytes, align=DESC_SIZE)
        self._tables.append(buf)
        for k, (addr, ln, flags) in enumerate(entries):
            PACKED_DESC.pack_into(buf.view, DESC_SIZE * k, addr, ln, 0, flags)
        return buf.addr, DESC_SIZE * len(entries) if length is None else length

    def set_event(self, flags: int, off_wrap: int = 0) -> None:
        """Write the driver's event suppression structure (what the device's notify decision reads)."""
        EVENT_SUPPRESS.pack_into(self._driver, 0, off_wrap & 0xFFFF, flags & 0xFFFF)

    @property
    def device_event(self) -> tuple[int, int]:
        off_wrap, flags = EVENT_SUPPRESS.unpack_from(self._device, 0)
        return int(off_wrap), int(flags)

    def device_queue(
        self,
        table: MemoryTable | None = None,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        in_order: bool = False,
        index: int = 0,
        base: int = PACKED_INITIAL_BASE,
        max_chain: int | None = None,
    ) -> PackedDeviceQueue:
        """A PackedDeviceQueue over this ring (``table`` defaults to one over the whole pool)."""
        memory = table if table is not None else MemoryTable.from_pool(self.pool)
        return PackedDeviceQueue.from_addresses(
            memory,
            self.size,
            self.desc_addr,
            self.driver_addr,
            self.device_addr,
            index=index,
            event_idx=event_idx,
            indirect=indirect,
            in_order=in_order,
            base=base,
            max_chain=max_chain,
        )

    def close(self) -> None:
        for v in (self._desc, self._driver, self._device):
            v.release()
        for buf in self._tables:
            self.pool.free(buf)
        self._tables.clear()
        self.pool.free(self._ring)
