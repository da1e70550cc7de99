#!/usr/bin/env python3
"""The one-request API's own cost: ``readinto`` / ``fixed_io`` on an in-process device.

Runs ``blk.readinto(offset, buf)`` (4 KiB, random offsets) and
``blk.fixed_io(buf).read(offset)`` against the embedded block model over
the loopback transport (the device side runs in the same thread when the
driver kicks: no second process, no sleep, no scheduler), so the time per
request is the driver's Python plus the model's, and a change to the
driver's path shows as a change in µs per request. With ``--src`` several
checkouts are timed in turn, interleaved round by round (old vs new).

``--callgrind`` counts instructions instead of timing (valgrind; for a
machine too busy to time on): for each call of ``--ops`` (``readinto``,
``read``, ``write`` of bytes, ``fixed_io`` reads), a loop of 1000 and of
3000 requests under callgrind; the difference over 2000 is the
instructions of one request (driver and device model), start-up cancelled
out.

  python bench/one_request.py [--src DIR ...] [--ring split|packed] [--rounds 5] [--n 20000]
                              [--callgrind [--ops OP ...]] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The loopback device and 4 KiB requests at ``n`` random offsets; argv: n, then "time" (print
#: µs per readinto and per fixed_io read as JSON) or "count" and an op (just that loop, for callgrind).
CHILD = r"""
import json, os, random, sys, time
from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.blk import VirtioBlk
storage = Storage(size=64 << 20)
dev = VirtioDevice("loopback", loopback_blk(BlockBackend(storage), queue_size=256), pool_size=8 << 20)
blk = VirtioBlk(dev, ring=os.environ.get("ONE_REQUEST_RING", "auto"))
buf = blk.allocate(4096, align=4096)
n = int(sys.argv[1])
random.seed(1)
offs = [random.randrange(blk.capacity // 4096) * 4096 for _ in range(n)]
if sys.argv[2] == "count":
    op = sys.argv[3]
    if op == "readinto":
        for o in offs:
            blk.readinto(o, buf)
    elif op == "read":
        for o in offs:
            blk.read(o, 4096)
    elif op == "write":
        data = bytes(4096)
        for o in offs:
            blk.write(o, data)
    elif op == "fixed_io":
        io = blk.fixed_io(buf)
        for o in offs:
            io.read(o)
        io.close()
    else:
        sys.exit(f"unknown op {op}")
    sys.exit(0)
out = {}
for _ in range(2):
    t0 = time.perf_counter_ns()
    for o in offs:
        blk.readinto(o, buf)
    out["readinto_us"] = (time.perf_counter_ns() - t0) / n / 1e3
    io = blk.fixed_io(buf)
    t0 = time.perf_counter_ns()
    for o in offs:
        io.read(o)
    out["fixed_io_us"] = (time.perf_counter_ns() - t0) / n / 1e3
    io.close()
blk.close()
storage.close()
print(json.dumps(out))
"""


#: What ``--callgrind`` can count: one loop each.
OPS = ("readinto", "read", "write", "fixed_io")


def instructions(src: str, n: int, op: str = "readinto", ring: str = "auto") -> int:
    """Instructions callgrind counts for a loop of ``n`` ``op`` requests (whole process)."""
    env = dict(os.environ, PYTHONPATH=str(Path(src) / "src"), ONE_REQUEST_RING=ring)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg",
                              sys.executable, "-c", CHILD, str(n), "count", op],
                             capture_output=True, text=True, env=env, timeout=1800, check=True)
    m = re.search(r"refs:\s*([\d,]+)", out.stderr)
    if m is None:
        raise SystemExit(f"no instruction count from callgrind: {out.stderr[-300:]}")
    return int(m.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", nargs="+", default=[str(REPO)], help="checkouts to time (their src/ is imported)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--callgrind", action="store_true", help="count instructions per request instead of timing")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the calls --callgrind counts")
    ap.add_argument("--ring", choices=("auto", "split", "packed"), default="auto", help="the ring format")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.callgrind:
        per = {
            (src, op): (instructions(src, 3000, op, a.ring) - instructions(src, 1000, op, a.ring)) / 2000
            for op in a.ops
            for src in a.src
        }
        if a.json:
            print(json.dumps({f"{src} {op}": ir for (src, op), ir in per.items()}))
            return
        print("instructions per request (driver + loopback device)")
        for (src, op), ir in per.items():
            print(f"{src:<40} {op:<9} {ir:>9,.0f}")
        if len(a.src) == 2:
            for op in a.ops:
                print(f"{op:<9} new/old {per[a.src[1], op] / per[a.src[0], op]:.3f}")
        return
    rows: dict[str, dict[str, list[float]]] = {s: {} for s in a.src}
    for r in range(a.rounds):
        order = a.src[r % len(a.src):] + a.src[: r % len(a.src)]
        for src in order:
            env = dict(os.environ, PYTHONPATH=str(Path(src) / "src"), ONE_REQUEST_RING=a.ring)
            out = subprocess.run([sys.executable, "-c", CHILD, str(a.n), "time"], capture_output=True, text=True,
                                 env=env, timeout=600, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            for k, v in res.items():
                rows[src].setdefault(k, []).append(v)
            print(f"round {r} {src}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), file=sys.stderr)
    summary = {src: {k: {"median": round(statistics.median(v), 2), "best": round(min(v), 2)} for k, v in d.items()}
               for src, d in rows.items()}
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rows}))
        return
    print(f"\nµs per 4 KiB read on the loopback device, {a.rounds} rounds x {a.n} (median / best)")
    for src, d in summary.items():
        print(f"{src:<40} " + "   ".join(f"{k} {c['median']:.2f} / {c['best']:.2f}" for k, c in d.items()))
    if len(a.src) == 2:
        old, new = (summary[s] for s in a.src)
        for k in old:
            print(f"{k}: new/old {new[k]['median'] / old[k]['median']:.3f} (median)")


if __name__ == "__main__":
    main()
