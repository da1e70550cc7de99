#!/usr/bin/env python3
"""Does SPDK's cache-line trimming of used-ring reaps help in Python?

SPDK (after DPDK) trims each reap of more than 4 used entries so that the
consumer index ends on a multiple of 4 ("descriptors per cache line"). This
runs a fixed-chain QD32 4k random-read loop against a vhost-user-blk socket
with and without the trim, interleaved, and prints median and best IOPS.

  python bench/reap_trim.py SOCKET [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.ring.fixed import FixedChains


def run(sock: str, trim: bool, seconds: float, qd: int = 32) -> float:
    with VirtioBlk.open(f"vhost-user:{sock}", queue_size=256, num_queues=1) as blk:
        ring = blk.thread_queue().vq.ring
        pool = blk.pool
        hdr, st, data = pool.allocate(16 * qd), pool.allocate(qd), pool.allocate(4096 * qd, align=4096)
        fx = FixedChains(
            ring, [[(hdr.addr + 16 * s, 16, False), (data.addr + 4096 * s, 4096, True), (st.addr + s, 1, True)]
                   for s in range(qd)]
        )
        kick = blk.device.transport.notifier(0)
        h64, u16 = hdr.view.cast("Q"), ring._used16
        span = blk.capacity // 4096
        free, done = list(range(qd)), 0
        gc.disable()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            if free:
                for s in free:
                    h64[2 * s + 1] = random.randrange(span) * 8
                if fx.post(free):
                    kick()
            n = (u16[1] - ring.last_used) & 0xFFFF
            if trim and n > 4:
                n -= (ring.last_used + n) % 4
            free = fx.reap_slots(n) if n else []
            done += len(free)
        dt = time.perf_counter() - t0
        while fx.n_inflight:
            fx.reap_slots()
        gc.enable()
        fx.detach()
        return done / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    res: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.rounds):
        for trim in (r % 2 == 0, r % 2 == 1):
            res[trim].append(run(a.socket, trim, a.seconds))
    for trim in (False, True):
        v = res[trim]
        print(f"{'trim to x4' if trim else 'reap all  '}: median {statistics.median(v) / 1e3:,.0f}k  "
              f"best {max(v) / 1e3:,.0f}k IOPS")


if __name__ == "__main__":
    main()
