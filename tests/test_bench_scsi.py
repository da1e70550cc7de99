"""The block bench engine on a virtio-scsi LUN: the same engine, options and report as on virtio-blk.

In process (the embedded scsi back end over the loopback transport): every
workload in both loops, verify, the LBA each command carries (checked in the
LUN's storage), and a device that fails commands in every way a
virtio-scsi completion can fail (counted as errors, the first one described)
or lies about lengths (the queue breaks). As a command (``pyvirtio bench
--lun`` / ``pyvirtio scsi bench`` against ``pyvirtio serve scsi``): verify
with randrw on two queues in both modes, with the data checked in the LUN's
file afterwards, and a failing LUN's exit status.
"""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio import VirtioDevice
from pyvirtio.backends.blk import Storage
from pyvirtio.backends.scsi import ScsiBackend, ScsiLun, loopback_scsi, ram_lun
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.bench.block import BlockEngine, run_queues
from pyvirtio.cli.main import main
from pyvirtio.drivers.blk import pack_pattern
from pyvirtio.drivers.scsi import ScsiDisk, VirtioScsi
from pyvirtio.errors import DeviceProtocolError, InvalidArgument
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

pytestmark = pytest.mark.timeout(60)

RESP = 12 + S.SENSE_SIZE  # virtio_scsi_cmd_resp with the default sense size


@contextlib.contextmanager
def scsi_device(
    luns: dict[tuple[int, int], ScsiLun], handler: Callable[[ScsiBackend, int, Chain], int] | None = None
) -> Iterator[VirtioScsi]:
    """A VirtioScsi on the embedded back end in process; ``handler`` replaces the request queues' device."""
    backend = ScsiBackend(luns, max_target=1)
    transport = loopback_scsi(backend, queue_size=256)
    scsi = VirtioScsi(VirtioDevice("loop-scsi", transport, pool_size=16 << 20))
    if handler is not None:
        for index in range(S.FIRST_REQUEST_QUEUE, S.FIRST_REQUEST_QUEUE + scsi.num_queues):
            transport.handlers[index] = lambda i, chain: handler(backend, i, chain)
    try:
        yield scsi
    finally:
        scsi.close()
        backend.close()


def run(disk: ScsiDisk, seconds: float = 0.2, **kw: Any) -> Any:
    engine = BlockEngine(disk, **kw)
    try:
        if engine.verify and engine.reads_only:
            engine.prefill()
        return engine.run(seconds)
    finally:
        engine.close()


# -- the engine in process ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize("rw", ["randread", "read", "randwrite", "write", "randrw", "rw"])
@pytest.mark.parametrize("block_size", [512, 4096])
def test_every_workload_in_both_loops(mode: str, rw: str, block_size: int) -> None:
    with scsi_device({(0, 0): ram_lun(4 << 20, block_size=block_size)}) as scsi:
        st = run(scsi.disk(0, 0), rw=rw, iodepth=16, mode=mode, seed=1, rwmixread=50)
        assert scsi.thread_queue().vq.ring.outstanding == 0  # drained
    assert st.ios > 100 and st.errors == 0 and st.error is None
    assert st.bytes == st.ios * 4096 and sum(st.hist) == st.ios
    if rw in ("randread", "read"):
        assert st.writes == 0
    elif rw in ("randwrite", "write"):
        assert st.writes == st.ios
    else:
        assert 0.3 < st.writes / st.ios < 0.7


def test_each_command_writes_the_lba_it_names() -> None:
    """Sequential writes over the whole LUN with verify: every block holds its own pattern in the storage."""
    storage = Storage(size=1 << 20)
    with scsi_device({(0, 0): ScsiLun(storage, block_size=512)}) as scsi:
        st = run(scsi.disk(0, 0), rw="write", bs=4096, iodepth=8, verify=True, seed=5)
        data = bytearray(1 << 20)
        storage.readinto([memoryview(data)], 0)  # (while the back end is open)
    assert st.errors == 0 and st.verify_errors == 0 and st.writes >= 256  # every block at least once
    for block in range(256):
        assert data[block * 4096 : (block + 1) * 4096] == pack_pattern(block, 5, 4096), f"block {block}"


@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize("rw", ["write", "randwrite"])
def test_writes_stay_in_their_region(mode: str, rw: str) -> None:
    """Both loops address the LUN's blocks right: writes to 256k..512k land there and nowhere else."""
    storage = Storage(size=1 << 20)
    with scsi_device({(0, 0): ScsiLun(storage, block_size=4096)}) as scsi:
        engine = BlockEngine(scsi.disk(0, 0), rw=rw, iodepth=16, mode=mode, offset=256 << 10, size=256 << 10)
        try:
            engine.data.view[:] = b"\xab" * len(engine.data.view)
            st = engine.run(0.2)
        finally:
            engine.close()
        data = bytearray(1 << 20)
        storage.readinto([memoryview(data)], 0)
    assert st.errors == 0 and st.writes > 64
    assert data[: 256 << 10] == bytes(256 << 10) and data[512 << 10 :] == bytes(512 << 10)
    inside = data[256 << 10 : 512 << 10]
    assert inside == b"\xab" * (256 << 10) or (rw == "randwrite" and inside.count(b"\xab" * 4096) > 32)


def test_verify_on_a_lun_finds_a_block_changed_behind_its_back() -> None:
    with scsi_device({(0, 0): ram_lun(1 << 20)}) as scsi:
        disk = scsi.disk(0, 0)
        st = run(disk, rw="randwrite", iodepth=4, verify=True, seed=3, size=64 * 4096)
        assert st.verify_errors == 0 and st.writes > 0
        engine = BlockEngine(disk, rw="randread", iodepth=4, verify=True, seed=3, size=64 * 4096)
        try:
            engine.prefill()
            disk.write(5 * 4096, b"\xee" * 4096)
            st = engine.run(0.3)
        finally:
            engine.close()
    assert st.verify_errors > 0 and st.errors == 0


def test_argument_checks_name_the_lun_limits() -> None:
    with scsi_device({(0, 0): ram_lun(1 << 20, block_size=4096), (0, 1): ScsiLun(Storage(size=1 << 20),
                                                                               readonly=True)}) as scsi:
        disk = scsi.disk(0, 0)
        with pytest.raises(InvalidArgument, match="multiple of the block size 4096"):
            BlockEngine(disk, bs=512)
        with pytest.raises(InvalidArgument, match="iodepth must be 1..85"):
            BlockEngine(disk, iodepth=1000)
        with pytest.raises(InvalidArgument, match="read-only"):
            BlockEngine(scsi.disk(0, 1), rw="randwrite")
        with pytest.raises(InvalidArgument, match="largest single-segment transfer"):
            BlockEngine(disk, bs=disk.max_transfer + 4096)


# -- a device that fails commands --------------------------------------------------------


def _rewrite_response(**fields: int) -> Callable[[ScsiBackend, int, Chain], int]:
    """Execute each command, then overwrite fields of its virtio_scsi_cmd_resp (the first writable buffer)."""
    offsets = {"resid": (4, 4), "qualifier": (8, 2), "status": (10, 1), "response": (11, 1)}

    def handler(backend: ScsiBackend, index: int, chain: Chain) -> int:
        written = backend.handle(index, chain)
        resp = chain.writable[0]
        for name, value in fields.items():
            off, size = offsets[name]
            resp[off : off + size] = value.to_bytes(size, "little")
        return written

    return handler


@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize(
    ("fields", "described"),
    [
        ({"resid": 512}, "short transfer, residual 512"),
        ({"status": T.BUSY}, "BUSY"),
        ({"response": S.S_BAD_TARGET}, "response BAD_TARGET"),
        ({"response": 0xFF}, "wrote no response"),
    ],
)
def test_every_kind_of_failed_completion_counts_as_an_error(
    mode: str, fields: dict[str, int], described: str
) -> None:
    with scsi_device({(0, 0): ram_lun(1 << 20)}, _rewrite_response(**fields)) as scsi:
        st = run(scsi.disk(0, 0), rw="randrw", iodepth=8, mode=mode, seed=2)
    # Every completion failed; so did those drained after the clock stopped (counted as errors, not as ios).
    assert st.ios > 50 and st.ios <= st.errors <= st.ios + 8
    assert st.error is not None and described in st.error and "LUN 0:0" in st.error


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_a_status_qualifier_alone_is_not_an_error(rw: str) -> None:
    """The qualifier is not looked at (tolerant: it costs nothing to ignore)."""
    with scsi_device({(0, 0): ram_lun(1 << 20)}, _rewrite_response(qualifier=0x1234)) as scsi:
        st = run(scsi.disk(0, 0), rw=rw, iodepth=8, seed=2)
    assert st.ios > 50 and st.errors == 0


class FailingStorage(Storage):
    """A RAM disk whose reads of the first 64 KiB fail with EIO (the back end answers MEDIUM ERROR)."""

    def readinto(self, bufs: list[memoryview], offset: int) -> None:
        if offset < 64 << 10:
            raise OSError(errno.EIO, "injected read error")
        super().readinto(bufs, offset)


@pytest.mark.parametrize("mode", ["python", "numpy"])
def test_a_lun_that_fails_some_reads(mode: str) -> None:
    with scsi_device({(0, 0): ScsiLun(FailingStorage(size=1 << 20))}) as scsi:
        st = run(scsi.disk(0, 0), rw="randread", iodepth=16, mode=mode, seed=4)
    # 16 of the 256 blocks fail: about 1 read in 16.
    assert st.ios > 200 and 0.02 < st.errors / st.ios < 0.15
    assert st.error is not None and "READ(16)" in st.error and "MEDIUM ERROR" in st.error


@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_a_used_length_beyond_what_the_direction_offered_breaks_the_queue(mode: str, rw: str) -> None:
    """A write offers only the response to the device, a read the response and the data: one byte more lies."""

    def too_long(backend: ScsiBackend, index: int, chain: Chain) -> int:
        backend.handle(index, chain)
        return chain.writable_len + 1

    with scsi_device({(0, 0): ram_lun(1 << 20)}, too_long) as scsi:
        engine = BlockEngine(scsi.disk(0, 0), rw=rw, iodepth=4, mode=mode)
        limit = RESP if rw == "randwrite" else RESP + 4096
        with pytest.raises(DeviceProtocolError, match=f"exceeds the {limit} device-writable bytes"):
            engine.run(1.0)
        assert engine.fixed.ring.broken is not None


def test_two_queues_on_a_lun_in_process() -> None:
    backend = ScsiBackend({(0, 0): ram_lun(4 << 20)}, max_target=1, request_queues=2)
    scsi = VirtioScsi(VirtioDevice("loop-scsi", loopback_scsi(backend), pool_size=16 << 20), num_queues=2)
    try:
        disk = scsi.disk(0, 0)
        scsi.release_queue()  # the scan's queue: each bench thread takes one
        result = run_queues(disk, 0.3, queues=2, rw="randrw", iodepth=8, verify=True, seed=9, mode="python")
    finally:
        scsi.close()
        backend.close()
    st = result.stats
    assert result.mode == "python" and not result.interrupted
    assert st.ios > 100 and st.errors == 0 and st.verify_errors == 0 and st.reads and st.writes


# -- the command ------------------------------------------------------------------------


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def serve_scsi(sock: Path, *args: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "serve", "scsi", "--socket", str(sock), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "serve scsi made no socket in 15 s"
            time.sleep(0.02)
        yield str(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


@pytest.mark.parametrize("mode", ["python", "numpy"])
def test_bench_lun_verify_randrw_two_queues(tmp_path: Path, mode: str) -> None:
    image = tmp_path / "lun.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    with serve_scsi(tmp_path / "scsi.sock", "--lun", "16M", "--lun", str(image), "--queues", "2") as sock:
        args = ["bench", sock, "--lun", "0:1", "--rw", "randrw", "--queues", "2", "--mode", mode, "--seed", "11",
                "--runtime", "0.5", "--json"]
        # --verify runs in the python loop; the numpy loop runs deep.
        args += ["--verify", "--iodepth", "8"] if mode == "python" else ["--iodepth", "64"]
        res = cli(*args)
        assert res.returncode == 0, res.stderr
        r = json.loads(res.stdout)
    assert r["lun"] == "0:1" and r["queues"] == 2 and r["engine"] == mode
    assert r["device"] == {"type": "scsi", "capacity": 8 << 20, "block_size": 512, "ring": "split", "in_order": False}
    assert r["errors"] == 0 and r["verify_errors"] == 0 and r["first_error"] is None
    assert r["reads"] > 0 and r["writes"] > 0 and r["ios"] == r["reads"] + r["writes"]
    if mode == "python":
        # Queue q wrote its own half of the LUN with seed 11 + q; every block written holds its pattern.
        data = image.read_bytes()
        written = 0
        for block in range(len(data) // 4096):
            got = data[block * 4096 : (block + 1) * 4096]
            if got != bytes(4096):
                assert got == pack_pattern(block, 11 + block // 1024, 4096), f"block {block}"
                written += 1
        assert written > 0


def test_scsi_bench_is_bench_lun(tmp_path: Path) -> None:
    with serve_scsi(tmp_path / "scsi.sock", "--lun", "16M", "--lun", "4M") as sock:
        res = cli("scsi", "bench", sock, "--rw", "write", "--runtime", "0.3", "--iodepth", "4", "--mode", "python")
        assert res.returncode == 0, res.stderr
        assert "lun=0:0" in res.stdout and "engine=python" in res.stdout and "errors: 0" in res.stdout
        res = cli("scsi", "bench", sock, "--lun", "0:1", "--runtime", "0.3", "--iodepth", "4", "--json")
        r = json.loads(res.stdout)
        assert r["lun"] == "0:1" and r["device"]["capacity"] == 4 << 20 and r["writes"] == 0
        res = cli("bench", sock, "--lun", "0:2", "--runtime", "0.3")
        assert res.returncode == 1 and res.stderr.startswith("pyvirtio: error:") and "0:2" in res.stderr
        res = cli("bench", "--lun", "0:0", "--runtime", "0.3")
        assert res.returncode == 1 and "--lun needs a TARGET" in res.stderr


def test_bench_lun_refuses_writes_to_a_write_protected_lun(tmp_path: Path) -> None:
    """serve scsi --readonly: the driver sees write protection and the engine refuses a write workload."""
    with serve_scsi(tmp_path / "scsi.sock", "--lun", "4M", "--readonly") as sock:
        res = cli("bench", sock, "--lun", "0:0", "--rw", "randwrite", "--runtime", "0.3")
        assert res.returncode == 1 and "read-only" in res.stderr and "Traceback" not in res.stderr
        res = cli("bench", sock, "--lun", "0:0", "--rw", "randread", "--runtime", "0.3", "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["errors"] == 0


def test_bench_lun_exit_status_when_commands_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A LUN whose storage fails some reads: errors counted, the first described, exit status 1."""
    backend = ScsiBackend({(0, 0): ScsiLun(FailingStorage(size=1 << 20))}, max_target=1)
    server = VhostUserServer(str(tmp_path / "failing.sock"), backend)
    server.start()
    try:
        status = main(["bench", server.path, "--lun", "0:0", "--rw", "randread", "--runtime", "0.3", "--json"])
    finally:
        server.stop()
        assert server.wait(10)
        backend.close()
    r = json.loads(capsys.readouterr().out)
    assert status == 1
    assert 0 < r["errors"] < r["ios"] and "MEDIUM ERROR" in r["first_error"]


class ScsiServeProcess:
    """``pyvirtio serve scsi`` over one file-backed LUN, in a child process that can be crashed and restarted."""

    def __init__(self, sock: Path, image: Path) -> None:
        self.sock, self.image = sock, image
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ScsiServeProcess:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # left by a crash
        argv = [sys.executable, "-m", "pyvirtio", "serve", "scsi", "--socket", str(self.sock), "--lun", str(self.image)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "serve scsi did not start"
            time.sleep(0.01)
        return self

    def restart(self) -> int:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        return self.start().pid

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.mark.timeout(90)
def test_bench_lun_reconnect_verify_across_a_restart(tmp_path: Path) -> None:
    """--reconnect on a LUN: the run goes on, every block checks; the new back end's UNIT ATTENTION is one error."""
    from peers_restart import run_bench_across_restarts

    image = tmp_path / "lun.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    serve = ScsiServeProcess(tmp_path / "scsi.sock", image).start()
    try:
        args = ("--lun", "0:0", "--rw", "randrw", "--verify", "--seed", "3", "--iodepth", "8", "--json")
        done = run_bench_across_restarts(str(serve.sock), serve.pid, serve.restart, *args, restarts=1)
    finally:
        serve.stop()
    r = json.loads(done.stdout)
    assert r["reconnects"] == 1 and r["verify_errors"] == 0 and r["writes"] > 100
    # SAM-5: after a power on every initiator's first command gets UNIT ATTENTION, counted like any failure.
    assert r["errors"] == 1 and "UNIT ATTENTION" in r["first_error"] and done.returncode == 1
    data = image.read_bytes()
    blocks = [data[b * 4096 : (b + 1) * 4096] for b in range(len(data) // 4096)]
    assert all(got in (bytes(4096), pack_pattern(b, 3, 4096)) for b, got in enumerate(blocks))


@pytest.mark.timeout(60)
def test_bench_lun_server_mode_with_serve_scsi_client(tmp_path: Path) -> None:
    """``pyvirtio bench --server --lun`` listens; ``pyvirtio serve scsi --client`` connects to it."""
    sock = tmp_path / "front.sock"
    bench = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "bench", str(sock), "--server", "--lun", "0:0", "--runtime", "0.5",
         "--iodepth", "4", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    serve = None
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert bench.poll() is None and time.monotonic() < deadline, "bench --server did not listen"
            time.sleep(0.02)
        serve = subprocess.Popen(
            [sys.executable, "-m", "pyvirtio", "serve", "scsi", "--socket", str(sock), "--client", "--lun", "4M"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        out, err = bench.communicate(timeout=40)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(10) == 0  # a client stops on SIGTERM like a server
    assert bench.returncode == 0, err
    r = json.loads(out)
    assert r["lun"] == "0:0" and r["ios"] > 50 and r["errors"] == 0 and r["device"]["capacity"] == 4 << 20
