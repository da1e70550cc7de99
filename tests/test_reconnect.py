"""Reconnect (client mode): a back end restarts and the frontend carries on, losing nothing.

In process (the embedded server in a thread, its model crashing on
command in the middle of a batch): requests in flight are held and
resubmitted exactly once, with and without the back end's inflight
tracking, on split and packed rings, with and without IN_ORDER (packed
with inflight tracking: the area's descriptor-level entries, the ring
resuming where the area says); completions already in the used ring at the crash are delivered
once and not resubmitted; with reconnect off every pending request fails
with ConnectionLost; a back end that comes back without a negotiated
feature, or not at all, is a clear error; two queues driven by two threads;
asyncio.

Real processes: qemu-storage-daemon on a raw file SIGKILLed and restarted
on the same socket five times under two writer threads (afterwards every
acknowledged write is on the file); ``pyvirtio serve blk --file`` the same,
with and without ``--inflight``; ``pyvirtio bench --reconnect --verify``
across restarts (zero verify errors, the pause reported, the file checked);
and a frontend SIGKILLed while the back end keeps its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from peers_restart import CrashingModel, ServeProcess, restart_qsd, run_bench_across_restarts
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.drivers.blk import BlkRequest, VirtioBlk, pack_pattern
from pyvirtio.errors import ConnectionLost
from pyvirtio.spec import blk as B
from pyvirtio.transport.vhost_user import ReconnectFailed, ReconnectPolicy

if TYPE_CHECKING:
    from peers import Qsd

pytest_plugins = ["peers"]

BS = 4096


# Injected crashes and dropped connections are logged by the back ends: expected here.
pytestmark = pytest.mark.usefixtures("quiet_backend_logs")


@contextlib.contextmanager
def crashing_server(
    path: str, *, inflight: bool = False, queues: int = 1, size: int = 8 << 20
) -> Iterator[tuple[VhostUserServer, CrashingModel]]:
    storage = Storage(size=size)
    model = CrashingModel(BlockBackend(storage, num_queues=queues))
    try:
        with VhostUserServer(path, model, inflight=inflight) as server:
            yield server, model
    finally:
        storage.close()


def _pending(blk: VirtioBlk) -> int:
    return blk.thread_queue().vq.ring.pending()


def wait_reconnects(blk: VirtioBlk, n: int, timeout: float = 30.0) -> None:
    """Until the frontend has reconnected ``n`` times (so the next crash is a crash of its own)."""
    deadline = time.monotonic() + timeout
    while blk.device.transport.reconnects < n:
        assert time.monotonic() < deadline, f"{blk.device.transport.reconnects} reconnects, waiting for {n}"
        time.sleep(0.01)


# -- in process ---------------------------------------------------------------------------------


RINGS = [("split", False), ("packed", False), ("packed", True), ("split", True)]
RING_IDS = ["split", "packed", "packed-in-order", "split-in-order"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ring, in_order", RINGS, ids=RING_IDS)
@pytest.mark.parametrize("inflight", [False, True], ids=["frontend-resubmits", "backend-inflight"])
def test_requests_in_flight_are_resubmitted_exactly_once(
    sockdir: str, inflight: bool, ring: str, in_order: bool
) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path, inflight=inflight) as (server, model), VirtioBlk.open(
        path, reconnect=5.0, ring=ring, in_order=in_order
    ) as blk:
        assert blk.info()["virtio"]["ring"] == ring
        assert (blk.device.transport.inflight_info is not None) == inflight
        # Batch 1 completes and stays unreaped in the used ring (it raced the crash).
        batch1 = [blk.write_request(b * BS, pack_pattern(b, 1, BS)) for b in range(16)]
        assert blk.submit(batch1) == 16
        deadline = time.monotonic() + 5
        while _pending(blk) < 16:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # Batch 2: the back end crashes at its 6th request, 5 handled but none published.
        model.arm(after=5)
        batch2 = [blk.write_request(b * BS, pack_pattern(b, 2, BS)) for b in range(16, 32)]
        assert blk.submit(batch2) == 16
        blk.wait(batch1 + batch2)
        assert model.crashes == 1 and blk.device.transport.reconnects == 1
        assert blk.device.transport.device_resubmits == inflight
        spb = BS // 512
        for b in range(16):
            assert model.executed[b * spb] == 1, "a completion in the used ring was resubmitted"
        counts = [model.executed[b * spb] for b in range(16, 32)]
        # Not lost; at most once more: the (up to 5) handled before the crash and not published.
        assert all(1 <= c <= 2 for c in counts), counts
        assert sum(c == 2 for c in counts) <= 5
        for b in range(32):
            assert blk.read(b * BS, BS) == pack_pattern(b, 1 if b < 16 else 2, BS)
        assert blk.info()["virtio"]["reconnects"] == 1


@pytest.mark.timeout(30)
def test_reconnect_off_fails_every_pending_request(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path) as (server, model), VirtioBlk.open(path) as blk:
        blk.write(0, b"x" * BS)
        model.arm(after=2)
        reqs = [blk.read_request(b * BS, BS) for b in range(8)]
        assert blk.submit(reqs) == 8
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            blk.wait(reqs)
        assert time.monotonic() - started < 3
        assert all(r.done and isinstance(r.error, ConnectionLost) for r in reqs)
        assert blk.thread_queue().inflight == 0 and len(blk.thread_queue().free_slots) == blk.thread_queue().nslots
        with pytest.raises(ConnectionLost):
            blk.read(0, BS)


@pytest.mark.timeout(30)
def test_a_back_end_back_without_a_negotiated_feature_is_a_clear_error(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path) as (server, model), VirtioBlk.open(path, reconnect=5.0) as blk:
        assert blk.can_flush
        blk.write(0, b"y" * BS)
        model.hidden_features = 1 << B.F_FLUSH
        model.arm()
        req = blk.read_request(0, BS)
        blk.submit([req])
        with pytest.raises(ReconnectFailed, match="FLUSH.*cannot resume"):
            blk.wait([req])
        assert isinstance(req.error, ReconnectFailed)


@pytest.mark.timeout(30)
def test_reconnect_gives_up_after_the_policy_limit(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path) as (server, model):
        blk = VirtioBlk.open(path, reconnect=ReconnectPolicy(timeout=0.6, delay=0.01, max_delay=0.05))
        blk.write(0, b"z" * BS)
    try:  # the server is gone for good (socket removed)
        started = time.monotonic()
        with pytest.raises(ReconnectFailed, match="not back after"):
            blk.read(0, BS)
        assert 0.5 < time.monotonic() - started < 5
    finally:
        blk.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring, inflight", [("split", False), ("packed", False), ("packed", True)])
def test_two_queues_two_threads_across_crashes(sockdir: str, ring: str, inflight: bool) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path, queues=2, inflight=inflight) as (server, model), VirtioBlk.open(
        path, num_queues=2, reconnect=5.0, poll="wait", ring=ring
    ) as blk:
        acked: list[dict[int, int]] = [{}, {}]
        errors: list[BaseException] = []
        stop = threading.Event()

        def writer(q: int) -> None:
            rnd = random.Random(q)
            version = 0
            try:
                while not stop.is_set():
                    version += 1
                    blocks = rnd.sample(range(q * 512, q * 512 + 512), 8)
                    reqs = [blk.write_request(b * BS, pack_pattern(b, version, BS)) for b in blocks]
                    assert blk.submit(reqs) == 8
                    blk.wait(reqs)
                    for b in blocks:
                        acked[q][b] = version
            except BaseException as exc:
                errors.append(exc)
            finally:
                blk.release_queue()

        threads = [threading.Thread(target=writer, args=(q,)) for q in range(2)]
        for t in threads:
            t.start()
        for _ in range(6):
            time.sleep(0.1)
            model.arm(after=3)
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(20)
        assert not errors, errors
        assert model.crashes >= 5
        for q in range(2):
            for b, v in acked[q].items():
                assert blk.read(b * BS, BS) == pack_pattern(b, v, BS), f"block {b}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_asyncio_across_a_crash(sockdir: str, ring: str) -> None:
    path = os.path.join(sockdir, "s.sock")

    async def main(blk: VirtioBlk, model: CrashingModel) -> None:
        for i in range(40):
            if i % 10 == 5:
                model.arm()
            await blk.awrite(i * BS, pack_pattern(i, 9, BS))
            assert await blk.aread(i * BS, BS) == pack_pattern(i, 9, BS)

    with crashing_server(path, inflight=True) as (server, model), VirtioBlk.open(path, reconnect=5.0, ring=ring) as blk:
        asyncio.run(main(blk, model))
        assert model.crashes == 4 and blk.device.transport.reconnects == 4


@pytest.mark.timeout(30)
def test_asyncio_reconnect_does_not_block_the_loop(sockdir: str) -> None:
    """While the back end is away, other coroutines run: the wait for it is in a worker thread."""
    path = os.path.join(sockdir, "s.sock")
    storage = Storage(size=8 << 20)
    away = 0.8

    async def main(blk: VirtioBlk, first: VhostUserServer, servers: list[VhostUserServer]) -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await blk.awrite(0, pack_pattern(0, 1, BS))

        def come_back() -> None:
            servers.append(VhostUserServer(path, BlockBackend(storage)))
            servers[-1].start()

        first.stop()
        assert first.wait(5)
        threading.Timer(away, come_back).start()
        loop = asyncio.get_running_loop()
        t0, before = loop.time(), ticks
        await blk.awrite(BS, pack_pattern(1, 1, BS))  # lost, then resubmitted on the next server
        elapsed, during = loop.time() - t0, ticks - before
        assert await blk.aread(0, 2 * BS) == pack_pattern(0, 1, BS) + pack_pattern(1, 1, BS)
        task.cancel()
        return elapsed, during

    servers: list[VhostUserServer] = []
    first = VhostUserServer(path, BlockBackend(storage))
    first.start()
    try:
        with VirtioBlk.open(path, reconnect=10.0) as blk:
            elapsed, during = asyncio.run(main(blk, first, servers))
            assert blk.device.transport.reconnects == 1
    finally:
        for srv in servers:
            srv.stop()
            srv.wait(5)
        storage.close()
    assert elapsed >= away * 0.8
    # ~100 ticks a second if the loop is free; a loop blocked in the reconnect gets almost none.
    assert during >= elapsed * 100 * 0.3, (elapsed, during)


# -- qemu-storage-daemon killed and restarted ----------------------------------------------------


def _writers(
    blk: VirtioBlk, nthreads: int, blocks_per_thread: int, batch: int
) -> tuple[Callable[[], None], list[dict[int, int]], list[BaseException]]:
    """Writer threads (one queue each): batches of distinct blocks, version per block kept when acked."""
    acked: list[dict[int, int]] = [{} for _ in range(nthreads)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(q: int) -> None:
        rnd = random.Random(q + 100)
        version = 0
        lo = q * blocks_per_thread
        try:
            while not stop.is_set():
                version += 1
                blocks = rnd.sample(range(lo, lo + blocks_per_thread), batch)
                reqs: list[BlkRequest] = [blk.write_request(b * BS, pack_pattern(b, version, BS)) for b in blocks]
                assert blk.submit(reqs) == batch
                blk.wait(reqs)
                for b in blocks:
                    acked[q][b] = version
        except BaseException as exc:
            errors.append(exc)
        finally:
            blk.release_queue()

    threads = [threading.Thread(target=writer, args=(q,), name=f"writer-{q}") for q in range(nthreads)]
    for t in threads:
        t.start()

    def finish() -> None:
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a writer hangs"

    return finish, acked, errors


def _check_file(image: str, acked: list[dict[int, int]]) -> None:
    with open(image, "rb") as f:
        data = f.read()
    for per_thread in acked:
        for b, v in per_thread.items():
            assert data[b * BS : (b + 1) * BS] == pack_pattern(b, v, BS), f"acknowledged write of block {b} lost"


@pytest.mark.peer
@pytest.mark.timeout(90)
def test_qsd_killed_and_restarted_under_writes(qsd_factory: Callable[..., Qsd]) -> None:
    q = qsd_factory(kind="raw", size=8 << 20, num_queues=2)
    blk = VirtioBlk.open(q.target, num_queues=2, reconnect=20.0)
    try:
        finish, acked, errors = _writers(blk, 2, 1024, 16)
        for i in range(5):
            time.sleep(0.2)
            restart_qsd(q)
            wait_reconnects(blk, i + 1)
        time.sleep(0.2)
        finish()
        assert not errors, errors
        assert blk.device.transport.reconnects >= 5
        # Through the device (the restarted daemon) ...
        for per_thread in acked:
            for b, v in list(per_thread.items())[:64]:
                assert blk.read(b * BS, BS) == pack_pattern(b, v, BS)
    finally:
        blk.close()
    q.stop()
    _check_file(str(q.image), acked)  # ... and on the file itself, every acknowledged write
    assert sum(len(a) for a in acked) > 500


@pytest.mark.timeout(90)
@pytest.mark.parametrize("inflight", [False, True], ids=["frontend-resubmits", "backend-inflight"])
def test_embedded_backend_killed_and_restarted_under_writes(sockdir: str, inflight: bool) -> None:
    image = os.path.join(sockdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    serve = ServeProcess(os.path.join(sockdir, "s.sock"), image, os.path.join(sockdir, "log"), inflight=inflight)
    serve.start()
    try:
        blk = VirtioBlk.open("vhost-user:" + serve.sock, reconnect=20.0)
        try:
            assert (blk.device.transport.inflight_info is not None) == inflight
            finish, acked, errors = _writers(blk, 1, 2048, 32)
            for i in range(3):
                time.sleep(0.2)
                serve.restart()
                wait_reconnects(blk, i + 1)
            time.sleep(0.2)
            finish()
            assert not errors, errors
            assert blk.device.transport.reconnects >= 3
            assert blk.device.transport.device_resubmits == inflight
        finally:
            blk.close()
    finally:
        serve.stop()
    assert "Traceback" not in serve.log_text()
    _check_file(image, acked)


# -- pyvirtio bench --reconnect ------------------------------------------------------------------


def _check_patterns_on_file(image: str, seed: int) -> int:
    """Every block is zero or its verify pattern; returns how many were written."""
    with open(image, "rb") as f:
        data = f.read()
    written = 0
    for b in range(len(data) // BS):
        got = data[b * BS : (b + 1) * BS]
        if got != bytes(BS):
            assert got == pack_pattern(b, seed, BS), f"block {b} corrupt"
            written += 1
    return written


def _bench_json(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr
    result: dict = json.loads(done.stdout)
    return result


@pytest.mark.peer
@pytest.mark.timeout(90)
def test_bench_reconnect_verify_across_qsd_restarts(qsd_factory: Callable[..., Qsd]) -> None:
    q = qsd_factory(kind="raw", size=8 << 20)
    # Reads and writes, both verified (a read is checked against what was acknowledged when it was posted).
    args = ("--rw", "randrw", "--verify", "--seed", "11", "--iodepth", "16", "--json")
    r = _bench_json(run_bench_across_restarts(q.target, q.pid, lambda: restart_qsd(q).pid, *args))
    assert r["errors"] == 0 and r["verify_errors"] == 0 and r["writes"] > 1000 and r["reads"] > 1000
    assert r["reconnects"] == 3
    assert 0 < r["pause_ms"]["max"] <= r["pause_ms"]["total"] < 60_000
    assert r["reconnect"] == 30.0
    q.stop()
    assert _check_patterns_on_file(str(q.image), 11) > 0


@pytest.mark.peer
@pytest.mark.timeout(90)
def test_bench_reconnect_fused_loop_keeps_running(qsd_factory: Callable[..., Qsd]) -> None:
    q = qsd_factory(kind="null", num_queues=1)
    args = ("--iodepth", "8", "--rw", "randread", "--json")
    r = _bench_json(run_bench_across_restarts(q.target, q.pid, lambda: restart_qsd(q).pid, *args))
    assert r["engine"] == "python" and r["errors"] == 0 and r["reconnects"] == 3 and r["ios"] > 1000
    assert r["pause_ms"]["total"] > 0


@pytest.mark.timeout(90)
def test_bench_reconnect_human_report_embedded_inflight(sockdir: str) -> None:
    image = os.path.join(sockdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    serve = ServeProcess(os.path.join(sockdir, "s.sock"), image, os.path.join(sockdir, "log"), inflight=True)
    serve.start()
    try:
        args = ("--rw", "randwrite", "--verify", "--seed", "4", "--iodepth", "8")
        done = run_bench_across_restarts(serve.sock, serve.pid, lambda: serve.restart().pid, *args, restarts=1)
    finally:
        serve.stop()
    assert done.returncode == 0, done.stderr
    assert "verify errors: 0" in done.stdout
    assert "reconnects: 1   paused:" in done.stdout
    assert _check_patterns_on_file(image, 4) > 0


# -- the frontend restarts, the back end keeps its state ---------------------------------------

_CHILD = r"""
import random, sys
from pyvirtio.drivers.blk import VirtioBlk, pack_pattern
blk = VirtioBlk.open(sys.argv[1])
rnd = random.Random(7)
version = 0
while True:
    version += 1
    blocks = rnd.sample(range(1024), 16)
    reqs = [blk.write_request(b * 4096, pack_pattern(b, version, 4096)) for b in blocks]
    blk.submit(reqs)
    blk.wait(reqs)
    print(version, *blocks, flush=True)
"""


def _frontend_killed_then_check(target: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, target], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    lines: list[str] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < 1.5 or len(lines) < 10:
            line = child.stdout.readline()
            assert line, "the child frontend died"
            lines.append(line)
            assert time.monotonic() - started < 30
    finally:
        child.kill()  # SIGKILL, with a batch of writes in flight
        child.wait(10)
        lines += child.stdout.readlines()  # every batch acknowledged before the kill
        child.stdout.close()
    acked: dict[int, int] = {}
    last = 0
    # A line cut by the kill (PYTHONUNBUFFERED writes it a number at a time) was not
    # acknowledged in full: its batch is the one in flight, version last + 1.
    for line in (line for line in lines if line.endswith("\n")):
        version, *blocks = map(int, line.split())
        last = version
        for b in blocks:
            acked[b] = version
    # A new frontend on the same back end finds every acknowledged write (or the
    # batch that was in flight at the kill, version last + 1, over it).
    with VirtioBlk.open(target, connect_timeout=10.0) as blk:
        for b, v in acked.items():
            got = blk.read(b * BS, BS)
            assert got in (pack_pattern(b, v, BS), pack_pattern(b, last + 1, BS)), f"block {b} lost version {v}"


@pytest.mark.peer
@pytest.mark.timeout(60)
def test_frontend_killed_qsd_keeps_state(qsd_factory: Callable[..., Qsd]) -> None:
    q = qsd_factory(kind="raw", size=4 << 20)
    _frontend_killed_then_check(q.target)


@pytest.mark.timeout(60)
def test_frontend_killed_embedded_backend_keeps_state(sockdir: str) -> None:
    image = os.path.join(sockdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    serve = ServeProcess(os.path.join(sockdir, "s.sock"), image, os.path.join(sockdir, "log"), inflight=True)
    serve.start()
    try:
        _frontend_killed_then_check("vhost-user:" + serve.sock)
    finally:
        serve.stop()
    assert "Traceback" not in serve.log_text()


# -- the generic queue API -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_virtqueue_wait_recovers_for_any_driver(sockdir: str) -> None:
    """Virtqueue.wait (the device layer, not VirtioBlk) holds and resubmits across a crash too."""
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path, queues=2) as (server, model), VirtioBlk.open(
        path, num_queues=2, reconnect=5.0
    ) as blk:
        blk.write(8 * BS, pack_pattern(8, 5, BS))
        blk.release_queue()
        vq = blk.device.acquire(1)
        pool = blk.pool
        hdr, data, status = pool.allocate(16), pool.allocate(BS, align=BS), pool.allocate(1)
        try:
            B.OUTHDR.pack_into(hdr.view, 0, B.T_IN, 0, 8 * BS // 512)
            status.view[0] = 0xFF
            model.arm()
            vq.submit("read", [(hdr.addr, 16, False), (data.addr, BS, True), (status.addr, 1, True)])
            vq.flush()
            done = vq.wait(10)
            assert [token for token, _ in done] == ["read"]
            assert status.view[0] == B.S_OK and bytes(data.view) == pack_pattern(8, 5, BS)
            assert model.crashes == 1 and blk.device.transport.reconnects == 1
        finally:
            for buf in (hdr, data, status):
                pool.free(buf)
            blk.device.release(1)


@pytest.mark.timeout(60)
def test_threads_share_the_memory_pool_safely(sockdir: str) -> None:
    """Bounce buffers of two queues' threads come from one pool (whose allocator has no lock of its own)."""
    path = os.path.join(sockdir, "s.sock")
    interval = sys.getswitchinterval()
    with crashing_server(path, queues=2) as (server, model), VirtioBlk.open(path, num_queues=2) as blk:
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show at once
        try:
            finish, acked, errors = _writers(blk, 2, 512, 16)
            time.sleep(1.0)
            finish()
        finally:
            sys.setswitchinterval(interval)
        assert not errors, errors
        assert all(acked)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inflight", [False, True], ids=["frontend-resubmits", "backend-inflight"])
def test_packed_zero_wrap_restarts_in_lap_0_exactly_once(sockdir: str, inflight: bool) -> None:
    """packed_zero_wrap against the embedded back end: crashes in either lap, nothing lost or run thrice.

    A ring of 13 slots and 4 writes of 3 descriptors a round: the used side is in lap 1 at
    about half the crashes, and every restart moves the ring back to lap 0. The inflight area
    is not handed over (its positions are in the old lap): the frontend resubmits.
    """
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path, inflight=inflight) as (server, model), VirtioBlk.open(
        path, reconnect=5.0, ring="packed", packed_zero_wrap=True, queue_size=13
    ) as blk:
        t = blk.device.transport
        assert (t.inflight_info is not None) == inflight and not t.hand_over_inflight
        spb = BS // 512
        for n in range(6):
            before = [model.executed[b * spb] for b in range(4)]
            model.arm(after=1 + n % 3)  # the crash comes among the writes
            reqs = [blk.write_request(b * BS, pack_pattern(b, n, BS)) for b in range(4)]
            assert blk.submit(reqs) == 4  # 12 of 13 slots
            blk.wait(reqs)
            assert t.reconnects == n + 1 and not t.device_resubmits
            runs = [model.executed[b * spb] - before[b] for b in range(4)]
            assert all(1 <= r <= 2 for r in runs), runs  # not lost; at most once more (handled, not published)
            for b in range(4):
                assert blk.read(b * BS, BS) == pack_pattern(b, n, BS)
        assert model.crashes == 6
