#!/usr/bin/env python3
"""pyvirtio's virtio-net driver vs DPDK's own virtio-user frontend, on the same vhost back end.

One dpdk-testpmd with the vhost PMD (``net_vhost0``) is the back end for a
whole mode, its two lcores on CPU 0 (PEERS.md); every frontend runs on
CPU 1. Rounds interleave the two frontends (order alternating):

* DPDK: ``dpdk-testpmd --vdev net_virtio_user0,path=SOCK,queue_size=Q``
  (txonly for ``tx``, rxonly for ``rx``);
* pyvirtio: ``pyvirtio net bench SOCK --mode tx|rx --size 64``.

One instrument measures both: the vhost testpmd's periodic statistics
(``Rx-pps`` when it runs rxonly and the frontend transmits, ``Tx-pps``, the
frames it put into the frontend's receive ring, when it runs txonly). The
1-second samples of a run are averaged without the first and the last
(partial) ones. pyvirtio's own count is printed next to it as a check.

usage: compare_dpdk.py [--modes tx,rx] [--rounds 4] [--seconds 5] [--size 64] [--queue-size 1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

COMMON_EAL = ["--no-pci", "--no-huge", "-m", "256", "--no-telemetry"]


class Vhost:
    def __init__(self, mode: str, tmp: str) -> None:
        self.name = f"cmpv{os.getpid()}"
        self.sock = os.path.join(tmp, "v.sock")
        self.log = os.path.join(tmp, f"vhost-{mode}.log")
        fwd = "rxonly" if mode == "tx" else "txonly"
        argv = ["dpdk-testpmd", "--lcores", "0@0,1@0", *COMMON_EAL, f"--file-prefix={self.name}",
                "--vdev", f"net_vhost0,iface={self.sock},queues=1", "--", f"--forward-mode={fwd}",
                "--stats-period=1", "--nb-cores=1", "--total-num-mbufs=16384"]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vhost testpmd did not start:\n{self.text()[-2000:]}")
            time.sleep(0.05)
        self.key = "Rx-pps" if mode == "tx" else "Tx-pps"

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def samples_since(self, offset: int) -> list[int]:
        values = [int(v) for v in re.findall(rf"{self.key}:\s+(\d+)", self.text()[offset:])]
        busy = [v for v in values if v > 0]
        return busy[1:-1] if len(busy) > 2 else busy

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(f"/var/run/dpdk/{self.name}", ignore_errors=True)


def run_dpdk(mode: str, vhost: Vhost, seconds: float, size: int, qsize: int, tmp: str, rnd: int) -> dict:
    name = f"cmpu{os.getpid()}r{rnd}"
    fwd = "txonly" if mode == "tx" else "rxonly"
    argv = ["taskset", "-c", "1", "dpdk-testpmd", "--lcores", "0@1,1@1", *COMMON_EAL, f"--file-prefix={name}",
            "--vdev", f"net_virtio_user0,path={vhost.sock},queues=1,queue_size={qsize}", "--",
            f"--forward-mode={fwd}", "--stats-period=1", "--nb-cores=1", "--total-num-mbufs=16384",
            f"--txd={qsize}", f"--rxd={qsize}", f"--txpkts={size}"]
    log = os.path.join(tmp, f"virtio-user-{mode}-{rnd}.log")
    offset = len(vhost.text())
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    # Run until the vhost side has seen `seconds` of traffic (EAL start-up takes 1-3 s here).
    deadline = time.monotonic() + seconds + 20
    while time.monotonic() < deadline and len([1 for _ in re.findall(
            rf"{vhost.key}:\s+([1-9]\d*)", vhost.text()[offset:])]) < seconds + 1:
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(f"/var/run/dpdk/{name}", ignore_errors=True)
    time.sleep(1.2)  # let the vhost side print its last sample
    samples = vhost.samples_since(offset)
    return {"pps": statistics.mean(samples) if samples else 0.0, "samples": samples}


def run_pyvirtio(mode: str, vhost: Vhost, seconds: float, size: int, qsize: int, extra: Sequence[str] = ()) -> dict:
    offset = len(vhost.text())
    argv = ["taskset", "-c", "1", sys.executable, "-m", "pyvirtio", "net", "bench", vhost.sock, "--mode", mode,
            "--size", str(size), "--runtime", str(seconds + 1), "--queue-size", str(qsize), "--json", *extra]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise SystemExit(f"pyvirtio net bench failed: {r.stderr}")
    own = json.loads(r.stdout)
    time.sleep(1.2)
    samples = vhost.samples_since(offset)
    return {"pps": statistics.mean(samples) if samples else 0.0, "samples": samples, "own_pps": own["pps"],
            "path": own.get("path")}


def arguments(doc: str | None, seconds: float) -> tuple[argparse.Namespace, dict]:
    """The options of a script that runs rounds on testpmd's vhost PMD, and its report's head (testpmd checked)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="tx,rx")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=seconds)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--queue-size", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if shutil.which("dpdk-testpmd") is None:
        raise SystemExit("dpdk-testpmd is not installed (apt-get install dpdk dpdk-dev)")
    report: dict = {"size": a.size, "queue_size": a.queue_size, "seconds": a.seconds, "rounds": a.rounds,
                    "date": time.strftime("%Y-%m-%d %H:%M"), "modes": {}}
    return a, report


def main() -> int:
    a, report = arguments(__doc__, 5.0)
    for mode in a.modes.split(","):
        tmp = tempfile.mkdtemp(prefix="cmpdpdk", dir="/tmp")
        vhost = Vhost(mode, tmp)
        rows = []
        try:
            for rnd in range(a.rounds):
                order = ("dpdk", "pyvirtio") if rnd % 2 == 0 else ("pyvirtio", "dpdk")
                row: dict = {}
                for who in order:
                    if who == "dpdk":
                        row["dpdk"] = run_dpdk(mode, vhost, a.seconds, a.size, a.queue_size, tmp, rnd)
                    else:
                        row["pyvirtio"] = run_pyvirtio(mode, vhost, a.seconds, a.size, a.queue_size)
                rows.append(row)
                if not a.json:
                    d, p = row["dpdk"]["pps"], row["pyvirtio"]["pps"]
                    print(f"{mode} round {rnd + 1}: DPDK virtio-user {d / 1e6:6.2f} Mpps   pyvirtio {p / 1e6:6.2f} Mpps"
                          f" (own count {row['pyvirtio']['own_pps'] / 1e6:.2f}, {row['pyvirtio']['path']})   "
                          f"ratio {p / d if d else float('nan'):.2f}", flush=True)
        finally:
            vhost.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        d = [r["dpdk"]["pps"] for r in rows]
        p = [r["pyvirtio"]["pps"] for r in rows]
        summary = {
            "dpdk_median": statistics.median(d), "dpdk_best": max(d),
            "pyvirtio_median": statistics.median(p), "pyvirtio_best": max(p),
            "ratio_median": statistics.median(p) / statistics.median(d) if statistics.median(d) else None,
            "ratio_best": max(p) / max(d) if max(d) else None,
            "rounds": rows,
        }
        report["modes"][mode] = summary
        if not a.json:
            print(f"{mode}: DPDK median {summary['dpdk_median'] / 1e6:.2f} best {summary['dpdk_best'] / 1e6:.2f} Mpps;"
                  f" pyvirtio median {summary['pyvirtio_median'] / 1e6:.2f} best "
                  f"{summary['pyvirtio_best'] / 1e6:.2f} Mpps; ratio median {summary['ratio_median']:.2f} "
                  f"best {summary['ratio_best']:.2f}")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
