"""DPDK's vhost_blk example as a test peer (PEERS.md, "Block, second back end").

``vhost_blk_binary`` (a module-scoped fixture; use ``pytest_plugins = ["dpdk_blk"]``)
copies the example's sources (package dpdk-doc) to a temporary directory and
builds it with make (libdpdk-dev, a C compiler), about 1 s; a missing piece
is :func:`peers.missing_peer`. :class:`VhostBlkExample` runs one instance in
a directory of its own (its socket is always ``<dir>/vhost.socket``):
``start``, ``kill`` (SIGKILL, to test reconnects), ``stop`` (SIGINT, then
SIGKILL; its DPDK runtime directory removed), ``log``.

What the example does (DPDK 22.11): a 128 MiB RAM disk of 4096-byte blocks;
it offers VERSION_1, RING_PACKED, NOTIFY_ON_EMPTY and the protocol features
CONFIG, INFLIGHT_SHMFD, STATUS (no blk feature bits, no EVENT_IDX, no
INDIRECT_DESC); it serves queue 0 only, by polling, completing each request
before it looks at the next. On packed rings it takes the 16-bit ring
state DPDK's library reports (wrap counter in bit 15) as its position, so a
packed ring must start and restart with wrap counters 0 (``packed_zero_wrap``,
:mod:`pyvirtio.ring.packed`); it tests a protocol feature bit against the
virtio features, so it never resubmits from the inflight area on a packed
ring, but re-reads the ring from the base (its requests complete in order,
so the descriptors in flight are still there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from peers import missing_peer

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


class VhostBlkExample:
    """One instance of the example in ``directory`` (module docstring)."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary = binary
        self.dir = directory
        self.sock = os.path.join(directory, "vhost.socket")  # the example's fixed name
        self.prefix = f"pvdpdk{os.getpid()}_{os.path.basename(directory)}"
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


@pytest.fixture
def vhost_blk(vhost_blk_binary: str) -> Iterator[VhostBlkExample]:
    """A started instance on a fresh directory, stopped at teardown."""
    d = tempfile.mkdtemp(prefix="pvd", dir="/tmp")
    backend = VhostBlkExample(vhost_blk_binary, d)
    try:
        backend.start()
        yield backend
    finally:
        backend.stop()
        shutil.rmtree(d, ignore_errors=True)
