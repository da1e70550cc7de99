#!/usr/bin/env python3
"""Ring micro-benchmark: submit + reap of 3-buffer requests through the loopback device.

Each request is a virtio-blk-shaped chain: 16-byte header (readable), a
4 KiB data buffer (writable), a status byte (writable). The loopback device
pops each chain and completes it (handler returns the status byte only), so
the figure is the cost of both sides of the split ring in Python: driver
start/add/flush/reap with used-entry validation, plus the device's
bounded, address-checked chain walk.

  python bench/ring_ops.py [--seconds 2] [--batch 1 32 128] [--size 512] [--rounds 3] [--json]

Reports requests/s and ns/request per batch size (requests published per
kick and reaped per poll), median and best over the rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from pyvirtio import LoopbackTransport, VirtioDevice
from pyvirtio.ring.device_side import Chain


def _handler(index: int, chain: Chain) -> int:
    chain.writable[-1][0] = 0
    return 1


def run_once(size: int, batch: int, seconds: float, event_idx: bool) -> float:
    features = (1 << 32) | (1 << 28) | ((1 << 29) if event_idx else 0)
    t = LoopbackTransport(features=features, queue_size=size, default_handler=_handler, auto=False)
    with VirtioDevice("bench", t, pool_size=8 << 20) as dev:
        dev.reset(features)
        dev.start(1)
        q = dev.acquire(0)
        ring = q.ring
        hdr = dev.pool.allocate(16 * batch)
        data = dev.pool.allocate(4096 * batch)
        status = dev.pool.allocate(batch)
        reqs = [
            ((hdr.addr + 16 * i, 16, False), (data.addr + 4096 * i, 4096, True), (status.addr + i, 1, True))
            for i in range(batch)
        ]
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for i, bufs in enumerate(reqs):
                ring.submit(i, bufs)
            if q.flush():
                pass
            t.process(0)
            done += len(ring.reap())
            if time.perf_counter() > deadline:
                break
        dt = time.perf_counter() - t0
    return done / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-event-idx", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if max(a.batch) * 3 > a.size:
        ap.error(f"--batch {max(a.batch)} needs a queue of at least {3 * max(a.batch)} descriptors (--size)")
    results: dict[int, list[float]] = {b: [] for b in a.batch}
    for _ in range(a.rounds):  # interleave batch sizes round by round
        for b in a.batch:
            results[b].append(run_once(a.size, b, a.seconds, not a.no_event_idx))
    out = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "queue_size": a.size,
        "event_idx": not a.no_event_idx,
        "rounds": a.rounds,
        "seconds_per_run": a.seconds,
        "results": {
            str(b): {
                "median_rps": round(statistics.median(v)),
                "best_rps": round(max(v)),
                "median_ns_per_req": round(1e9 / statistics.median(v)),
                "best_ns_per_req": round(1e9 / max(v)),
            }
            for b, v in results.items()
        },
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"ring_ops: queue {a.size}, event_idx={not a.no_event_idx}, {a.rounds} rounds x {a.seconds}s")
    for b, r in out["results"].items():  # type: ignore[union-attr]
        print(
            f"  batch {b:>4}: median {r['median_rps']:>9,} req/s ({r['median_ns_per_req']} ns/req), "
            f"best {r['best_rps']:,} req/s ({r['best_ns_per_req']} ns/req)"
        )


if __name__ == "__main__":
    main()
