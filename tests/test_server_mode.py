"""Server mode: pyvirtio listens on the socket and the back end connects (DPDK's vhost ``client=1``).

The embedded back end in client mode (``VhostUserClient``, ``pyvirtio serve
blk --client``) connects to a frontend opened with ``server=True``;
reconnect in this mode is the back end connecting again, which the
frontend accepts: in process with crashes mid-batch (with and without
inflight tracking), a ``serve --client`` process SIGKILLed and restarted
under writes (every acknowledged write on the file afterwards), and
``pyvirtio bench --server --reconnect``. The socket file: created, a stale
one replaced, a live one refused, removed on close; nobody connecting is a
clear ConnectionLost after ``connect_timeout``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from peers_restart import CrashingModel, ServeProcess, run_bench_across_restarts
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.server import VhostUserClient
from pyvirtio.drivers.blk import VirtioBlk, pack_pattern
from pyvirtio.errors import ConnectionLost, TransportError
from pyvirtio.transport.vhost_user import VhostUserTransport

BS = 4096


# Injected crashes and dropped connections are logged by the back ends: expected here.
pytestmark = pytest.mark.usefixtures("quiet_backend_logs")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("inflight", [False, True], ids=["frontend-resubmits", "backend-inflight"])
def test_backend_connects_and_reconnects_after_crashes(sockdir: str, inflight: bool) -> None:
    path = os.path.join(sockdir, "f.sock")
    storage = Storage(size=4 << 20)
    model = CrashingModel(BlockBackend(storage))
    client = VhostUserClient(path, model, inflight=inflight, retry=0.01)
    client.start()
    try:
        with VirtioBlk.open(path, server=True, reconnect=5.0) as blk:
            t = blk.device.transport
            assert blk.info()["virtio"]["mode"] == "server"
            assert (t.inflight_info is not None) == inflight
            for round_ in range(5):
                model.arm(after=3)
                reqs = [blk.write_request(b * BS, pack_pattern(b, round_, BS)) for b in range(16)]
                assert blk.submit(reqs) == 16
                blk.wait(reqs)
                for b in range(16):
                    assert blk.read(b * BS, BS) == pack_pattern(b, round_, BS)
            assert model.crashes == 5 and t.reconnects == 5 and t.device_resubmits == inflight
        assert not os.path.exists(path)  # the frontend's socket, removed on close
    finally:
        client.stop()
        assert client.wait(10)
        storage.close()
    assert client.connections >= 6  # (and maybe one more, refused as the frontend closed)


@pytest.mark.timeout(90)
def test_serve_client_process_killed_and_restarted_under_writes(sockdir: str) -> None:
    image = os.path.join(sockdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    sock = os.path.join(sockdir, "f.sock")
    serve = ServeProcess(sock, image, os.path.join(sockdir, "log"), inflight=True, client=True).start()
    acked: dict[int, int] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        blk = VirtioBlk.open(sock, server=True, reconnect=20.0, connect_timeout=20.0)
        try:

            def writer() -> None:
                version = 0
                try:
                    while not stop.is_set():
                        version += 1
                        blocks = [(version * 7 + i * 31) % 1024 for i in range(16)]
                        reqs = [blk.write_request(b * BS, pack_pattern(b, version, BS)) for b in blocks]
                        assert blk.submit(reqs) == 16
                        blk.wait(reqs)
                        for b in blocks:
                            acked[b] = version
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=writer)
            thread.start()
            for i in range(3):
                time.sleep(0.2)
                serve.restart()
                deadline = time.monotonic() + 30  # this reconnect done before the next crash
                while blk.device.transport.reconnects < i + 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            time.sleep(0.2)
            stop.set()
            thread.join(30)
            assert not thread.is_alive() and not errors, errors
            assert blk.device.transport.reconnects >= 3
        finally:
            blk.close()
    finally:
        serve.stop()
    assert "Traceback" not in serve.log_text()
    with open(image, "rb") as f:
        data = f.read()
    assert acked
    for b, v in acked.items():
        assert data[b * BS : (b + 1) * BS] == pack_pattern(b, v, BS), f"acknowledged write of block {b} lost"


@pytest.mark.timeout(90)
def test_bench_server_mode_reconnect(sockdir: str) -> None:
    image = os.path.join(sockdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    sock = os.path.join(sockdir, "f.sock")
    serve = ServeProcess(sock, image, os.path.join(sockdir, "log"), client=True).start()
    try:
        args = ("--server", "--rw", "randwrite", "--verify", "--seed", "3", "--iodepth", "8", "--json")
        done = run_bench_across_restarts(sock, serve.pid, lambda: serve.restart().pid, *args, restarts=1)
    finally:
        serve.stop()
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["reconnects"] == 1 and r["verify_errors"] == 0 and r["errors"] == 0 and r["writes"] > 0
    assert r["pause_ms"]["max"] > 0


# -- the socket file -------------------------------------------------------------------------


def test_stale_socket_replaced_live_one_refused_and_nobody_connecting(sockdir: str) -> None:
    path = os.path.join(sockdir, "f.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="no vhost-user back end connected"):
        VhostUserTransport(path, server=True, connect_timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert not os.path.exists(path)  # replaced, then removed again on failure
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(TransportError, match="another process is listening"):
            VhostUserTransport(path, server=True, connect_timeout=0.3)
    finally:
        live.close()
        os.unlink(path)
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(TransportError, match="not a socket"):
        VhostUserTransport(path, server=True, connect_timeout=0.3)
    assert os.path.exists(path)
