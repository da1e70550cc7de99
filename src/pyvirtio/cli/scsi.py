"""``pyvirtio scsi ...``: scan, benchmark and reset LUNs of a virtio-scsi device.

``pyvirtio scsi scan TARGET [--json]``
    every target and LUN found (REPORT LUNS, INQUIRY, VPD, READ CAPACITY):
    vendor / product, capacity, block size, UNMAP support.
``pyvirtio scsi bench TARGET [--lun T:L] --rw ... --bs ... --iodepth ... --runtime ...``
    a fio-like load on one LUN (the first one found by default): IOPS, MB/s,
    latency mean / p50 / p99 / max, errors.
``pyvirtio scsi reset TARGET --lun T:L``
    LOGICAL UNIT RESET on the control queue.

This module also holds ``pyvirtio serve scsi`` (registered by
:mod:`pyvirtio.cli.serve`): ``--lun [T:L=]SIZE_OR_FILE`` as many times as
wanted; LUNs without an address go to target 0, LUN 0, 1, 2...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from typing import Any

from pyvirtio.cli.common import (
    UsageError,
    add_target_arguments,
    format_size,
    parse_size,
    print_json,
    print_table,
    size_arg,
)
from pyvirtio.errors import InvalidArgument

MAX_QUEUE_SIZE = 1024


def lun_arg(text: str) -> tuple[int, int]:
    """argparse ``type=`` for ``T:L`` (target 0..255, LUN 0..16383)."""
    try:
        t_text, l_text = text.split(":")
        target, lun = int(t_text, 0), int(l_text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid LUN {text!r}: expected TARGET:LUN, e.g. 0:1") from None
    if not 0 <= target <= 255 or not 0 <= lun <= 16383:
        raise argparse.ArgumentTypeError(f"LUN {text!r} out of range (target 0..255, LUN 0..16383)")
    return target, lun


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("scsi", help="virtio-scsi: scan, bench, reset", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="scsi_command", metavar="OP", required=True)

    s = sub.add_parser("scan", help="list targets and LUNs", description="Scan every target and LUN of a "
                       "virtio-scsi device and print what each LUN is.")
    add_target_arguments(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_scan)

    b = sub.add_parser("bench", help="benchmark one LUN", description="A fio-like load on one LUN.")
    add_target_arguments(b)
    b.add_argument("--lun", type=lun_arg, default=None, metavar="T:L", help="the LUN (default: the first found)")
    b.add_argument("--rw", choices=("read", "write", "randread", "randwrite", "randrw", "rw"), default="randread")
    b.add_argument("--rwmixread", type=int, default=70, help="percentage of reads for randrw/rw (default 70)")
    b.add_argument("--bs", type=size_arg, default=4096, help="block size (default 4k)")
    b.add_argument("--iodepth", type=int, default=32, help="commands in flight (default 32)")
    b.add_argument("--runtime", type=float, default=10.0, help="seconds (default 10)")
    b.add_argument("--queue-size", type=int, default=None, help="ring size (default: fits iodepth, at least 256)")
    b.add_argument("--seed", type=int, default=None)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--no-progress", action="store_true", help="no live progress line")
    b.set_defaults(func=run_bench)

    r = sub.add_parser("reset", help="LOGICAL UNIT RESET", description="Send LOGICAL UNIT RESET to one LUN.")
    add_target_arguments(r)
    r.add_argument("--lun", type=lun_arg, required=True, metavar="T:L")
    r.set_defaults(func=run_reset)


def open_scsi(args: argparse.Namespace, **kw: Any) -> Any:
    """A started :class:`~pyvirtio.drivers.scsi.VirtioScsi` for ``args.target`` (scanned unless told)."""
    from pyvirtio.drivers.scsi import VirtioScsi
    from pyvirtio.spec.common import DEVICE_ID_SCSI
    from pyvirtio.targets import open_device

    transport_kw: dict[str, Any] = {"connect_timeout": args.connect_timeout, "timeout": args.timeout}
    if kw.get("queue_size"):
        transport_kw["queue_size"] = kw["queue_size"]
    device = open_device(args.target, device_type=DEVICE_ID_SCSI, **transport_kw)
    try:
        return VirtioScsi(device, timeout=args.timeout, **kw)
    except BaseException:
        device.close()
        raise


# -- scan -------------------------------------------------------------------------------


def run_scan(args: argparse.Namespace) -> int:
    scsi = open_scsi(args)
    try:
        luns = [info.to_dict() for _key, info in sorted(scsi.luns.items())]
        skipped = {f"{t}:{lun}" if lun >= 0 else f"{t}:*": why for (t, lun), why in sorted(scsi.scan_errors.items())}
        summary = {"target": args.target, "max_target": scsi.max_target, "max_lun": scsi.max_lun}
    finally:
        scsi.close()
    if args.json:
        print_json({**summary, "luns": luns, "skipped": skipped})
        return 0
    print(f"{len(luns)} LUN(s) on {args.target} (targets 0..{summary['max_target']} scanned)")
    if luns:
        render_luns(luns)
    for where, why in skipped.items():
        print(f"  skipped {where}: {why}")
    return 0


def render_luns(luns: list[dict[str, Any]]) -> None:
    """A table of LUNs (dicts from ``LunInfo.to_dict``)."""
    head = ("T:L", "type", "vendor", "product", "rev", "capacity", "block", "unmap", "ro")
    rows = [
        (
            f"{d['target']}:{d['lun']}",
            d["type"],
            d["vendor"],
            d["product"],
            d["revision"],
            f"{d['capacity']} ({format_size(d['capacity'])})",
            str(d["block_size"]),
            "yes" if d["unmap"] else "no",
            "yes" if d["readonly"] else "no",
        )
        for d in luns
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for line in (head, *rows):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


# -- reset ------------------------------------------------------------------------------


def run_reset(args: argparse.Namespace) -> int:
    scsi = open_scsi(args, scan=False)
    try:
        target, lun = args.lun
        scsi.lun_reset(target, lun)
    finally:
        scsi.close()
    print(f"LOGICAL UNIT RESET of {target}:{lun}: function complete")
    return 0


# -- bench ------------------------------------------------------------------------------


def _queue_size(args: argparse.Namespace) -> int:
    if args.queue_size is not None:
        return int(args.queue_size)
    size = 256
    while size < 4 * args.iodepth and size < MAX_QUEUE_SIZE:
        size *= 2
    return size


def run_bench(args: argparse.Namespace) -> int:
    from pyvirtio.drivers.scsi import ScsiBench

    if args.iodepth < 1 or args.runtime <= 0:
        raise InvalidArgument("--iodepth and --runtime must be positive")
    qsize = _queue_size(args)
    scsi = open_scsi(args, num_queues=1, queue_size=qsize, targets=None if args.lun is None else [args.lun[0]])
    try:
        if args.lun is None:
            if not scsi.luns:
                raise InvalidArgument(f"{args.target} has no LUN to benchmark")
            target, lun = min(scsi.luns)
        else:
            target, lun = args.lun
        disk = scsi.disk(target, lun)
        bench = ScsiBench(
            disk, rw=args.rw, bs=args.bs, iodepth=args.iodepth, rwmixread=args.rwmixread, seed=args.seed
        )
        show = None
        if sys.stderr.isatty() and not args.no_progress and not args.json:

            def show(stats: Any) -> None:
                secs = stats.seconds or 1e-9
                sys.stderr.write(
                    f"\r[{secs:5.1f}/{args.runtime:.0f}s] {stats.ios / secs:>10,.0f} IOPS  "
                    f"{stats.bytes / secs / 1e6:>9,.1f} MB/s  errors {stats.errors}   "
                )
                sys.stderr.flush()

        stop = threading.Event()
        try:
            stats = bench.run(args.runtime, stop=stop, progress=show)
        except KeyboardInterrupt:
            stop.set()
            raise
        finally:
            bench.close()
        if show is not None:
            sys.stderr.write("\n")
        report = stats.summary()
        report.update(
            {
                "backend": args.target,
                "lun": f"{target}:{lun}",
                "rw": args.rw,
                "rwmixread": args.rwmixread if args.rw in ("randrw", "rw") else None,
                "bs": args.bs,
                "iodepth": args.iodepth,
                "queues": 1,
                "queue_size": qsize,
                "runtime": args.runtime,
                "engine": bench.mode,
                "device": {"type": "scsi", "capacity": disk.capacity, "block_size": disk.block_size},
                "first_error": stats.error,
            }
        )
    finally:
        scsi.close()
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 1 if stats.errors else 0


def print_report(r: dict[str, Any]) -> None:
    lat = r["latency_us"]
    mix = f", rwmixread={r['rwmixread']}" if r.get("rwmixread") is not None else ""
    print(
        f"pyvirtio scsi bench: {r['rw']}{mix} bs={r['bs']} iodepth={r['iodepth']} lun={r['lun']} "
        f"runtime={r['seconds']}s"
    )
    print(f"  back end: {r['backend']}")
    print(
        f"  IOPS: {r['iops']:,}   bandwidth: {r['mb_per_s']:,} MB/s   ios: {r['ios']:,} "
        f"(reads {r['reads']:,}, writes {r['writes']:,})"
    )
    print(f"  latency (us): mean {lat['mean']}  p50 {lat['p50']}  p99 {lat['p99']}  max {lat['max']}")
    print(f"  errors: {r['errors']}" + (f" (first: {r['first_error']})" if r.get("first_error") else ""))


# -- info (called by pyvirtio.cli.info) ----------------------------------------------------


def scsi_info(args: argparse.Namespace) -> dict[str, Any]:
    """``pyvirtio info --type scsi``: the device info dict, LUNs included (``--lun`` keeps one)."""
    lun_sel = getattr(args, "lun", None)
    scsi = open_scsi(args, targets=None if lun_sel is None else [lun_sel[0]])
    try:
        info: dict[str, Any] = scsi.info()
    finally:
        scsi.close()
    if lun_sel is not None:
        wanted = [d for d in info["scsi"]["luns"] if (d["target"], d["lun"]) == tuple(lun_sel)]
        if not wanted:
            raise InvalidArgument(f"no LUN {lun_sel[0]}:{lun_sel[1]} on {args.target}")
        info["scsi"]["luns"] = wanted
    return info


def render_scsi(scsi: dict[str, Any]) -> None:
    print_table(
        "SCSI host",
        [
            ("request queues", f"{scsi['num_queues']} of {scsi['max_queues']}"),
            ("targets", f"0..{scsi['max_target']}"),
            ("LUNs per target", f"0..{scsi['max_lun']}"),
            ("cdb / sense size", f"{scsi['cdb_size']} / {scsi['sense_size']}"),
            ("seg_max", str(scsi["seg_max"] or "-")),
            ("max_sectors", str(scsi["max_sectors"] or "-")),
            ("hotplug", "yes" if scsi["hotplug"] else "no"),
        ],
    )
    print()
    print(f"LUNs: {len(scsi['luns'])}")
    if scsi["luns"]:
        render_luns(scsi["luns"])


# -- serve scsi (registered by pyvirtio.cli.serve) --------------------------------------------


def parse_lun_spec(text: str) -> tuple[tuple[int, int] | None, int | None, str | None]:
    """``[T:L=]SIZE_OR_FILE`` -> (address or None, RAM size or None, file or None)."""
    address = None
    spec = text
    head, sep, rest = text.partition("=")
    if sep and ":" in head and not head.startswith(("/", ".")):
        address = lun_arg(head)
        spec = rest
    if spec.startswith("file:"):
        return address, None, spec[5:]
    if spec.startswith("ram:"):
        spec = spec[4:]
    try:
        size = parse_size(spec)
    except InvalidArgument:
        return address, None, spec
    return address, size, None


def add_serve_parser(devices: Any, common: Any) -> None:
    """``pyvirtio serve scsi``; ``common(parser)`` adds serve's shared options (log level, poll)."""
    p = devices.add_parser(
        "scsi",
        help="a virtio-scsi device with one or more LUNs over RAM or files",
        description="Serve a virtio-scsi device on a vhost-user socket until SIGINT/SIGTERM. "
        "--lun [T:L=]SIZE_OR_FILE, repeated: a RAM disk of SIZE bytes (e.g. 64M) or an existing file; "
        "LUNs without T:L go to target 0, LUN 0, 1, 2...",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (created)")
    p.add_argument("--lun", action="append", required=True, metavar="[T:L=]SIZE_OR_FILE",
                   help="a LUN: RAM size or file (repeat for more LUNs)")
    p.add_argument("--block-size", type=size_arg, default=512, help="logical block size (default 512)")
    p.add_argument("--readonly", action="store_true", help="every LUN write-protected")
    p.add_argument("--sense-format", choices=("fixed", "descriptor"), default="fixed",
                   help="sense data format of CHECK CONDITION (default fixed)")
    common(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pyvirtio.backends.blk import Storage
    from pyvirtio.backends.scsi import ScsiBackend, ScsiLun
    from pyvirtio.backends.server import DEFAULT_POLL_US, VhostUserServer
    from pyvirtio.cli.serve import _install_signals, _restore_signals

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("pyvirtio.backends")
    units: dict[tuple[int, int], ScsiLun] = {}
    storages: list[Storage] = []
    model: ScsiBackend | None = None
    try:
        next_lun = 0
        for text in args.lun:
            address, size, path = parse_lun_spec(text)
            if address is None:
                while (0, next_lun) in units:
                    next_lun += 1
                address = (0, next_lun)
            if address in units:
                raise UsageError(f"--lun {text}: LUN {address[0]}:{address[1]} given twice")
            if size is not None and size < args.block_size:
                raise InvalidArgument(f"--lun {text}: a LUN needs at least one {args.block_size}-byte block")
            storage = Storage(size=size, path=path, readonly=args.readonly)
            storages.append(storage)
            try:
                units[address] = ScsiLun(storage, block_size=args.block_size)
            except ValueError as exc:
                raise InvalidArgument(f"--lun {text}: {exc}") from None
        model = ScsiBackend(units, request_queues=args.queues, sense_format=args.sense_format)
        poll_us = DEFAULT_POLL_US if args.poll_us is None else args.poll_us
        server = VhostUserServer(args.socket, model, poll_us=poll_us)
        server.listen()
        previous = _install_signals(server.stop)
        try:
            for (t, lun), unit in sorted(units.items()):
                log.info("LUN %d:%d: %s, %d bytes, block %d", t, lun, unit.storage.path or "RAM disk",
                         unit.capacity, unit.block_size)
            log.info("virtio-scsi: %d LUN(s), %d request queue(s) on %s", len(units), args.queues, args.socket)
            server.serve()
        finally:
            _restore_signals(previous)
            server.close()
    finally:
        if model is not None:
            model.close()
        for storage in storages:
            storage.close()  # idempotent: those of LUNs never attached
    return 0
