"""The embedded block device's storage: the sparse RAM disk against a flat bytearray model, and files."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.backends.blk import CHUNK, Storage

SIZE = 4 * CHUNK

ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "zero"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 2 * CHUNK + 100),
        st.integers(1, 255),
        st.integers(1, 3),
    ),
    max_size=30,
)


def _split(data: bytes, parts: int) -> list[memoryview]:
    step = max(1, len(data) // parts)
    return [memoryview(bytearray(data[i : i + step])) for i in range(0, len(data), step)]


@settings(max_examples=60)
@given(ops)
def test_sparse_ram_disk_matches_a_flat_model(program):
    disk = Storage(size=SIZE)
    model = bytearray(SIZE)
    try:
        for op, offset, length, byte, parts in program:
            length = min(length, SIZE - offset)
            if op == "write":
                data = bytes([byte]) * length
                disk.writefrom(_split(data, parts), offset)
                model[offset : offset + length] = data
            elif op == "zero":
                disk.zero(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                bufs = [memoryview(bytearray(b"\xee" * len(b))) for b in _split(bytes(length), parts)]
                disk.readinto(bufs, offset)
                assert b"".join(bytes(b) for b in bufs) == bytes(model[offset : offset + length])
        # Whole zeroed chunks are given back; nothing unwritten is ever allocated.
        assert disk.chunks is not None and len(disk.chunks) <= SIZE // CHUNK
    finally:
        disk.close()


def test_untouched_ram_disk_allocates_nothing():
    disk = Storage(size=1 << 40)  # a 1 TiB sparse disk
    buf = memoryview(bytearray(b"\x01" * 4096))
    disk.readinto([buf], (1 << 40) - 4096)
    assert bytes(buf) == bytes(4096)
    assert disk.chunks == {}
    disk.writefrom([memoryview(b"\x02" * 512)], 12345 * 512)
    assert len(disk.chunks) == 1
    disk.close()


def test_file_storage_round_trip(tmp_path):
    path = str(tmp_path / "disk.img")
    disk = Storage(size=1 << 20, path=path)
    disk.writefrom([memoryview(b"a" * 512), memoryview(b"b" * 512)], 4096)
    disk.flush()
    out = memoryview(bytearray(1024))
    disk.readinto([out], 4096)
    assert bytes(out) == b"a" * 512 + b"b" * 512
    disk.zero(4096, 512)
    disk.close()
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(1024) == bytes(512) + b"b" * 512


def _read(disk: Storage, offset: int, length: int) -> bytes:
    out = memoryview(bytearray(b"\xee" * length))
    disk.readinto([out], offset)
    return bytes(out)


def test_ram_disk_resize_forgets_what_lies_past_a_smaller_end():
    disk = Storage(size=3 * CHUNK)
    try:
        disk.writefrom([memoryview(b"\x07" * (3 * CHUNK))], 0)
        disk.resize(CHUNK + 1000)  # whole sectors only: CHUNK + 512
        assert disk.size == CHUNK + 512
        assert disk.chunks is not None and sorted(disk.chunks) == [0, 1]  # the third chunk is given back
        disk.resize(3 * CHUNK)
        assert _read(disk, CHUNK, 1024) == b"\x07" * 512 + bytes(512)  # kept, then gone
        assert _read(disk, 2 * CHUNK, 512) == bytes(512)
    finally:
        disk.close()


def test_file_resize_and_the_refusals(tmp_path):
    path = tmp_path / "grow.img"
    disk = Storage(size=1 << 20, path=str(path))
    try:
        disk.resize(3 << 20)
        assert path.stat().st_size == 3 << 20 and disk.size == 3 << 20
        disk.resize(1 << 19)
        assert path.stat().st_size == 1 << 19
        with pytest.raises(ValueError, match="at least one 512-byte sector"):
            disk.resize(100)
    finally:
        disk.close()
    ro = Storage(path=str(path), readonly=True)
    try:
        with pytest.raises(ValueError, match="read-only"):
            ro.resize(1 << 20)
        assert path.stat().st_size == 1 << 19
    finally:
        ro.close()
