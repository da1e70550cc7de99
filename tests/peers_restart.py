"""Back ends that crash and come back, for the reconnect tests.

* :func:`restart_qsd` SIGKILLs a :class:`peers.Qsd` (if it still runs),
  removes the socket and pidfile it leaves behind (qemu-storage-daemon
  removes its socket on SIGTERM, not on SIGKILL, and will not bind over a
  stale one), and starts the same command line again on the same socket
  and image. The Qsd object is updated in place, so the ``qsd_factory``
  fixture still stops the new process at teardown.
* :class:`ServeProcess`: ``pyvirtio serve blk --file IMG`` in a child
  process (listening, or ``client=True`` connecting to a frontend that
  listens), with :meth:`~ServeProcess.crash` (SIGKILL) and
  :meth:`~ServeProcess.start` again.
* :func:`run_bench_across_restarts`: ``pyvirtio bench --reconnect`` while its
  back end is crashed and restarted, each crash only once the bench is
  attached (:func:`wait_frontend_attached` reads the back end's maps), the
  run ended by SIGINT: deterministic however loaded the machine.
* :class:`CrashingModel`: wraps a device model; after :meth:`arm` the
  n-th request it is handed raises, which makes the embedded back end drop
  the connection in the middle of a batch (chains popped, some handled,
  nothing published): an in-process crash, deterministic. It counts how
  many times each sector was executed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import TransportError
from pyvirtio.ring.device_side import Chain

if TYPE_CHECKING:
    # Imported lazily: peers is a pytest plugin, registered by the test modules (pytest_plugins).
    from peers import Qsd


def restart_qsd(q: Qsd, *, startup_timeout: float = 10.0, down_for: float = 0.0) -> Qsd:
    """Crash ``q`` (SIGKILL) and start it again on the same socket; returns ``q``."""
    from peers import QSD, _pidfile_pid

    q.kill()
    for path in (q.sock, q.pidfile):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if down_for:
        time.sleep(down_for)
    with open(q.log, "ab") as logf:
        proc = subprocess.Popen(q.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    q.proc = proc
    q.pid = proc.pid
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{QSD} exited with status {proc.returncode} on restart: {q.log_text().strip()}")
        if os.path.exists(q.sock) and _pidfile_pid(q.pidfile) == proc.pid:
            return q
        if time.monotonic() > deadline:
            raise RuntimeError(f"{QSD} did not come back on {q.sock} within {startup_timeout} s: {q.log_text()}")
        time.sleep(0.005)


def wait_frontend_attached(pid: int, timeout: float = 30.0) -> None:
    """Until process ``pid`` maps a pyvirtio frontend's memory (it got SET_MEM_TABLE: a frontend is attached)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if "/memfd:pyvirtio" in f.read():
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no frontend attached to process {pid} within {timeout} s")
        time.sleep(0.01)


def run_bench_across_restarts(
    target: str, first_pid: int, restart: Callable[[], int], *args: str, restarts: int = 3
) -> subprocess.CompletedProcess[str]:
    """``pyvirtio bench --reconnect`` while its back end is crashed ``restarts`` times.

    ``restart()`` crashes the back end and returns the new one's PID. Each
    crash waits until the bench is attached to the back end it kills (no two
    crashes fold into one reconnect, however loaded the machine); the run
    then ends with SIGINT, on which the bench stops and reports as usual.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "bench", target, "--runtime", "120", "--reconnect", "30", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = first_pid
        for _ in range(restarts):
            wait_frontend_attached(pid)
            time.sleep(0.3)
            assert proc.poll() is None, proc.communicate()[1]
            pid = restart()
        wait_frontend_attached(pid)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class ServeProcess:
    """``pyvirtio serve blk`` over a file, in a child process that can be crashed and restarted."""

    def __init__(self, sock: str, image: str, log: str, *, inflight: bool = False, client: bool = False) -> None:
        self.sock = sock
        self.image = image
        self.log = log
        self.inflight = inflight
        self.client = client
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 15.0) -> ServeProcess:
        argv = [sys.executable, "-m", "pyvirtio", "serve", "blk", "--file", self.image, "--socket", self.sock]
        argv += ["--log-level", "info"]
        if self.inflight:
            argv.append("--inflight")
        if self.client:
            argv.append("--client")
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        self.starts += 1
        if not self.client:
            self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        """Until the socket accepts (then the probe connection is dropped: the server serves the next)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyvirtio serve exited with {self.proc.returncode}: {self.log_text()}")
            if os.path.exists(self.sock):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(self.sock)
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"pyvirtio serve did not listen on {self.sock} within {timeout} s")
            time.sleep(0.01)

    def crash(self) -> None:
        """SIGKILL and reap (the socket file stays behind, as after a real crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def restart(self) -> ServeProcess:
        self.crash()
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class InjectedCrash(TransportError):
    """Raised by CrashingModel: the embedded back end drops the connection."""


class CrashingModel:
    """A device model that crashes (drops the connection) on the n-th request after :meth:`arm`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.num_queues = model.num_queues
        self.executed: Counter[int] = Counter()  # sector -> executions (blk)
        self.crashes = 0
        self.hidden_features = 0  # feature bits the next connections are not offered
        self._countdown = 0
        self._lock = threading.Lock()

    def arm(self, after: int = 0) -> None:
        """Crash on the request after ``after`` more have been executed."""
        with self._lock:
            self._countdown = after + 1

    def features(self) -> int:
        return int(self.model.features()) & ~self.hidden_features

    def config(self) -> bytes:
        return bytes(self.model.config())

    def info(self) -> dict[str, Any]:
        return dict(self.model.info())

    def handle(self, queue: int, chain: Chain) -> int:
        with self._lock:
            if self._countdown:
                self._countdown -= 1
                if not self._countdown:
                    self.crashes += 1
                    raise InjectedCrash("injected crash")
        header = bytes(chain.readable[0][:16]) if chain.readable else b""
        if len(header) == 16:
            self.executed[int.from_bytes(header[8:16], "little")] += 1
        result: int = self.model.handle(queue, chain)
        return result


__all__ = [
    "CrashingModel",
    "InjectedCrash",
    "ServeProcess",
    "restart_qsd",
    "run_bench_across_restarts",
    "wait_frontend_attached",
]
