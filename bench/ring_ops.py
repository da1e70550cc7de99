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
kick and reaped per poll), median and best over the rounds, for three
driver-side variants over the same device (see ``run_once``), and each one's
ratio to the bare ``raw`` reference loop measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from pyvirtio import LoopbackTransport, VirtioDevice
from pyvirtio.ring.device_side import Chain
from pyvirtio.ring.fixed import FixedChains


def _handler(index: int, chain: Chain) -> int:
    chain.writable[-1][0] = 0
    return 1


def run_once(size: int, batch: int, seconds: float, event_idx: bool, variant: str = "submit") -> float:
    """requests/s of one variant.

    ``submit``: SplitQueue.submit per request (validated reap), the general API;
    ``fixed``: FixedChains post/reap_slots, the batch engine's ring;
    ``raw``: the reference, a bare loop over the same ring memory in the style
    of ../shared/bench/raw_vhost_blk.py (pre-linked chains, no checks at all).
    The device side is the same loopback DeviceQueue for all three.
    """
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
        if variant == "submit":
            while True:
                for i, bufs in enumerate(reqs):
                    ring.submit(i, bufs)
                q.flush()
                t.process(0)
                done += len(ring.reap())
                if time.perf_counter() > deadline:
                    break
        elif variant == "fixed":
            fixed = FixedChains(ring, reqs)
            slots = list(range(batch))
            while True:
                fixed.post(slots)
                t.process(0)
                slots = fixed.reap_slots()
                done += len(slots)
                if time.perf_counter() > deadline:
                    break
        else:
            fixed = FixedChains(ring, reqs)  # only to lay out the chains
            heads = fixed.heads
            a16, u16, u32 = ring._avail16, ring._used16, ring._used32
            mask = size - 1
            slot_of = fixed.slot_of
            avail_idx = used = 0
            free = list(range(batch))
            while True:
                for s in free:
                    a16[2 + (avail_idx & mask)] = heads[s]
                    avail_idx = (avail_idx + 1) & 0xFFFF
                a16[1] = avail_idx
                t.process(0)
                free = []
                head = u16[1]
                while used != head:
                    free.append(slot_of[u32[1 + 2 * (used & mask)]])
                    used = (used + 1) & 0xFFFF
                done += len(free)
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
    variants = ("raw", "submit", "fixed")
    results: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants for b in a.batch}
    for _ in range(a.rounds):  # interleave variants and batch sizes round by round
        for b in a.batch:
            for v in variants:
                results[(v, b)].append(run_once(a.size, b, a.seconds, not a.no_event_idx, v))
    rows = {}
    for b in a.batch:
        for v in variants:
            vals = results[(v, b)]
            ref = results[("raw", b)]
            rows[f"{v}/{b}"] = {
                "variant": v,
                "batch": b,
                "median_rps": round(statistics.median(vals)),
                "best_rps": round(max(vals)),
                "median_ns_per_req": round(1e9 / statistics.median(vals)),
                "ratio_to_raw_median": round(statistics.median(vals) / statistics.median(ref), 2),
                "ratio_to_raw_best": round(max(vals) / max(ref), 2),
            }
    out = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "queue_size": a.size,
        "event_idx": not a.no_event_idx,
        "rounds": a.rounds,
        "seconds_per_run": a.seconds,
        "results": rows,
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"ring_ops: queue {a.size}, event_idx={not a.no_event_idx}, {a.rounds} rounds x {a.seconds}s, "
          "device = loopback DeviceQueue (both sides in this process)")
    for r in rows.values():
        print(
            f"  {r['variant']:>6} batch {r['batch']:>4}: median {r['median_rps']:>9,} req/s "
            f"({r['median_ns_per_req']} ns/req), best {r['best_rps']:,}; vs raw {r['ratio_to_raw_median']} "
            f"(best {r['ratio_to_raw_best']})"
        )


if __name__ == "__main__":
    main()
