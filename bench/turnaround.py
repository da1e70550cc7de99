#!/usr/bin/env python3
"""What one QD1 turnaround costs at minimum: from a completion seen to the kick, in C and in CPython.

At QD1 against a back end that does not poll (qemu-storage-daemon), the
client's turnaround (used index seen moving -> next request published ->
kick decision -> eventfd write) is on the round trip twice over: it adds
its own time, and the longer it is the more often the back end's thread
has gone to sleep before the kick comes (docs/benchmarks.md §1.2, §8).
This measures that turnaround with no device at all, on a ring in process
memory, so the figures are the client's alone:

* ``c``: the sequence in C (gcc -O2): used index read, one avail entry and
  the avail index stored, a full fence, avail_event read and the EVENT_IDX
  test, an eventfd write. What SPDK's initiator does per request at QD1,
  minus its bdev layers.
* ``python_minimal``: the same sequence in CPython with every name a local
  (the floor for any Python client; the pure-Python measuring stick is
  shaped like it).
* ``pyvirtio_turn``: :meth:`SplitCycle.turn <pyvirtio.ring.cycle_split.SplitCycle.turn>`
  of this checkout, a completion waiting when it is called; time from the
  call to the return of the eventfd write in the notify callback (the
  validation and booking after the kick are not counted; the callback's
  own Python call, ~50 ns, is).
* ``eventfd_write``: the syscall alone, from Python.

Each in rounds, interleaved; prints the median and best ns per turnaround.

  python bench/turnaround.py [--rounds 5] [--n 200000] [--src CHECKOUT] [--json]

``--src`` times another checkout's ``turn`` (default: this one).
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

C_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
static volatile uint16_t avail[2 + 256 + 1];
static volatile uint16_t used[2 + 512 + 1];
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int fd = eventfd(0, EFD_NONBLOCK);
    uint16_t idx = 0, last = 0, kick_from = 0;
    long kicks = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        used[1] = (uint16_t)(last + 1);      /* the "device" completes one */
        used[2 + 512] = idx;                 /* and asks for the next kick (avail_event) */
        uint16_t nn = (uint16_t)(used[1] - last);
        if (nn) {
            avail[2 + (idx & 255)] = (uint16_t)i;
            idx++;
            avail[1] = idx;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if ((uint16_t)(idx - used[2 + 512] - 1) < (uint16_t)(idx - kick_from)) {
                uint64_t one = 1;
                if (write(fd, &one, 8) != 8) { uint64_t x; if (read(fd, &x, 8) < 0) return 1; }
                kicks++;
            }
            kick_from = idx;
            last = (uint16_t)(last + nn);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (kicks != n) return 2;
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
"""


def python_minimal(n: int) -> float:
    """The C sequence in CPython, every name a local; minus the fake device's own stores."""
    import threading

    fd = os.eventfd(0, os.EFD_NONBLOCK)
    avail = memoryview(bytearray(2 * (2 + 256 + 1))).cast("H")
    used = memoryview(bytearray(2 * (2 + 512 + 1))).cast("H")
    lock = threading.Lock()
    acquire, release = lock.acquire, lock.release
    ew = os.eventfd_write
    ae = 2 + 512
    perf = time.perf_counter_ns

    def run(turnaround: bool) -> int:
        idx = last = kick_from = 0
        t0 = perf()
        for i in range(n):
            used[1] = (last + 1) & 0xFFFF
            used[ae] = idx
            nn = (used[1] - last) & 0xFFFF
            if turnaround and nn:
                avail[2 + (idx & 255)] = i & 0xFFFF
                idx = (idx + 1) & 0xFFFF
                avail[1] = idx
                acquire()
                release()
                if ((idx - used[ae] - 1) & 0xFFFF) < ((idx - kick_from) & 0xFFFF):
                    ew(fd, 1)
                kick_from = idx
            last = (last + nn) & 0xFFFF
        return perf() - t0

    try:
        return (run(True) - run(False)) / n
    finally:
        os.close(fd)


def eventfd_write(n: int) -> float:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    ew = os.eventfd_write
    perf = time.perf_counter_ns
    try:
        t0 = perf()
        for _ in range(n):
            ew(fd, 1)
        return (perf() - t0) / n
    finally:
        os.close(fd)


def pyvirtio_turn(n: int) -> float:
    """SplitCycle.turn with one completion waiting: ns from the call to the kick written (median)."""
    from pyvirtio.ring.fixed import FixedChains
    from pyvirtio.testing import HostileDevice, RingPair

    perf = time.perf_counter_ns
    p = RingPair(256, event_idx=True)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        shapes = []
        for _ in range(2):
            hdr, data, st = p.buffer(16), p.buffer(4096), p.buffer(1)
            shapes.append([(hdr.addr, 16, False), (data.addr, 4096, True), (st.addr, 1, True)])
        fc = FixedChains(p.driver, shapes)
        stamp = [0]
        ew = os.eventfd_write

        def notify() -> None:
            ew(fd, 1)
            stamp[0] = perf()

        cyc = fc.cycle(1, notify)
        cyc.turn()
        dev = HostileDevice(p.driver, p.pool)
        calib = []
        for _ in range(1000):
            t0 = perf()
            calib.append(perf() - t0)
        c = statistics.median(calib)  # what the two clock reads add
        took = []
        heads = fc.heads
        for _ in range(min(n, 50000)):
            dev.complete((heads[int(cyc.posted[0])], 4096))
            dev.avail_event = dev.avail_idx  # the device asks for the next kick (what it reads in the ring)
            stamp[0] = 0
            t0 = perf()
            cyc.turn()
            if not stamp[0]:
                raise SystemExit("the cycle did not kick")
            took.append(stamp[0] - t0)
        return statistics.median(took) - c
    finally:
        os.close(fd)
        p.close()


def c_turnaround(binary: Path, n: int) -> float:
    out = subprocess.run([str(binary), str(n)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--src", type=Path, default=REPO, help="the checkout whose SplitCycle.turn is timed")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(a.src / "src"))
    runs = {"python_minimal": python_minimal, "pyvirtio_turn": pyvirtio_turn, "eventfd_write": eventfd_write}
    tmp = tempfile.mkdtemp(prefix="pyvirtio-turnaround-")
    try:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            print("note: no C compiler: no C column", file=sys.stderr)
        else:
            src = Path(tmp) / "turnaround.c"
            src.write_text(C_SOURCE)
            binary = Path(tmp) / "turnaround"
            subprocess.run([cc, "-O2", "-o", str(binary), str(src)], check=True)
            runs = {"c": lambda n: c_turnaround(binary, n), **runs}
        got: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(a.rounds):
            order = list(runs)
            order = order[r % len(order) :] + order[: r % len(order)]
            for k in order:
                got[k].append(runs[k](a.n))
                print(f"round {r} {k:<15} {got[k][-1]:8.1f} ns", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {k: {"median_ns": round(statistics.median(v), 1), "best_ns": round(min(v), 1)} for k, v in got.items()}
    if a.json:
        print(json.dumps({"summary": summary, "rounds": got, "n": a.n}))
        return
    print(f"\nns per turnaround (completion seen -> kick written), {a.rounds} rounds, median / best")
    for k, v in summary.items():
        print(f"  {k:<15} {v['median_ns']:8.1f} / {v['best_ns']:8.1f}")


if __name__ == "__main__":
    main()
