"""Shared memory: memfd regions, the pool allocator, translation tables."""

from __future__ import annotations

import gc
import os
import random

import pytest

from pyvirtio.errors import DriverProtocolError, InvalidArgument, PyvirtioError
from pyvirtio.memory import PAGE_SIZE, Buffer, MemoryPool, MemoryTable, Region
from pyvirtio.testing import open_fd_count

KIB = 1 << 10


# -- regions ------------------------------------------------------------------


def test_region_is_a_shared_memfd_mapping() -> None:
    region = Region.create(10_000, name="probe")
    try:
        assert region.fd >= 0
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:probe")
        assert region.size == 12 * KIB if PAGE_SIZE == 4096 else region.size % PAGE_SIZE == 0
        assert region.size >= 10_000 and region.size % PAGE_SIZE == 0
        assert os.fstat(region.fd).st_size == region.size
        assert region.user_addr == region.guest_addr != 0
        assert region.fd_offset == 0
        assert len(region.view) == region.size
        assert not region.closed
        # MAP_SHARED: what is written through the mapping is in the file, and back.
        region.view[100:105] = b"hello"
        assert os.pread(region.fd, 5, 100) == b"hello"
        os.pwrite(region.fd, b"world", 200)
        assert bytes(region.view[200:205]) == b"world"
    finally:
        fd = region.fd
        region.close()
    assert region.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    region.close()  # idempotent


def test_region_bounds() -> None:
    region = Region.create(PAGE_SIZE)
    try:
        g = region.guest_addr
        assert region.contains(g, PAGE_SIZE)
        assert region.contains(g + PAGE_SIZE - 1, 1)
        assert region.contains(g + PAGE_SIZE, 0)
        assert not region.contains(g + PAGE_SIZE, 1)
        assert not region.contains(g - 1, 1)
        assert not region.contains(g, PAGE_SIZE + 1)
        assert not region.contains(g, -1)
    finally:
        region.close()


@pytest.mark.parametrize("size", [0, -1])
def test_region_size_must_be_positive(size: int) -> None:
    with pytest.raises(InvalidArgument):
        Region.create(size)


def test_region_close_with_a_live_buffer() -> None:
    """The memfd is closed at once; the mapping (and mmap's own dup of the fd) lives on
    until the last view of it is gone."""
    before = open_fd_count()
    pool = MemoryPool(64 * KIB)
    buf = pool.allocate(64)
    fd = pool.regions[0].fd
    view = buf.view  # a caller still holds it
    pool.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    view[0] = 1  # still mapped: no crash
    view.release()
    del buf, view, pool
    gc.collect()
    assert open_fd_count() == before


# -- the allocator ------------------------------------------------------------


@pytest.mark.parametrize("align", [1, 2, 8, 16, 64, 512, 4096, 65536])
def test_allocation_alignment(align: int) -> None:
    with MemoryPool(1 << 20) as pool:
        pool.allocate(3)  # knock the free pointer off any boundary
        bufs = [pool.allocate(size, align=align) for size in (1, 7, 100, 5000)]
        for buf in bufs:
            assert buf.addr % align == 0
            assert len(buf) == buf.size == len(buf.view)


@pytest.mark.parametrize("align", [0, -8, 3, 24])
def test_bad_alignment(align: int) -> None:
    with MemoryPool(64 * KIB) as pool, pytest.raises(InvalidArgument, match="power of two"):
        pool.allocate(8, align=align)


@pytest.mark.parametrize("size", [0, -1])
def test_bad_allocation_size(size: int) -> None:
    with MemoryPool(64 * KIB) as pool, pytest.raises(InvalidArgument):
        pool.allocate(size)


def test_allocations_do_not_overlap() -> None:
    rng = random.Random(7)
    with MemoryPool(1 << 20) as pool:
        live: list[Buffer] = []
        for _ in range(2000):
            if live and rng.random() < 0.4:
                pool.free(live.pop(rng.randrange(len(live))))
            else:
                live.append(pool.allocate(rng.randint(1, 3000), align=1 << rng.randint(0, 8)))
            spans = sorted((b.addr, b.addr + b.size) for b in live)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert end <= start
        assert len(pool.regions) == 1


def test_exhaustion_adds_a_region() -> None:
    with MemoryPool(64 * KIB, max_regions=3) as pool:
        first = pool.allocate(64 * KIB)
        assert len(pool.regions) == 1
        second = pool.allocate(16)
        assert len(pool.regions) == 2
        assert second.region is not first.region
        big = pool.allocate(200 * KIB)  # larger than region_size: a region that fits it
        assert len(pool.regions) == 3
        assert big.region.size >= 200 * KIB
        with pytest.raises(InvalidArgument, match="full"):
            pool.allocate(64 * KIB)
        # Room left in an existing region is still used.
        pool.allocate(16)
        assert len(pool.regions) == 3


def test_max_regions_one() -> None:
    with MemoryPool(64 * KIB, max_regions=1) as pool:
        pool.allocate(60 * KIB)
        with pytest.raises(InvalidArgument):
            pool.allocate(8 * KIB)


def test_free_coalesces() -> None:
    with MemoryPool(64 * KIB, max_regions=1) as pool:
        for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
            quarters = [pool.allocate(16 * KIB) for _ in range(4)]
            with pytest.raises(InvalidArgument):
                pool.allocate(1)  # full
            for k in order:
                pool.free(quarters[k])
            whole = pool.allocate(64 * KIB)  # only possible if the four merged back
            assert whole.offset == 0
            pool.free(whole)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_double_free(which: int) -> None:
    with MemoryPool(64 * KIB) as pool:
        bufs = [pool.allocate(1024) for _ in range(3)]
        pool.free(bufs[which])
        with pytest.raises(InvalidArgument, match="double free"):
            pool.free(bufs[which])
        # Also once its free block has merged with its neighbours.
        for k, b in enumerate(bufs):
            if k != which:
                pool.free(b)
        with pytest.raises(InvalidArgument, match="double free"):
            pool.free(bufs[which])


def test_free_of_a_foreign_buffer() -> None:
    with MemoryPool(64 * KIB) as a, MemoryPool(64 * KIB) as b:
        buf = b.allocate(8)
        with pytest.raises(InvalidArgument, match="does not belong"):
            a.free(buf)


def test_translate_bounds() -> None:
    with MemoryPool(64 * KIB) as pool:
        region = pool.regions[0]
        start, size = region.guest_addr, region.size
        assert len(pool.translate(start, size)) == size
        assert len(pool.translate(start + size - 1, 1)) == 1
        assert len(pool.translate(start + size, 0)) == 0
        for addr, length in (
            (start + size, 1),
            (start + size - 1, 2),
            (start - 1, 1),
            (start, size + 1),
            (0, 1),
        ):
            with pytest.raises(InvalidArgument, match="outside pool"):
                pool.translate(addr, length)


def test_zero_copy() -> None:
    with MemoryPool(64 * KIB) as pool:
        buf = pool.allocate(32, align=16)
        buf.view[:] = bytes(range(32))
        assert bytes(buf.region.view[buf.offset : buf.offset + 32]) == bytes(range(32))
        assert bytes(pool.translate(buf.addr, 32)) == bytes(range(32))
        assert os.pread(buf.region.fd, 32, buf.offset) == bytes(range(32))  # it is in the memfd
        pool.translate(buf.addr + 8, 4)[:] = b"ABCD"
        assert bytes(buf.view[8:12]) == b"ABCD"


def test_pool_region_size_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        MemoryPool(0)


def test_pool_create_close_does_not_leak_fds() -> None:
    MemoryPool(64 * KIB).close()  # warm up lazy imports
    before = open_fd_count()
    for _ in range(200):
        with MemoryPool(64 * KIB, max_regions=3) as pool:
            pool.allocate(100 * KIB)  # a second region
            buf = pool.allocate(8)
            pool.free(buf)
    assert open_fd_count() == before


# -- translation tables (the back end's side) ----------------------------------


@pytest.fixture
def region() -> Region:
    r = Region.create(64 * KIB)
    yield r  # type: ignore[misc]
    r.close()


def test_table_gpa_and_uva_bounds(region: Region) -> None:
    table = MemoryTable()
    gpa, uva = 0x100000, 0x7F0000000000
    table.add(region, gpa, uva)
    size = region.size
    region.view[:4] = b"head"
    region.view[size - 4 :] = b"tail"
    assert bytes(table.gpa(gpa, 4)) == b"head"
    assert bytes(table.gpa(gpa + size - 4, 4)) == b"tail"
    assert bytes(table.uva(uva, 4)) == b"head"
    assert bytes(table.uva(uva + size - 4, 4)) == b"tail"
    assert table.uva_to_gpa(uva + 123) == gpa + 123
    for addr, length in ((gpa + size, 1), (gpa + size - 1, 2), (gpa - 1, 1), (gpa, size + 1), (gpa, -1)):
        with pytest.raises(DriverProtocolError, match="outside the memory table"):
            table.gpa(addr, length)
    for addr, length in ((uva + size, 1), (uva + size - 1, 2), (uva - 1, 1), (gpa, 1)):
        with pytest.raises(DriverProtocolError, match="outside the memory table"):
            table.uva(addr, length)
    with pytest.raises(DriverProtocolError):
        table.uva_to_gpa(uva + size)


def test_table_rejects_overlapping_regions(region: Region) -> None:
    other = Region.create(64 * KIB)
    try:
        table = MemoryTable()
        table.add(region, 0x100000, 0x1000000)
        size = region.size
        for gpa in (0x100000, 0x100000 + size - 1, 0x100000 - other.size + 1):
            with pytest.raises(DriverProtocolError, match="overlaps"):
                table.add(other, gpa, 0x9000000)
        table.add(other, 0x100000 + size, 0x9000000)  # adjacent is fine
        assert len(table) == 2
        assert bytes(table.gpa(0x100000 + size, 1)) == bytes(other.view[:1])
    finally:
        other.close()


def test_table_error_type_is_chosen_by_the_owner(region: Region) -> None:
    class Mine(PyvirtioError):
        pass

    table = MemoryTable(error=Mine)
    table.add(region, 0, 0x1000000)
    with pytest.raises(Mine):
        table.gpa(region.size, 1)
    with pytest.raises(Mine):
        table.remove(0x5000, 16)


def test_table_remove_and_close() -> None:
    a, b = Region.create(PAGE_SIZE), Region.create(PAGE_SIZE)
    table = MemoryTable()
    table.add(a, 0, 0x10000)
    table.add(b, PAGE_SIZE, 0x20000)
    removed = table.remove(0, PAGE_SIZE)
    assert removed.region is a
    assert [m.region for m in table] == [b]
    table.close()
    assert b.closed and not a.closed  # close() unmaps what the table still owns
    assert len(table) == 0
    a.close()


def test_table_from_pool_does_not_own_the_regions() -> None:
    with MemoryPool(64 * KIB, max_regions=2) as pool:
        pool.allocate(100 * KIB)
        table = MemoryTable.from_pool(pool)
        assert len(table) == 2
        for m in table:
            assert m.guest_phys_addr == m.user_addr == m.region.guest_addr
            assert not m.owned
        buf = pool.allocate(16)
        buf.view[:] = b"0123456789abcdef"
        assert bytes(table.gpa(buf.addr, 16)) == b"0123456789abcdef"
        table.close()
        assert all(not r.closed for r in pool.regions)
