#!/usr/bin/env python3
"""Where a round trip goes: the embedded back end's time per request, split against packed.

``bench/revisions.py --target`` says *that* packed is slower than split on
``pyvirtio serve blk`` at QD1; this says on which side of the ring. It runs
the real server (``pyvirtio serve blk`` of each checkout, pinned to CPU 0)
with a timer around its batch (``backends/datapath.py``'s ``DataPath.batch``:
pop, the block model's ``handle``, ``add_used``, ``flush_used`` and the call
eventfd write, the re-check), and the real client (``pyvirtio bench``
of the same checkout, CPU 1), interleaved, order rotated each round. Per
cell: the client's IOPS and round trip (1 / IOPS at QD1), and the server's
microseconds per request inside its batches. The rest of the round trip is
the server's polling (waiting, and the loop between batches) and the
client's turn.

The timer costs two clock reads per batch, the same for every cell; the
server's figures compare cells, they are not the back end's speed.

  python bench/server_time.py CHECKOUT [CHECKOUT] [--rings split packed] [--depths 1 32] [--rounds 4] [--seconds 3]

Figures (issue 12): docs/benchmarks.md §7, "Which side".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from compare import run_json, start_serve_blk, stop_process

#: The server with a timer around DataPath.batch (named _batch in checkouts before 2026-12-03). SIGUSR1
#: appends "ns chains batches" (since the last one) to the file named by PYVIRTIO_BATCH_TIMES and starts
#: over; batches counts the calls that served at least one chain.
SERVER = r"""
import os, signal, sys, time
from pyvirtio.backends.datapath import DataPath
from pyvirtio.cli.main import main

clock = time.perf_counter_ns
spent = [0]
batches = [0]
paths: list[DataPath] = []
NAME = "batch" if hasattr(DataPath, "batch") else "_batch"
batch = getattr(DataPath, NAME)

def timed(self, ring):
    if not paths or paths[-1] is not self:
        paths.append(self)
    before = self.chains
    t = clock()
    try:
        return batch(self, ring)
    finally:
        spent[0] += clock() - t
        if self.chains != before:
            batches[0] += 1

setattr(DataPath, NAME, timed)
marks = [0]

def report(_sig, _frame):
    chains = sum(p.chains for p in paths)
    with open(os.environ["PYVIRTIO_BATCH_TIMES"], "a") as f:
        f.write(f"{spent[0]} {chains - marks[0]} {batches[0]}\n")
    spent[0] = 0
    batches[0] = 0
    marks[0] = chains

signal.signal(signal.SIGUSR1, report)
sys.exit(main(sys.argv[1:]))
"""


class Server:
    """One checkout's ``pyvirtio serve blk`` with the batch timer, on CPU 0."""

    def __init__(self, checkout: Path, sock: str, times: str) -> None:
        self.sock = sock
        self.times = times
        self.log = times + ".log"
        env = dict(os.environ, PYTHONPATH=str(checkout / "src"), PYVIRTIO_BATCH_TIMES=times)
        self.proc = start_serve_blk(sock, "0", env, runner=[sys.executable, "-c", SERVER], log=self.log)

    def mark(self) -> tuple[int, int, int]:
        """(ns spent in batches, chains completed, batches that completed any) since the last mark."""
        before = Path(self.times).read_text().count("\n") if os.path.exists(self.times) else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while True:
            lines = Path(self.times).read_text().splitlines() if os.path.exists(self.times) else []
            if len(lines) > before:
                ns, chains, batches = lines[-1].split()
                return int(ns), int(chains), int(batches)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server stopped answering: {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        return Path(self.log).read_text()[-500:]

    def stop(self) -> None:
        stop_process(self.proc, grace=5)


def summary(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per (checkout, ring, qd): median IOPS and median server µs per request, over the rounds."""
    cells: dict[tuple[str, str, int], list[dict[str, object]]] = {}
    for r in rows:
        cells.setdefault((str(r["checkout"]), str(r["ring"]), int(str(r["qd"]))), []).append(r)
    out = []
    for (checkout, ring, qd), rs in cells.items():
        iops = statistics.median(float(str(r["iops"])) for r in rs)
        out.append({"checkout": checkout, "ring": ring, "qd": qd, "iops": iops,
                    "round_trip_us": qd * 1e6 / iops if iops else None,
                    "server_us": statistics.median(float(str(r["server_us"])) for r in rs),
                    "per_batch": statistics.median(float(str(r["per_batch"])) for r in rs)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", type=Path, nargs="+")
    ap.add_argument("--rings", nargs="+", choices=("split", "packed"), default=["split", "packed"])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="server-time-")
    servers = []
    try:
        for i, checkout in enumerate(a.checkouts):
            servers.append((checkout, Server(checkout.resolve(), f"{tmp}/blk{i}.sock", f"{tmp}/times{i}")))
        cells = [(c, s, ring) for c, s in servers for ring in a.rings]
        rows: list[dict[str, object]] = []
        for rnd in range(a.rounds):
            for qd in a.depths:
                turn = cells[rnd % len(cells):] + cells[: rnd % len(cells)]
                for checkout, server, ring in turn:
                    server.mark()
                    res = run_json([sys.executable, "-m", "pyvirtio", "bench", f"vhost-user:{server.sock}",
                                    "--rw", "randread", "--bs", "4k", "--iodepth", str(qd),
                                    "--runtime", str(a.seconds), "--ring", ring, "--json", "--no-progress"],
                                   "1", dict(os.environ, PYTHONPATH=str(checkout.resolve() / "src")))
                    ns, chains, batches = server.mark()
                    row = {"round": rnd, "checkout": str(checkout), "ring": ring, "qd": qd,
                           "iops": res["iops"], "server_us": ns / 1e3 / max(1, chains),
                           "per_batch": chains / max(1, batches)}
                    rows.append(row)
                    print(f"round {rnd} qd{qd:<4} {ring:>6} {checkout}: {float(str(res['iops'])):>10,.0f} IOPS, "
                          f"server {row['server_us']:.2f} us/request in batches of {row['per_batch']:.1f}", flush=True)
        print()
        table = summary(rows)
        for t in table:
            rt = float(str(t["round_trip_us"] or 0))
            print(f"qd{t['qd']:<4} {t['ring']:>6} {t['checkout']}: median {float(str(t['iops'])):>10,.0f} IOPS, "
                  f"round trip {rt:.2f} us, server {float(str(t['server_us'])):.2f} us/request, "
                  f"{float(str(t['per_batch'])):.1f} per batch")
        if a.json:
            print(json.dumps({"rows": rows, "summary": table}))
    finally:
        for _, s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
