"""The embedded vhost-user back end (``pyvirtio.backends.server``) serving real frontends.

pyvirtio's own frontend (``VirtioBlk.open("vhost-user:...")``) against a
server in a background thread: every operation (with and without
EVENT_IDX), a read-only device, two queues driven by two threads, a
file-backed device whose file is compared byte for byte, a second frontend
after the first leaves, stop() with a frontend attached, stale and live
socket files. A raw frontend (``hostile_frontend``) covers the protocol
paths pyvirtio's frontend does not take: ADD/REM_MEM_REG, rings without
protocol features, SET_VRING_ENABLE gating, GET_VRING_BASE, status and
RESET_DEVICE, and a device model that is not blk. ``pyvirtio serve blk``
runs as a subprocess and stops on SIGTERM, removing its socket.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("blk_checks", "hostile_frontend")

from blk_checks import (  # noqa: E402
    check_all_ops,
    check_asyncio,
    check_batch,
    check_two_queues,
    pattern,
    write_patterns,
)
from hostile_frontend import REGION, STATE, U64, BlkBuilder, HostileFrontend  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.server import MAX_MEM_SLOTS, VhostUserServer  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.errors import ConnectionLost, InvalidArgument, TransportError  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.ring.device_side import Chain  # noqa: E402
from pyvirtio.spec import blk as B  # noqa: E402
from pyvirtio.spec.common import F_VERSION_1  # noqa: E402

pytestmark = pytest.mark.timeout(60)

RAM_SIZE = 16 << 20


@contextlib.contextmanager
def serving(
    path: str,
    *,
    size: int | None = RAM_SIZE,
    file: str | None = None,
    readonly: bool = False,
    queues: int = 2,
) -> Iterator[VhostUserServer]:
    storage = Storage(size=size if file is None else None, path=file, readonly=readonly)
    server = VhostUserServer(path, BlockBackend(storage, num_queues=queues))
    try:
        with server:
            yield server
    finally:
        storage.close()


@pytest.fixture(scope="module")
def ram(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserServer]:
    with serving(str(tmp_path_factory.mktemp("srv") / "ram.sock")) as server:
        yield server


def target(server: VhostUserServer) -> str:
    return "vhost-user:" + server.path


def wait_finished(server: VhostUserServer, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.finished < count:
        assert time.monotonic() < deadline, f"{server.finished} connections finished, waiting for {count}"
        time.sleep(0.005)


# -- pyvirtio's own frontend ----------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [True, False])
def test_all_operations(ram: VhostUserServer, event_idx: bool) -> None:
    with VirtioBlk.open(target(ram), event_idx=event_idx) as blk:
        assert blk.capacity == RAM_SIZE
        assert blk.num_queues == 2
        assert blk.get_id() == "pyvirtio"
        check_all_ops(blk, stores=True)
        check_batch(blk, stores=True)
        check_asyncio(blk, stores=True)


def test_readonly(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(pattern(0, 1 << 20, 42) + bytes(3 << 20))
    with serving(str(tmp_path / "ro.sock"), file=str(image), readonly=True) as server:
        with VirtioBlk.open(target(server)) as blk:
            assert blk.readonly
            assert blk.capacity == 4 << 20
            assert blk.read(0, 8192) == pattern(0, 8192, 42)
            with pytest.raises(InvalidArgument, match="read-only"):
                blk.write(0, bytes(512))
            blk.flush()
    assert image.read_bytes()[: 1 << 20] == pattern(0, 1 << 20, 42)


def test_two_queues_from_two_threads(tmp_path: Path) -> None:
    image = tmp_path / "mq.img"
    image.write_bytes(bytes(4 << 20))
    model = bytearray(4 << 20)
    with serving(str(tmp_path / "mq.sock"), file=str(image), queues=2) as server:
        with VirtioBlk.open(target(server)) as blk:
            check_two_queues(blk, model)
        wait_finished(server, 1)
        assert server.disconnects == ["frontend disconnected"]
    assert image.read_bytes() == bytes(model)


def test_file_backed_bytes_on_disk(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x11" * (16 << 20))
    with serving(str(tmp_path / "f.sock"), file=str(image), queues=1) as server:
        with VirtioBlk.open(target(server)) as blk:
            model = bytearray(blk.read(0, blk.capacity))
            assert model == b"\x11" * (16 << 20)
            write_patterns(blk, model)
            blk.flush()
            # pwritev went to the file: it is there while the server still runs.
            on_disk = image.read_bytes()
            assert on_disk == bytes(model)
    assert image.read_bytes() == bytes(model)


def test_a_second_frontend_after_the_first_leaves(ram: VhostUserServer) -> None:
    start = ram.finished
    data = os.urandom(8192)
    with VirtioBlk.open(target(ram), num_queues=1) as blk:
        blk.write(1 << 20, data)
    with VirtioBlk.open(target(ram), num_queues=2) as blk:
        assert blk.read(1 << 20, 8192) == data  # the disk outlives the connection
        blk.write(1 << 20, bytes(8192))
    wait_finished(ram, start + 2)
    assert ram.disconnects[-2:] == ["frontend disconnected"] * 2


def test_stop_with_a_frontend_attached(tmp_path: Path) -> None:
    path = str(tmp_path / "stop.sock")
    with serving(path) as server:
        blk = VirtioBlk.open("vhost-user:" + path, poll="wait")
        try:
            blk.write(0, b"x" * 512)
            server.stop()
            assert server.wait(5)
            assert not os.path.exists(path)
            assert server.disconnects == ["server stopping"]
            with pytest.raises(ConnectionLost):
                for _ in range(100):  # the first request may already be in the socket buffer
                    blk.read(0, 512)
        finally:
            with contextlib.suppress(ConnectionLost):
                blk.close()


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    with serving(path) as server:
        with VirtioBlk.open(target(server)) as blk:
            assert blk.get_id() == "pyvirtio"
        second = VhostUserServer(path, server.model)
        with pytest.raises(TransportError, match="another server is listening"):
            second.listen()
        second.close()
        assert os.path.exists(path)  # the refused server did not remove the live socket
    assert not os.path.exists(path)
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    with pytest.raises(TransportError, match="not a socket"):
        VhostUserServer(str(regular), server.model).listen()
    assert regular.read_text() == "keep me"


@pytest.mark.parametrize("long_path", [False, True], ids=["staged", "too-long-to-stage"])
def test_the_socket_file_appears_only_once_it_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, long_path: bool
) -> None:
    """A fixture or frontend that waits for the socket file and then connects is never refused: the file
    is renamed into place after listen(). A path too long for the temporary name is bound in place."""
    directory = tmp_path / ("d" * (95 - len(str(tmp_path))) if long_path else "")
    directory.mkdir(exist_ok=True)
    path = str(directory / "s.sock")
    assert len(path) < 108
    renames: list[str] = []
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        assert dst == path and not os.path.exists(dst)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(src)  # listening already (refused before listen())
        probe.close()
        renames.append(src)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    server = VhostUserServer(path, BlockBackend(Storage(1 << 20)))
    try:
        server.listen()
        assert len(renames) == (0 if long_path else 1)
        assert os.listdir(directory) == ["s.sock"]  # no temporary name left behind
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)
        probe.close()
    finally:
        server.close()
    assert not os.path.exists(path)


# -- protocol paths pyvirtio's frontend does not take ----------------------------------------


def _get_id(fe: HostileFrontend, first: int, count: int) -> None:
    blk = BlkBuilder(fe, fe.rings[0])
    status, ident = blk.request(first, B.T_GET_ID, data=B.ID_BYTES)
    fe.rings[0].publish(first)
    fe.kick()
    assert fe.wait_used(0, count)
    assert bytes(status.view) == bytes([B.S_OK])
    assert ident is not None and bytes(ident.view).rstrip(b"\0") == b"pyvirtio"


def test_add_and_remove_memory_regions(ram: VhostUserServer) -> None:
    with HostileFrontend(ram.path) as fe:
        fe.handshake()
        assert fe.u64(vu.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS
        region = fe.pool.regions[0]
        reg = U64.pack(0) + REGION.pack(region.guest_addr, region.size, region.user_addr, 0)
        fe.set(vu.ADD_MEM_REG, reg, fds=[region.fd])
        fe.setup_ring(0)
        _get_id(fe, 0, 1)
        # A second region, added and removed while the ring runs.
        extra = os.memfd_create("extra")
        try:
            os.ftruncate(extra, 1 << 20)
            other = U64.pack(0) + REGION.pack(1 << 40, 1 << 20, 1 << 40, 0)
            fe.set(vu.ADD_MEM_REG, other, fds=[extra])
            fe.set(vu.REM_MEM_REG, other)
        finally:
            os.close(extra)
        _get_id(fe, 4, 2)
        # Removing a region nobody added is a violation.
        fe.send(vu.REM_MEM_REG, other)
        assert fe.expect_closed()


def test_rings_start_on_kick_without_protocol_features(ram: VhostUserServer) -> None:
    with HostileFrontend(ram.path) as fe:
        offered = fe.u64(vu.GET_FEATURES)
        fe.send(vu.SET_OWNER)
        fe.send(vu.SET_FEATURES, U64.pack(offered & (1 << F_VERSION_1)))
        fe.set_mem_table()
        fe.setup_ring(0)  # no SET_VRING_ENABLE: the kick starts it
        _get_id(fe, 0, 1)
        assert fe.u64(vu.GET_FEATURES) == offered  # a reply: every message before it was handled


def test_ring_waits_for_enable_with_protocol_features(ram: VhostUserServer) -> None:
    with HostileFrontend(ram.path) as fe:
        fe.handshake()
        fe.set_mem_table()
        rd = fe.setup_ring(0, enable=False)
        BlkBuilder(fe, rd).request(0, B.T_GET_ID, data=B.ID_BYTES)
        rd.publish(0)
        fe.kick()
        assert not fe.wait_used(0, 1, timeout=0.2)  # disabled: not processed
        fe.set(vu.SET_VRING_ENABLE, STATE.pack(0, 1))
        assert fe.wait_used(0, 1)
        # Disabled again: requests wait; GET_VRING_BASE says where the ring stopped.
        fe.set(vu.SET_VRING_ENABLE, STATE.pack(0, 0))
        BlkBuilder(fe, rd).request(4, B.T_GET_ID, data=B.ID_BYTES)
        rd.publish(4)
        fe.kick()
        assert not fe.wait_used(0, 2, timeout=0.2)
        assert STATE.unpack(fe.call(vu.GET_VRING_BASE, STATE.pack(0, 0))) == (0, 1)


def test_get_vring_base_stops_the_ring(ram: VhostUserServer) -> None:
    with HostileFrontend(ram.path) as fe:
        fe.start()
        _get_id(fe, 0, 1)
        _get_id(fe, 4, 2)
        assert STATE.unpack(fe.call(vu.GET_VRING_BASE, STATE.pack(0, 0))) == (0, 2)
        rd = fe.rings[0]
        BlkBuilder(fe, rd).request(8, B.T_GET_ID, data=B.ID_BYTES)
        rd.publish(8)
        assert not fe.wait_used(0, 3, timeout=0.2)  # stopped (and its kick fd dropped)


def test_status_and_reset_device(ram: VhostUserServer) -> None:
    with HostileFrontend(ram.path) as fe:
        fe.handshake(protocol=(1 << vu.PROTOCOL_F_STATUS) | (1 << vu.PROTOCOL_F_RESET_DEVICE))
        fe.send(vu.SET_STATUS, U64.pack(0x0F))
        assert fe.u64(vu.GET_STATUS) == 0x0F
        fe.set_mem_table()
        fe.setup_ring(0)
        _get_id(fe, 0, 1)
        fe.send(vu.RESET_DEVICE)
        assert fe.u64(vu.GET_STATUS) == 0
        assert STATE.unpack(fe.call(vu.GET_VRING_BASE, STATE.pack(0, 0))) == (0, 0)  # ring state reset


class EchoModel:
    """Not a blk device: copies what the driver gave into what it may write."""

    num_queues = 1

    def __init__(self) -> None:
        self.seen = 0

    def features(self) -> int:
        return 1 << F_VERSION_1

    def config(self) -> bytes:
        return b"echo"

    def handle(self, queue: int, chain: Chain) -> int:
        self.seen += 1
        data = chain.read_all()
        if data == b"boom":
            raise RuntimeError("the model failed")
        return chain.write(data[::-1])


def test_any_device_model_and_a_model_failure(tmp_path: Path) -> None:
    model = EchoModel()
    server = VhostUserServer(str(tmp_path / "echo.sock"), model)
    with server:
        for word, expect_ok in ((b"hello", True), (b"boom", False), (b"again", True)):
            with HostileFrontend(server.path) as fe:
                fe.handshake()
                assert fe.call(vu.GET_CONFIG, struct.pack("=III", 0, 4, 0) + bytes(4))[12:] == b"echo"
                fe.set_mem_table()
                rd = fe.setup_ring(0, 16)
                src = fe.pool.allocate(len(word))
                src.view[:] = word
                dst = fe.pool.allocate(16)
                rd.chain(0, [(src.addr, len(word), 1), (dst.addr, 16, 2)])
                rd.publish(0)
                fe.kick()
                if expect_ok:
                    assert fe.wait_used(0, 1)
                    assert rd.used_entry(0) == (0, len(word))
                    assert bytes(dst.view[: len(word)]) == word[::-1]
                else:
                    assert fe.expect_closed()
        wait_finished(server, 3)
        assert server.disconnects[0] == "frontend disconnected"
        assert server.disconnects[1].startswith("internal error: RuntimeError('the model failed')")
        assert server.disconnects[2] == "frontend disconnected"
    assert model.seen == 3


# -- the command ------------------------------------------------------------------------------


def serve_command() -> list[str]:
    """``pyvirtio serve`` once pyvirtio.cli.main registers it; until then the module itself."""
    from pyvirtio.cli import main as cli_main

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli_main.build_parser().parse_args(["serve", "blk", "--socket", "s", "--size", "1M"])
        return [sys.executable, "-m", "pyvirtio", "serve"]
    except SystemExit:
        return [sys.executable, "-m", "pyvirtio.cli.serve"]


def wait_for_socket(proc: subprocess.Popen[bytes], path: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no socket"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["ram", "file"])
def test_serve_command_stops_on_sigterm(tmp_path: Path, how: str) -> None:
    sock = str(tmp_path / "cli.sock")
    args = ["--size", "64M", "--queues", "2"]
    if how == "file":
        image = tmp_path / "cli.img"
        image.write_bytes(bytes(1 << 20))
        args = ["--file", str(image), "--readonly", "--inflight", "--log-level", "info"]
    proc = subprocess.Popen(
        [*serve_command(), "blk", "--socket", sock, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(proc, sock)
        with VirtioBlk.open("vhost-user:" + sock) as blk:
            if how == "ram":
                assert (blk.capacity, blk.num_queues, blk.readonly) == (64 << 20, 2, False)
                blk.write(4096, b"z" * 4096)
                assert blk.read(4096, 4096) == b"z" * 4096
            else:
                assert (blk.capacity, blk.readonly) == (1 << 20, True)
                assert blk.read(0, 4096) == bytes(4096)
                assert blk.device.transport.inflight_info is not None  # --inflight: INFLIGHT_SHMFD in use
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert not os.path.exists(sock)
    assert b"Traceback" not in err
    if how == "file":
        assert b"not yet supported" not in err
        assert b"frontend 1 gone: frontend disconnected" in err


def test_serve_command_errors(tmp_path: Path) -> None:
    cmd = [*serve_command(), "blk"]

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*cmd, *args], capture_output=True, timeout=20, check=False)

    sock = str(tmp_path / "e.sock")
    both = run("--socket", sock, "--size", "1M", "--file", "x")
    assert both.returncode == 2 and b"not allowed with argument" in both.stderr
    assert run("--socket", sock).returncode == 2  # neither --size nor --file
    assert run("--socket", sock, "--size", "1M", "--queues", "0").returncode == 2
    regular = tmp_path / "regular"
    regular.write_text("")
    res = run("--socket", str(regular), "--size", "1M")
    assert res.returncode == 1
    assert res.stderr.decode().startswith("pyvirtio: error: ") and b"not a socket" in res.stderr
    missing = run("--socket", sock, "--file", str(tmp_path / "missing.img"))
    assert missing.returncode == 1 and b"No such file" in missing.stderr
    assert not os.path.exists(sock)


def test_serve_run_in_a_thread_stops_via_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run() outside the main thread cannot install signal handlers; it still serves."""
    import argparse

    from pyvirtio.backends import server as server_module
    from pyvirtio.cli import serve

    created: list[VhostUserServer] = []

    class Recording(VhostUserServer):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            created.append(self)

    monkeypatch.setattr(server_module, "VhostUserServer", Recording)
    sock = str(tmp_path / "t.sock")
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "blk", "--socket", sock, "--size", "1M"])
    status: list[int] = []
    t = threading.Thread(target=lambda: status.append(serve.run(args)))
    t.start()
    deadline = time.monotonic() + 10
    while not (created and os.path.exists(sock)):
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.01)
    with VirtioBlk.open("vhost-user:" + sock) as blk:
        assert blk.capacity == 1 << 20
    created[0].stop()
    t.join(10)
    assert status == [0]
    assert not os.path.exists(sock)
