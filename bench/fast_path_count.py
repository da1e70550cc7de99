#!/usr/bin/env python3
"""Driver-side instructions per I/O of the rings' batch fast path (``FixedChains.cycle``), split against packed.

The in-process engine counts (``bench/instructions.py --inprocess``) include
the device model, whose packed and split sides are different code, so they
cannot say how close the two *driver* fast paths are. Here the device is a
scripted one, the same few stores per completion for both formats: it takes
every chain published since its last look, in order, and writes one used
entry per chain (split: id and length in the used ring, one used index store
per pass; packed: length, id and flags in the used descriptor at its used
position), through views of one field per entry (no index arithmetic
beyond a mask). An engine-like loop runs one ``turn()`` per pass and the device
after it (a kick is a no-op), every chain blk-shaped (16-byte header, 4 KiB
data, status byte), ``depth`` in flight with as many spares as the block
engine keeps (``vectorised`` above QD 128, as its ``auto`` mode).

Each cell runs twice under ``valgrind --tool=callgrind`` (a short and a long
run, ``--passes``); instructions per I/O = difference of the instruction
totals over the difference of the I/Os, so start-up cancels out. The
scripted device's share is in the figure (a handful of stores per I/O for
both formats). Counts, not timings: run it anywhere.

  python bench/fast_path_count.py CHECKOUT [CHECKOUT...] [--depths 1 32 256] [--rings split packed]

Each CHECKOUT's ``src`` is imported (e.g. main before and after a change).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RING_SIZES = {1: 256, 32: 256, 128: 512, 256: 1024}  # as bench/compare.py's RINGS

CHILD = r"""
import sys
from pyvirtio.memory import MemoryPool
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue

fmt, depth, size, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pool = MemoryPool(64 << 20, name="fast-path-count")
ring = (PackedQueue if fmt == "packed" else SplitQueue)(size, pool, event_idx=True)
nslots = min(2 * depth, size // 3)
bufs = [(pool.allocate(16), pool.allocate(4096), pool.allocate(1)) for _ in range(nslots)]
fc = FixedChains(ring, [[(h.addr, 16, False), (d.addr, 4096, True), (s.addr, 1, True)] for h, d, s in bufs])
cyc = fc.cycle(depth, lambda: None, vectorised=depth > 128)
a = ring.addresses()
if fmt == "packed":
    fl = pool.translate(a.desc, a.desc_size).cast("H")[7::8]  # one field of every descriptor, by ring slot
    ids = pool.translate(a.desc, a.desc_size).cast("H")[6::8]
    lens = pool.translate(a.desc, a.desc_size).cast("I")[2::4]
    st = [0, 1, 0, 1]  # avail pos, avail wrap, used pos, used wrap

    def device() -> int:
        pos, aw, upos, uw = st
        n = 0
        while True:
            if fl[pos] & 0x8080 != (0x80 if aw else 0x8000):  # available: AVAIL = wrap, USED = !wrap
                break
            bid = ids[pos]
            pos += 3
            if pos >= size:
                pos -= size
                aw ^= 1
            lens[upos] = 1
            ids[upos] = bid
            fl[upos] = (0x8080 if uw else 0) | 2  # used, VIRTQ_DESC_F_WRITE
            upos += 3
            if upos >= size:
                upos -= size
                uw ^= 1
            n += 1
        st[:] = [pos, aw, upos, uw]
        return n
else:
    avail = pool.translate(a.driver, a.driver_size).cast("H")
    ring16 = avail[2 : 2 + size]
    used16 = pool.translate(a.device, a.device_size).cast("H")
    used32 = pool.translate(a.device, a.device_size - (a.device_size % 4)).cast("I")
    uids, ulens = used32[1::2], used32[2::2]
    mask = size - 1
    st = [0]

    def device() -> int:
        last = st[0]
        idx = avail[1]
        n = (idx - last) & 0xFFFF
        u = used16[1]
        for _ in range(n):
            i = u & mask
            uids[i] = ring16[last & mask]
            ulens[i] = 1
            u = (u + 1) & 0xFFFF
            last = (last + 1) & 0xFFFF
        used16[1] = u
        st[0] = last
        return n

ios = 0
turn = cyc.turn
for _ in range(passes):
    done = turn()
    if done is not None:
        ios += len(done)
    device()
print(ios)
"""


def count(checkout: Path, fmt: str, depth: int, passes: int) -> tuple[int, int]:
    """(instructions, I/Os) of one run under callgrind."""
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg", sys.executable, "-c", CHILD,
               fmt, str(depth), str(RING_SIZES.get(depth, 1024)), str(passes)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{checkout} {fmt}: {res.stderr.strip()[-800:]}")
    m = re.search(r"refs:\s*([\d,]+)", res.stderr)
    if m is None:
        raise SystemExit(f"no instruction count from callgrind: {res.stderr[-300:]}")
    return int(m.group(1).replace(",", "")), int(res.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", type=Path, nargs="+")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--rings", nargs="+", choices=("split", "packed"), default=["split", "packed"])
    ap.add_argument("--passes", type=int, nargs=2, default=[2000, 6000], metavar=("SHORT", "LONG"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = []
    for depth in a.depths:
        for checkout in a.checkouts:
            for fmt in a.rings:
                i1, n1 = count(checkout, fmt, depth, a.passes[0])
                i2, n2 = count(checkout, fmt, depth, a.passes[1])
                per = (i2 - i1) / (n2 - n1)
                out.append({"checkout": str(checkout), "ring": fmt, "qd": depth, "instructions_per_io": per})
                print(f"qd {depth:>3} {fmt:>6} {checkout}: {per:,.0f} instructions/I/O", flush=True)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
