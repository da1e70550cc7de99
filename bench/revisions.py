#!/usr/bin/env python3
"""Two revisions of pyvirtio against each other, interleaved: did a change cost speed?

Give it two checkouts (``git worktree add /tmp/old <rev>`` makes one); each
contestant runs with ``PYTHONPATH=<checkout>/src``, so nothing is installed.
Round by round, the order of the two rotated each round:

* ``engine``: ``pyvirtio bench --rw randread --bs 4k`` against
  qemu-storage-daemon (null-co, pinned to CPU 0), the client pinned to CPU 1,
  at each ``--depths`` (ring sizes as in bench/compare.py);
* ``sync``: a loop of ``VirtioBlk.readinto`` of 4 KiB at random offsets (the
  one-request API) against the same daemon;
* ``backend``: ``pyvirtio serve blk`` of each revision (pinned to CPU 0)
  under a client that is neither (../shared/bench/raw_vhost_blk.py, CPU 1),
  randread and randwrite at QD1 and QD32.

Prints, per cell, median and best IOPS of each revision and the ratio
new/old (median/median, best/best). ``--json`` adds the raw rounds.

  python bench/revisions.py OLD NEW [--rounds 4] [--seconds 3] [--parts engine sync backend]

``--target`` runs the engine cells against another back end (a vhost-user
socket: ``pyvirtio serve blk``, DPDK's vhost_blk example) instead of the
daemon; ``--old-extra`` / ``--new-extra`` give one side's ``pyvirtio bench``
options of its own, so one checkout can race itself on two ring formats
(issue 12), e.g.

  python bench/revisions.py NEW NEW --parts engine --target vhost-user:/tmp/blk.sock \
      --old-extra=--ring=split --new-extra=--ring=packed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import RINGS, STICKS, run_json, start_qsd, start_serve_blk, stop_process

SYNC_LOOP = """
import json, random, sys, time
from pyvirtio.drivers.blk import VirtioBlk
sock, seconds = sys.argv[1], float(sys.argv[2])
with VirtioBlk.open("vhost-user:" + sock, num_queues=1, queue_size=256) as blk:
    buf = blk.allocate(4096, align=4096)
    blocks = blk.capacity // 4096
    rnd = random.Random(1)
    for _ in range(2000):
        blk.readinto(rnd.randrange(blocks) * 4096, buf)
    n, end = 0, time.perf_counter() + seconds
    t0 = time.perf_counter()
    while True:
        for _ in range(256):
            blk.readinto(rnd.randrange(blocks) * 4096, buf)
        n += 256
        if time.perf_counter() >= end:
            break
    print(json.dumps({"iops": n / (time.perf_counter() - t0)}))
"""


def env_for(checkout: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(checkout / "src")
    return env


def start_server(checkout: Path, tmp: str, name: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(tmp, f"{name}.sock")
    return start_serve_blk(sock, "0", env_for(checkout)), sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--parts", nargs="+", choices=("engine", "sync", "backend"), default=["engine", "sync", "backend"])
    ap.add_argument("--target", default=None, help="engine cells: this vhost-user target instead of the daemon")
    ap.add_argument("--old-extra", action="append", default=[], help="an option for OLD's pyvirtio bench (repeatable)")
    ap.add_argument("--new-extra", action="append", default=[], help="an option for NEW's pyvirtio bench (repeatable)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    extra = {"old": a.old_extra, "new": a.new_extra}
    revs = {"old": a.old.resolve(), "new": a.new.resolve()}
    for name, path in revs.items():
        if not (path / "src" / "pyvirtio").is_dir():
            raise SystemExit(f"{name}: {path} is not a pyvirtio checkout")
    tmp = tempfile.mkdtemp(prefix="pyvirtio-revisions-")
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, object]] = []
    try:
        qsock = ""
        if a.target is None or "sync" in a.parts:
            qsd, qsock = start_qsd(tmp, "0")
            procs.append(qsd)
        target = a.target or f"vhost-user:{qsock}"
        servers: dict[str, str] = {}
        if "backend" in a.parts:
            for name, path in revs.items():
                proc, sock = start_server(path, tmp, name)
                procs.append(proc)
                servers[name] = sock
        for r in range(a.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            cells: list[tuple[str, dict[str, list[str]]]] = []
            if "engine" in a.parts:
                for qd in a.depths:
                    ring = RINGS.get(qd, 1024)
                    cmd = [sys.executable, "-m", "pyvirtio", "bench", target, "--rw", "randread",
                           "--iodepth", str(qd), "--queue-size", str(ring), "--runtime", str(a.seconds),
                           "--json", "--no-progress"]
                    cells.append((f"engine qd{qd}", {n: [*cmd, *extra[n]] for n in order}))
            if "sync" in a.parts:
                cmd = [sys.executable, "-c", SYNC_LOOP, qsock, str(a.seconds)]
                cells.append(("sync readinto qd1", {n: cmd for n in order}))
            if "backend" in a.parts:
                for rw in ("randread", "randwrite"):
                    for qd in (1, 32):
                        per = {n: [sys.executable, str(STICKS / "raw_vhost_blk.py"), servers[n], "--qd", str(qd),
                                   "--rw", rw, "--seconds", str(a.seconds), "--json"] for n in order}
                        cells.append((f"backend {rw} qd{qd}", per))
            for cell, cmds in cells:
                for name in order:
                    env = None if cell.startswith("backend") else env_for(revs[name])  # backend: the stick
                    res = run_json(cmds[name], "1", env)
                    iops = float(res["iops"])  # type: ignore[arg-type]
                    rows.append({"round": r, "cell": cell, "rev": name, "iops": iops})
                    print(f"round {r} {cell:<24} {name:<3} {iops:>12,.0f} IOPS", file=sys.stderr)
    finally:
        for p in procs:
            stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, dict[str, object]] = {}
    for cell in dict.fromkeys(str(x["cell"]) for x in rows):
        got = {n: [float(x["iops"]) for x in rows if x["cell"] == cell and x["rev"] == n] for n in revs}  # type: ignore[arg-type]
        med = {n: statistics.median(v) for n, v in got.items()}
        best = {n: max(v) for n, v in got.items()}
        summary[cell] = {"old_median": round(med["old"]), "old_best": round(best["old"]),
                         "new_median": round(med["new"]), "new_best": round(best["new"]),
                         "ratio_median": round(med["new"] / med["old"], 3),
                         "ratio_best": round(best["new"] / best["old"], 3)}
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rows, "seconds": a.seconds,
                          "old": str(revs["old"]), "new": str(revs["new"])}))
        return
    print(f"\nold {revs['old']}  new {revs['new']}; {a.rounds} rounds x {a.seconds}s, interleaved, order rotated")
    print(f"{'cell':<26}{'old med/best':>24}{'new med/best':>24}  new/old med (best)")
    for cell, c in summary.items():
        print(f"{cell:<26}{c['old_median']:>12,}/{c['old_best']:<11,}{c['new_median']:>12,}/{c['new_best']:<11,}"
              f"  {c['ratio_median']} ({c['ratio_best']})")


if __name__ == "__main__":
    main()
