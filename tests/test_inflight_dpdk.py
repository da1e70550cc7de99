"""INFLIGHT_SHMFD against a third-party back end: DPDK's vhost_blk example (PEERS.md).

The example offers INFLIGHT_SHMFD and resubmits what its predecessor left
in the inflight area. It is SIGKILLed and restarted twice under a reader;
the frontend hands the area over (``device_resubmits``) and every read
completes. Reads only: the example reports the data length as the used
length of a write (one writable byte offered), which the driver rightly
rejects as a protocol violation. Also checked: the area names the queues
really used (DPDK allocates that many rings on SET_INFLIGHT_FD and serves
none until all are started).

Skipped when the example's sources (package dpdk-doc) or its build
dependencies (libdpdk-dev, make, a C compiler) are missing: an optional peer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from peers import missing_peer
from pyvirtio.drivers.blk import VirtioBlk

EXAMPLE = "/usr/share/dpdk/examples/vhost_blk"


@pytest.fixture(scope="module")
def vhost_blk_binary() -> Iterator[str]:
    if not os.path.isdir(EXAMPLE) or shutil.which("make") is None or shutil.which("cc") is None:
        missing_peer("DPDK's vhost_blk example is not installed (apt-get install dpdk-doc libdpdk-dev make)")
    build = tempfile.mkdtemp(prefix="pvdpdk")
    try:
        shutil.copytree(EXAMPLE, os.path.join(build, "vhost_blk"))
        done = subprocess.run(
            ["make", "-C", os.path.join(build, "vhost_blk")], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            missing_peer(f"cannot build DPDK's vhost_blk example: {done.stderr[-300:]}")
        yield os.path.join(build, "vhost_blk", "build", "vhost-blk")
    finally:
        shutil.rmtree(build, ignore_errors=True)


class _VhostBlk:
    def __init__(self, binary: str, directory: str) -> None:
        self.binary = binary
        self.dir = directory
        self.sock = os.path.join(directory, "vhost.socket")  # the example's fixed name
        self.prefix = f"pvdpdk{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)  # left by a SIGKILL
        argv = [self.binary, "--no-pci", "--no-huge", "-m", "512", f"--file-prefix={self.prefix}", "-l", "0"]
        with open(os.path.join(self.dir, "log"), "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "vhost_blk did not create its socket"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)

    def log(self) -> str:
        with open(os.path.join(self.dir, "log"), errors="replace") as f:
            return f.read()


@pytest.mark.peer
@pytest.mark.timeout(120)
def test_dpdk_vhost_blk_restarts_with_inflight_tracking(vhost_blk_binary: str) -> None:
    d = tempfile.mkdtemp(prefix="pvd", dir="/tmp")
    backend = _VhostBlk(vhost_blk_binary, d)
    backend.start()
    try:
        blk = VirtioBlk.open(backend.sock, num_queues=1, queue_size=128, reconnect=30.0)
        try:
            t = blk.device.transport
            info = t.inflight_info
            assert info is not None and info.num_queues == 1 and info.queue_size == 128
            done = [0]
            errors: list[BaseException] = []
            stop = threading.Event()

            def reader() -> None:
                try:
                    i = 0
                    while not stop.is_set():
                        reqs = [blk.read_request((i + k) % 4096 * 4096, 4096) for k in range(16)]
                        assert blk.submit(reqs) == 16
                        blk.wait(reqs)
                        done[0] += 16
                        i += 16
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=reader)
            thread.start()
            for n in range(2):
                time.sleep(0.3)
                before = done[0]
                backend.kill()
                backend.start()
                deadline = time.monotonic() + 30
                while (t.reconnects < n + 1 or done[0] <= before) and not errors:
                    assert time.monotonic() < deadline, "no progress after the restart"
                    time.sleep(0.01)
                assert t.device_resubmits  # the new back end took the inflight area
            stop.set()
            thread.join(30)
            assert not errors, errors
        finally:
            blk.close()
    finally:
        backend.stop()
        shutil.rmtree(d, ignore_errors=True)
