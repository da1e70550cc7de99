#!/usr/bin/env python3
"""Ring micro-benchmark: split against packed, submit + reap through the in-process device side.

Each request is a virtio-blk-shaped chain: 16-byte header (readable), a
4 KiB data buffer (writable), a status byte (writable). A batch of requests
is submitted through the ring API (:class:`~pyvirtio.ring.base.RingQueue`:
``submit`` per request, one ``flush``), the device side
(:class:`~pyvirtio.ring.base.DeviceRing`) pops each chain and uses it
(status byte only, as ``bench/ring_ops.py``'s loopback handler), one
``flush_used``, and the driver reaps the batch. Both sides run in this
process, so the figure is the cost of both halves of the ring in Python
(driver submit/flush/reap with used-entry validation, device bounded walk
with address checks), per request, in CPU time of this process.

  python bench/ring_formats.py [--seconds 1] [--batch 1 32 128] [--size 512] [--rounds 3] [--json]

Variants (interleaved round by round): ``split``, ``packed``,
``packed-in-order`` (VIRTIO_F_IN_ORDER: the device batches used
descriptors), ``split-in-order``. EVENT_IDX on unless --no-event-idx. Reports
ns/request (median and best over the rounds) and each variant's ratio to
split. Indicative only: run it on a quiet machine, old and new revisions
interleaved, for figures that matter (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from pyvirtio.testing import PackedRingPair, RingPair

VARIANTS = ("split", "packed", "packed-in-order", "split-in-order")


def run_once(variant: str, size: int, batch: int, seconds: float, event_idx: bool) -> float:
    """Requests per CPU second of one variant (process CPU time: steadier than wall time on a shared machine)."""
    cls = PackedRingPair if variant.startswith("packed") else RingPair
    with cls(size, event_idx=event_idx, in_order=variant.endswith("in-order"), region_size=8 << 20) as p:
        q, dev = p.driver, p.device
        hdr = p.buffer(16 * batch)
        data = p.buffer(4096 * batch)
        status = p.buffer(batch)
        reqs = [
            [(hdr.addr + 16 * i, 16, False), (data.addr + 4096 * i, 4096, True), (status.addr + i, 1, True)]
            for i in range(batch)
        ]
        submit, flush, reap = q.submit, q.flush, q.reap
        pop, add_used, flush_used = dev.pop, dev.add_used, dev.flush_used
        done = 0
        clock = time.process_time
        t0 = clock()
        deadline = t0 + seconds
        while True:
            for i, bufs in enumerate(reqs):
                submit(i, bufs)
            flush()
            while (chain := pop()) is not None:
                chain.writable[-1][0] = 0
                add_used(chain.head, 1)
            flush_used()
            done += len(reap())
            if clock() > deadline:
                break
        return done / (clock() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--no-event-idx", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if max(a.batch) * 3 > a.size:
        ap.error(f"--batch {max(a.batch)} needs a queue of at least {3 * max(a.batch)} descriptors (--size)")
    results: dict[tuple[str, int], list[float]] = {(v, b): [] for v in a.variants for b in a.batch}
    for _ in range(a.rounds):
        for b in a.batch:
            for v in a.variants:
                results[(v, b)].append(run_once(v, a.size, b, a.seconds, not a.no_event_idx))
    rows = {}
    for b in a.batch:
        for v in a.variants:
            vals = results[(v, b)]
            ref = results.get(("split", b), vals)
            rows[f"{v}/{b}"] = {
                "variant": v,
                "batch": b,
                "median_ns_per_req": round(1e9 / statistics.median(vals)),
                "best_ns_per_req": round(1e9 / max(vals)),
                "ratio_to_split_median": round(statistics.median(vals) / statistics.median(ref), 2),
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
    print(f"ring_formats: queue {a.size}, event_idx={not a.no_event_idx}, {a.rounds} rounds x {a.seconds} CPU s, "
          "driver and device side in this process")
    for r in rows.values():
        print(
            f"  {r['variant']:>16} batch {r['batch']:>4}: median {r['median_ns_per_req']:>6} ns/req "
            f"(best {r['best_ns_per_req']}), speed vs split {r['ratio_to_split_median']}"
        )


if __name__ == "__main__":
    main()
