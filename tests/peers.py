"""Real peers for tests: qemu-storage-daemon (PEERS.md, "Block").

:func:`start_qsd` starts one daemon on a fresh short temporary directory
(Unix socket paths are limited to 108 bytes), waits until its socket exists
and its pidfile is non-empty, and returns a :class:`Qsd`; :meth:`Qsd.stop`
sends SIGTERM to the PID, then SIGKILL after a timeout, and reaps it.

Fixtures (use them with ``pytest_plugins = ["peers"]`` in a test module;
tests/ is on ``sys.path`` because it has no ``__init__.py``):

* ``qsd_factory``: ``qsd_factory(**start_qsd_kwargs)``; every daemon started
  through it is stopped at teardown.
* ``qsd_null``: 1 GiB null-co export (reads return zeroes), 2 queues.
* ``qsd_raw``: a 16 MiB raw image file (``qsd.image``), 1 queue.
* ``qsd_raw_mq``: the same with num-queues=2.
* ``qsd_ro``: a read-only raw image (the RO feature bit is offered).
* ``qsd_4k``: null-co with logical-block-size=4096.

If the binary (``$PYVIRTIO_QSD``, default ``qemu-storage-daemon`` on PATH)
is missing the test is skipped, or fails when CI=true.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import pytest

QSD = "qemu-storage-daemon"

#: Default sizes (null-co size= takes a plain integer, PEERS.md).
NULL_SIZE = 1 << 30
IMAGE_SIZE = 16 << 20


def in_ci() -> bool:
    """Is this a CI run? ``CI=true`` in any letter case (.ci/run exports it; so do most CI services)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def missing_peer(message: str) -> NoReturn:
    """A real peer is not there: fail under CI=true (.ci/run installs every peer), skip elsewhere."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def peer_binary(env: str, default: str, packages: str) -> str:
    """Path of a peer program (overridable by ``env``), or :func:`missing_peer`."""
    name = os.environ.get(env, default)
    path = shutil.which(name)
    if path is None:
        missing_peer(f"{name} is not installed (apt-get install {packages})")
    return path


def qsd_binary() -> str:
    """The daemon's path; skip (or fail under CI=true) when it is not installed."""
    return peer_binary("PYVIRTIO_QSD", QSD, "qemu-system-common")


@dataclass
class Qsd:
    """One running qemu-storage-daemon."""

    proc: subprocess.Popen[bytes]
    pid: int
    dir: str
    sock: str
    pidfile: str
    log: str
    image: str | None
    size: int
    argv: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"vhost-user:{self.sock}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL now (simulates a crash) and reap."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL if it has not exited after ``timeout``; always reaps."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_qsd(
    *,
    kind: str = "null",
    size: int | None = None,
    image: str | None = None,
    readonly: bool = False,
    num_queues: int = 1,
    logical_block_size: int | None = None,
    read_zeroes: bool = True,
    startup_timeout: float = 10.0,
) -> Qsd:
    """Start qemu-storage-daemon exporting one vhost-user-blk device.

    ``kind`` is ``"null"`` (null-co of ``size`` bytes) or ``"raw"`` (a raw
    image: ``image`` if given, else a new zero-filled file of ``size`` bytes in
    the daemon's directory). ``readonly`` adds read-only=on to the file node
    and drops writable=on, so the RO feature bit is offered.
    """
    binary = qsd_binary()
    d = tempfile.mkdtemp(prefix="pvq", dir="/tmp")
    sock = os.path.join(d, "s.sock")
    pidfile = os.path.join(d, "pid")
    log = os.path.join(d, "log")
    if kind == "null":
        size = NULL_SIZE if size is None else size
        zeroes = ",read-zeroes=on" if read_zeroes else ""
        blockdevs = ["--blockdev", f"driver=null-co,node-name=n0,size={size}{zeroes}"]
        node = "n0"
        if readonly:
            blockdevs[1] += ",read-only=on"
    elif kind == "raw":
        if image is None:
            image = os.path.join(d, "disk.img")
            with open(image, "wb") as f:
                f.truncate(IMAGE_SIZE if size is None else size)
        size = os.path.getsize(image)
        ro = ",read-only=on" if readonly else ""
        blockdevs = [
            "--blockdev",
            f"driver=file,node-name=f0,filename={image}{ro}",
            "--blockdev",
            f"driver=raw,node-name=r0,file=f0{ro}",
        ]
        node = "r0"
    else:
        raise ValueError(f"unknown qsd kind {kind!r}")
    export = f"type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={sock}"
    export += f",num-queues={num_queues}"
    if not readonly:
        export += ",writable=on"
    if logical_block_size is not None:
        export += f",logical-block-size={logical_block_size}"
    argv = [binary, *blockdevs, "--export", export, "--pidfile", pidfile]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    q = Qsd(proc, proc.pid, d, sock, pidfile, log, image, size, argv)
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{QSD} exited with status {proc.returncode}: {q.log_text().strip()}")
            if os.path.exists(sock) and _pidfile_pid(pidfile) is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{QSD} did not create {sock} within {startup_timeout} s: {q.log_text()}")
            time.sleep(0.005)
        pid = _pidfile_pid(pidfile)
        if pid != proc.pid:
            raise RuntimeError(f"{QSD} pidfile says {pid}, started {proc.pid}")
    except BaseException:
        q.cleanup()
        raise
    return q


def _pidfile_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def qsd_factory() -> Iterator[Callable[..., Qsd]]:
    started: list[Qsd] = []

    def factory(**kw: object) -> Qsd:
        q = start_qsd(**kw)  # type: ignore[arg-type]
        started.append(q)
        return q

    try:
        yield factory
    finally:
        for q in started:
            q.cleanup()


@pytest.fixture
def qsd_null(qsd_factory: Callable[..., Qsd]) -> Qsd:
    return qsd_factory(kind="null", num_queues=2)


@pytest.fixture
def qsd_raw(qsd_factory: Callable[..., Qsd]) -> Qsd:
    return qsd_factory(kind="raw")


@pytest.fixture
def qsd_raw_mq(qsd_factory: Callable[..., Qsd]) -> Qsd:
    return qsd_factory(kind="raw", num_queues=2)


@pytest.fixture
def qsd_ro(qsd_factory: Callable[..., Qsd]) -> Qsd:
    return qsd_factory(kind="raw", readonly=True)


@pytest.fixture
def qsd_4k(qsd_factory: Callable[..., Qsd]) -> Qsd:
    return qsd_factory(kind="null", logical_block_size=4096)


def read_file(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


__all__ = [
    "Qsd",
    "qsd_4k",
    "qsd_binary",
    "qsd_factory",
    "qsd_null",
    "qsd_raw",
    "qsd_raw_mq",
    "qsd_ro",
    "read_file",
    "start_qsd",
]
