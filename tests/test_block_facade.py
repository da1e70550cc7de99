"""The block facade and the request engine, the same for virtio-blk and a virtio-scsi LUN.

One set of checks (the caller's mistakes, before any ring is touched), one
sync API that splits transfers above ``max_transfer`` (and discard /
write-zeroes by the device's limits), the streams behind ``pyvirtio blk``
(``read_iter``, ``write_from``, ``fill``), and the engine's public queue
accessor (``thread_queue``). Each test runs against an in-process
virtio-blk device and an in-process virtio-scsi LUN.
"""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk
from pyvirtio.backends.scsi import ScsiBackend, loopback_scsi, ram_lun
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.drivers.block import BlockDevice, split_range
from pyvirtio.drivers.scsi import VirtioScsi
from pyvirtio.errors import InvalidArgument
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import blk as B
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

pytestmark = pytest.mark.timeout(60)

SIZE = 4 << 20
LIMIT_BLOCKS = 16  # the scsi LUN's block limits: 8 KiB per READ / WRITE


class Rig:
    """A block device (``kind`` blk or scsi) over an in-process back end; counts what reaches it."""

    def __init__(self, kind: str, *, pool_size: int = 1 << 20, **backend_kw: Any) -> None:
        self.kind = kind
        self.ops: Counter[int] = Counter()  # blk request types / SCSI opcodes the device executed
        if kind == "blk":
            self.storage = Storage(size=SIZE, readonly=backend_kw.pop("readonly", False))
            self.blk_backend = BlockBackend(self.storage, **backend_kw)
            transport = loopback_blk(self.blk_backend)
            self._handle_blk = self.blk_backend.handle
            transport.default_handler = self._count_blk
            # A small pool: max_transfer (half of it) is small enough for the split paths.
            self.blk = VirtioBlk(VirtioDevice("facade-blk", transport, pool_size=pool_size))
            self.disk: BlockDevice[Any] = self.blk
        else:
            lun = ram_lun(SIZE, max_transfer_blocks=LIMIT_BLOCKS, **backend_kw)
            self.scsi_backend = ScsiBackend({(0, 0): lun}, max_target=0)
            transport = loopback_scsi(self.scsi_backend)
            transport.handlers[S.FIRST_REQUEST_QUEUE] = self._count_scsi
            self.scsi = VirtioScsi(VirtioDevice("facade-scsi", transport, pool_size=pool_size))
            self.disk = self.scsi.disk(0, 0)

    def _count_blk(self, queue: int, chain: Chain) -> int:
        self.ops[int.from_bytes(bytes(chain.readable[0][:4]), "little")] += 1
        return self._handle_blk(queue, chain)

    def _count_scsi(self, queue: int, chain: Chain) -> int:
        self.ops[bytes(chain.readable[0])[19]] += 1  # the CDB's opcode, after the 19-byte header
        return self.scsi_backend.handle(queue, chain)

    @property
    def reads(self) -> int:
        return self.ops[B.T_IN] if self.kind == "blk" else self.ops[T.READ_10] + self.ops[T.READ_16]

    @property
    def writes(self) -> int:
        return self.ops[B.T_OUT] if self.kind == "blk" else self.ops[T.WRITE_10] + self.ops[T.WRITE_16]

    def close(self) -> None:
        if self.kind == "blk":
            self.blk.close()
            self.storage.close()
        else:
            self.scsi.close()
            self.scsi_backend.close()


@pytest.fixture(params=["blk", "scsi"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- one set of checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "why"),
    [
        (lambda d: d.read(0, 0), "zero length"),
        (lambda d: d.write(0, b""), "zero length"),
        (lambda d: d.read(-512, 512), "negative"),
        (lambda d: d.read(1, 512), "block size"),
        (lambda d: d.read(0, 513), "block size"),
        (lambda d: d.read(d.capacity, 512), "capacity"),
        (lambda d: d.read(d.capacity - 512, 1024), "capacity"),
        (lambda d: d.write(d.capacity - 512, bytes(1024)), "capacity"),
        (lambda d: d.discard(0, 0), "zero length"),
        (lambda d: d.write_zeroes(d.capacity, 512), "capacity"),
        (lambda d: list(d.read_iter(0, 0)), "zero length"),
        (lambda d: d.read_request(0, d.max_transfer + d.block_size), "largest transfer"),
        (lambda d: d.write_request(0, bytes(d.max_transfer + d.block_size)), "largest transfer"),
        (lambda d: d.transfer_step(256), "smaller than the block size"),
        (lambda d: d.fill(0, 512, 256), "0..255"),
    ],
)
def test_bad_arguments_are_refused_before_the_ring(rig: Rig, call: Any, why: str) -> None:
    disk = rig.disk
    disk.read(0, 512)  # this thread now owns a queue
    vq = rig.disk.engine.thread_queue().vq
    before = (vq.ring.avail_idx, vq.kicks, sum(rig.ops.values()))
    with pytest.raises(InvalidArgument, match=why):
        call(disk)
    assert (vq.ring.avail_idx, vq.kicks, sum(rig.ops.values())) == before


@pytest.mark.parametrize(("kind", "why"), [("blk", "the device is read-only"), ("scsi", "LUN 0:0 is write-protected")])
def test_a_read_only_device_refuses_every_write_alike(kind: str, why: str) -> None:
    rig = Rig(kind, readonly=True)
    disk = rig.disk
    try:
        assert disk.readonly
        before = sum(rig.ops.values())
        for call in (
            lambda: disk.write(0, bytes(512)),
            lambda: disk.write(0, bytes(disk.max_transfer + 512)),  # the split path checks too
            lambda: disk.write_zeroes(0, 512),
            lambda: disk.discard(0, 512),
            lambda: disk.fill(0, 512, 1),
            lambda: disk.write_from(0, io.BytesIO(bytes(512)).read, 512),
        ):
            with pytest.raises(InvalidArgument, match=why):
                call()
        assert sum(rig.ops.values()) == before  # nothing reached the device
        assert disk.read(0, 512) == bytes(512)
    finally:
        rig.close()


# -- one sync API, splitting above max_transfer ----------------------------------------------


def test_transfers_above_max_transfer_are_split_and_read_back(rig: Rig) -> None:
    disk = rig.disk
    step = disk.max_transfer
    assert step < SIZE // 4, "the rig must make max_transfer small enough to split"
    n = 2 * step + 3 * disk.block_size
    data = _pattern(n, 1)
    writes = rig.writes
    disk.write(disk.block_size, data)
    assert rig.writes - writes == 3  # two full requests and the rest
    reads = rig.reads
    assert disk.read(disk.block_size, n) == data
    assert rig.reads - reads == 3
    # Zero copy, split the same way: pieces of the caller's Buffer, one request each.
    m = step + disk.block_size
    buf = disk.engine.allocate(m, align=4096)
    try:
        assert disk.engine.in_device_memory(buf)
        buf.view[:] = bytes(m)
        reads = rig.reads
        assert disk.readinto(disk.block_size, buf) == m
        assert rig.reads - reads == 2
        assert bytes(buf.view) == data[:m]
        buf.view[:] = _pattern(m, 2)
        disk.write(0, buf)
    finally:
        disk.engine.free(buf)
    assert disk.read(0, m) == _pattern(m, 2)  # (bounced: room for it once the Buffer is freed)


def test_asyncio_splits_the_same_way(rig: Rig) -> None:
    disk = rig.disk
    n = disk.max_transfer + disk.block_size

    async def main() -> bytes:
        await disk.awrite(0, _pattern(n, 3))
        await disk.awrite_zeroes(disk.block_size, disk.block_size)
        return await disk.aread(0, n)

    writes = rig.writes
    got = asyncio.run(main())
    assert rig.writes - writes == 2
    expected = bytearray(_pattern(n, 3))
    expected[disk.block_size : 2 * disk.block_size] = bytes(disk.block_size)
    assert got == bytes(expected)


def test_streams_check_the_whole_range_first(rig: Rig) -> None:
    disk = rig.disk
    bs = disk.block_size
    reads = rig.reads
    with pytest.raises(InvalidArgument, match="capacity"):
        disk.read_iter(disk.capacity - bs, 2 * bs)  # raises at once, not at the first next()
    assert rig.reads == reads
    disk.fill(0, 8 * bs, 0xA5, chunk=2 * bs)
    pieces = list(disk.read_iter(0, 8 * bs, chunk=3 * bs))  # chunk capped and block aligned: 3 * bs
    assert [len(p) for p in pieces] == [3 * bs, 3 * bs, 2 * bs]
    assert b"".join(pieces) == b"\xa5" * 8 * bs


def test_write_from_a_source(rig: Rig) -> None:
    disk = rig.disk
    bs = disk.block_size
    data = _pattern(5 * bs, 4)
    assert disk.write_from(bs, io.BytesIO(data).read, None, chunk=2 * bs) == 5 * bs
    assert disk.read(bs, 5 * bs) == data
    with pytest.raises(InvalidArgument, match="not a multiple of the block size"):
        disk.write_from(0, io.BytesIO(bytes(bs + 1)).read, None, chunk=4 * bs)
    with pytest.raises(InvalidArgument, match=f"ended after {bs} of {2 * bs}"):
        disk.write_from(0, io.BytesIO(bytes(bs)).read, 2 * bs)
    with pytest.raises(InvalidArgument, match="empty"):
        disk.write_from(0, io.BytesIO(b"").read)
    with pytest.raises(InvalidArgument, match="capacity"):
        disk.write_from(disk.capacity, io.BytesIO(bytes(bs)).read, bs)


def test_discard_and_write_zeroes_read_back_zeroes(rig: Rig) -> None:
    disk = rig.disk
    bs = disk.block_size
    disk.fill(0, 32 * bs, 0x5A)
    disk.write_zeroes(2 * bs, 4 * bs, unmap=True)
    disk.discard(16 * bs, 8 * bs)
    got = disk.read(0, 32 * bs)
    assert got[: 2 * bs] == b"\x5a" * 2 * bs
    assert got[2 * bs : 6 * bs] == bytes(4 * bs)
    assert got[6 * bs : 16 * bs] == b"\x5a" * 10 * bs
    assert got[16 * bs : 24 * bs] == bytes(8 * bs)  # both back ends zero a discarded range
    assert got[24 * bs :] == b"\x5a" * 8 * bs


def test_split_range() -> None:
    assert split_range(4096, 10000, 4096) == [(4096, 4096), (8192, 4096), (12288, 1808)]
    assert split_range(0, 0, 512) == []
    with pytest.raises(InvalidArgument):
        split_range(0, 512, 0)


# -- virtio-blk: steps from the device's limits --------------------------------------------------


def test_blk_request_steps_follow_the_device_limits() -> None:
    rig = Rig("blk", max_discard_sectors=8, max_discard_seg=2, max_write_zeroes_sectors=1000)
    try:
        blk = rig.blk
        assert blk.transfer_step(1 << 20) == min(1 << 20, blk.max_transfer)
        assert blk.transfer_step(5000) == 4608  # block aligned
        assert blk.transfer_step(1 << 40) == blk.max_transfer  # capped by the device
        assert blk.range_step("discard") == 8 * 2 * 512
        assert blk.range_step("write-zeroes") == 1000 * 2 * 512
        with pytest.raises(InvalidArgument):
            blk.range_step("frobnicate")
        # A discard larger than one request may be: split by the device's limits, all of it done.
        blk.write(0, b"\x11" * 65536)
        blk.discard(0, 65536)
        assert rig.ops[B.T_DISCARD] == 65536 // 8192
        assert blk.read(0, 65536) == bytes(65536)
        with pytest.raises(InvalidArgument, match="segments"):
            blk.discard_request(0, 65536)  # one request is never split silently
    finally:
        rig.close()


# -- the public queue accessor (a contract with the bench engines) ------------------------------


def test_thread_queue_is_the_calling_threads_queue_context(rig: Rig) -> None:
    engine = rig.disk.engine
    ctx = engine.thread_queue()
    assert engine.thread_queue() is ctx
    assert ctx.inflight == 0 and ctx.held is None
    expected_first = 0 if rig.kind == "blk" else S.FIRST_REQUEST_QUEUE
    assert ctx.vq.index == expected_first and ctx.vq.owner is not None
    # A holder takes the whole queue: the general API refuses until it lets go.
    ctx.held = "a bench engine"
    try:
        with pytest.raises(Exception, match="held by an open str"):
            rig.disk.read(0, 512)
    finally:
        ctx.held = None
    assert rig.disk.read(0, 512) == bytes(512)
