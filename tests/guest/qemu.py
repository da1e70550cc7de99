"""Run a Linux guest under QEMU TCG and read what its ``/init`` reported on the serial console.

Theory of operation. :func:`run_guest` starts ``qemu-system-x86_64`` with
TCG (``/dev/kvm`` on these machines cannot run a Linux guest), the kernel
and initramfs given directly (``-kernel``/``-initrd``: no disk image, no
boot loader), guest RAM as a shared memfd (``memory-backend-memfd,share=on``:
what a vhost-user back end maps), no default devices, the serial port
written to a file and the caller's device arguments. It waits for QEMU to
exit (the guest's ``poweroff -f`` with ``-no-reboot``, or ``panic=-1`` on a
kernel panic) or for the timeout, after which it stops QEMU by its PID
(SIGTERM, then SIGKILL) and reports a timeout; it never raises for what the
guest did, only for a missing QEMU (:class:`GuestUnavailable`).

The console protocol (written by :mod:`initramfs <guest.initramfs>`'s
``/init``) is line based:

``GUEST-BOOTED uptime=S``
    ``/init`` started (S seconds after the kernel did).
``GUEST-INSMOD-FAILED NAME``
    a module did not load.
``RESULT KEY=VALUE``
    a finding of the test script; a key seen twice is kept as its first
    value and listed in :attr:`GuestRun.duplicates`.
``GUEST-END status=N``
    the script ran to its end with exit status N.

Kernel messages can share the console (``loglevel=4``: warnings and worse),
so only lines that *start* with these words count. :meth:`GuestRun.check`
turns a run that did not end, ended with a non-zero status or failed to
load a module into :class:`GuestFailed`, whose message carries the tail of
the console and QEMU's own output — the diagnosis of a failed guest test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .kernel import GuestUnavailable, Kernel

QEMU = "qemu-system-x86_64"
#: Kernel command line: serial console, warnings only, a panic ends QEMU at once.
CMDLINE = "console=ttyS0 loglevel=4 panic=-1 oops=panic mitigations=off no_timer_check tsc=reliable"

_LINE_RE = re.compile(r"^(RESULT|GUEST-BOOTED|GUEST-END|GUEST-INSMOD-FAILED)\b ?(.*)$")


class GuestFailed(AssertionError):
    """The guest did not run its script to a clean end (the message says what it printed)."""


def qemu_binary() -> str:
    name = os.environ.get("PYVIRTIO_QEMU", QEMU)
    path = shutil.which(name)
    if path is None:
        raise GuestUnavailable(f"{name} is not installed (apt-get install qemu-system-x86)")
    return path


@dataclass
class GuestRun:
    """What one guest run printed and how it ended."""

    argv: list[str]
    serial: str
    qemu_output: str
    returncode: int | None
    seconds: float
    timed_out: bool
    results: dict[str, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    booted: bool = False
    status: int | None = None
    insmod_failed: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, argv: list[str], serial: str, qemu_output: str, returncode: int | None, seconds: float,
              timed_out: bool) -> GuestRun:
        run = cls(argv, serial, qemu_output, returncode, seconds, timed_out)
        for raw in serial.splitlines():
            m = _LINE_RE.match(raw.rstrip("\r"))
            if not m:
                continue
            word, rest = m.groups()
            if word == "RESULT":
                key, sep, value = rest.partition("=")
                if not sep:
                    continue
                if key in run.results:
                    run.duplicates.append(key)
                else:
                    run.results[key] = value.strip()
            elif word == "GUEST-BOOTED":
                run.booted = True
            elif word == "GUEST-INSMOD-FAILED":
                run.insmod_failed.append(rest.strip())
            elif word == "GUEST-END":
                s = re.match(r"status=(\d+)", rest)
                run.status = int(s.group(1)) if s else -1
        return run

    def describe(self, lines: int = 60) -> str:
        """How the run ended, the last ``lines`` console lines and QEMU's output."""
        if self.timed_out:
            how = f"timed out after {self.seconds:.0f} s and was stopped"
        elif self.status is None:
            how = f"QEMU exited with status {self.returncode} after {self.seconds:.1f} s before the script ended"
        else:
            how = f"script ended with status {self.status} after {self.seconds:.1f} s"
        tail = "\n".join(self.serial.splitlines()[-lines:])
        return (f"guest {how}; booted={self.booted}; insmod failed={self.insmod_failed or 'none'}\n"
                f"--- console (last {lines} lines) ---\n{tail}\n--- QEMU ---\n{self.qemu_output.strip()[-2000:]}")

    def check(self) -> None:
        """Raise :class:`GuestFailed` unless the script ran to its end with status 0 and every module loaded."""
        if self.status != 0 or self.insmod_failed or self.timed_out:
            raise GuestFailed(self.describe())

    def result(self, key: str) -> str:
        """One result, or :class:`GuestFailed` naming the missing key with the console tail."""
        try:
            return self.results[key]
        except KeyError:
            raise GuestFailed(f"the guest reported no {key!r}\n{self.describe()}") from None

    def int_result(self, key: str) -> int:
        value = self.result(key)
        try:
            return int(value, 0)
        except ValueError:
            raise GuestFailed(f"the guest reported {key}={value!r}, not a number\n{self.describe()}") from None


def qemu_argv(kernel: Kernel, initramfs: Path, serial: Path, devices: Sequence[str], *, memory_mb: int = 512,
              smp: int = 1, cmdline: str = "", machine: str = "pc", cpu: str = "") -> list[str]:
    """The QEMU command line of :func:`run_guest` (see the module docstring).

    ``machine``: ``pc`` (i440FX) by default; ``q35`` for a guest with an
    emulated IOMMU (``-device intel-iommu`` needs it). ``cpu``: the CPU
    model (default QEMU's qemu64; ``max`` gives TCG's SSE4.2/POPCNT/AVX2,
    which a host's numpy wheel may need in the guest).
    """
    return [
        qemu_binary(),
        "-accel", "tcg",
        *(["-cpu", cpu] if cpu else []),
        "-machine", f"{machine},memory-backend=mem",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-m", f"{memory_mb}M",
        "-smp", str(smp),
        "-nodefaults", "-display", "none", "-monitor", "none",
        "-serial", f"file:{serial}",
        "-no-reboot",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initramfs),
        "-append", f"{CMDLINE} {cmdline}".strip(),
        *devices,
    ]


def run_guest(kernel: Kernel, initramfs: Path, workdir: Path, devices: Sequence[str] = (), *,
              memory_mb: int = 512, smp: int = 1, cmdline: str = "", timeout: float = 120.0,
              machine: str = "pc", cpu: str = "") -> GuestRun:
    """Boot the guest, wait at most ``timeout`` seconds for QEMU to exit, and parse the console."""
    workdir.mkdir(parents=True, exist_ok=True)
    serial = workdir / "console.log"
    out = workdir / "qemu.log"
    argv = qemu_argv(kernel, initramfs, serial, devices, memory_mb=memory_mb, smp=smp, cmdline=cmdline,
                     machine=machine, cpu=cpu)
    t0 = time.monotonic()
    with open(out, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        stop_process(proc)
    seconds = time.monotonic() - t0
    return GuestRun.parse(argv, _read(serial), _read(out), proc.returncode, seconds, timed_out)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM by PID, SIGKILL after ``timeout``; always reaps. A process that has exited is left alone."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


__all__ = ["CMDLINE", "GuestFailed", "GuestRun", "qemu_argv", "qemu_binary", "run_guest", "stop_process"]
