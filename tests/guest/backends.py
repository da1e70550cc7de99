"""pyvirtio's embedded back ends as separate processes, for a QEMU guest to use.

:func:`start_serve` runs ``python -m pyvirtio serve DEVICE --socket S ...``
(the installed command, as a user would run it, in this interpreter so the
checkout under test is what runs) with ``--log-level info``, waits for the
socket, and returns a :class:`Served`; :meth:`Served.stop` sends SIGTERM to
the PID (SIGKILL after a timeout), reaps it and returns the exit status. The
log file is kept for the test to inspect: :meth:`Served.faults` lists the
lines at WARNING or worse, i.e. anything the back end disliked about the
frontend (a QEMU message it rejected, a dropped connection).

:func:`serve_argv` is the same command line, and :func:`qemu_chardev` the
``-chardev`` that connects QEMU to the socket.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .qemu import stop_process

_FAULT_RE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@dataclass
class Served:
    """One ``pyvirtio serve`` process."""

    name: str
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def faults(self) -> list[str]:
        """Log lines at WARNING, ERROR or CRITICAL level, and tracebacks."""
        return [line for line in self.log_text().splitlines() if _FAULT_RE.search(line)]

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop by PID (SIGTERM, then SIGKILL) and return the exit status."""
        stop_process(self.proc, timeout)
        return self.proc.returncode

    def qemu_chardev(self, chardev_id: str | None = None) -> list[str]:
        """``-chardev socket,id=ID,path=SOCKET`` for QEMU (the id defaults to the back end's name)."""
        return ["-chardev", f"socket,id={chardev_id or self.name},path={self.socket}"]


def serve_argv(device: str, socket: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pyvirtio", "serve", device, "--socket", str(socket), "--log-level", "info",
            *args]


def start_serve(name: str, device: str, directory: Path, *args: str, startup_timeout: float = 30.0) -> Served:
    """Start ``pyvirtio serve DEVICE`` listening on ``directory/NAME.sock``; logs to ``directory/NAME.log``.

    Unix socket paths are limited to 108 bytes: ``directory`` should be short (e.g. under /tmp).
    """
    socket = directory / f"{name}.sock"
    if len(str(socket).encode()) > 100:
        raise ValueError(f"socket path too long for AF_UNIX: {socket}")
    log = directory / f"{name}.log"
    argv = serve_argv(device, socket, *args)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    served = Served(name, proc, socket, log, argv)
    deadline = time.monotonic() + startup_timeout
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            served.stop()
            raise RuntimeError(f"pyvirtio serve {device} did not create {socket} (status {proc.returncode}):\n"
                               f"{served.log_text()[-2000:]}")
        time.sleep(0.02)
    return served


__all__ = ["Served", "serve_argv", "start_serve"]
