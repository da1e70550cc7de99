"""``pyvirtio bench``: a fio-like block benchmark on a virtio-blk device or a virtio-scsi LUN.

With a TARGET it drives that device; without one it starts pyvirtio's
embedded RAM back end (``pyvirtio serve blk``) in a child process, benchmarks
it and stops it, so the command works on a machine with nothing else
installed. The report names the back end it ran against.

``--lun T:L`` benchmarks that LUN of a virtio-scsi device (TARGET is then a
vhost-user-scsi socket, e.g. ``pyvirtio serve scsi``) with the same engine,
options and report (READ(16) / WRITE(16) commands; a command is good if its
response is OK, its status GOOD and its residual 0). ``pyvirtio scsi bench``
is the same command with the first LUN found as default.

``--reconnect [SECONDS]`` keeps the run going when the back end restarts:
requests in flight are resubmitted once the new one is connected, and the
report adds the number of reconnects and the pause (total and longest time
without completions); with ``--verify`` every block is still checked.
On a LUN the new back end reports UNIT ATTENTION (power on) to the first
command it gets, as SCSI requires: that command counts as one error.
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
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.bench.block import MODES, RW_MODES, run_queues
from pyvirtio.bench.stats import Stats
from pyvirtio.cli.common import lun_arg, positive_int, seconds_arg, size_arg
from pyvirtio.cli.ring_option import add_ring_arguments, ring_options
from pyvirtio.errors import InvalidArgument, TransportError

MAX_QUEUE_SIZE = 1024  # QEMU's VIRTQUEUE_MAX_SIZE: the largest ring every back end takes


def add_bench_options(p: argparse.ArgumentParser) -> None:
    """The workload and report options of ``pyvirtio bench`` and ``pyvirtio scsi bench``."""
    p.add_argument("--rw", choices=RW_MODES, default="randread")
    p.add_argument("--rwmixread", type=int, default=70, help="percentage of reads for randrw/rw (default 70)")
    p.add_argument("--bs", type=size_arg, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=positive_int, default=32, help="requests in flight per queue (default 32)")
    p.add_argument("--runtime", type=seconds_arg, default=10.0, help="seconds (default 10)")
    p.add_argument("--queues", type=positive_int, default=1, help="queues, one thread each (default 1)")
    p.add_argument("--queue-size", type=positive_int, default=None,
                   help="ring size (default: fits iodepth, at least 256)")
    p.add_argument("--verify", action="store_true", help="write a per-block pattern and check it on read-back")
    p.add_argument("--mode", choices=MODES, default="auto", help="engine loop (default auto)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--event-idx", choices=("on", "off"), default="on",
                   help="negotiate VIRTIO_F_RING_EVENT_IDX (default on)")
    p.add_argument("--device-signals", choices=("on", "off"), default="on",
                   help="let the device signal completions although the engine polls "
                   "(default on: faster against qemu-storage-daemon at every depth measured; see docs/benchmarks.md)")
    p.add_argument("--reconnect", type=float, nargs="?", const=30.0, default=None, metavar="SECONDS",
                   help="keep running across a back-end restart: reconnect, resubmit what was in flight, "
                   "report the pause (wait up to SECONDS for the back end, default 30)")
    p.add_argument("--server", action="store_true",
                   help="listen on TARGET's socket and let the back end connect (vhost-user server mode)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    add_ring_arguments(p)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark a virtio-blk device (the embedded RAM back end if no TARGET) or a virtio-scsi LUN",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", help="vhost-user:PATH or a socket path; omit for the embedded back end")
    p.add_argument("--lun", type=lun_arg, default=None, metavar="T:L",
                   help="benchmark LUN T:L of a virtio-scsi device (TARGET is then a vhost-user-scsi socket)")
    p.add_argument("--size", type=size_arg, default=1 << 30, help="embedded back end: RAM disk size (default 1G)")
    add_bench_options(p)
    p.set_defaults(func=run, connect_timeout=5.0, timeout=30.0)


def queue_size(args: argparse.Namespace) -> int:
    """The ring size: --queue-size, or the smallest power of two >= 256 holding 3 descriptors per request."""
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


def _progress_printer(args: argparse.Namespace) -> Callable[[Stats], None] | None:
    if args.json or args.no_progress or not sys.stderr.isatty():
        return None
    out = sys.stderr

    def show(stats: Stats) -> None:
        secs = stats.seconds or 1e-9
        out.write(
            f"\r[{secs:5.1f}/{args.runtime:.0f}s] {stats.ios / secs:>10,.0f} IOPS  "
            f"{stats.bytes / secs / 1e6:>9,.1f} MB/s  errors {stats.errors}"
            + (f"  reconnects {stats.reconnects}" if stats.reconnects else "")
            + "   "
        )
        out.flush()

    return show


def run(args: argparse.Namespace) -> int:
    """``pyvirtio bench``: the embedded back end, a virtio-blk TARGET, or a LUN of one (--lun)."""
    if args.lun is not None:
        if args.target is None:
            raise InvalidArgument("--lun needs a TARGET (a vhost-user-scsi socket, e.g. from `pyvirtio serve scsi`)")
        return run_lun(args)
    backend: EmbeddedBackend | None = None
    target = args.target
    if target is None:
        backend = EmbeddedBackend(args.size, args.queues)
        target = f"vhost-user:{backend.socket}"
    try:
        return _run_blk(args, target, "embedded pyvirtio RAM back end" if backend else target)
    finally:
        if backend is not None:
            backend.stop()


def _transport_options(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.reconnect is not None:
        if args.reconnect <= 0:
            raise InvalidArgument("--reconnect SECONDS must be positive")
        kw["reconnect"] = args.reconnect
    if args.server:
        kw["server"] = True
        kw["connect_timeout"] = args.reconnect or 30.0
    return kw


def _run_blk(args: argparse.Namespace, target: str, backend_name: str) -> int:
    from pyvirtio.drivers.blk import VirtioBlk

    qsize = queue_size(args)
    blk = VirtioBlk.open(
        target,
        num_queues=args.queues,
        queue_size=qsize,
        event_idx=args.event_idx == "on",
        **ring_options(args),
        **_transport_options(args),
    )
    try:
        device = {"type": "blk", "capacity": blk.capacity, "block_size": blk.block_size, **ring_info(blk.device)}
        return _bench(args, blk, device, backend_name, qsize, None)
    finally:
        blk.close()


def run_lun(args: argparse.Namespace) -> int:
    """``bench --lun`` / ``scsi bench``: the same workload on a LUN (the first one found without --lun)."""
    from pyvirtio.drivers.scsi import VirtioScsi
    from pyvirtio.spec.common import DEVICE_ID_SCSI
    from pyvirtio.targets import open_device

    qsize = queue_size(args)
    ring = ring_options(args)
    kw = {
        "connect_timeout": args.connect_timeout,
        "timeout": args.timeout,
        "packed_zero_wrap": ring.pop("packed_zero_wrap"),  # the device's; ring= and in_order= the driver's
        **_transport_options(args),
    }
    dev = open_device(args.target, device_type=DEVICE_ID_SCSI, queue_size=qsize, **kw)
    try:
        scsi = VirtioScsi(
            dev,
            num_queues=args.queues,
            queue_size=qsize,
            event_idx=args.event_idx == "on",
            timeout=args.timeout,
            targets=None if args.lun is None else [args.lun[0]],
            **ring,
        )
    except BaseException:
        dev.close()
        raise
    try:
        if args.lun is None:
            if not scsi.luns:
                raise InvalidArgument(f"{args.target} has no LUN to benchmark")
            t, lun = min(scsi.luns)
        else:
            t, lun = args.lun
        disk = scsi.disk(t, lun)
        scsi.release_queue()  # the scan's: the bench threads take a queue each
        device = {"type": "scsi", "capacity": disk.capacity, "block_size": disk.block_size, **ring_info(dev)}
        return _bench(args, disk, device, args.target, qsize, f"{t}:{lun}")
    finally:
        scsi.close()


def ring_info(device: Any) -> dict[str, Any]:
    """The ring format and IN_ORDER a device negotiated, for the report."""
    from pyvirtio.spec.common import F_IN_ORDER

    return {"ring": device.ring_format, "in_order": device.has_feature(F_IN_ORDER)}


def _bench(
    args: argparse.Namespace, target: Any, device: dict[str, Any], backend: str, qsize: int, lun: str | None
) -> int:
    show = _progress_printer(args)
    result = run_queues(
        target,
        args.runtime,
        queues=args.queues,
        seed=args.seed,
        verify=args.verify,
        bs=args.bs,
        progress=show,
        rw=args.rw,
        iodepth=args.iodepth,
        rwmixread=args.rwmixread,
        mode=args.mode,
        device_signals=args.device_signals == "on",
    )
    if show is not None:
        sys.stderr.write("\n")
    total = result.stats
    report = total.summary()
    report.update(
        {
            "backend": backend,
            "rw": args.rw,
            "rwmixread": args.rwmixread if args.rw in ("randrw", "rw") else None,
            "bs": args.bs,
            "iodepth": args.iodepth,
            "queues": args.queues,
            "queue_size": qsize,
            "runtime": args.runtime,
            "engine": result.mode,
            "device_signals": args.device_signals == "on",
            "verify": args.verify,
            "reconnect": args.reconnect,
            "device": device,
            "first_error": total.error,
        }
    )
    if lun is not None:
        report["lun"] = lun
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 1 if total.errors or total.verify_errors else 0


def print_report(r: dict[str, Any]) -> None:
    """The human form of a bench report (the dict ``--json`` prints)."""
    lat = r["latency_us"]
    mix = f", rwmixread={r['rwmixread']}" if r.get("rwmixread") is not None else ""
    lun = f" lun={r['lun']}" if r.get("lun") else ""
    print(f"pyvirtio bench: {r['rw']}{mix} bs={r['bs']} iodepth={r['iodepth']} queues={r['queues']} "
          f"runtime={r['seconds']}s engine={r['engine']}{lun}")
    dev = r.get("device") or {}
    ring = f"   ring: {dev['ring']}{', IN_ORDER' if dev.get('in_order') else ''}" if dev.get("ring") else ""
    print(f"  back end: {r['backend']}{ring}")
    print(f"  IOPS: {r['iops']:,}   bandwidth: {r['mb_per_s']:,} MB/s   ios: {r['ios']:,} "
          f"(reads {r['reads']:,}, writes {r['writes']:,})")
    print(f"  latency (us): mean {lat['mean']}  p50 {lat['p50']}  p99 {lat['p99']}  "
          f"p99.9 {lat['p99.9']}  max {lat['max']}")
    verify = f"   verify errors: {r['verify_errors']}" if r["verify"] else ""
    first = f" (first: {r['first_error']})" if r.get("first_error") else ""
    print(f"  errors: {r['errors']}{first}{verify}")
    if r.get("reconnect") is not None or r.get("reconnects"):
        pause = r["pause_ms"]
        print(f"  reconnects: {r['reconnects']}   paused: {pause['total']:,} ms in total, "
              f"longest {pause['max']:,} ms")


__all__ = ["add_bench_options", "print_report", "queue_size", "register", "run", "run_lun"]
