#!/usr/bin/env python3
"""pyvirtio bench vs. the measuring sticks and SPDK's C initiator, against one back end.

Starts the back end pinned to CPU 0 (qemu-storage-daemon null-co by
default, in its main loop, which sleeps when idle; in an IOThread, which
polls adaptively, with ``--backend qsd-iothread``; SPDK's vhost target over
a null bdev, which polls and never sleeps, with ``--backend spdk-vhost``
(needs the SPDK build); or ``pyvirtio serve blk``, a RAM disk, with
``--backend embedded``) and runs, pinned to CPU 1, interleaved round by
round with the order rotated each round:

  * ``pyvirtio bench --rw randread --bs 4k`` (this checkout),
  * ../shared/bench/raw_vhost_blk.py        (pure-Python floor, one request at a time),
  * ../shared/bench/raw_vhost_blk_numpy.py  (vectorised floor),
  * SPDK's bdevperf over bdev_virtio (v24.01, the C initiator pyvirtio
    re-implements), when a build is found: ``--spdk DIR``, else
    ``$SPDK_BUILD``, else the shared scripts' default places (see
    bench/spdk.py). Without one the table says so and has no SPDK column.

at QD1, QD32 (ring 256), QD128 (ring 512) and QD256 (ring 1024), one
virtqueue each. The pure-Python stick's rings hold at most 85
three-descriptor requests (ring 256), so it runs at QD1 and QD32 only.

Prints per depth the median and best IOPS of each, pyvirtio's ratio to the
better stick and to SPDK (median/median, best/best), and the mean latency
of pyvirtio and SPDK (each as its own tool reports it; the sticks do not
report latency). ``--json`` prints the raw rounds too.

With each run it counts the back end's sleeps: the voluntary context
switches of all its threads (``/proc/PID/task/*/status``) over the run,
per I/O. A back end that does not poll (qemu-storage-daemon, ``pyvirtio
serve``) sleeps in ppoll/epoll whenever its queue is empty, and a kick
that comes after it fell asleep costs a wake-up; at QD1 this count is
what separates the clients (docs/benchmarks.md §8). The I/Os are IOPS x
seconds; the count also holds the run's start and end (a few dozen
switches), which is noise at these rates.

  python bench/compare.py [--rounds 4] [--seconds 3] [--depths 1 32 128 256]
                          [--backend qsd|qsd-iothread|spdk-vhost|embedded] [--spdk DIR | --no-spdk] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import spdk

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STICKS = REPO.parent / "shared" / "bench"
RINGS = {1: 256, 32: 256, 128: 512, 256: 1024}
#: --backend: what each one is, as the table names it
BACKENDS = {
    "qsd": "qemu-storage-daemon null-co",
    "qsd-iothread": "qemu-storage-daemon null-co in an IOThread",
    "spdk-vhost": "SPDK vhost target, null bdev (polls)",
    "embedded": "pyvirtio serve blk (RAM)",
}
BACKEND_CPU, CLIENT_CPU = "0", "1"

#: what one run returns: IOPS, and the mean latency in µs when the contestant reports it
Result = dict[str, float]


def start_qsd(tmp: str, cpu: str, iothread: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """qemu-storage-daemon, null-co, pinned to ``cpu``: the export in its main loop (which sleeps
    when idle), or with ``iothread`` in an IOThread (QEMU's adaptive polling, poll-max-ns default)."""
    sock = os.path.join(tmp, "qsd.sock")
    pidfile = os.path.join(tmp, "qsd.pid")
    export = f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={sock},writable=on"
    cmd = ["qemu-storage-daemon", "--blockdev", "driver=null-co,node-name=null0,size=1073741824"]
    if iothread:
        cmd += ["--object", "iothread,id=iot0"]
        export += ",iothread=iot0"
    cmd += ["--export", export, "--pidfile", pidfile]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (os.path.exists(sock) and os.path.exists(pidfile) and os.path.getsize(pidfile)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("qemu-storage-daemon did not start")
        time.sleep(0.05)
    return proc, sock


def start_serve_blk(
    sock: str, cpu: str, env: dict[str, str], runner: list[str] | None = None, log: str | None = None
) -> subprocess.Popen[bytes]:
    """``pyvirtio serve blk`` (1 GiB RAM disk) on ``sock``, pinned to ``cpu``, once its socket exists.

    ``env`` says which checkout (its PYTHONPATH); ``runner`` what runs the CLI (default
    ``python -m pyvirtio``); ``log`` a file for its stderr (else discarded), quoted if it does not start.
    """
    cmd = [*(runner or [sys.executable, "-m", "pyvirtio"]), "serve", "blk", "--socket", sock, "--size", "1G"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    if log is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    else:
        with open(log, "w") as f:  # a file, not a pipe: a pipe nobody reads could stall the server
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            why = f": {Path(log).read_text()[-500:]}" if log else ""
            raise SystemExit(f"pyvirtio serve blk (PYTHONPATH={env.get('PYTHONPATH')}) did not start{why}")
        time.sleep(0.05)
    return proc


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM to a process this script started (by its PID), SIGKILL if it is not gone after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_embedded(tmp: str, cpu: str) -> tuple[subprocess.Popen[bytes], str]:
    """``pyvirtio serve blk`` (1 GiB RAM disk) of this checkout, pinned to ``cpu``."""
    sock = os.path.join(tmp, "embedded.sock")
    return start_serve_blk(sock, cpu, dict(os.environ, PYTHONPATH=str(REPO / "src"))), sock


def run_json(cmd: list[str], cpu: str, env: dict[str, str] | None = None) -> dict[str, object]:
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    result: dict[str, object] = json.loads(line)
    return result


def sleeps(pid: int) -> int:
    """Voluntary context switches of every thread of process ``pid`` so far (0 if it is gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def pyvirtio_run(sock: str, qd: int, ring: int, seconds: float, rw: str = "randread") -> Result:
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = run_json([py, "-m", "pyvirtio", "bench", f"vhost-user:{sock}", "--rw", rw, "--bs", "4k",
                    "--iodepth", str(qd), "--queue-size", str(ring), "--runtime", str(seconds),
                    "--json", "--no-progress"], CLIENT_CPU, env)
    lat = res.get("latency_us")
    out = {"iops": float(res["iops"])}  # type: ignore[arg-type]
    if isinstance(lat, dict):
        out["lat_us"] = float(lat["mean"])
    return out


def stick_run(script: str, sock: str, qd: int, ring: int, seconds: float, rw: str = "randread") -> Result:
    cmd = [sys.executable, str(STICKS / script), sock, "--qd", str(qd), "--seconds", str(seconds), "--json"]
    if script == "raw_vhost_blk_numpy.py":
        cmd += ["--ring", str(ring)]
    elif rw != "randread":
        cmd += ["--rw", rw]
    res = run_json(cmd, CLIENT_CPU)
    return {"iops": float(res["iops"])}  # type: ignore[arg-type]


def spdk_runner(build: Path, keep_hugepages: bool = False) -> Callable[..., Result]:
    def run(sock: str, qd: int, ring: int, seconds: float, rw: str = "randread") -> Result:
        r = spdk.run_bdevperf(build, sock, qd, ring, seconds, int(CLIENT_CPU), workload=rw,
                              keep_hugepages=keep_hugepages)
        return {"iops": r.iops, "lat_us": r.mean_latency_us}

    return run


def contestants(spdk_build: Path | None, qd: int, keep_hugepages: bool = False) -> dict[str, Callable[..., Result]]:
    """Who runs at this depth (the pure-Python stick's ring of 256 holds 85 requests)."""
    runs: dict[str, Callable[..., Result]] = {
        "pyvirtio": pyvirtio_run,
        "numpy_stick": lambda *a, **k: stick_run("raw_vhost_blk_numpy.py", *a, **k),
    }
    if qd <= 85:
        runs["python_stick"] = lambda *a, **k: stick_run("raw_vhost_blk.py", *a, **k)
    if spdk_build is not None:
        runs["spdk"] = spdk_runner(spdk_build, keep_hugepages)
    return runs


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def summarise(rounds: list[dict[str, object]], depths: list[int]) -> dict[int, dict[str, object]]:
    summary: dict[int, dict[str, object]] = {}
    for qd in depths:
        row: dict[str, object] = {"ring": RINGS.get(qd, 1024)}
        for who in ("pyvirtio", "python_stick", "numpy_stick", "spdk"):
            mine = [x for x in rounds if x["qd"] == qd and x["who"] == who]
            if not mine:
                continue
            v = [float(x["iops"]) for x in mine]  # type: ignore[arg-type]
            cell: dict[str, float] = {"median": round(statistics.median(v)), "best": round(max(v))}
            sl = [float(x["sleeps_per_io"]) for x in mine if "sleeps_per_io" in x]  # type: ignore[arg-type]
            if sl:
                cell["sleeps_per_io"] = round(statistics.median(sl), 3)
            lats = [float(x["lat_us"]) for x in mine if "lat_us" in x]  # type: ignore[arg-type]
            if lats:
                cell["lat_median_us"] = round(statistics.median(lats), 2)
                cell["lat_best_us"] = round(min(lats), 2)
            row[who] = cell
        pv: dict[str, float] = row["pyvirtio"]  # type: ignore[assignment]
        sticks = [row[w] for w in ("python_stick", "numpy_stick") if w in row]
        row["vs_stick_median"] = ratio(pv["median"], max(s["median"] for s in sticks))  # type: ignore[index]
        row["vs_stick_best"] = ratio(pv["best"], max(s["best"] for s in sticks))  # type: ignore[index]
        if "spdk" in row:
            sp: dict[str, float] = row["spdk"]  # type: ignore[assignment]
            row["vs_spdk_median"] = ratio(pv["median"], sp["median"])
            row["vs_spdk_best"] = ratio(pv["best"], sp["best"])
            if "lat_median_us" in pv and "lat_median_us" in sp:
                # latency: pyvirtio's mean over SPDK's (lower is better; the goal is <= 1.2 at QD1)
                row["lat_vs_spdk_median"] = ratio(pv["lat_median_us"], sp["lat_median_us"])
        summary[qd] = row
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--backend", choices=tuple(BACKENDS), default="qsd",
                    help="qsd: its export in the main loop (sleeps when idle); qsd-iothread: in an IOThread "
                    "(adaptive polling); spdk-vhost: SPDK's vhost target, null bdev (polls; needs the SPDK "
                    "build); embedded: pyvirtio serve blk")
    ap.add_argument("--spdk", metavar="DIR", help="SPDK build folder (default: $SPDK_BUILD, then the usual places)")
    ap.add_argument("--no-spdk", action="store_true", help="leave SPDK out even when a build is found")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = None if a.no_spdk else spdk.find_build(a.spdk)
    if build is None and not a.no_spdk:
        print("note: no SPDK build found (--spdk DIR or SPDK_BUILD; ../shared/spdk/README): running without "
              "SPDK's initiator", file=sys.stderr)
    elif build is not None and spdk.scripts_dir() is None:
        print("note: SPDK build found but not the shared bdevperf scripts: running without SPDK", file=sys.stderr)
        build = None
    tmp = tempfile.mkdtemp(prefix="pyvirtio-compare-")
    target: spdk.VhostTarget | None = None
    if a.backend == "spdk-vhost":
        vbuild = build or spdk.find_build(a.spdk)
        if vbuild is None:
            raise SystemExit("--backend spdk-vhost needs the SPDK build (--spdk DIR or SPDK_BUILD)")
        try:
            target = spdk.start_vhost(vbuild, tmp, int(BACKEND_CPU))
        except RuntimeError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(str(e)) from None
        backend_pid, sock = target.pid, target.sock
    elif a.backend == "embedded":
        backend, sock = start_embedded(tmp, BACKEND_CPU)
        backend_pid = backend.pid
    else:
        backend, sock = start_qsd(tmp, BACKEND_CPU, iothread=a.backend == "qsd-iothread")
        backend_pid = backend.pid
    rounds: list[dict[str, object]] = []
    try:
        for r in range(a.rounds):
            for qd in a.depths:
                ring = RINGS.get(qd, 1024)
                runs = contestants(build, qd, keep_hugepages=target is not None)
                order = list(runs)
                order = order[r % len(order):] + order[: r % len(order)]  # rotate who goes first
                for name in order:
                    s0 = sleeps(backend_pid)
                    res = runs[name](sock, qd, ring, a.seconds)
                    if res["iops"]:
                        res["sleeps_per_io"] = round((sleeps(backend_pid) - s0) / (res["iops"] * a.seconds), 4)
                    rounds.append({"round": r, "qd": qd, "ring": ring, "who": name, **res})
                    lat = f"  mean {res['lat_us']:8.2f} us" if "lat_us" in res else ""
                    print(f"round {r} qd {qd:>3} {name:<12} {int(res['iops']):>10,} IOPS{lat}"
                          f"  back end sleeps/IO {res.get('sleeps_per_io', float('nan')):.3f}", file=sys.stderr)
    finally:
        if target is not None:
            target.stop()
        else:
            stop_process(backend)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarise(rounds, a.depths)
    backend_name = BACKENDS[a.backend]
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rounds, "seconds": a.seconds, "backend": backend_name,
                          "spdk": str(build) if build else None}))
        return
    print(f"\n4k randread vs {backend_name}; {a.rounds} rounds x {a.seconds}s interleaved; "
          f"back end on CPU {BACKEND_CPU}, clients on CPU {CLIENT_CPU}"
          + ("" if build else "; SPDK: not built, left out"))

    def cell(row: dict[str, object], who: str) -> str:
        x = row.get(who)
        return f"{x['median'] / 1e3:,.0f}k / {x['best'] / 1e3:,.0f}k" if x else "-"  # type: ignore[index]

    head = f"{'QD':>4} {'ring':>5} {'pyvirtio':>17} {'py stick':>17} {'numpy stick':>17}"
    head += f" {'SPDK':>17}" if build else ""
    head += f" {'/stick':>11}"
    head += f" {'/SPDK':>11} {'lat us py/SPDK':>17} {'lat ratio':>9}" if build else ""
    print(head + "\n" + " " * 11 + "(IOPS median / best; ratios median (best))")
    for qd, row in summary.items():
        line = (f"{qd:>4} {row['ring']:>5} {cell(row, 'pyvirtio'):>17} {cell(row, 'python_stick'):>17} "
                f"{cell(row, 'numpy_stick'):>17}")
        if build:
            line += f" {cell(row, 'spdk'):>17}"
        line += f" {row['vs_stick_median']:>5} ({row['vs_stick_best']})"
        if build and "vs_spdk_median" in row:
            pv, sp = row["pyvirtio"], row["spdk"]
            lat = f"{pv.get('lat_median_us', 0):.1f} / {sp.get('lat_median_us', 0):.1f}"  # type: ignore[attr-defined]
            line += f" {row['vs_spdk_median']:>5} ({row['vs_spdk_best']}) {lat:>17}"
            line += f" {row.get('lat_vs_spdk_median', '-'):>9}"
        print(line)
    print("\nback end sleeps per I/O (voluntary context switches of its threads per I/O, median):")
    whos = [w for w in ("pyvirtio", "python_stick", "numpy_stick", "spdk") if any(w in r for r in summary.values())]
    print(f"{'QD':>4} " + " ".join(f"{w:>13}" for w in whos))
    for qd, row in summary.items():
        vals = [row.get(w, {}).get("sleeps_per_io") for w in whos]  # type: ignore[attr-defined]
        print(f"{qd:>4} " + " ".join(f"{v:>13.3f}" if v is not None else f"{'-':>13}" for v in vals))


if __name__ == "__main__":
    main()
