#!/usr/bin/env python3
"""Device-side instructions per request of the embedded block back end, split against packed.

``bench/instructions.py --inprocess`` counts driver and device together, and
``bench/fast_path_count.py`` the driver alone; this counts the *device* alone:
the serving loop of ``pyvirtio serve blk`` (``backends/datapath.py``'s
``DataPath``: suppress kicks, pop a batch, the model's ``handle`` per chain,
``add_used``, one ``flush_used``, re-arm and re-check), the device ring
(``ring/device_side.py`` / ``ring/device_packed.py``) and the block model,
on rings that a driver fills with blk-shaped chains (16-byte header, 4 KiB
data, status byte: randread of sector 0) through its batch fast path
(``FixedChains.cycle``, ``depth`` in flight, as many spares).

Each pass the driver takes one ``turn()`` and the device one kick's worth of
work (``wake`` + ``run`` with polling off, as the server does when a kick
wakes it). Only the device's work is collected: it runs inside
``contextvars.Context.run`` and callgrind collects inside ``context_run``
alone (``--collect-atstart=no --toggle-collect=context_run``). With
``--no-model`` the model's ``handle`` is a stub (one byte written, nothing
read), so the count is the serving loop and the device ring alone (and the
stub's call, the same for both formats). ``--inflight`` adds inflight
tracking (``serve blk --inflight``: INFLIGHT_SHMFD, ``backends/inflight.py``).

One run per cell: ``--warm`` passes first, not collected (they fill the
device rings' chain caches: a packed ring's chains land on other slots every
lap), then ``--passes`` collected ones; instructions per request = the
collected total over the requests the device completed in them.
Deterministic: no clock, no second process. The figures (issue 12):
docs/benchmarks.md §7, "The packed device side".

  python bench/device_count.py CHECKOUT [CHECKOUT...] [--depths 1 32] [--rings split packed] [--no-model] [--inflight]
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
import contextvars, dataclasses, os, sys
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.datapath import DataPath
from pyvirtio.backends.model import ModelHooks
from pyvirtio.backends.ringstate import RingState
from pyvirtio.memory import MemoryPool, MemoryTable
from pyvirtio.ring.device_side import open_device_ring
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue

fmt, depth, size, warm, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model, inflight = sys.argv[6] == "1", sys.argv[7] == "1"
pool = MemoryPool(64 << 20, name="device-count")
ring = (PackedQueue if fmt == "packed" else SplitQueue)(size, pool, event_idx=True)
nslots = min(2 * depth, size // 3)
bufs = [(pool.allocate(16), pool.allocate(4096), pool.allocate(1)) for _ in range(nslots)]
fc = FixedChains(ring, [[(h.addr, 16, False), (d.addr, 4096, True), (s.addr, 1, True)] for h, d, s in bufs])
fc.enable_interrupts()  # as BlockEngine with device_signals (its default)
cyc = fc.cycle(depth, lambda: None, vectorised=False)
a = ring.addresses()
table = MemoryTable.from_pool(pool)
base = ring.initial_base if fmt == "packed" else 0
tracker = None
if inflight:  # INFLIGHT_SHMFD (serve blk --inflight): started as the control plane starts a tracked ring
    from pyvirtio.backends.inflight import InflightArea, PackedQueueInflight
    tracker = InflightArea.create(1, size, fmt).queue(0, fmt)
    if isinstance(tracker, PackedQueueInflight):
        ring_bytes = table.gpa(a.desc, a.desc_size)
        base = tracker.recover(ring_bytes, size, base)
queue = open_device_ring(fmt, table, size, a.desc, a.driver, a.device, base=base, event_idx=True)
if tracker is not None:
    tracker.start(queue, ring_bytes) if fmt == "packed" else tracker.start(queue)
storage = Storage(size=1 << 20)
hooks = ModelHooks.of(BlockBackend(storage))
if not model:
    hooks = dataclasses.replace(hooks, handle=lambda _queue, _chain: 1)  # a stub: the status byte written
dp = DataPath(hooks, poll_us=0)
state = RingState(0)
state.queue = queue
state.inflight = tracker
state.call = os.eventfd(0, os.EFD_NONBLOCK)  # signalled when the driver's event suppression asks; nobody reads it

def serve():
    dp.wake(state)
    while state in dp.busy:
        dp.run()

turn = cyc.turn
for _ in range(warm):  # not collected: fills the device ring's chain cache (packed: one lap pair and more)
    turn()
    serve()
before, calls = dp.chains, dp.calls
run = contextvars.Context().run
for _ in range(passes):
    turn()
    run(serve)
print(dp.chains - before, dp.calls - calls)
"""


def count(
    checkout: Path, fmt: str, depth: int, warm: int, passes: int, model: bool, inflight: bool = False
) -> tuple[int, int, int]:
    """(instructions collected in the device's work, requests it completed, calls it signalled): measured passes."""
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg", "--collect-atstart=no",
               "--toggle-collect=context_run", sys.executable, "-c", CHILD, fmt, str(depth),
               str(RING_SIZES.get(depth, 1024)), str(warm), str(passes), "1" if model else "0",
               "1" if inflight else "0"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{checkout} {fmt}: {res.stderr.strip()[-800:]}")
    m = re.search(r"Collected\s*:\s*([\d,]+)", res.stderr)
    if m is None:
        raise SystemExit(f"no instruction count from callgrind: {res.stderr[-300:]}")
    requests, calls = res.stdout.split()[-2:]
    return int(m.group(1).replace(",", "")), int(requests), int(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", type=Path, nargs="+")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rings", nargs="+", choices=("split", "packed"), default=["split", "packed"])
    ap.add_argument("--warm", type=int, default=1200, help="passes run before counting (not collected)")
    ap.add_argument("--passes", type=int, default=400, help="passes counted")
    ap.add_argument("--no-model", action="store_true", help="leave the block model's handle out of the count")
    ap.add_argument("--inflight", action="store_true", help="with inflight tracking (serve blk --inflight)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = []
    for depth in a.depths:
        for checkout in a.checkouts:
            per_ring: dict[str, float] = {}
            for fmt in a.rings:
                instructions, requests, calls = count(
                    checkout, fmt, depth, a.warm, a.passes, not a.no_model, a.inflight
                )
                per = instructions / max(1, requests)
                per_ring[fmt] = per
                out.append({"checkout": str(checkout), "ring": fmt, "qd": depth, "model": not a.no_model,
                            "inflight": a.inflight, "requests": requests, "calls": calls,
                            "instructions_per_request": round(per)})
                print(f"qd {depth:>3} {fmt:>6} {checkout}: {per:,.0f} device instructions/request "
                      f"({requests} requests, {calls} call eventfd writes)", flush=True)
            if "split" in per_ring and "packed" in per_ring:
                ratio = per_ring["packed"] / per_ring["split"]
                print(f"qd {depth:>3} packed/split {checkout}: {ratio:.3f}", flush=True)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
