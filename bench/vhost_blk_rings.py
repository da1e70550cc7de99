#!/usr/bin/env python3
"""Packed against split on DPDK's vhost_blk example (issue 12): same back end, interleaved rounds.

DPDK 22.11's example (PEERS.md, "Block, second back end"; tests/dpdk_blk.py)
serves one queue by polling, completing each request before it reads the
next. It keeps ring state across connections badly: a packed connection
after a split one on the same instance stalls or runs at a fraction of its
speed (measured here: 42k against 100k IOPS, or no completion at all). So
every run gets a fresh instance, started in a directory of its own on CPU 0
and stopped by PID after the run; the client (``pyvirtio bench``, 4 KiB
random reads: the example reports a write's used length as the whole data,
which the block engines refuse) runs on CPU 1. Packed runs use
``--packed-zero-wrap`` (the example takes DPDK's 16-bit ring state, wrap
counter in bit 15, as its position).

  python bench/vhost_blk_rings.py [--rounds 4] [--seconds 3] [--depths 1 32] [--json]
  python bench/vhost_blk_rings.py --checkouts OLD NEW [--rings packed] ...

Each round runs split and packed at every depth, the order alternating
round by round; prints median and best IOPS per cell and packed/split.
With ``--checkouts`` (``git worktree add /tmp/old <rev>`` makes one) each
round runs every ring of every checkout (``PYTHONPATH=<checkout>/src``),
the order rotated round by round, and adds new/old per ring: the last
checkout against the first, the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = "/usr/share/dpdk/examples/vhost_blk"
ROOT = Path(__file__).resolve().parent.parent
RINGS = {"split": ["--ring", "split"], "packed": ["--ring", "packed", "--packed-zero-wrap"]}


def build(tmp: str) -> str:
    if not os.path.isdir(EXAMPLE):
        raise SystemExit("DPDK's vhost_blk example is not installed (apt-get install dpdk-doc libdpdk-dev make)")
    src = os.path.join(tmp, "vhost_blk")
    shutil.copytree(EXAMPLE, src)
    done = subprocess.run(["make", "-C", src], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"cannot build DPDK's vhost_blk example: {done.stderr[-400:]}")
    return os.path.join(src, "build", "vhost-blk")


def run_one(binary: str, tmp: str, ring: str, depth: int, seconds: float, checkout: Path = ROOT) -> float:
    """One fresh instance, one ``pyvirtio bench`` run against it; its IOPS."""
    d = tempfile.mkdtemp(dir=tmp)
    prefix = f"pvrings{os.getpid()}_{os.path.basename(d)}"
    sock = os.path.join(d, "vhost.socket")
    argv = ["taskset", "-c", "0", binary, "--no-pci", "--no-huge", "-m", "512", f"--file-prefix={prefix}", "-l", "0"]
    with open(os.path.join(d, "log"), "wb") as log:
        proc = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vhost_blk did not start: {Path(d, 'log').read_text(errors='replace')[-400:]}")
            time.sleep(0.02)
        client = [
            "taskset", "-c", "1", sys.executable, "-m", "pyvirtio", "bench", f"vhost-user:{sock}",
            "--rw", "randread", "--bs", "4k", "--iodepth", str(depth), "--runtime", str(seconds),
            "--json", "--no-progress", *RINGS[ring],
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
        out = subprocess.run(client, capture_output=True, text=True, timeout=seconds + 60, env=env)
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode != 0 or not lines:
            print(f"  {ring} QD{depth}: failed: {out.stderr.strip()[-200:]}", file=sys.stderr)
            return 0.0
        return float(json.loads(lines[-1])["iops"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rings", nargs="+", choices=list(RINGS), default=list(RINGS))
    ap.add_argument("--checkouts", type=Path, nargs="+", default=[ROOT])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cells = [(c.resolve(), r) for c in args.checkouts for r in args.rings]
    res: dict[tuple[Path, str], dict[int, list[float]]] = {cell: {d: [] for d in args.depths} for cell in cells}
    with tempfile.TemporaryDirectory(prefix="pvrings") as tmp:
        binary = build(tmp)
        for rnd in range(args.rounds):
            order = cells[rnd % len(cells) :] + cells[: rnd % len(cells)]
            for depth in args.depths:
                for checkout, ring in order:
                    iops = run_one(binary, tmp, ring, depth, args.seconds, checkout)
                    res[checkout, ring][depth].append(iops)
                    if not args.json:
                        who = f" {checkout}" if len(args.checkouts) > 1 else ""
                        print(f"round {rnd} QD{depth} {ring}{who}: {iops:,.0f} IOPS", flush=True)
    table = summarise(res, args.depths)
    if args.json:
        print(json.dumps(table))
        return
    print("\n| QD | checkout | ring | median / best IOPS | ratio, median of the rounds (of the medians) |")
    print("|---:|---|---|---:|---:|")
    for row in table:
        print(f"| {row['depth']} | {row['checkout']} | {row['ring']} | {row['median']:,.0f} / {row['best']:,.0f} | "
              + "; ".join(f"{k} **{v[0]:.3f}** ({v[1]:.3f})" for k, v in row["ratios"].items()) + " |")


def summarise(res: dict[tuple[Path, str], dict[int, list[float]]], depths: list[int]) -> list[dict]:
    """Per depth and cell: median and best IOPS; packed/split of the same checkout and new/old of the same
    ring (the last checkout against the first), each as (median of the per-round ratios, ratio of the medians)."""

    def ratio(a: list[float], b: list[float]) -> tuple[float, float]:
        paired = [x / y for x, y in zip(a, b, strict=True) if y]
        mb = statistics.median(b)
        return (statistics.median(paired) if paired else 0.0, statistics.median(a) / mb if mb else 0.0)

    checkouts = list(dict.fromkeys(c for c, _r in res))
    table = []
    for depth in depths:
        for (checkout, ring), runs in res.items():
            v = runs[depth]
            ratios = {}
            if ring == "packed" and (checkout, "split") in res:
                ratios["packed/split"] = ratio(v, res[checkout, "split"][depth])
            if len(checkouts) > 1 and checkout == checkouts[-1]:
                ratios["new/old"] = ratio(v, res[checkouts[0], ring][depth])
            table.append({"depth": depth, "checkout": str(checkout), "ring": ring, "iops": v,
                          "median": statistics.median(v), "best": max(v), "ratios": ratios})
    return table


if __name__ == "__main__":
    main()
