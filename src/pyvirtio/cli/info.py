"""``pyvirtio info TARGET [--json]``: what a device offers and what was negotiated.

The JSON form is :meth:`pyvirtio.drivers.blk.VirtioBlk.info` as is: SPDK's
``virtio_dev_dump_json_info`` keys (``"virtio": {"vq_count", "vq_size",
"type", "socket"}``) plus device type, status, offered / negotiated feature
names, protocol features and the decoded config space under ``"blk"``.
vhost-user does not say what a device is: ``--type scsi`` (or ``--lun T:L``)
opens it as virtio-scsi, and the info gains ``"scsi"`` (config, LUNs found
by a scan; ``--lun`` keeps one). A ``pci:`` target says what it is (its PCI
device ID): without ``--type`` it is opened as that type (blk, scsi or net;
net's info gains ``"net"``).
"""

from __future__ import annotations

import argparse
from typing import Any

from pyvirtio.cli.common import (
    UsageError,
    add_target_arguments,
    format_size,
    lun_arg,
    open_blk,
    print_json,
    print_table,
)
from pyvirtio.cli.net import render_net
from pyvirtio.cli.ring_option import add_ring_arguments
from pyvirtio.cli.scsi import render_scsi, scsi_info
from pyvirtio.spec.common import DEVICE_ID_BLOCK, DEVICE_ID_NET, DEVICE_ID_SCSI
from pyvirtio.targets import target_device_type

#: Device types ``info`` opens, by virtio device ID.
TYPE_NAMES = {DEVICE_ID_BLOCK: "blk", DEVICE_ID_SCSI: "scsi", DEVICE_ID_NET: "net"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "info",
        help="show a device's features, queues and config",
        description="Connect to a virtio-blk device, negotiate features, start its queues and "
        "print what it offers and what was negotiated.",
    )
    add_target_arguments(p)
    add_ring_arguments(p)
    p.add_argument("--json", action="store_true", help="print the info dict as JSON")
    p.add_argument("--type", choices=("blk", "scsi", "net"), default=None,
                   help="the device type (vhost-user does not say it: default blk, scsi with --lun; "
                   "a pci: target's own type)")
    p.add_argument("--lun", type=lun_arg, default=None, metavar="T:L", help="scsi: show this LUN only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kind = args.type
    if kind is None:
        kind = "scsi" if args.lun is not None else TYPE_NAMES.get(target_device_type(args.target) or 0, "blk")
    if kind == "scsi":
        info = scsi_info(args)
    elif kind == "net":
        from pyvirtio.drivers.net import VirtioNet

        with VirtioNet.open(args.target, connect_timeout=args.connect_timeout, timeout=args.timeout) as net:
            info = net.info()
    else:
        if args.lun is not None:
            raise UsageError("--lun applies to --type scsi")
        blk = open_blk(args)
        try:
            info = blk.info()
        finally:
            blk.close()
    if args.json:
        print_json(info)
    elif kind == "net":
        render_net(info)
    else:
        render(info)
    return 0


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "-"


def render(info: dict[str, Any]) -> None:
    """The human form of an info dict (see the module docstring)."""
    virtio = info.get("virtio", {})
    rows = [
        ("name", str(info.get("name", "-"))),
        ("device type", str(info.get("device_type", "-"))),
        ("transport", str(virtio.get("type", "-"))),
    ]
    if "socket" in virtio:
        rows.append(("socket", str(virtio["socket"])))
    rows.append(("status", _names(info.get("status", []))))
    print_table("Device", rows)
    print()
    print_table(
        "Features",
        [
            ("offered", _names(info.get("offered_features", []))),
            ("negotiated", _names(info.get("negotiated_features", []))),
        ],
    )
    if "protocol_features" in virtio:
        print()
        print_table(
            "vhost-user protocol features",
            [
                ("offered", _names(virtio.get("offered_protocol_features", []))),
                ("negotiated", _names(virtio.get("protocol_features", []))),
            ],
        )
    print()
    qrows = [
        ("queues started", str(virtio.get("vq_count", "-"))),
        ("queue size", str(virtio.get("vq_size", "-"))),
        ("ring format", str(virtio.get("ring", "-"))),
        ("in order", _yes(virtio["in_order"]) if "in_order" in virtio else "-"),
    ]
    if "backend_queues" in virtio:
        qrows.append(("back end queues", str(virtio["backend_queues"])))
    print_table("Queues", qrows)
    if info.get("scsi"):
        print()
        render_scsi(info["scsi"])
    blk = info.get("blk")
    if blk:
        print()
        print_table(
            "Block device",
            [
                ("capacity", f"{blk['capacity']} bytes ({format_size(blk['capacity'])})"),
                ("block size", str(blk["block_size"])),
                ("read-only", _yes(blk["readonly"])),
                ("flush", _yes(blk["flush"])),
                ("discard", _yes(blk["discard"])),
                ("write zeroes", _yes(blk["write_zeroes"])),
                ("queues", f"{blk['num_queues']} of {blk['max_queues']}"),
                ("size_max", str(blk["size_max"] or "-")),
                ("seg_max", str(blk["seg_max"] or "-")),
            ],
        )
        config = blk.get("config") or {}
        if config:
            print()
            print_table("Config space", [(k, str(v)) for k, v in config.items()])


def _yes(flag: object) -> str:
    return "yes" if flag else "no"
