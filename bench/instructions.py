#!/usr/bin/env python3
"""Instructions per I/O of ``pyvirtio bench`` (the client): two revisions, or two ring formats, on one back end.

Wall-clock figures need a quiet machine; instruction counts do not. Each
cell runs the client under ``valgrind --tool=callgrind`` twice, a short and
a long run, and divides the difference of the instructions by the
difference of the I/Os (so start-up and tear-down cancel out;
docs/benchmarks.md §5). The device (qemu-storage-daemon null-co) runs
natively, so under valgrind it is far faster than the client: batches are
larger than in a normal run (every request of the depth completes between
two passes), which makes the per-pass cost weigh less than it does for real.
Compare revisions cell by cell, not with wall-clock runs.

``--backend embedded`` runs ``pyvirtio serve blk`` of this checkout instead
(natively too: only the client is counted), which serves packed rings;
``--old-extra`` / ``--new-extra`` give one side options of its own, so one
checkout can be compared with itself on two ring formats (issue 12):

  python bench/instructions.py OLD NEW [--depths 1 32 128 256] [--short 2] [--long 6] [--json]
  python bench/instructions.py OLD NEW --extra=--rw=randrw   (options passed to pyvirtio bench)
  python bench/instructions.py NEW NEW --backend embedded --old-extra=--ring=split --new-extra=--ring=packed

Against a device in another process the batch sizes still depend on how the
two processes are scheduled, and a stall in either run spoils the
difference (a busy machine does that). ``--inprocess`` removes the second
process: the engine (``BlockEngine``) runs on the embedded block model over
the loopback transport, whose device works inside the driver's kick, so
every pass sees exactly the batch it caused and the count per I/O is
deterministic; it includes the device model's work, which is the same code
for two revisions that share it. ``--calls`` then replaces callgrind by
cProfile and counts Python function calls per I/O, split into the driver's
side (engine, ring, driver) and the device's (loopback, back end, device
side of the ring), so two ring formats can be compared on the driver's side
alone. ``--ring`` (in-process only) is ``split``, ``packed`` or ``in-order``
(split with VIRTIO_F_IN_ORDER), per side with ``--old-ring`` / ``--new-ring``:

  python bench/instructions.py OLD NEW --inprocess [--depths 1 32 256]
  python bench/instructions.py NEW NEW --inprocess --calls --old-ring split --new-ring packed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import RINGS, start_embedded, start_qsd


def count(checkout: Path, sock: str, qd: int, seconds: float, extra: list[str], tmp: str) -> tuple[int, int]:
    """(instructions, I/Os) of one client run under callgrind."""
    out_file = os.path.join(tmp, "cg.out")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", sys.executable, "-m", "pyvirtio",
           "bench", f"vhost-user:{sock}", "--rw", "randread", "--bs", "4k", "--iodepth", str(qd),
           "--queue-size", str(RINGS.get(qd, 1024)), "--runtime", str(seconds), "--json", "--no-progress", *extra]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "1", *cmd]
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{checkout}: {res.stderr.strip()[-800:]}")
    ios = int(json.loads([x for x in res.stdout.splitlines() if x.startswith("{")][-1])["ios"])
    text = Path(out_file).read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
    if m is None:
        raise SystemExit("no instruction total in the callgrind output")
    os.unlink(out_file)
    return int(m.group(1)), ios


ENGINE_CHILD = r"""
import cProfile, json, pstats, sys
from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk
from pyvirtio.bench.block import BlockEngine
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.blk import VirtioBlk
qd, qsize, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ring, calls = sys.argv[4], sys.argv[5] == "1"
storage = Storage(size=256 << 20)
dev = VirtioDevice("loopback", loopback_blk(BlockBackend(storage), queue_size=qsize), pool_size=64 << 20)
blk = VirtioBlk(dev, ring="packed" if ring == "packed" else "split", in_order=ring == "in-order")
e = BlockEngine(blk, rw="randread", bs=4096, iodepth=qd, seed=1)
# Warm: imports, NumPy, first allocations. Its I/Os are counted with the run's (a time-bound run
# does as many as the machine allows: leaving them out would charge their instructions to the run).
warm = e.run(0.2).ios
out = {"mode": e.mode, "ring": blk.device.ring_format}
if calls:
    prof = cProfile.Profile()
    prof.enable()
    st = e.run(seconds)
    prof.disable()
    device = ("/backends/", "/transport/loopback", "/ring/device_", "/ring/chain")
    drv = dev_calls = 0
    for (path, _line, _name), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if any(d in path for d in device):
            dev_calls += row[1]
        else:
            drv += row[1]
    out.update(driver_calls=drv, device_calls=dev_calls)
else:
    st = e.run(seconds)
out["ios"] = st.ios if calls else warm + st.ios  # cProfile sees the run alone
e.close()
blk.close()
storage.close()
print(json.dumps(out))
"""


def count_inprocess(checkout: Path, qd: int, seconds: float, ring: str, calls: bool) -> dict[str, object]:
    """One in-process engine run: its I/Os, and its instructions (callgrind) or calls per side (cProfile)."""
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    args = [str(qd), str(RINGS.get(qd, 1024)), str(seconds), ring, "1" if calls else "0"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", ENGINE_CHILD, *args]
        if not calls:
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{checkout}: {res.stderr.strip()[-800:]}")
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    if not calls:
        m = re.search(r"refs:\s*([\d,]+)", res.stderr)
        if m is None:
            raise SystemExit(f"no instruction count from callgrind: {res.stderr[-300:]}")
        out["instructions"] = int(m.group(1).replace(",", ""))
    return out


def inprocess(a: argparse.Namespace) -> list[dict[str, object]]:
    """``--inprocess``: per depth and side, instructions (or calls) per I/O of the difference of two runs."""
    rows = []
    for qd in a.depths:
        row: dict[str, object] = {"qd": qd}
        for name, checkout, ring in (("old", a.old, a.old_ring), ("new", a.new, a.new_ring)):
            r1 = count_inprocess(checkout, qd, a.short, ring, a.calls)
            r2 = count_inprocess(checkout, qd, a.long, ring, a.calls)
            dn = max(1, int(r2["ios"]) - int(r1["ios"]))  # type: ignore[call-overload]
            keys = ("driver_calls", "device_calls") if a.calls else ("instructions",)
            cell: dict[str, object] = {"ring": r2["ring"], "mode": r2["mode"], "ios": [r1["ios"], r2["ios"]]}
            for k in keys:
                cell[k + "_per_io"] = round((int(r2[k]) - int(r1[k])) / dn, 2)  # type: ignore[call-overload]
            row[name] = cell
            print(f"qd {qd:>3} {name} ({cell['ring']}, {cell['mode']}): "
                  + ", ".join(f"{k}_per_io {cell[k + '_per_io']:,}" for k in keys), file=sys.stderr)
        k = ("driver_calls" if a.calls else "instructions") + "_per_io"
        row["new/old"] = round(row["new"][k] / row["old"][k], 3)  # type: ignore[index]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--short", type=float, default=2.0)
    ap.add_argument("--long", type=float, default=6.0)
    ap.add_argument("--extra", action="append", default=[], help="an option for pyvirtio bench (repeatable)")
    ap.add_argument("--old-extra", action="append", default=[], help="an option for OLD's runs only (repeatable)")
    ap.add_argument("--new-extra", action="append", default=[], help="an option for NEW's runs only (repeatable)")
    ap.add_argument("--backend", choices=("qsd", "embedded"), default="qsd",
                    help="qemu-storage-daemon null-co (split only), or this checkout's pyvirtio serve blk")
    ap.add_argument("--inprocess", action="store_true", help="the engine on the loopback device, in one process")
    ap.add_argument("--calls", action="store_true", help="with --inprocess: cProfile calls per I/O, not callgrind")
    ap.add_argument("--ring", choices=("split", "packed", "in-order"), default="split", help="with --inprocess")
    ap.add_argument("--old-ring", choices=("split", "packed", "in-order"), default=None)
    ap.add_argument("--new-ring", choices=("split", "packed", "in-order"), default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.inprocess:
        a.old_ring = a.old_ring or a.ring
        a.new_ring = a.new_ring or a.ring
        res = inprocess(a)
        print(json.dumps(res, indent=2) if a.json else "\n".join(
            f"QD{r['qd']}: new/old {r['new/old']}" for r in res))
        return
    tmp = tempfile.mkdtemp(prefix="pyvirtio-instr-")
    qsd, sock = start_qsd(tmp, "0") if a.backend == "qsd" else start_embedded(tmp, "0")
    rows = []
    try:
        for qd in a.depths:
            row: dict[str, object] = {"qd": qd}
            for name, checkout, own in (("old", a.old, a.old_extra), ("new", a.new, a.new_extra)):
                extra = [*a.extra, *own]
                i1, n1 = count(checkout, sock, qd, a.short, extra, tmp)
                i2, n2 = count(checkout, sock, qd, a.long, extra, tmp)
                per = (i2 - i1) / max(1, n2 - n1)
                row[name] = {"instr_per_io": round(per), "ios": [n1, n2]}
                print(f"qd {qd:>3} {name}: {per:,.0f} instructions / I/O ({n1} and {n2} I/Os)", file=sys.stderr)
            row["new/old"] = round(row["new"]["instr_per_io"] / row["old"]["instr_per_io"], 3)  # type: ignore[index]
            rows.append(row)
    finally:
        qsd.send_signal(signal.SIGTERM)
        qsd.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps({"backend": a.backend, "extra": a.extra, "old_extra": a.old_extra,
                          "new_extra": a.new_extra, "rows": rows}, indent=2))
    else:
        print(f"{'QD':>4} {'old instr/IO':>14} {'new instr/IO':>14} {'new/old':>8}")
        for r in rows:
            print(f"{r['qd']:>4} {r['old']['instr_per_io']:>14,} {r['new']['instr_per_io']:>14,} "  # type: ignore[index]
                  f"{r['new/old']:>8}")


if __name__ == "__main__":
    main()
