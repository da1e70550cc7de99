"""Shared memory for virtio: memfd regions, a buffer allocator, translation.

Theory of operation. A virtio device reads and writes the driver's memory
directly: rings, request headers, data buffers. For a vhost-user back end in
another process that memory must be a shared file mapping whose fd can be
passed over the socket, so every byte pyvirtio gives a device lives in a
:class:`Region`: an anonymous ``memfd`` (no hugepages, no root), mapped
``MAP_SHARED``. Pages are allocated lazily by the kernel, so a large region
costs nothing until it is touched.

The *device address* of a byte is what goes into a descriptor. By default
it is the process virtual address (as SPDK's virtio-user does), so one
number means the same byte to both sides once a vhost-user back end has
mapped the region. A device on PCI sees other addresses: physical ones
(uio, no IOMMU) or I/O virtual ones (vfio). Its transport installs a
:class:`DeviceAddressing` in the pool (issue 13): it creates each region
(hugepages, pages locked in memory: memory a device may use never moves)
and gives it its device addresses, either one base for the whole region
(``guest_addr``: vfio maps each region at an IOVA of its own) or one address
per *segment* (``Region.segment_addrs``: the physical address of each
hugepage or page, read by the transport from /proc/self/pagemap). The one
place a device address is made is :meth:`Region.device_address` (a
:class:`Buffer`'s ``addr``); the allocator never hands out a buffer that is
not contiguous for the device (a buffer crosses a segment boundary only
where the next segment follows in device address), so one descriptor
always covers one buffer. Regions of the default (vhost-user) kind have no
segments: their ``addr`` is ``guest_addr + offset`` as before.

:class:`MemoryPool` hands out aligned :class:`Buffer` objects from its
regions (first fit, freed blocks coalesce). A buffer's ``view`` is a
writable memoryview straight into shared memory: fill it in place and the
device sees it (zero copy).

:class:`MemoryTable` is the reverse direction, for back ends and tests:
regions received from a frontend, with bounds-checked translation of guest
physical addresses and frontend virtual addresses to memoryviews. Nothing
outside the regions can ever be reached through it. Regions never overlap
in guest address (strict: two views of one guest address could disagree).
The one exception is a region added again *identically* (same guest address,
size, user address, offset into the same file, compared by device and
inode): :meth:`MemoryTable.share` counts it as one more reference to the
mapping already there, and :meth:`MemoryTable.remove` drops one reference,
the mapping leaving the table with its last. A vhost-user frontend that
drives several devices over one connection does exactly that (QEMU's
multi-queue vhost-user-net: see :mod:`pyvirtio.backends.regions`).

Only this module creates mmaps (docs/architecture.md, rules of the house).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from pyvirtio.errors import DriverProtocolError, InvalidArgument, PyvirtioError

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_REGION_SIZE = 256 << 20
#: mmap(2) flag: lock the pages in memory as they are mapped (x86-64 value; not in Python's mmap module).
MAP_LOCKED = 0x2000


def _mapping_address(mm: mmap.mmap) -> int:
    """Process virtual address of an mmap's first byte (no export kept)."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class Region:
    """One shared mapping of a file descriptor (normally a memfd).

    ``guest_addr`` is the address a device uses for the region's first byte;
    ``user_addr`` the process address of the mapping; ``fd_offset`` the
    offset of the mapping within ``fd``. ``readonly`` maps it without write
    permission (an observer's view; its ``view`` is then read-only too, and
    ``user_addr`` is 0).
    """

    __slots__ = (
        "fd",
        "size",
        "fd_offset",
        "mmap",
        "view",
        "user_addr",
        "guest_addr",
        "name",
        "_owns_fd",
        "segment_size",
        "segment_addrs",
    )

    def __init__(
        self,
        fd: int,
        size: int,
        *,
        fd_offset: int = 0,
        guest_addr: int | None = None,
        name: str = "",
        owns_fd: bool = True,
        readonly: bool = False,
        locked: bool = False,
    ) -> None:
        if size <= 0:
            raise InvalidArgument(f"region size must be positive, got {size}")
        self.fd = fd
        self.size = size
        self.fd_offset = fd_offset
        self.name = name
        self._owns_fd = owns_fd
        # readonly: an observer's view (pyvirtio trace --rings), which must never write.
        # locked: every page populated and locked now (DMA memory a device may use must never move).
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE | MAP_LOCKED if locked else 0)
        self.mmap = mmap.mmap(fd, size, flags, prot, offset=fd_offset)
        self.view = memoryview(self.mmap)
        # ctypes cannot take the address of a read-only buffer; an observer never needs it.
        self.user_addr = 0 if readonly else _mapping_address(self.mmap)
        self.guest_addr = self.user_addr if guest_addr is None else guest_addr
        #: Device addresses per segment (see the module docstring); None: contiguous from guest_addr.
        self.segment_size = 0
        self.segment_addrs: list[int] | None = None

    @classmethod
    def create(cls, size: int, name: str = "pyvirtio", *, huge_page: int = 0, locked: bool = False) -> Region:
        """A new memfd of ``size`` bytes (rounded up to a page), mapped shared.

        ``huge_page``: the hugepage size to back it with (MFD_HUGETLB; the
        size is rounded up to it), 0 for normal pages. ``locked``: pages
        populated and locked at once (a device's DMA memory).
        """
        if size <= 0:
            raise InvalidArgument(f"region size must be positive, got {size}")
        page = huge_page or PAGE_SIZE
        size = (size + page - 1) // page * page
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB | (huge_page.bit_length() - 1) << 26 if huge_page else 0)
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, name=name, locked=locked)
        except BaseException:
            os.close(fd)
            raise

    def set_segments(self, segment_size: int, addrs: list[int]) -> None:
        """Device addresses per ``segment_size`` bytes (a power of two dividing the size; one per segment)."""
        if segment_size <= 0 or segment_size & (segment_size - 1) or self.size % segment_size:
            raise InvalidArgument(f"segment size {segment_size} does not divide region {self.name!r} in powers of two")
        if len(addrs) != self.size // segment_size:
            raise InvalidArgument(f"{len(addrs)} segment addresses for {self.size // segment_size} segments")
        self.segment_size = segment_size
        self.segment_addrs = list(addrs)
        self.guest_addr = addrs[0]

    def device_address(self, offset: int) -> int:
        """The device address of the byte at ``offset`` (the one place one is made: module docstring)."""
        segs = self.segment_addrs
        if segs is None:
            return self.guest_addr + offset
        seg = self.segment_size
        return segs[offset // seg] + offset % seg

    def contiguous(self, offset: int, length: int) -> bool:
        """Are ``length`` bytes at ``offset`` one run of device addresses?"""
        segs = self.segment_addrs
        if segs is None or length <= 0:
            return True
        seg = self.segment_size
        first, last = offset // seg, (offset + length - 1) // seg
        return all(segs[i + 1] == segs[i] + seg for i in range(first, last))

    def device_offset(self, addr: int, length: int) -> int | None:
        """The offset of device address range ``addr``..+``length`` in this region, None if not wholly inside."""
        segs = self.segment_addrs
        if segs is None:
            off = addr - self.guest_addr
            return off if 0 <= off and length >= 0 and off + length <= self.size else None
        seg = self.segment_size
        for i, base in enumerate(segs):
            if base <= addr < base + seg:
                off = i * seg + addr - base
                return off if length >= 0 and off + length <= self.size and self.contiguous(off, length) else None
        return None

    def close(self) -> None:
        """Unmap and close the fd. Views handed out must be released first."""
        if self.fd < 0:
            return
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:
            # A caller still holds a view (a Buffer not freed): the mapping
            # stays until the last view is gone; the fd can go now.
            pass
        if self._owns_fd:
            os.close(self.fd)
        self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def contains(self, addr: int, length: int) -> bool:
        return self.device_offset(addr, length) is not None

    def __repr__(self) -> str:
        return f"Region({self.name!r}, guest=0x{self.guest_addr:x}, size={self.size})"


class Buffer:
    """A block of shared memory handed out by :class:`MemoryPool`.

    ``addr`` is the device address; ``view`` a writable memoryview of
    exactly ``size`` bytes.
    """

    __slots__ = ("region", "offset", "size", "addr", "view")

    def __init__(self, region: Region, offset: int, size: int) -> None:
        self.region = region
        self.offset = offset
        self.size = size
        self.addr = region.guest_addr + offset if region.segment_addrs is None else region.device_address(offset)
        self.view = region.view[offset : offset + size]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Buffer(addr=0x{self.addr:x}, size={self.size})"


class _Arena:
    """First-fit allocator over one region: a sorted list of free (offset, size)."""

    __slots__ = ("region", "_starts", "_sizes", "free_bytes")

    def __init__(self, region: Region) -> None:
        self.region = region
        self._starts: list[int] = [0]
        self._sizes: list[int] = [region.size]
        self.free_bytes = region.size

    def take(self, size: int, align: int) -> int | None:
        # Align the device address, not the offset: a region is only page aligned.
        # Segmented regions: segments are aligned in device space, so the offset is.
        region = self.region
        base = region.guest_addr if region.segment_addrs is None else 0
        for i, (start, avail) in enumerate(zip(self._starts, self._sizes, strict=True)):
            aligned = ((base + start + align - 1) & ~(align - 1)) - base
            if region.segment_addrs is not None:
                # Never a buffer the device cannot address in one piece: skip to the next segment.
                seg = region.segment_size
                while aligned + size <= start + avail and not region.contiguous(aligned, size):
                    aligned = ((aligned // seg + 1) * seg + align - 1) & ~(align - 1)
            pad = aligned - start
            if avail - pad < size:
                continue
            tail = avail - pad - size
            # Replace block i with the padding before and the tail after.
            parts = [(s, n) for s, n in ((start, pad), (aligned + size, tail)) if n]
            self._starts[i : i + 1] = [s for s, _ in parts]
            self._sizes[i : i + 1] = [n for _, n in parts]
            self.free_bytes -= size
            return aligned
        return None

    def give(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] < offset + size:
            raise InvalidArgument(f"double free of offset {offset}")
        if i and self._starts[i - 1] + self._sizes[i - 1] > offset:
            raise InvalidArgument(f"double free of offset {offset}")
        self._starts.insert(i, offset)
        self._sizes.insert(i, size)
        self.free_bytes += size
        # Coalesce with the next block, then with the previous one.
        if i + 1 < len(self._starts) and offset + size == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            self._starts.pop(i + 1)
        if i and self._starts[i - 1] + self._sizes[i - 1] == offset:
            self._sizes[i - 1] += self._sizes.pop(i)
            self._starts.pop(i)


class DeviceAddressing(Protocol):
    """How a device addresses a pool's memory, installed by its transport (see the module docstring).

    None (the pool's default) is the vhost-user way: plain memfd regions,
    device address = process address. A PCI transport supplies one that
    makes locked (or hugepage) regions and gives them physical addresses
    (uio) or maps them into an IOMMU (vfio).
    """

    #: Short name for info dumps ("physical", "iova").
    kind: str

    def create_region(self, size: int, name: str) -> Region:
        """A new region of at least ``size`` bytes, of the memory the device can reach."""
        ...

    def attach(self, region: Region) -> None:
        """Make ``region`` reachable by the device and set its device addresses (``guest_addr`` or segments)."""
        ...

    def detach(self, region: Region) -> None:
        """The device may no longer reach ``region`` (it is about to be closed)."""
        ...


class MemoryPool:
    """Driver-side shared memory: regions plus an aligned allocator.

    The pool starts with one region of ``region_size`` bytes and adds more
    (at least ``region_size`` each, at most ``max_regions`` in all) when an
    allocation does not fit. A vhost-user back end without
    CONFIGURE_MEM_SLOTS accepts at most 8 regions, and regions added after the
    device started are only usable if the transport can register them, so
    size the first region for the whole workload when you can: its pages
    are only allocated when touched.

    ``addressing``: how the device addresses the memory (a PCI transport's
    :class:`DeviceAddressing`); None: process addresses (vhost-user).
    """

    def __init__(
        self,
        region_size: int = DEFAULT_REGION_SIZE,
        *,
        max_regions: int = 8,
        name: str = "pyvirtio",
        addressing: DeviceAddressing | None = None,
    ) -> None:
        if region_size <= 0:
            raise InvalidArgument(f"region size must be positive, got {region_size}")
        self.region_size = region_size
        self.max_regions = max_regions
        self.name = name
        self.addressing = addressing
        self._arenas: list[_Arena] = []
        # Several threads (one per queue) allocate and free at once: the free
        # lists are guarded. Not on any per-request hot path of the engines.
        self._lock = threading.Lock()
        self._add_region(region_size)

    def _add_region(self, size: int) -> _Arena:
        if len(self._arenas) >= self.max_regions:
            raise InvalidArgument(f"memory pool {self.name!r} is full ({self.max_regions} regions)")
        size, name = max(size, self.region_size), f"{self.name}-{len(self._arenas)}"
        addressing = self.addressing
        if addressing is None:
            region = Region.create(size, name)
        else:
            region = addressing.create_region(size, name)
            try:
                addressing.attach(region)
            except BaseException:
                region.close()
                raise
        arena = _Arena(region)
        self._arenas.append(arena)
        return arena

    @property
    def regions(self) -> list[Region]:
        return [a.region for a in self._arenas]

    def allocate(self, size: int, align: int = 8) -> Buffer:
        """An aligned block of ``size`` bytes (zeroed only the first time a page is used)."""
        if size <= 0:
            raise InvalidArgument(f"allocation size must be positive, got {size}")
        if align <= 0 or align & (align - 1):
            raise InvalidArgument(f"alignment must be a power of two, got {align}")
        with self._lock:
            return self._allocate(size, align)

    def _allocate(self, size: int, align: int) -> Buffer:
        for arena in self._arenas:
            if arena.free_bytes >= size:
                off = arena.take(size, align)
                if off is not None:
                    return Buffer(arena.region, off, size)
        arena = self._add_region(size + align)
        off = arena.take(size, align)
        if off is None:
            region = arena.region
            raise InvalidArgument(
                f"{size} bytes cannot be one contiguous block for the device in pool {self.name!r}: its "
                f"{self.addressing.kind if self.addressing else ''} memory comes in "
                f"{region.segment_size}-byte segments that are not contiguous (use hugepages or an IOMMU)"
            )
        return Buffer(arena.region, off, size)

    def free(self, buf: Buffer) -> None:
        """Return a buffer. Its ``view`` is released and must not be used again."""
        with self._lock:
            for arena in self._arenas:
                if arena.region is buf.region:
                    buf.view.release()
                    arena.give(buf.offset, buf.size)
                    return
        raise InvalidArgument(f"{buf!r} does not belong to pool {self.name!r}")

    def translate(self, addr: int, length: int) -> memoryview:
        """The memoryview of ``length`` bytes at device address ``addr``."""
        for arena in self._arenas:
            region = arena.region
            off = region.device_offset(addr, length)
            if off is not None:
                return region.view[off : off + length]
        raise InvalidArgument(f"address 0x{addr:x}+{length} is outside pool {self.name!r}")

    def close(self) -> None:
        addressing = self.addressing
        for arena in self._arenas:
            try:
                if addressing is not None:
                    addressing.detach(arena.region)
            finally:
                arena.region.close()
        self._arenas.clear()

    def __enter__(self) -> MemoryPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True, eq=False)
class Mapping:
    """One region as a back end sees it: guest physical and frontend virtual ranges.

    ``refs``: how many identical adds the mapping stands for (:meth:`MemoryTable.share`).
    """

    region: Region
    guest_phys_addr: int
    user_addr: int
    size: int
    owned: bool = True
    refs: int = 1


def _same_file(a: int, b: int) -> bool:
    """Whether two fds refer to the same file (device and inode), so map the same memory."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class MemoryTable:
    """Back-end side translation of frontend addresses, bounds-checked.

    ``gpa()`` translates guest physical addresses (descriptor contents);
    ``uva()`` frontend virtual addresses (vhost-user SET_VRING_ADDR). Both
    raise ``error`` (default :class:`DriverProtocolError`) for any range not
    wholly inside one region: a back end never touches memory it was not
    given.
    """

    def __init__(self, error: type[PyvirtioError] = DriverProtocolError) -> None:
        self._maps: list[Mapping] = []
        self._ranges: list[tuple[int, int, memoryview]] | None = None  # gpa lookup, rebuilt after changes
        self.error = error

    def add(self, region: Region, guest_phys_addr: int, user_addr: int) -> Mapping:
        """Add a mapped region; any overlap in guest address with one already here is refused."""
        m = Mapping(region, guest_phys_addr, user_addr, region.size)
        for other in self._maps:
            end, other_end = guest_phys_addr + m.size, other.guest_phys_addr + other.size
            if guest_phys_addr < other_end and other.guest_phys_addr < end:
                raise self.error(f"memory region at gpa 0x{guest_phys_addr:x} overlaps an existing one")
        self._maps.append(m)
        self._ranges = None
        return m

    @classmethod
    def from_pool(cls, pool: MemoryPool, error: type[PyvirtioError] = DriverProtocolError) -> MemoryTable:
        """A table over a driver pool's regions (same process: for loopback devices)."""
        table = cls(error)
        for region in pool.regions:
            table._maps.append(Mapping(region, region.guest_addr, region.user_addr, region.size, owned=False))
        return table

    def share(self, guest_phys_addr: int, size: int, user_addr: int, fd_offset: int, fd: int) -> Mapping | None:
        """One more reference to the mapping identical to this description, if there is one.

        Identical: the same guest address, size, user address and offset into
        the file, and ``fd`` refers to the file the mapping was made from (same
        device and inode: the same memory). Returns that mapping, its ``refs``
        counted up (the caller closes ``fd``: nothing new is mapped), or None:
        the caller then maps the region and adds it (:meth:`add`), which
        refuses an overlap that is not identical.
        """
        for m in self._maps:
            if (
                m.guest_phys_addr == guest_phys_addr
                and m.size == size
                and m.user_addr == user_addr
                and m.region.fd_offset == fd_offset
                and _same_file(m.region.fd, fd)
            ):
                m.refs += 1
                return m
        return None

    def remove(self, guest_phys_addr: int, size: int, user_addr: int | None = None) -> Mapping | None:
        """Drop one reference to the mapping at ``guest_phys_addr`` of ``size`` bytes (and ``user_addr``).

        Returns the mapping when that was its last reference (it has left the
        table; the caller unmaps it once nothing uses it), None while other
        references keep it. No such mapping: ``error``.
        """
        for i, m in enumerate(self._maps):
            if m.guest_phys_addr == guest_phys_addr and m.size == size and user_addr in (None, m.user_addr):
                m.refs -= 1
                if m.refs:
                    return None
                self._ranges = None
                return self._maps.pop(i)
        at = "" if user_addr is None else f" user address 0x{user_addr:x}"
        raise self.error(f"no memory region at gpa 0x{guest_phys_addr:x} size {size}{at}")

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def _build_ranges(self) -> list[tuple[int, int, memoryview]]:
        self._ranges = [(m.guest_phys_addr, m.guest_phys_addr + m.size, m.region.view) for m in self._maps]
        return self._ranges

    def gpa(self, addr: int, length: int) -> memoryview:
        ranges = self._ranges if self._ranges is not None else self._build_ranges()
        if length >= 0:
            for start, end, view in ranges:
                if start <= addr and addr + length <= end:
                    off = addr - start
                    return view[off : off + length]
        raise self.error(f"guest address 0x{addr:x}+{length} is outside the memory table")

    def uva(self, addr: int, length: int) -> memoryview:
        for m in self._maps:
            off = addr - m.user_addr
            if 0 <= off and 0 <= length and off + length <= m.size:
                return m.region.view[off : off + length]
        raise self.error(f"frontend address 0x{addr:x}+{length} is outside the memory table")

    def uva_to_gpa(self, addr: int) -> int:
        for m in self._maps:
            off = addr - m.user_addr
            if 0 <= off < m.size:
                return m.guest_phys_addr + off
        raise self.error(f"frontend address 0x{addr:x} is outside the memory table")

    def close(self) -> None:
        """Unmap every region this table owns (back ends: the fds they received)."""
        for m in self._maps:
            if m.owned:
                m.region.close()
        self._maps.clear()
        self._ranges = None
