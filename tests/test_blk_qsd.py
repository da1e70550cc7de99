"""VirtioBlk against a real back end: qemu-storage-daemon (PEERS.md, "Block").

Covers: info (API and ``pyvirtio info --json``), every operation and the
sync / batch / asyncio APIs on a null-co export; data written through
pyvirtio checked in the raw image file itself after the daemon stopped;
two threads on two queues plus a third that gets OwnershipError; a
read-only export; a daemon killed mid-read (ConnectionLost, no hang);
argument checks before the ring; 4 KiB logical blocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Before importing them, so that pytest rewrites the asserts in the helper modules.
pytest.register_assert_rewrite("blk_checks", "peers")

from blk_checks import (  # noqa: E402
    QSD_ID,
    check_all_ops,
    check_argument_errors,
    check_asyncio,
    check_batch,
    check_two_queues,
    pattern,
    write_patterns,
)
from peers import Qsd, read_file  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.errors import ConnectionLost, InvalidArgument, QueueFull  # noqa: E402
from pyvirtio.spec import blk as B  # noqa: E402

pytest_plugins = ["peers"]

pytestmark = [pytest.mark.peer, pytest.mark.timeout(30)]


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", *args], capture_output=True, timeout=timeout, check=False
    )


# -- (a) null-co export -------------------------------------------------------------


def test_info_api(qsd_null: Qsd) -> None:
    with VirtioBlk.open(qsd_null.target) as blk:
        info = blk.info()
    assert info["device_type"] == "blk"
    virtio = info["virtio"]
    # SPDK's virtio_dev_dump_json_info keys.
    assert virtio["type"] == "user"
    assert virtio["socket"] == qsd_null.sock
    assert virtio["vq_count"] == 2
    assert virtio["vq_size"] == 256
    assert "DRIVER_OK" in info["status"]
    for name in ("BLK_FLUSH", "BLK_DISCARD", "BLK_WRITE_ZEROES", "BLK_MQ", "VERSION_1", "RING_EVENT_IDX"):
        assert name in info["negotiated_features"]
    assert "PROTOCOL_FEATURES" in info["offered_features"]
    assert {"MQ", "CONFIG"} <= set(virtio["protocol_features"])
    assert set(virtio["protocol_features"]) <= set(virtio["offered_protocol_features"])
    b = info["blk"]
    assert b["capacity"] == qsd_null.size
    assert b["block_size"] == 512
    assert b["readonly"] is False
    assert b["num_queues"] == b["max_queues"] == 2
    assert b["config"]["capacity"] * 512 == qsd_null.size
    json.dumps(info)  # serialisable as is


def test_info_cli_json(qsd_null: Qsd) -> None:
    res = cli("info", "--json", qsd_null.target)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["virtio"]["type"] == "user"
    assert info["virtio"]["socket"] == qsd_null.sock
    assert info["virtio"]["vq_count"] == 2
    assert info["blk"]["capacity"] == qsd_null.size
    assert "BLK_FLUSH" in info["negotiated_features"]


def test_all_ops_null(qsd_null: Qsd) -> None:
    with VirtioBlk.open(qsd_null.target) as blk:
        check_all_ops(blk, stores=False, ident=QSD_ID)


def test_batch_null(qsd_null: Qsd) -> None:
    with VirtioBlk.open(qsd_null.target) as blk:
        check_batch(blk, stores=False)


def test_batch_raw(qsd_raw: Qsd) -> None:
    with VirtioBlk.open(qsd_raw.target) as blk:
        check_batch(blk, stores=True)


@pytest.mark.parametrize("poll", ["hybrid", "wait", "busy"])
def test_asyncio_null(qsd_null: Qsd, poll: str) -> None:
    with VirtioBlk.open(qsd_null.target, poll=poll) as blk:
        check_asyncio(blk, stores=False)
        # The sync API still works on the same thread afterwards.
        blk.read(0, 4096)


def test_asyncio_raw(qsd_raw: Qsd) -> None:
    with VirtioBlk.open(qsd_raw.target) as blk:
        check_asyncio(blk, stores=True)


@pytest.mark.parametrize("poll", ["wait", "busy"])
def test_sync_poll_modes(qsd_null: Qsd, poll: str) -> None:
    with VirtioBlk.open(qsd_null.target, poll=poll) as blk:
        for i in range(50):
            blk.write(i * 4096, bytes(4096))
            assert blk.read(i * 4096, 4096) == bytes(4096)


# -- (b) raw file export: what pyvirtio wrote is in the file ----------------------


def test_raw_file_contents(qsd_raw: Qsd) -> None:
    assert qsd_raw.image is not None
    model = bytearray(qsd_raw.size)
    with VirtioBlk.open(qsd_raw.target) as blk:
        check_all_ops(blk, stores=True, ident=QSD_ID, discard_zeroes=False)
        # check_all_ops leaves its own data behind: take it into the model.
        model[:] = blk.read(0, 1 << 20) + bytes(qsd_raw.size - (1 << 20))
        write_patterns(blk, model)
    qsd_raw.stop()
    assert not qsd_raw.alive()
    with open(qsd_raw.image, "rb") as f:
        on_disk = f.read()
    assert len(on_disk) == len(model)
    if on_disk != bytes(model):
        first = next(i for i in range(len(model)) if on_disk[i] != model[i])
        pytest.fail(f"image differs from the model first at byte {first}")


# -- (c) two queues, two threads ----------------------------------------------------


def test_two_threads_two_queues(qsd_raw_mq: Qsd) -> None:
    assert qsd_raw_mq.image is not None
    model = bytearray(qsd_raw_mq.size)
    with VirtioBlk.open(qsd_raw_mq.target) as blk:
        assert blk.num_queues == 2
        check_two_queues(blk, model)
    qsd_raw_mq.stop()
    assert read_file(qsd_raw_mq.image, 0, 2 << 20) == bytes(model[: 2 << 20])


# -- (d) read-only export -------------------------------------------------------------


@pytest.fixture
def ro_image(tmp_path: Path) -> str:
    path = str(tmp_path / "ro.img")
    with open(path, "wb") as f:
        f.write(pattern(0, 1 << 20, 42))
        f.truncate(4 << 20)
    return path


def test_readonly_export(qsd_factory: Callable[..., Qsd], ro_image: str) -> None:
    q: Qsd = qsd_factory(kind="raw", image=ro_image, readonly=True)
    with VirtioBlk.open(q.target) as blk:
        assert blk.readonly
        assert "BLK_RO" in blk.info()["negotiated_features"]
        assert blk.read(0, 8192) == pattern(0, 8192, 42)[:8192]
        blk.read(0, 512)
        vq = blk.thread_queue().vq
        before = (vq.ring.avail_idx, vq.kicks)
        for call in (
            lambda: blk.write(0, bytes(512)),
            lambda: blk.writev(0, [bytes(512), bytes(512)]),
            lambda: blk.discard(0, 4096),
            lambda: blk.write_zeroes(0, 4096),
            lambda: blk.write_zeroes(0, 4096, unmap=True),
            lambda: blk.write_request(0, bytes(512)),
        ):
            with pytest.raises(InvalidArgument, match="read-only"):
                call()
        assert (vq.ring.avail_idx, vq.kicks) == before
        blk.flush()  # allowed on a read-only device
        assert blk.read(0, 512) == pattern(0, 512, 42)

    for args in (
        ("blk", "write", q.target, "--offset", "0", "--pattern", "0xaa", "--length", "4k"),
        ("blk", "discard", q.target, "--offset", "0", "--length", "4k"),
        ("blk", "write-zeroes", q.target, "--offset", "0", "--length", "4k", "--unmap"),
    ):
        res = cli(*args)
        assert res.returncode == 1, res
        err = res.stderr.decode()
        assert err.count("\n") == 1 and err.startswith("pyvirtio: error: "), err
        assert "read-only" in err
        assert "Traceback" not in err
    assert read_file(ro_image, 0, 4096) == pattern(0, 4096, 42)


# -- (e) the daemon dies under a reader -------------------------------------------------


@pytest.mark.parametrize("poll", ["hybrid", "wait"])
def test_daemon_killed_mid_read(qsd_null: Qsd, poll: str) -> None:
    blk = VirtioBlk.open(qsd_null.target, poll=poll)
    try:
        reads = 0
        failure: list[tuple[BaseException, float]] = []
        later: list[BaseException | None] = []
        started = threading.Event()

        def reader() -> None:
            nonlocal reads
            try:
                while True:
                    blk.read(0, 4096)
                    reads += 1
                    if reads == 20:
                        started.set()
            except BaseException as exc:
                failure.append((exc, time.monotonic()))
            finally:
                started.set()
            for call in (lambda: blk.read(0, 4096), lambda: blk.write(0, bytes(512)), blk.flush):
                try:
                    call()
                    later.append(None)
                except BaseException as exc:
                    later.append(exc)

        t = threading.Thread(target=reader, name="doomed-reader")
        t.start()
        assert started.wait(10)
        killed_at = time.monotonic()
        qsd_null.kill()
        t.join(10)
        assert not t.is_alive(), "the reader hangs on a dead daemon"
        assert failure, "reads kept succeeding after SIGKILL"
        exc, when = failure[0]
        assert isinstance(exc, ConnectionLost), repr(exc)
        assert when - killed_at < 5.0
        assert later and all(isinstance(e, ConnectionLost) for e in later), later
        # However many calls follow: ConnectionLost, not QueueFull from a
        # ring filling up with requests the dead peer never completes.
        for _ in range(300):
            with pytest.raises(ConnectionLost):
                blk.read(0, 4096)
        # Another thread (the second queue) sees the same.
        with pytest.raises(ConnectionLost):
            blk.read(0, 4096)
        with pytest.raises(ConnectionLost):
            blk.info()
    finally:
        blk.close()  # must not raise or hang on a dead peer


# -- argument checks, 4 KiB blocks ------------------------------------------------------


def test_argument_errors(qsd_factory: Callable[..., Qsd]) -> None:
    # 8 GiB so that a transfer longer than max_transfer fits in the capacity.
    q: Qsd = qsd_factory(kind="null", size=8 << 30)
    with VirtioBlk.open(q.target) as blk:
        assert blk.max_transfer + 512 <= blk.capacity
        check_argument_errors(blk)
        with pytest.raises(InvalidArgument, match="largest transfer"):
            blk.read_request(0, blk.max_transfer + 512)
        with pytest.raises(InvalidArgument, match="segments"):
            blk.readv(0, [512] * (blk.max_segments + 1))
    # One frontend at a time: these open after the first one closed.
    with pytest.raises(InvalidArgument, match="num_queues"):
        VirtioBlk.open(q.target, num_queues=5)
    with pytest.raises(InvalidArgument, match="poll"):
        VirtioBlk.open(q.target, poll="sometimes")


def test_4k_logical_blocks(qsd_4k: Qsd) -> None:
    with VirtioBlk.open(qsd_4k.target) as blk:
        assert blk.block_size == 4096
        assert blk.info()["blk"]["block_size"] == 4096
        for call in (
            lambda: blk.read(512, 4096),
            lambda: blk.read(0, 512),
            lambda: blk.write(4096 + 512, bytes(4096)),
            lambda: blk.discard(512, 4096),
            lambda: blk.write_zeroes(0, 2048),
        ):
            with pytest.raises(InvalidArgument, match="block size 4096"):
                call()
        blk.write(8192, bytes(4096))
        assert blk.read(8192, 8192) == bytes(8192)
        blk.discard(4096, 4096)
        blk.write_zeroes(0, 8192, unmap=True)
        check_argument_errors(blk)


def test_bounce_buffers_stay_in_device_memory(qsd_null: Qsd) -> None:
    """A transfer never lands in pool memory the daemon was not given (it would drop us)."""
    with VirtioBlk.open(qsd_null.target) as blk:
        shared = sum(r.size for r in blk.pool.regions)
        assert blk.max_transfer <= shared // 2
        with pytest.raises(InvalidArgument, match="largest transfer"):
            blk.read_request(0, shared)
        # The sync call splits it; the second half waits for the first one's bounce buffer.
        assert blk.read(0, 2 * blk.max_transfer) == bytes(2 * blk.max_transfer)
        assert len(blk.read(0, 8 << 20)) == 8 << 20
        # Memory held elsewhere: no room now is QueueFull, and the connection lives on.
        hog = blk.pool.allocate(shared - (4 << 20))
        try:
            with pytest.raises(QueueFull, match="shared memory"):
                blk.read(0, 8 << 20)
            stray = blk.pool.allocate(8 << 20)  # from a region added after start
            try:
                with pytest.raises(InvalidArgument, match="not in the shared memory"):
                    blk.readinto(0, stray)
            finally:
                blk.pool.free(stray)
        finally:
            blk.pool.free(hog)
        assert blk.read(0, 8 << 20) == bytes(8 << 20)
        blk.device.transport.check_alive()


WCE_OFFSET = next(off for name, off, _fmt in B.CONFIG_FIELDS if name == "wce")


def test_write_config_wce_over_vhost_user(qsd_raw: Qsd) -> None:
    """SET_CONFIG reaches qemu-storage-daemon: CONFIG_WCE's ``wce`` byte is the one field it takes.

    qsd turns the export's write cache on and off with it and reports the new value in
    GET_CONFIG. (GET_CONFIG on qsd copies from the start of the config whatever the
    offset asked, so the config is read whole, as the driver does.)
    """
    with VirtioBlk.open(qsd_raw.target, extra_features=1 << B.F_CONFIG_WCE) as blk:
        assert blk.device.has_feature(B.F_CONFIG_WCE)

        def wce() -> int:
            return B.parse_config(blk.device.read_config(0, B.CONFIG_SIZE_V11))["wce"]

        start = wce()
        for value in (1 - start, start):
            blk.device.write_config(WCE_OFFSET, bytes([value]))
            assert wce() == value
        blk.write(0, b"w" * 4096)  # the device still works after the writes
        blk.flush()
        assert blk.read(0, 4096) == b"w" * 4096
