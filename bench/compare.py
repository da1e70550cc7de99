#!/usr/bin/env python3
"""pyvirtio bench vs. the measuring sticks, against qemu-storage-daemon (null-co).

Starts qemu-storage-daemon pinned to CPU 0 and runs, pinned to CPU 1,
interleaved round by round:

  * ``pyvirtio bench --rw randread --bs 4k`` (this checkout),
  * ../shared/bench/raw_vhost_blk.py        (pure-Python floor, one request at a time),
  * ../shared/bench/raw_vhost_blk_numpy.py  (vectorised floor),

at QD1, QD32 (ring 256), QD128 (ring 512) and QD256 (ring 1024). The
pure-Python stick's rings hold at most 85 three-descriptor requests (ring
256), so it runs at QD1 and QD32 only. Prints per-depth median and best
IOPS of each and pyvirtio's ratio to the better stick (median/median,
best/best). ``--json`` prints the raw rounds too.

  python bench/compare.py [--rounds 4] [--seconds 3] [--depths 1 32 128 256] [--json]
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STICKS = REPO.parent / "shared" / "bench"
RINGS = {1: 256, 32: 256, 128: 512, 256: 1024}


def start_qsd(tmp: str, cpu: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(tmp, "qsd.sock")
    pidfile = os.path.join(tmp, "qsd.pid")
    cmd = [
        "qemu-storage-daemon",
        "--blockdev",
        "driver=null-co,node-name=null0,size=1073741824",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={sock},writable=on",
        "--pidfile",
        pidfile,
    ]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (os.path.exists(sock) and os.path.exists(pidfile) and os.path.getsize(pidfile)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("qemu-storage-daemon did not start")
        time.sleep(0.05)
    return proc, sock


def run_json(cmd: list[str], cpu: str, env: dict[str, str] | None = None) -> dict[str, object]:
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    result: dict[str, object] = json.loads(line)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="pyvirtio-compare-")
    qsd, sock = start_qsd(tmp, "0")
    rounds: list[dict[str, object]] = []
    try:
        for r in range(a.rounds):
            for qd in a.depths:
                ring = RINGS.get(qd, 1024)
                runs = {
                    "pyvirtio": [py, "-m", "pyvirtio", "bench", f"vhost-user:{sock}", "--rw", "randread", "--bs", "4k",
                                 "--iodepth", str(qd), "--queue-size", str(ring), "--runtime", str(a.seconds),
                                 "--json", "--no-progress"],
                    "numpy_stick": [py, str(STICKS / "raw_vhost_blk_numpy.py"), sock, "--qd", str(qd), "--ring",
                                    str(ring), "--seconds", str(a.seconds), "--json"],
                }
                if qd <= 85:
                    runs["python_stick"] = [py, str(STICKS / "raw_vhost_blk.py"), sock, "--qd", str(qd),
                                            "--seconds", str(a.seconds), "--json"]
                order = list(runs)
                order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
                for name in order:
                    res = run_json(runs[name], "1")
                    rounds.append({"round": r, "qd": qd, "ring": ring, "who": name, "iops": res["iops"],
                                   "engine": res.get("engine")})
                    print(f"round {r} qd {qd:>3} {name:<12} {int(res['iops']):>10,} IOPS", file=sys.stderr)
    finally:
        qsd.send_signal(signal.SIGTERM)
        qsd.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for qd in a.depths:
        row: dict[str, object] = {"ring": RINGS.get(qd, 1024)}
        for who in ("pyvirtio", "python_stick", "numpy_stick"):
            v = [float(x["iops"]) for x in rounds if x["qd"] == qd and x["who"] == who]  # type: ignore[arg-type]
            if v:
                row[who] = {"median": round(statistics.median(v)), "best": round(max(v))}
        sticks = [row[w] for w in ("python_stick", "numpy_stick") if w in row]
        best_med = max(s["median"] for s in sticks)  # type: ignore[index]
        best_best = max(s["best"] for s in sticks)  # type: ignore[index]
        pv = row["pyvirtio"]
        row["ratio_median"] = round(pv["median"] / best_med, 2)  # type: ignore[index]
        row["ratio_best"] = round(pv["best"] / best_best, 2)  # type: ignore[index]
        summary[qd] = row
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rounds, "seconds": a.seconds}))
        return
    print(f"\n4k randread vs qemu-storage-daemon null-co; {a.rounds} rounds x {a.seconds}s; "
          "qsd on CPU 0, clients CPU 1")
    print(f"{'QD':>4} {'ring':>5} {'pyvirtio med/best':>22} {'py stick med/best':>22} {'numpy stick med/best':>22} "
          f"{'ratio med':>9} {'best':>5}")
    def cell(row: dict[str, object], who: str) -> str:
        x = row.get(who)
        return f"{x['median'] / 1e3:,.0f}k / {x['best'] / 1e3:,.0f}k" if x else "-"  # type: ignore[index]

    for qd, row in summary.items():
        print(f"{qd:>4} {row['ring']:>5} {cell(row, 'pyvirtio'):>22} {cell(row, 'python_stick'):>22} "
              f"{cell(row, 'numpy_stick'):>22} {row['ratio_median']:>9} {row['ratio_best']:>5}")


if __name__ == "__main__":
    main()
