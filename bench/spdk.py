"""SPDK (v24.01) in our benchmark scripts: its C initiator (bdevperf over bdev_virtio), its vhost target.

SPDK is not packaged; ``../shared/spdk/build.sh`` builds it into
``$SPDK_BUILD/spdk`` (see that folder's README). This module finds a build
and runs ``../shared/spdk/bdevperf_qsd.sh`` against a vhost-user-blk socket:
4 KiB random reads (or ``workload``) at a queue depth, one virtqueue of a
given size, the reactor pinned to one CPU. It returns IOPS and bdevperf's
mean latency in microseconds.

Which build: ``--spdk DIR`` in the scripts, else ``$SPDK_BUILD``, else the
shared scripts' own default (``spdk-build`` in the temporary directory),
else ``/work/spdk-build``. :func:`find_build` returns None when there is
none, and the scripts say so and go on without SPDK.

``unpatched=True`` runs SPDK's virtio library as shipped: its GET_CONFIG
asks for 256 bytes whatever the device, which qemu-storage-daemon refuses
(so SPDK as shipped cannot attach to qsd) and pyvirtio's back end answers.
The default is the build with ``getconfig.patch`` (exact sizes), which
attaches to both.

:func:`start_vhost` runs SPDK's vhost target (``../shared/spdk/vhost_target.sh``)
as a vhost-user-blk back end over a 1 GiB null bdev, its reactor pinned to
one CPU: a back end that polls and never sleeps, where qemu-storage-daemon's
main loop sleeps whenever its queue is empty (docs/benchmarks.md §8). It
keeps its hugepages while it runs (bdevperf runs beside it with
``KEEP_HUGEPAGES=1``, :func:`run_bdevperf`); the script gives them back when
it is stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_SPDK = HERE.parent.parent / "shared" / "spdk"
_CANDIDATES = ("/work/spdk-build",)


@dataclass(frozen=True)
class SpdkResult:
    iops: float
    mean_latency_us: float


def find_build(explicit: str | None = None) -> Path | None:
    """The SPDK build folder (holding ``spdk/build/examples/bdevperf``), or None."""
    tried = [explicit, os.environ.get("SPDK_BUILD"), os.path.join(tempfile.gettempdir(), "spdk-build"), *_CANDIDATES]
    for cand in tried:
        if cand and (Path(cand) / "spdk" / "build" / "examples" / "bdevperf").is_file():
            return Path(cand)
    return None


def scripts_dir() -> Path | None:
    """The workplace's SPDK scripts (bdevperf_qsd.sh), beside the repository or in /work/shared."""
    for d in (SHARED_SPDK, Path("/work/shared/spdk")):
        if (d / "bdevperf_qsd.sh").is_file():
            return d
    return None


_TOTAL = re.compile(r"^\s*Total\s*:\s*([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)", re.M)


def parse_bdevperf(log: str) -> SpdkResult:
    """IOPS and mean latency (µs) from bdevperf's "Total" line."""
    m = _TOTAL.search(log.replace("\r", ""))
    if m is None:
        raise ValueError("no Total line in bdevperf's output")
    return SpdkResult(float(m.group(1)), float(m.group(2)))


def run_bdevperf(
    build: Path,
    sock: str,
    qd: int,
    ring: int,
    seconds: float,
    cpu: int,
    *,
    workload: str = "randread",
    unpatched: bool = False,
    keep_hugepages: bool = False,
) -> SpdkResult:
    """One bdevperf run against ``sock``; raises RuntimeError with the log's tail when it fails."""
    scripts = scripts_dir()
    if scripts is None:
        raise RuntimeError("the SPDK scripts (shared/spdk/bdevperf_qsd.sh) are not there")
    env = dict(os.environ, SPDK_BUILD=str(build), BP_WORKLOAD=workload)  # hugepages reserved and given back per run
    if keep_hugepages:
        env["KEEP_HUGEPAGES"] = "1"  # a vhost target (start_vhost) holds some: leave the pool to it
    if unpatched:
        env["SPDK_UNPATCHED"] = "1"
    secs = max(1, round(seconds))
    cmd = ["bash", str(scripts / "bdevperf_qsd.sh"), sock, str(qd), str(ring), str(secs), hex(1 << cpu)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=secs + 120)
    if out.returncode != 0:
        raise RuntimeError(f"bdevperf failed (rc {out.returncode}): {out.stderr.strip()[-600:]}")
    return parse_bdevperf(out.stderr)


@dataclass
class VhostTarget:
    """A running SPDK vhost target: the script's process (stop it with :meth:`stop`), the vhost process's
    PID (the one that serves: count its sleeps) and the vhost-user-blk socket."""

    proc: subprocess.Popen[bytes]
    pid: int
    sock: str

    def stop(self) -> None:
        """SIGTERM to the script, which stops vhost and gives the hugepages back (by PID, never by name)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_vhost(build: Path, sock_dir: str, cpu: int, timeout: float = 60.0) -> VhostTarget:
    """SPDK's vhost target serving a 1 GiB null bdev as vhost-user-blk at ``sock_dir/vhost.0``, its
    reactor on ``cpu``; raises RuntimeError with the log's tail if it does not come up."""
    scripts = scripts_dir()
    if scripts is None:
        raise RuntimeError("the SPDK scripts (shared/spdk/vhost_target.sh) are not there")
    env = dict(os.environ, SPDK_BUILD=str(build), SOCK_DIR=sock_dir, VHOST_BDEV="null")
    env.pop("KEEP_HUGEPAGES", None)  # given back when it stops
    log = open(os.path.join(sock_dir, "vhost.log"), "wb")  # noqa: SIM115 - the target outlives this call
    proc = subprocess.Popen(["bash", str(scripts / "vhost_target.sh"), "blk", "vhost.0", hex(1 << cpu)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    sock = os.path.join(sock_dir, "vhost.0")
    pidfile = build / "run" / "vhost.pid"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            target = VhostTarget(proc, 0, sock)
            target.stop()
            with open(os.path.join(sock_dir, "vhost.log"), errors="replace") as f:
                tail = f.read()[-600:]
            raise RuntimeError(f"SPDK's vhost target did not start: {tail}")
        if os.path.exists(sock) and pidfile.is_file():
            text = pidfile.read_text().strip()
            if text.isdigit():
                return VhostTarget(proc, int(text), sock)
        time.sleep(0.1)
