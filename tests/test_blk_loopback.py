"""VirtioBlk against the embedded block device model, in process (no peer).

``loopback_blk(BlockBackend(Storage(...)))`` + :class:`VirtioDevice`: the
same functional checks as tests/test_blk_qsd.py (all operations, the batch
and asyncio APIs, data landing in a backing file, two threads on two
queues, argument checks, a read-only device), plus device errors
(IOERR / UNSUPP become :class:`BlockIOError` naming op, offset and length)
and a Hypothesis model test: random reads, writes, scatter-gather and
zeroing against a bytearray.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

# Before importing it, so that pytest rewrites the asserts in the helper module.
pytest.register_assert_rewrite("blk_checks")

from blk_checks import (  # noqa: E402
    check_all_ops,
    check_argument_errors,
    check_asyncio,
    check_batch,
    check_two_queues,
    pattern,
    write_patterns,
)
from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk  # noqa: E402
from pyvirtio.device import VirtioDevice  # noqa: E402
from pyvirtio.drivers.blk import BlkRequest, VirtioBlk  # noqa: E402
from pyvirtio.errors import BlockIOError, InvalidArgument, OwnershipError, QueueFull  # noqa: E402
from pyvirtio.ring.device_side import Chain  # noqa: E402
from pyvirtio.spec import blk as B  # noqa: E402
from pyvirtio.testing import open_fd_count  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class Loop:
    """A VirtioBlk over an in-process block device; closes everything on close()."""

    def __init__(
        self,
        size: int | None = 16 << 20,
        *,
        path: str | None = None,
        readonly: bool = False,
        num_queues: int = 1,
        queue_size: int = 256,
        poll: str = "hybrid",
        pool_size: int = 8 << 20,
        **backend_kw: Any,
    ) -> None:
        self.storage = Storage(size=size, path=path, readonly=readonly)
        self.backend = BlockBackend(self.storage, num_queues=num_queues, **backend_kw)
        self.transport = loopback_blk(self.backend, queue_size=queue_size)
        self.device = VirtioDevice("loopback", self.transport, pool_size=pool_size)
        try:
            self.blk = VirtioBlk(self.device, poll=poll)
        except BaseException:
            self.device.close()
            self.storage.close()
            raise

    def close(self) -> None:
        try:
            self.blk.close()
        finally:
            self.storage.close()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    with Loop() as lp:
        yield lp


# -- the same checks as against qemu-storage-daemon -------------------------------------


def test_info(loop: Loop) -> None:
    info = loop.blk.info()
    assert info["device_type"] == "blk"
    assert info["virtio"]["type"] == "loopback"
    assert info["virtio"]["vq_count"] == 1
    assert info["virtio"]["vq_size"] == 256
    assert info["blk"]["capacity"] == 16 << 20
    assert info["blk"]["block_size"] == 512
    for name in ("BLK_FLUSH", "BLK_DISCARD", "BLK_WRITE_ZEROES", "BLK_SEG_MAX", "VERSION_1"):
        assert name in info["negotiated_features"]


def test_all_ops(loop: Loop) -> None:
    check_all_ops(loop.blk, stores=True)
    assert loop.blk.get_id() == "pyvirtio"


def test_batch(loop: Loop) -> None:
    check_batch(loop.blk, stores=True)


@pytest.mark.parametrize("poll", ["hybrid", "wait", "busy"])
def test_asyncio(poll: str) -> None:
    with Loop(poll=poll) as lp:
        check_asyncio(lp.blk, stores=True)
        lp.blk.read(0, 512)


def test_file_contents(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    size = 8 << 20
    model = bytearray(size)
    with Loop(size, path=str(image)) as lp:
        write_patterns(lp.blk, model)
    assert image.read_bytes() == bytes(model)


def test_two_threads_two_queues() -> None:
    with Loop(num_queues=2) as lp:
        model = bytearray(lp.blk.capacity)
        check_two_queues(lp.blk, model)
        assert lp.blk.read(0, 1 << 20) == bytes(model[: 1 << 20])


def test_argument_errors(loop: Loop) -> None:
    check_argument_errors(loop.blk)


def test_segment_limit() -> None:
    with Loop(seg_max=4) as lp:
        blk = lp.blk
        assert blk.max_segments == 4
        blk.writev(0, [bytes(512)] * 4)
        with pytest.raises(InvalidArgument, match="segments"):
            blk.writev(0, [bytes(512)] * 5)
        with pytest.raises(InvalidArgument, match="segments"):
            blk.readv(0, [512] * 5)


def test_readonly(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(pattern(0, 1 << 20, 3))
    with Loop(None, path=str(image), readonly=True) as lp:
        blk = lp.blk
        assert blk.readonly
        assert blk.read(4096, 4096) == pattern(0, 1 << 20, 3)[4096:8192]
        for call in (
            lambda: blk.write(0, bytes(512)),
            lambda: blk.writev(0, [bytes(512)]),
            lambda: blk.discard(0, 512),
            lambda: blk.write_zeroes(0, 512, unmap=True),
        ):
            with pytest.raises(InvalidArgument, match="read-only"):
                call()
        # A device that enforces RO itself: a write slipped past the driver fails with IOERR.
        req = BlkRequest(B.T_OUT, 0, 512)
        req._user = bytes(512)
        with pytest.raises(BlockIOError, match="write at offset 0 length 512 failed: IOERR"):
            blk.run(req)
    assert image.read_bytes() == pattern(0, 1 << 20, 3)


# -- device errors ----------------------------------------------------------------------------


def _status_handler(status: int) -> Any:
    def handler(index: int, chain: Chain) -> int:
        last = chain.writable[-1]
        last[len(last) - 1] = status
        return 1

    return handler


@pytest.mark.parametrize(("status", "name"), [(B.S_IOERR, "IOERR"), (B.S_UNSUPP, "UNSUPP"), (7, "UNKNOWN")])
def test_device_error_status(loop: Loop, status: int, name: str) -> None:
    blk = loop.blk
    blk.write(4096, pattern(4096, 8192, 1))
    loop.transport.default_handler = _status_handler(status)
    cases = [
        ("read", 4096, 8192, lambda: blk.read(4096, 8192)),
        ("write", 1024, 512, lambda: blk.write(1024, bytes(512))),
        ("read", 0, 1536, lambda: blk.readv(0, [512, 1024])),
        ("flush", 0, 0, blk.flush),
        ("discard", 512, 4096, lambda: blk.discard(512, 4096)),
        ("write-zeroes", 0, 1024, lambda: blk.write_zeroes(0, 1024)),
        ("get-id", 0, 20, blk.get_id),
    ]
    for op, offset, length, call in cases:
        with pytest.raises(BlockIOError) as info:
            call()
        err = info.value
        got = (err.op, err.offset, err.length, err.status, err.status_name)
        assert got == (op, offset, length, status, name)
        assert f"{op} at offset {offset} length {length} failed: {name}" in str(err)
        assert isinstance(err, OSError)  # a BlockIOError is also an OSError (CLI: one line, exit 1)

    # Batch: every request carries its own status; wait raises the first error.
    reqs = [blk.read_request(i * 512, 512) for i in range(4)]
    assert blk.submit(reqs) == 4
    with pytest.raises(BlockIOError, match="read at offset 0 length 512"):
        blk.wait(reqs)
    assert all(r.done and r.status == status for r in reqs)

    # asyncio
    async def aread() -> bytes:
        return await blk.aread(8192, 512)

    with pytest.raises(BlockIOError, match="read at offset 8192 length 512"):
        asyncio.run(aread())

    # Nothing leaked on the way: the device works again, the data is intact.
    loop.transport.default_handler = loop.backend.handle
    ctx = blk.thread_queue()
    assert ctx.inflight == 0 and len(ctx.free_slots) == ctx.nslots
    assert blk.read(4096, 8192) == pattern(4096, 8192, 1)


def test_transfers_limited_to_device_memory() -> None:
    with Loop(pool_size=4 << 20) as lp:
        blk = lp.blk
        assert blk.max_transfer == 2 << 20
        with pytest.raises(InvalidArgument, match="largest transfer"):
            blk.read_request(0, (2 << 20) + 512)
        blk.write(0, b"\x11" * (2 << 20))
        hog = blk.pool.allocate(3 << 20)
        try:
            with pytest.raises(QueueFull, match="shared memory"):
                blk.read(0, 2 << 20)
        finally:
            blk.pool.free(hog)
        assert blk.read(0, 2 << 20) == b"\x11" * (2 << 20)


def test_backend_rejects_out_of_range_request(loop: Loop) -> None:
    """A request built past the driver's checks: the device model says IOERR."""
    blk = loop.blk
    req = BlkRequest(B.T_IN, blk.capacity, 512)
    with pytest.raises(BlockIOError, match=f"read at offset {blk.capacity} length 512 failed: IOERR"):
        blk.run(req)
    assert loop.backend.errors == 1


def test_no_fd_leak_open_close() -> None:
    with Loop(1 << 20):
        pass
    gc.collect()
    fds = open_fd_count()
    for _ in range(50):
        with Loop(1 << 20) as lp:
            lp.blk.write(0, bytes(512))
            assert lp.blk.read(0, 512) == bytes(512)
    gc.collect()
    assert open_fd_count() == fds


# -- Hypothesis: random I/O against a bytearray model ----------------------------------------

DISK = 64 << 10  # 128 sectors
SECTORS = DISK // 512

_extent = st.integers(0, SECTORS - 1).flatmap(
    lambda s: st.tuples(st.just(s), st.integers(1, min(16, SECTORS - s)))
)
_op = st.one_of(
    st.tuples(st.just("write"), _extent, st.integers(0, 255)),
    st.tuples(st.just("read"), _extent),
    st.tuples(st.just("writev"), _extent, st.integers(0, 255)),
    st.tuples(st.just("readv"), _extent),
    st.tuples(st.just("zero"), _extent, st.booleans()),
    st.tuples(st.just("discard"), _extent),
    st.tuples(st.just("batch-read"), st.lists(_extent, min_size=1, max_size=8)),
    st.tuples(st.just("flush")),
)


def _split(n: int) -> list[int]:
    """n sectors as up to 3 uneven pieces, in bytes."""
    if n == 1:
        return [512]
    a = max(1, n // 3)
    rest = n - a
    return [a * 512, rest * 512] if rest < 2 else [a * 512, (rest - 1) * 512, 512]


@given(ops=st.lists(_op, max_size=40))
def test_random_io_matches_model(ops: list[tuple[Any, ...]]) -> None:
    model = bytearray(DISK)
    with Loop(DISK, pool_size=2 << 20) as lp:
        blk = lp.blk
        for op in ops:
            kind = op[0]
            if kind == "flush":
                blk.flush()
                continue
            if kind == "batch-read":
                reqs = [blk.read_request(s * 512, n * 512) for s, n in op[1]]
                assert blk.submit(reqs) == len(reqs)
                blk.wait(reqs)
                for (s, n), r in zip(op[1], reqs, strict=True):
                    assert r.result == bytes(model[s * 512 : (s + n) * 512])
                continue
            (s, n) = op[1]
            off, length = s * 512, n * 512
            if kind == "write":
                data = pattern(off, length, op[2])
                blk.write(off, data)
                model[off : off + length] = data
            elif kind == "writev":
                pieces = [bytes([op[2] ^ i]) * ln for i, ln in enumerate(_split(n))]
                blk.writev(off, pieces)
                model[off : off + length] = b"".join(pieces)
            elif kind == "read":
                assert blk.read(off, length) == bytes(model[off : off + length])
            elif kind == "readv":
                got = blk.readv(off, _split(n))
                assert b"".join(got) == bytes(model[off : off + length])
            elif kind == "zero":
                blk.write_zeroes(off, length, unmap=op[2])
                model[off : off + length] = bytes(length)
            elif kind == "discard":
                blk.discard(off, length)
                model[off : off + length] = bytes(length)  # this model zeroes discarded ranges
        assert blk.read(0, DISK) == bytes(model)


@pytest.mark.parametrize("reported", [0, 1, 4096, 8191])
def test_a_read_the_device_reports_short_fails(loop: Loop, reported: int) -> None:
    """virtio 1.2 §2.7.8.2: nothing beyond the used length may be relied on (8192 + 1 would be exact)."""
    blk = loop.blk
    blk.write(0, pattern(0, 8192, 2))
    honest = loop.backend.handle

    def short(index: int, chain: Chain) -> int:
        honest(index, chain)
        return reported  # of 8192 data bytes + 1 status byte

    loop.transport.default_handler = short
    with pytest.raises(BlockIOError, match=f"short read: the device reported {reported} bytes written for 8192"):
        blk.read(0, 8192)
    buf = blk.allocate(8192, align=4096)
    with pytest.raises(BlockIOError, match="short read"):
        blk.readinto(0, buf)
    loop.transport.default_handler = honest
    assert blk.read(0, 8192) == pattern(0, 8192, 2)  # the queue goes on


def test_a_read_length_without_the_status_byte_is_taken(loop: Loop) -> None:
    """DPDK's vhost_blk example reports the data bytes only: the data is all there."""
    blk = loop.blk
    blk.write(0, pattern(0, 8192, 4))
    honest = loop.backend.handle

    def data_only(index: int, chain: Chain) -> int:
        return honest(index, chain) - 1

    loop.transport.default_handler = data_only
    assert blk.read(0, 8192) == pattern(0, 8192, 4)


# -- queues of threads that ended -----------------------------------------------------


def _in_thread(fn: Any) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def test_the_queue_of_an_ended_thread_goes_to_a_thread_that_finds_none_free() -> None:
    with Loop(num_queues=2) as lp:
        blk = lp.blk
        first: list[int] = []

        def ends_holding_its_queue() -> None:
            blk.write(0, pattern(0, 4096, 1))
            first.append(blk.thread_queue().vq.index)

        _in_thread(ends_holding_its_queue)
        assert blk.read(0, 4096) == pattern(0, 4096, 1)  # this thread takes the other, free queue
        assert blk.thread_queue().vq.index != first[0]
        taken: list[int] = []

        def finds_none_free() -> None:
            blk.write(8192, pattern(8192, 4096, 2))
            assert blk.read(8192, 4096) == pattern(8192, 4096, 2)
            taken.append(blk.thread_queue().vq.index)
            blk.release_queue()

        _in_thread(finds_none_free)
        assert taken == first
        # A live owner keeps its queue: with both queues held by live threads a third fails.
        hold = threading.Event()
        holding = threading.Event()

        def holds() -> None:
            blk.read(0, 512)
            holding.set()
            hold.wait(10)
            blk.release_queue()

        t = threading.Thread(target=holds)
        t.start()
        try:
            assert holding.wait(10)
            with pytest.raises(OwnershipError, match="owned by other threads"):
                _in_thread(lambda: blk.read(0, 512))
        finally:
            hold.set()
            t.join(10)


def test_requests_an_ended_thread_left_in_flight_complete_under_the_new_owner() -> None:
    storage = Storage(size=1 << 20)
    be = BlockBackend(storage)
    t = loopback_blk(be, queue_size=64, auto=False)
    blk = VirtioBlk(VirtioDevice("manual", t, pool_size=4 << 20))
    try:
        reqs: list[BlkRequest] = []

        def submits_and_ends() -> None:
            reqs.append(blk.write_request(4096, pattern(4096, 8192, 3)))
            assert blk.submit(reqs) == 1

        _in_thread(submits_and_ends)
        assert not reqs[0].done
        t.process(0)  # the device completes it; nobody has reaped it yet
        blk.wait(reqs, timeout=5)  # this thread takes the queue over and reaps
        assert reqs[0].done and reqs[0].error is None
        on_device = bytearray(8192)
        storage.readinto([memoryview(on_device)], 4096)
        assert on_device == pattern(4096, 8192, 3)
    finally:
        blk.close()
        storage.close()
