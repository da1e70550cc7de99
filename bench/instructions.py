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
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
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
