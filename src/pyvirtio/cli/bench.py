"""``pyvirtio bench``: a fio-like block benchmark on a virtio-blk device.

With a TARGET it drives that device; without one it starts pyvirtio's
embedded RAM back end (``pyvirtio serve blk``) in a child process, benchmarks
it and stops it, so the command works on a machine with nothing else
installed. The report names the back end it ran against.

``--reconnect [SECONDS]`` keeps the run going when the back end restarts:
requests in flight are resubmitted once the new one is connected, and the
report adds the number of reconnects and the pause (total and longest time
without completions); with ``--verify`` every block is still checked.
``--server`` listens on TARGET's socket for the back end to connect.
Ctrl-C ends a run early with the report so far.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pyvirtio.bench.block import RW_MODES, BlkEngine, Stats
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.errors import InvalidArgument, TransportError

MAX_QUEUE_SIZE = 1024  # QEMU's VIRTQUEUE_MAX_SIZE: the largest ring every back end takes


def register(sub: Any) -> None:
    from pyvirtio.cli.common import parse_size

    p = sub.add_parser(
        "bench",
        help="benchmark a virtio-blk device (the embedded RAM back end if no TARGET)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", help="vhost-user:PATH or a socket path; omit for the embedded back end")
    p.add_argument("--rw", choices=RW_MODES, default="randread")
    p.add_argument("--rwmixread", type=int, default=70, help="percentage of reads for randrw/rw (default 70)")
    p.add_argument("--bs", type=parse_size, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue (default 32)")
    p.add_argument("--runtime", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--queues", type=int, default=1, help="queues, one thread each (default 1)")
    p.add_argument("--queue-size", type=int, default=None, help="ring size (default: fits iodepth, at least 256)")
    p.add_argument("--verify", action="store_true", help="write a per-block pattern and check it on read-back")
    p.add_argument("--mode", choices=("auto", "python", "numpy"), default="auto", help="engine loop (default auto)")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="embedded back end: RAM disk size (default 1G)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--event-idx", choices=("on", "off"), default="on",
                   help="negotiate VIRTIO_F_RING_EVENT_IDX (default on)")
    p.add_argument("--device-signals", choices=("on", "off"), default="on",
                   help="let the device signal completions although the engine polls "
                   "(default on: faster against qemu-storage-daemon at every depth measured; see docs/benchmarks.md)")
    p.add_argument("--lun", default=None, metavar="T:L",
                   help="benchmark LUN T:L of a virtio-scsi device (TARGET is then a vhost-user-scsi socket)")
    p.add_argument("--reconnect", type=float, nargs="?", const=30.0, default=None, metavar="SECONDS",
                   help="keep running across a back-end restart: reconnect, resubmit what was in flight, "
                   "report the pause (wait up to SECONDS for the back end, default 30)")
    p.add_argument("--server", action="store_true",
                   help="listen on TARGET's socket and let the back end connect (vhost-user server mode)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.set_defaults(func=run)


def _queue_size(args: argparse.Namespace) -> int:
    if args.queue_size is not None:
        return int(args.queue_size)
    size = 256
    while size < 3 * args.iodepth and size < MAX_QUEUE_SIZE:
        size *= 2
    return size


class EmbeddedBackend:
    """``pyvirtio serve blk`` in a child process on a temporary socket."""

    def __init__(self, size: int, queues: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="pyvirtio-bench-")
        self.socket = os.path.join(self.dir, "blk.sock")
        cmd = [
            sys.executable,
            "-m",
            "pyvirtio",
            "serve",
            "blk",
            "--socket",
            self.socket,
            "--size",
            str(size),
            "--queues",
            str(max(queues, 1)),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                raise TransportError(f"the embedded back end exited: {err or self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TransportError("the embedded back end did not create its socket within 15 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


def _progress_printer(enabled: bool, total_seconds: float) -> Any:
    if not enabled:
        return None
    out = sys.stderr

    def show(stats: Stats) -> None:
        secs = stats.seconds or 1e-9
        out.write(
            f"\r[{secs:5.1f}/{total_seconds:.0f}s] {stats.ios / secs:>10,.0f} IOPS  "
            f"{stats.bytes / secs / 1e6:>9,.1f} MB/s  errors {stats.errors}"
            + (f"  reconnects {stats.reconnects}" if stats.reconnects else "")
            + "   "
        )
        out.flush()

    return show


def run(args: argparse.Namespace) -> int:
    if args.iodepth < 1 or args.queues < 1 or args.runtime <= 0:
        raise InvalidArgument("--iodepth, --queues and --runtime must be positive")
    if args.lun is not None:
        return _scsi_bench(args)
    backend: EmbeddedBackend | None = None
    target = args.target
    if target is None:
        backend = EmbeddedBackend(args.size, args.queues)
        target = f"vhost-user:{backend.socket}"
    try:
        return _bench(args, target, "embedded pyvirtio RAM back end" if backend else target)
    finally:
        if backend is not None:
            backend.stop()


def _scsi_bench(args: argparse.Namespace) -> int:
    """``--lun T:L``: the same workload on a virtio-scsi LUN (pyvirtio.drivers.scsi.ScsiBench)."""
    from pyvirtio.cli import scsi as scsi_cli

    if args.target is None:
        raise InvalidArgument("--lun needs a TARGET (a vhost-user-scsi socket, e.g. from `pyvirtio serve scsi`)")
    if args.queues != 1 or args.verify or args.mode != "auto":
        raise InvalidArgument("--lun benchmarks run on one queue, without --verify or --mode")
    args.lun = scsi_cli.lun_arg(args.lun)
    for name, default in (("connect_timeout", 5.0), ("timeout", 30.0)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return int(scsi_cli.run_bench(args))


def _bench(args: argparse.Namespace, target: str, backend_name: str) -> int:
    qsize = _queue_size(args)
    transport_kw: dict[str, Any] = {}
    if getattr(args, "reconnect", None) is not None:
        if args.reconnect <= 0:
            raise InvalidArgument("--reconnect SECONDS must be positive")
        transport_kw["reconnect"] = args.reconnect
    if getattr(args, "server", False):
        transport_kw["server"] = True
        transport_kw["connect_timeout"] = args.reconnect or 30.0
    blk = VirtioBlk.open(
        target, num_queues=args.queues, queue_size=qsize, event_idx=args.event_idx == "on", **transport_kw
    )
    try:
        if args.queues > blk.num_queues:
            raise InvalidArgument(f"--queues {args.queues}: the device has {blk.num_queues}")
        results: list[Stats | BaseException | None] = [None] * args.queues
        stop = threading.Event()
        show = _progress_printer(sys.stderr.isatty() and not args.no_progress and not args.json, args.runtime)
        engines: list[BlkEngine] = []
        ready = threading.Barrier(args.queues)
        live: list[Stats] = [Stats() for _ in range(args.queues)]

        def merged_progress(q: int) -> Any:
            def cb(stats: Stats) -> None:
                live[q] = stats
                if q == 0 and show is not None:
                    total = Stats()
                    for s in live:
                        total.merge(s)
                    total.seconds = stats.seconds
                    show(total)

            return cb

        def worker(q: int) -> None:
            try:
                engine = BlkEngine(
                    blk,
                    rw=args.rw,
                    bs=args.bs,
                    iodepth=args.iodepth,
                    rwmixread=args.rwmixread,
                    verify=args.verify,
                    seed=None if args.seed is None else args.seed + q,
                    mode=args.mode,
                    device_signals=args.device_signals == "on",
                    **_region(blk, args, q),
                )
                engines.append(engine)
                if args.verify and engine.reads_only:
                    engine.prefill()
                ready.wait()
                results[q] = engine.run(args.runtime, stop=stop, progress=merged_progress(q))
                engine.close()
            except BaseException as exc:  # reported by the main thread
                results[q] = exc
                stop.set()
                ready.abort()
            finally:
                finished[q].set()

        # Waited for with events: a Thread.join() interrupted by Ctrl-C may return early
        # afterwards on CPython 3.11 (the thread still running, its result not yet there).
        finished = [threading.Event() for _ in range(args.queues)]
        threads = [threading.Thread(target=worker, args=(q,), name=f"bench-q{q}") for q in range(args.queues)]
        for t in threads:
            t.start()
        try:
            for done in finished:
                while not done.wait(0.2):
                    pass
        except KeyboardInterrupt:
            stop.set()
            for done in finished:
                done.wait()
        for t in threads:
            t.join()
        if show is not None:
            sys.stderr.write("\n")
        errors = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, threading.BrokenBarrierError)
        ]
        if errors:
            raise errors[0]
        total = Stats()
        for r in results:
            assert isinstance(r, Stats)
            total.merge(r)
        report = _report(args, blk, total, backend_name, engines[0].mode if engines else args.mode, qsize)
    finally:
        blk.close()
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 1 if total.errors or total.verify_errors else 0


def _region(blk: VirtioBlk, args: argparse.Namespace, q: int) -> dict[str, int]:
    """With --verify each queue gets its own slice of the device, so checks don't race."""
    if not args.verify or args.queues == 1:
        return {}
    per = blk.capacity // args.queues // args.bs * args.bs
    return {"offset": q * per, "size": per}


def _report(
    args: argparse.Namespace, blk: VirtioBlk, total: Stats, backend: str, mode: str, qsize: int
) -> dict[str, Any]:
    out = total.summary()
    out.update(
        {
            "backend": backend,
            "rw": args.rw,
            "rwmixread": args.rwmixread if args.rw in ("randrw", "rw") else None,
            "bs": args.bs,
            "iodepth": args.iodepth,
            "queues": args.queues,
            "queue_size": qsize,
            "runtime": args.runtime,
            "engine": mode,
            "device_signals": args.device_signals == "on",
            "verify": args.verify,
            "reconnect": getattr(args, "reconnect", None),
            "device": {"capacity": blk.capacity, "block_size": blk.block_size},
        }
    )
    return out


def _print_report(r: dict[str, Any]) -> None:
    lat = r["latency_us"]
    mix = f", rwmixread={r['rwmixread']}" if r.get("rwmixread") is not None else ""
    print(f"pyvirtio bench: {r['rw']}{mix} bs={r['bs']} iodepth={r['iodepth']} queues={r['queues']} "
          f"runtime={r['seconds']}s engine={r['engine']}")
    print(f"  back end: {r['backend']}")
    print(f"  IOPS: {r['iops']:,}   bandwidth: {r['mb_per_s']:,} MB/s   ios: {r['ios']:,} "
          f"(reads {r['reads']:,}, writes {r['writes']:,})")
    print(f"  latency (us): mean {lat['mean']}  p50 {lat['p50']}  p99 {lat['p99']}  "
          f"p99.9 {lat['p99.9']}  max {lat['max']}")
    verify = f"   verify errors: {r['verify_errors']}" if r["verify"] else ""
    print(f"  errors: {r['errors']}{verify}")
    if r.get("reconnect") is not None or r.get("reconnects"):
        pause = r["pause_ms"]
        print(f"  reconnects: {r['reconnects']}   paused: {pause['total']:,} ms in total, "
              f"longest {pause['max']:,} ms")


__all__ = ["register", "run"]
