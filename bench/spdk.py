"""SPDK's C initiator (bdevperf over bdev_virtio, v24.01) as a contestant in our benchmark scripts.

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
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
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
) -> SpdkResult:
    """One bdevperf run against ``sock``; raises RuntimeError with the log's tail when it fails."""
    scripts = scripts_dir()
    if scripts is None:
        raise RuntimeError("the SPDK scripts (shared/spdk/bdevperf_qsd.sh) are not there")
    env = dict(os.environ, SPDK_BUILD=str(build), BP_WORKLOAD=workload)  # hugepages reserved and given back per run
    if unpatched:
        env["SPDK_UNPATCHED"] = "1"
    secs = max(1, round(seconds))
    cmd = ["bash", str(scripts / "bdevperf_qsd.sh"), sock, str(qd), str(ring), str(secs), hex(1 << cpu)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=secs + 120)
    if out.returncode != 0:
        raise RuntimeError(f"bdevperf failed (rc {out.returncode}): {out.stderr.strip()[-600:]}")
    return parse_bdevperf(out.stderr)
