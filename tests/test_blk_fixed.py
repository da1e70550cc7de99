"""VirtioBlk.fixed_io: one request pre-linked for one buffer (drivers/blk_fixed.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.errors import (
    BlockIOError,
    ConnectionLost,
    DeviceProtocolError,
    InvalidArgument,
    OwnershipError,
    QueueBroken,
    QueueStateError,
)
from pyvirtio.memory import MemoryPool
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import blk as B

pytest_plugins = ["peers"]
pytestmark = pytest.mark.timeout(60)


class Dev:
    def __init__(self, readonly: bool = False) -> None:
        self.storage = Storage(size=4 << 20, readonly=readonly)
        self.backend = BlockBackend(self.storage)
        self.transport = loopback_blk(self.backend, queue_size=64)
        self.blk = VirtioBlk(VirtioDevice("fixed", self.transport, pool_size=4 << 20))


@pytest.fixture
def dev() -> Iterator[Dev]:
    d = Dev()
    yield d
    d.blk.close()
    d.storage.close()


def test_write_and_read_back_and_the_queue_is_held_meanwhile(dev: Dev) -> None:
    blk = dev.blk
    buf = blk.allocate(8192, align=4096)
    with blk.fixed_io(buf) as io:
        for k in range(20):
            buf.view[:] = bytes([k]) * 8192
            io.write(k * 8192)
        for k in range(20):
            io.read(k * 8192)
            assert bytes(buf.view) == bytes([k]) * 8192
        with pytest.raises(QueueStateError, match="held by an open FixedIO"):
            blk.read(0, 512)
        with pytest.raises(QueueStateError, match="busy"):
            blk.fixed_io(blk.allocate(512))
    assert io.closed
    assert blk.read(3 * 8192, 8192) == bytes([3]) * 8192  # the general API again
    with pytest.raises(QueueStateError, match="closed"):
        io.read(0)
    ring = blk.thread_queue().vq.ring
    assert ring.check_free_list() == ring.num_free == ring.size  # every descriptor back


def test_argument_errors(dev: Dev) -> None:
    blk = dev.blk
    with pytest.raises(InvalidArgument, match="multiple of 512"):
        blk.fixed_io(blk.allocate(1000))
    with MemoryPool(1 << 16, name="elsewhere") as other, pytest.raises(InvalidArgument, match="shared memory"):
        blk.fixed_io(other.allocate(4096))
    with blk.fixed_io(blk.allocate(4096, align=4096)) as io:
        with pytest.raises(InvalidArgument):
            io.read(100)  # not block aligned
        with pytest.raises(InvalidArgument):
            io.write(blk.capacity)  # beyond the device
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                io.read(0)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(10)
        assert len(errors) == 1 and isinstance(errors[0], OwnershipError)
        io.read(0)  # the opening thread still can


def test_read_only_device() -> None:
    d = Dev(readonly=True)
    try:
        with d.blk.fixed_io(d.blk.allocate(4096, align=4096)) as io:
            io.read(4096)
            with pytest.raises(InvalidArgument, match="read-only"):
                io.write(4096)
    finally:
        d.blk.close()
        d.storage.close()


def test_device_status_and_short_read(dev: Dev) -> None:
    blk = dev.blk
    honest = dev.backend.handle

    def ioerr(index: int, chain: Chain) -> int:
        last = chain.writable[-1]
        last[len(last) - 1] = B.S_IOERR
        return 1

    def short(index: int, chain: Chain) -> int:
        honest(index, chain)
        return 100

    with blk.fixed_io(blk.allocate(4096, align=4096)) as io:
        dev.transport.default_handler = ioerr
        with pytest.raises(BlockIOError, match="read at offset 8192 length 4096 failed: IOERR"):
            io.read(8192)
        with pytest.raises(BlockIOError, match="write at offset 0 length 4096 failed: IOERR"):
            io.write(0)
        dev.transport.default_handler = short
        with pytest.raises(BlockIOError, match="short read"):
            io.read(0)
        dev.transport.default_handler = honest
        io.read(0)  # and on it goes


def test_a_lying_device_breaks_the_queue(dev: Dev) -> None:
    blk = dev.blk

    def lie(index: int, chain: Chain) -> int:
        return 4096 + 2  # more than the chain's writable bytes

    with blk.fixed_io(blk.allocate(4096, align=4096)) as io:
        dev.transport.default_handler = lie
        with pytest.raises(DeviceProtocolError, match="exceeds"):
            io.read(0)
        with pytest.raises(QueueBroken):
            io.read(0)


def test_against_qemu_storage_daemon(qsd_raw: object) -> None:
    target = qsd_raw.target  # type: ignore[attr-defined]
    with VirtioBlk.open(target) as blk:
        buf = blk.allocate(4096, align=4096)
        with blk.fixed_io(buf) as io:
            for k in range(64):
                buf.view[:] = k.to_bytes(8, "little") * 512
                io.write(k * 4096)
            for k in (0, 17, 63):
                io.read(k * 4096)
                assert bytes(buf.view) == k.to_bytes(8, "little") * 512
        assert blk.read(5 * 4096, 4096) == (5).to_bytes(8, "little") * 512


def test_a_back_end_that_goes_away_raises_connection_lost(tmp_path: object) -> None:
    path = f"{tmp_path}/fixed.sock"
    storage = Storage(size=4 << 20)
    server = VhostUserServer(path, BlockBackend(storage))
    server.start()
    try:
        with VirtioBlk.open(path) as blk:
            buf = blk.allocate(4096, align=4096)
            with pytest.raises(ConnectionLost), blk.fixed_io(buf) as io:  # not masked by the close
                io.read(0)
                server.stop()
                assert server.wait(5)
                for _ in range(100):
                    io.read(4096)
            assert io.closed
    finally:
        server.stop()
        server.wait(5)
        storage.close()
