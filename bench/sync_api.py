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

With an SPDK build (``--spdk DIR``, ``$SPDK_BUILD``, or the usual places:
bench/spdk.py), SPDK's bdevperf at QD1 runs in the same rounds, and the
table adds each API's time per request (1 / IOPS: one request at a time)
over SPDK's mean latency: the one-request goal of issue 15 is <= 2.

Each run also counts the back end's sleeps per request (its threads'
voluntary context switches, as bench/compare.py does): a request that
finds the back end asleep pays its wake-up.

  python bench/sync_api.py [--rounds 3] [--seconds 2] [--spdk DIR | --no-spdk] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile

import spdk
from compare import REPO, STICKS, run_json, sleeps, spdk_runner, start_embedded, start_qsd

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
    ap.add_argument("--spdk", metavar="DIR", help="SPDK build folder (default: $SPDK_BUILD, then the usual places)")
    ap.add_argument("--no-spdk", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = None if a.no_spdk else spdk.find_build(a.spdk)
    if build is None and not a.no_spdk:
        print("note: no SPDK build found: no SPDK column", file=sys.stderr)
    spdk_run = spdk_runner(build) if build is not None else None
    tmp = tempfile.mkdtemp(prefix="pyvirtio-sync-api-")
    qsd, qsock = start_qsd(tmp, "0")
    emb, esock = start_embedded(tmp, "0")
    loop = LOOP.format(src=str(REPO / "src"))
    rows: list[dict[str, object]] = []
    try:
        for r in range(a.rounds):
            for device, sock, pid in (("qsd", qsock, qsd.pid), ("embedded", esock, emb.pid)):
                runs = {
                    "readinto": [sys.executable, "-c", loop, sock, str(a.seconds), "readinto"],
                    "fixed_io": [sys.executable, "-c", loop, sock, str(a.seconds), "fixed_io"],
                    "stick": [sys.executable, str(STICKS / "raw_vhost_blk.py"), sock, "--qd", "1",
                              "--seconds", str(a.seconds), "--json"],
                }
                order = list(runs) + (["spdk"] if spdk_run is not None else [])
                order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
                for who in order:
                    s0 = sleeps(pid)
                    if who == "spdk" and spdk_run is not None:
                        sp = spdk_run(sock, 1, 256, a.seconds)
                        res: dict[str, object] = {"iops": sp["iops"], "lat_us": sp["lat_us"]}
                    else:
                        res = run_json(runs[who], "1")
                    if res["iops"]:
                        res["sleeps_per_io"] = round((sleeps(pid) - s0) / (float(res["iops"]) * a.seconds), 4)  # type: ignore[arg-type]
                    rows.append({"round": r, "device": device, "who": who, **res})
                    print(f"round {r} {device:<9} {who:<9} {int(res['iops']):>9,} IOPS", file=sys.stderr)  # type: ignore[call-overload]
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
            mine = [x for x in rows if x["device"] == device and x["who"] == who and "sleeps_per_io" in x]
            sl = [float(x["sleeps_per_io"]) for x in mine]  # type: ignore[arg-type]
            if sl:
                got[who]["sleeps_per_io"] = round(statistics.median(sl), 3)  # type: ignore[assignment]
        for who in ("readinto", "fixed_io"):
            got[f"{who}_ratio"] = round(got[who]["median"] / got["stick"]["median"], 2)  # type: ignore[assignment]
        lats = [float(x["lat_us"]) for x in rows if x["device"] == device and x["who"] == "spdk"]  # type: ignore[arg-type]
        if lats:
            spdk_lat = statistics.median(lats)
            got["spdk_lat_us"] = round(spdk_lat, 2)  # type: ignore[assignment]
            for who in ("readinto", "fixed_io"):
                # one request at a time: the time per request is 1 / IOPS
                got[f"{who}_vs_spdk_lat"] = round(1e6 / got[who]["median"] / spdk_lat, 2)  # type: ignore[assignment]
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
        sl = "  ".join(f"{who} {got[who].get('sleeps_per_io', '-')}" for who in ("readinto", "fixed_io", "stick"))  # type: ignore[union-attr]
        print(f"{'':<9} back end sleeps per request (median): {sl}")
        if "spdk_lat_us" in got:
            print(f"{'':<9} SPDK QD1 mean latency {got['spdk_lat_us']} us; time per request over it: "
                  f"readinto {got['readinto_vs_spdk_lat']}, fixed_io {got['fixed_io_vs_spdk_lat']}")


if __name__ == "__main__":
    main()
