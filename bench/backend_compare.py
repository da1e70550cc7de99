#!/usr/bin/env python3
"""The embedded back end vs. qemu-storage-daemon, under a client that is not ours.

Starts ``pyvirtio serve blk`` (RAM disk) and qemu-storage-daemon (null-co),
both pinned to CPU 0, and runs ../shared/bench/raw_vhost_blk.py pinned to
CPU 1 against each, interleaved round by round, for randread and randwrite
at QD1 and QD32. Prints median and best kIOPS of each and the ratio
embedded / qsd.

  python bench/backend_compare.py [--rounds 3] [--seconds 3] [--json]
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

from compare import STICKS, run_json, start_qsd


def start_embedded(tmp: str, cpu: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(tmp, "embedded.sock")
    cmd = [sys.executable, "-m", "pyvirtio", "serve", "blk", "--socket", sock, "--size", "1G"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("pyvirtio serve blk did not start")
        time.sleep(0.05)
    return proc, sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pyvirtio-backend-compare-")
    qsd, qsock = start_qsd(tmp, "0")
    emb, esock = start_embedded(tmp, "0")
    rows: list[dict[str, object]] = []
    try:
        for r in range(a.rounds):
            for rw in ("randread", "randwrite"):
                for qd in (1, 32):
                    pair = [("embedded", esock), ("qsd", qsock)]
                    if r % 2:
                        pair.reverse()
                    for who, sock in pair:
                        cmd = [sys.executable, str(STICKS / "raw_vhost_blk.py"), sock, "--qd", str(qd), "--rw", rw,
                               "--seconds", str(a.seconds), "--json"]
                        res = run_json(cmd, "1")
                        rows.append({"round": r, "rw": rw, "qd": qd, "who": who, "iops": res["iops"]})
                        print(f"round {r} {rw:<9} qd {qd:>2} {who:<8} {int(res['iops']):>10,} IOPS", file=sys.stderr)
    finally:
        for p in (emb, qsd):
            p.send_signal(signal.SIGTERM)
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for rw in ("randread", "randwrite"):
        for qd in (1, 32):
            cell: dict[str, object] = {}
            for who in ("embedded", "qsd"):
                v = [float(x["iops"]) for x in rows if x["rw"] == rw and x["qd"] == qd and x["who"] == who]
                cell[who] = {"median": round(statistics.median(v)), "best": round(max(v))}
            e, q = cell["embedded"], cell["qsd"]
            cell["ratio_median"] = round(e["median"] / q["median"], 3)  # type: ignore[index]
            cell["ratio_best"] = round(e["best"] / q["best"], 3)  # type: ignore[index]
            summary[f"{rw}/qd{qd}"] = cell
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rows, "seconds": a.seconds}))
        return
    print(f"\nraw_vhost_blk.py client; {a.rounds} rounds x {a.seconds}s; back ends on CPU 0, client on CPU 1")
    for key, c in summary.items():
        e, q = c["embedded"], c["qsd"]
        print(f"{key:<16} embedded {e['median'] / 1e3:>7.1f}k (best {e['best'] / 1e3:.1f}k)   "  # type: ignore[index]
              f"qsd {q['median'] / 1e3:>8.1f}k (best {q['best'] / 1e3:.1f}k)   "  # type: ignore[index]
              f"ratio {c['ratio_median']} (best {c['ratio_best']})")


if __name__ == "__main__":
    main()
