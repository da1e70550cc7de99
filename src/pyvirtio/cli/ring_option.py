"""The ring options every device command takes: ``--ring`` and ``--in-order`` (issue 12).

``--ring split|packed|auto`` chooses the virtqueue format (virtio 1.2 §2.7
split, §2.8 packed); ``--in-order on|off|auto`` VIRTIO_F_IN_ORDER (§2.7.9,
§2.8.20). ``auto`` leaves the choice to the device layer
(:meth:`pyvirtio.device.VirtioDevice.reset`: what it negotiates when the
device offers the feature is :data:`pyvirtio.device.AUTO_RING` /
``AUTO_IN_ORDER``); ``packed`` or ``on`` make a device that does not offer
the feature fail with a :class:`~pyvirtio.errors.NegotiationError` naming it.
``--packed-zero-wrap`` keeps every packed ring base in lap 0 (DPDK's
vhost_blk example reads bit 15 of the base as part of the ring position;
:mod:`pyvirtio.ring.packed`, "Bases in lap 0").

This module only parses: :func:`ring_options` gives the keyword arguments
a driver's ``open`` takes (``ring=``, ``in_order=``, ``packed_zero_wrap=``);
a command that builds the device itself passes ``packed_zero_wrap`` to
:func:`pyvirtio.targets.open_device` and the rest to the driver.
"""

from __future__ import annotations

import argparse
from typing import Any

RING_CHOICES = ("split", "packed", "auto")
IN_ORDER_CHOICES = ("on", "off", "auto")

_IN_ORDER: dict[str, bool | str] = {"on": True, "off": False, "auto": "auto"}


def add_ring_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ring``, ``--in-order`` (both default to ``auto``) and ``--packed-zero-wrap`` to ``parser``."""
    parser.add_argument(
        "--ring",
        choices=RING_CHOICES,
        default="auto",
        help="virtqueue format: split, packed (VIRTIO_F_RING_PACKED), or auto (the default: "
        "the device layer's choice among what the device offers)",
    )
    parser.add_argument(
        "--in-order",
        choices=IN_ORDER_CHOICES,
        default="auto",
        help="VIRTIO_F_IN_ORDER: on (fail if the device does not offer it), off, or auto (the default)",
    )
    parser.add_argument(
        "--packed-zero-wrap",
        action="store_true",
        help="packed rings: hand the back end ring bases with wrap counters 0 (DPDK's vhost_blk example needs it)",
    )


def ring_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"ring", "in_order", "packed_zero_wrap"}`` for a driver's ``open``, from the parsed options."""
    return {"ring": args.ring, "in_order": _IN_ORDER[args.in_order], "packed_zero_wrap": args.packed_zero_wrap}
