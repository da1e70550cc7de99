#!/usr/bin/env python3
"""The one-request-at-a-time APIs (``readinto``, ``fixed_io``) vs. the pure-Python stick at QD1.

``blk.read()`` / ``blk.readinto()`` in a loop is how most programs will use
pyvirtio; the bench engine is not. This runs, pinned to CPU 1 and
interleaved round by round, a loop of ``readinto`` of 4 KiB at random
offsets, the same with ``blk.fixed_io(buf).read`` (this checkout) and
``raw_vhost_blk.py --qd 1`` against
qemu-storage-daemon (null-co, does not poll) and the embedded back end
(polls 50 us before sleeping), both pinned to CPU 0. Prints median and best
kIOPS and the ratio to the stick.

  python bench/sync_api.py [--rounds 3] [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile

from compare import REPO, STICKS, run_json, start_embedded, start_qsd

LOOP = """
import json, random, sys, time
sys.path.insert(0, {src!r})
from pyvirtio.drivers.blk import VirtioBlk
blk = VirtioBlk.open("vhost-user:" + sys.argv[1])
buf = blk.allocate(4096, align=4096)
blocks = blk.capacity // 4096
rr = random.randrange
io = blk.fixed_io(buf) if sys.argv[3] == "fixed_io" else None
n = 0
t0 = time.perf_counter()
deadline = t0 + float(sys.argv[2])
while time.perf_counter() < deadline:
    if io is None:
        for _ in range(64):
            blk.readinto(rr(blocks) * 4096, buf)
    else:
        for _ in range(64):
            io.read(rr(blocks) * 4096)
    n += 64
dt = time.perf_counter() - t0
if io is not None:
    io.close()
blk.close()
print(json.dumps({{"iops": round(n / dt)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pyvirtio-sync-api-")
    qsd, qsock = start_qsd(tmp, "0")
    emb, esock = start_embedded(tmp, "0")
    loop = LOOP.format(src=str(REPO / "src"))
    rows: list[dict[str, object]] = []
    try:
        for r in range(a.rounds):
            for device, sock in (("qsd", qsock), ("embedded", esock)):
                runs = {
                    "readinto": [sys.executable, "-c", loop, sock, str(a.seconds), "readinto"],
                    "fixed_io": [sys.executable, "-c", loop, sock, str(a.seconds), "fixed_io"],
                    "stick": [sys.executable, str(STICKS / "raw_vhost_blk.py"), sock, "--qd", "1",
                              "--seconds", str(a.seconds), "--json"],
                }
                order = list(runs)
                order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
                for who in order:
                    res = run_json(runs[who], "1")
                    rows.append({"round": r, "device": device, "who": who, "iops": res["iops"]})
                    print(f"round {r} {device:<9} {who:<9} {int(res['iops']):>9,} IOPS", file=sys.stderr)
    finally:
        for proc in (qsd, emb):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for device in ("qsd", "embedded"):
        got = {}
        for who in ("readinto", "fixed_io", "stick"):
            v = [float(x["iops"]) for x in rows if x["device"] == device and x["who"] == who]  # type: ignore[arg-type]
            got[who] = {"median": round(statistics.median(v)), "best": round(max(v))}
        for who in ("readinto", "fixed_io"):
            got[f"{who}_ratio"] = round(got[who]["median"] / got["stick"]["median"], 2)  # type: ignore[assignment]
        summary[device] = got
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rows, "seconds": a.seconds}))
        return
    print(f"\n4k random reads, one at a time, vs raw_vhost_blk.py --qd 1; {a.rounds} rounds x {a.seconds}s")
    for device, got in summary.items():
        cells = "   ".join(
            f"{who} {got[who]['median'] / 1e3:.1f}k (best {got[who]['best'] / 1e3:.1f}k)"  # type: ignore[index]
            for who in ("readinto", "fixed_io", "stick")
        )
        print(f"{device:<9} {cells}   ratios {got['readinto_ratio']} / {got['fixed_io_ratio']}")


if __name__ == "__main__":
    main()
