"""``pyvirtio scsi ...``: scan, benchmark and reset LUNs of a virtio-scsi device.

``pyvirtio scsi scan TARGET [--json]``
    every target and LUN found (REPORT LUNS, INQUIRY, VPD, READ CAPACITY):
    vendor / product, capacity, block size, UNMAP support.
``pyvirtio scsi bench TARGET [--lun T:L] --rw ... --bs ... --iodepth ... --runtime ...``
    ``pyvirtio bench --lun`` (:mod:`pyvirtio.cli.bench`: same engine, options
    and report), with the first LUN found as default.
``pyvirtio scsi reset TARGET --lun T:L``
    LOGICAL UNIT RESET on the control queue.

This module also holds ``pyvirtio serve scsi`` (registered by
:mod:`pyvirtio.cli.serve`): ``--lun [T:L=]SIZE_OR_FILE`` as many times as
wanted; LUNs without an address go to target 0, LUN 0, 1, 2...
"""

from __future__ import annotations

import argparse
from typing import Any

from pyvirtio.cli.bench import add_bench_options, run_lun
from pyvirtio.cli.common import (
    UsageError,
    add_target_arguments,
    format_size,
    lun_arg,
    parse_size,
    print_json,
    print_table,
    size_arg,
)
from pyvirtio.cli.ring_option import add_ring_arguments, ring_options
from pyvirtio.cli.serving import add_serve_options, serve_model, setup_logging
from pyvirtio.errors import InvalidArgument


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("scsi", help="virtio-scsi: scan, bench, reset", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="scsi_command", metavar="OP", required=True)

    s = sub.add_parser("scan", help="list targets and LUNs", description="Scan every target and LUN of a "
                       "virtio-scsi device and print what each LUN is.")
    add_target_arguments(s)
    add_ring_arguments(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_scan)

    b = sub.add_parser("bench", help="benchmark one LUN (pyvirtio bench --lun)",
                       description="A fio-like load on one LUN: pyvirtio bench --lun, with the first LUN found "
                       "as default.")
    add_target_arguments(b)
    b.add_argument("--lun", type=lun_arg, default=None, metavar="T:L", help="the LUN (default: the first found)")
    add_bench_options(b)
    b.set_defaults(func=run_lun)

    r = sub.add_parser("reset", help="LOGICAL UNIT RESET", description="Send LOGICAL UNIT RESET to one LUN.")
    add_target_arguments(r)
    add_ring_arguments(r)
    r.add_argument("--lun", type=lun_arg, required=True, metavar="T:L")
    r.set_defaults(func=run_reset)


def open_scsi(args: argparse.Namespace, **kw: Any) -> Any:
    """A started :class:`~pyvirtio.drivers.scsi.VirtioScsi` for ``args.target`` (scanned unless told)."""
    from pyvirtio.drivers.scsi import VirtioScsi
    from pyvirtio.spec.common import DEVICE_ID_SCSI
    from pyvirtio.targets import open_device

    opts = ring_options(args)
    transport_kw: dict[str, Any] = {
        "connect_timeout": args.connect_timeout,
        "timeout": args.timeout,
        "packed_zero_wrap": opts.pop("packed_zero_wrap"),
    }
    if kw.get("queue_size"):
        transport_kw["queue_size"] = kw["queue_size"]
    device = open_device(args.target, device_type=DEVICE_ID_SCSI, **transport_kw)
    try:
        return VirtioScsi(device, timeout=args.timeout, **opts, **kw)
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
            ("config", scsi.get("config_source", "device")),
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


def add_serve_parser(devices: Any) -> None:
    """``pyvirtio serve scsi`` (registered by :mod:`pyvirtio.cli.serve`)."""
    p = devices.add_parser(
        "scsi",
        help="a virtio-scsi device with one or more LUNs over RAM or files",
        description="Serve a virtio-scsi device on a vhost-user socket until SIGINT/SIGTERM. "
        "--lun [T:L=]SIZE_OR_FILE, repeated: a RAM disk of SIZE bytes (e.g. 64M) or an existing file; "
        "LUNs without T:L go to target 0, LUN 0, 1, 2...",
    )
    add_serve_options(p)
    p.add_argument("--lun", action="append", required=True, metavar="[T:L=]SIZE_OR_FILE",
                   help="a LUN: RAM size or file (repeat for more LUNs)")
    p.add_argument("--block-size", type=size_arg, default=512, help="logical block size (default 512)")
    p.add_argument("--readonly", action="store_true", help="every LUN write-protected")
    p.add_argument("--sense-format", choices=("fixed", "descriptor"), default="fixed",
                   help="sense data format of CHECK CONDITION (default fixed)")
    p.add_argument("--no-config", action="store_true",
                   help="do not offer PROTOCOL_F_CONFIG (as SPDK's vhost-user-scsi target): "
                   "the frontend keeps the virtio-scsi config itself")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pyvirtio.backends.blk import Storage
    from pyvirtio.backends.scsi import ScsiBackend, ScsiLun

    log = setup_logging(args.log_level)
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
        model = ScsiBackend(
            units, request_queues=args.queues, sense_format=args.sense_format, config_space=not args.no_config
        )

        def announce() -> None:
            for (t, lun), unit in sorted(units.items()):
                log.info("LUN %d:%d: %s, %d bytes, block %d", t, lun, unit.storage.path or "RAM disk",
                         unit.capacity, unit.block_size)
            log.info("virtio-scsi: %d LUN(s), %d request queue(s) on %s", len(units), args.queues, args.socket)

        return serve_model(args, model, announce)
    finally:
        if model is not None:
            model.close()
        for storage in storages:
            storage.close()  # idempotent: those of LUNs never attached
