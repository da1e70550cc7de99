#!/usr/bin/env python3
"""The embedded back end vs. qemu-storage-daemon, judged by clients that are not ours.

Starts ``pyvirtio serve blk`` (RAM disk) and qemu-storage-daemon (null-co),
both pinned to CPU 0, and runs clients pinned to CPU 1 against each,
interleaved round by round, for randread and randwrite at QD1 and QD32:

  * ../shared/bench/raw_vhost_blk.py (the pure-Python stick),
  * SPDK's bdevperf over bdev_virtio (a C frontend), when a build is found
    (``--spdk DIR``, ``$SPDK_BUILD``, or the usual places: bench/spdk.py).

Prints median and best kIOPS of each pair and the ratio embedded / qsd per
client.

  python bench/backend_compare.py [--rounds 3] [--seconds 3] [--spdk DIR | --no-spdk] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable

import spdk
from compare import Result, spdk_runner, start_embedded, start_qsd, stick_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--spdk", metavar="DIR", help="SPDK build folder (default: $SPDK_BUILD, then the usual places)")
    ap.add_argument("--no-spdk", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = None if a.no_spdk else spdk.find_build(a.spdk)
    if build is None and not a.no_spdk:
        print("note: no SPDK build found: the stick is the only client", file=sys.stderr)
    clients: dict[str, Callable[..., Result]] = {
        "stick": lambda *x, **k: stick_run("raw_vhost_blk.py", *x, **k),
    }
    if build is not None:
        clients["spdk"] = spdk_runner(build)
    tmp = tempfile.mkdtemp(prefix="pyvirtio-backend-compare-")
    qsd, qsock = start_qsd(tmp, "0")
    emb, esock = start_embedded(tmp, "0")
    rows: list[dict[str, object]] = []
    try:
        for r in range(a.rounds):
            for rw in ("randread", "randwrite"):
                for qd in (1, 32):
                    for client, run in clients.items():
                        pair = [("embedded", esock), ("qsd", qsock)]
                        if r % 2:
                            pair.reverse()
                        for who, sock in pair:
                            res = run(sock, qd, 256, a.seconds, rw)
                            rows.append({"round": r, "rw": rw, "qd": qd, "client": client, "who": who, **res})
                            print(f"round {r} {rw:<9} qd {qd:>2} {client:<5} {who:<8} {int(res['iops']):>10,} IOPS",
                                  file=sys.stderr)
    finally:
        for p in (emb, qsd):
            p.send_signal(signal.SIGTERM)
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for client in clients:
        for rw in ("randread", "randwrite"):
            for qd in (1, 32):
                cell: dict[str, object] = {}
                for who in ("embedded", "qsd"):
                    v = [float(x["iops"]) for x in rows  # type: ignore[arg-type]
                         if x["rw"] == rw and x["qd"] == qd and x["who"] == who and x["client"] == client]
                    cell[who] = {"median": round(statistics.median(v)), "best": round(max(v))}
                e, q = cell["embedded"], cell["qsd"]
                cell["ratio_median"] = round(e["median"] / q["median"], 3)  # type: ignore[index]
                cell["ratio_best"] = round(e["best"] / q["best"], 3)  # type: ignore[index]
                summary[f"{client}/{rw}/qd{qd}"] = cell
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rows, "seconds": a.seconds}))
        return
    print(f"\nclients: {', '.join(clients)}; {a.rounds} rounds x {a.seconds}s; back ends on CPU 0, client on CPU 1")
    for key, c in summary.items():
        e, q = c["embedded"], c["qsd"]
        print(f"{key:<22} embedded {e['median'] / 1e3:>7.1f}k (best {e['best'] / 1e3:.1f}k)   "  # type: ignore[index]
              f"qsd {q['median'] / 1e3:>8.1f}k (best {q['best'] / 1e3:.1f}k)   "  # type: ignore[index]
              f"ratio {c['ratio_median']} (best {c['ratio_best']})")


if __name__ == "__main__":
    main()
