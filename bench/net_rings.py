#!/usr/bin/env python3
"""Packed against split on dpdk-testpmd's vhost PMD, virtio-net (issue 12): same back end, interleaved rounds.

One dpdk-testpmd with the vhost PMD per mode (rxonly when pyvirtio
transmits, txonly when it receives; its lcores on CPU 0), as
``bench/compare_dpdk.py`` starts it; the client is ``pyvirtio net bench
--mode tx|rx --size 64`` on CPU 1 with ``--ring split`` or ``--ring packed``
(the vhost PMD offers RING_PACKED), the order alternating round by round.
The instrument is the vhost side's own packets-per-second counter (the same
for both rings), pyvirtio's count printed beside it as a check.

  python bench/net_rings.py [--modes tx,rx] [--rounds 4] [--seconds 3] [--size 64] [--queue-size 1024] [--json]

Prints per mode the median and best of each ring, packed/split of the
medians, and the median of the per-round ratios (packed against the split
run next to it).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile

from compare_dpdk import Vhost, arguments, run_pyvirtio

RINGS = ("split", "packed")


def summarise(rows: list[dict]) -> dict:
    """Per ring the median and best packets/s; packed/split of the medians and the median of the rounds' ratios."""
    split = [r["split"]["pps"] for r in rows]
    packed = [r["packed"]["pps"] for r in rows]
    paired = [p / s for p, s in zip(packed, split, strict=True) if s]
    return {
        "split_median": statistics.median(split), "split_best": max(split),
        "packed_median": statistics.median(packed), "packed_best": max(packed),
        "ratio_median": statistics.median(packed) / statistics.median(split) if statistics.median(split) else None,
        "ratio_paired": statistics.median(paired) if paired else None,
        "rounds": rows,
    }


def main() -> int:
    a, report = arguments(__doc__, 3.0)
    for mode in a.modes.split(","):
        tmp = tempfile.mkdtemp(prefix="netrings", dir="/tmp")
        vhost = Vhost(mode, tmp)
        rows: list[dict] = []
        try:
            for rnd in range(a.rounds):
                row = {}
                for ring in RINGS if rnd % 2 == 0 else RINGS[::-1]:
                    row[ring] = run_pyvirtio(mode, vhost, a.seconds, a.size, a.queue_size, ["--ring", ring])
                rows.append(row)
                if not a.json:
                    s, p = row["split"]["pps"], row["packed"]["pps"]
                    print(f"{mode} round {rnd + 1}: split {s / 1e6:6.2f} Mpps   packed {p / 1e6:6.2f} Mpps   "
                          f"(own counts {row['split']['own_pps'] / 1e6:.2f} / {row['packed']['own_pps'] / 1e6:.2f})   "
                          f"packed/split {p / s if s else float('nan'):.3f}", flush=True)
        finally:
            vhost.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        summary = summarise(rows)
        report["modes"][mode] = summary
        if not a.json:
            print(f"{mode}: split median {summary['split_median'] / 1e6:.2f}"
                  f" best {summary['split_best'] / 1e6:.2f} Mpps;"
                  f" packed median {summary['packed_median'] / 1e6:.2f} best {summary['packed_best'] / 1e6:.2f} Mpps;"
                  f" packed/split {summary['ratio_median']:.3f} (paired {summary['ratio_paired']:.3f})")
    if a.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
