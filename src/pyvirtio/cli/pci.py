"""``pyvirtio pci list|bind|unbind``: virtio PCI functions and the driver each is bound to.

``pyvirtio pci list [--json]`` shows every virtio function (address, vendor
and device ID, device type, modern or transitional, the driver bound, the
IOMMU group). ``pyvirtio pci bind ADDR... [--driver uio|vfio]`` moves a function
from the kernel's virtio-pci to uio_pci_generic (default) or vfio-pci, so
that ``pci:ADDR`` targets can drive it; ``pyvirtio pci unbind ADDR...`` gives it
back to the kernel's driver. Binding needs root and the driver's module
loaded. The work is :mod:`pyvirtio.transport.pci_sysfs`'s; this is the thin
command around it.
"""

from __future__ import annotations

import argparse
from typing import Any

from pyvirtio.cli.common import print_json
from pyvirtio.transport.pci_sysfs import DRIVERS, PciFunction, bind, give_back, parse_address, virtio_functions


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pci", help="list virtio PCI functions; bind them to uio/vfio or back",
                              description="virtio PCI functions and their drivers (pci:ADDR targets).")
    sub = p.add_subparsers(dest="pci_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the virtio functions, their type, interface and driver")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_list)
    b = sub.add_parser("bind", help="bind a function to uio_pci_generic or vfio-pci")
    b.add_argument("address", type=parse_address, nargs="+", metavar="ADDR", help="DDDD:BB:SS.F (one or more)")
    b.add_argument("--driver", choices=tuple(DRIVERS), default="uio", help="uio (default) or vfio")
    b.set_defaults(func=run_bind)
    u = sub.add_parser("unbind", help="give a function back to the kernel's virtio driver")
    u.add_argument("address", type=parse_address, nargs="+", metavar="ADDR", help="DDDD:BB:SS.F (one or more)")
    u.set_defaults(func=run_unbind)


def run_list(args: argparse.Namespace) -> int:
    rows = [fn.describe() for fn in virtio_functions()]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no virtio PCI functions")
        return 0
    cols = ("address", "device", "type", "interface", "driver", "iommu_group")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(w) for c, w in zip(cols, widths, strict=True)))
    return 0


def run_bind(args: argparse.Namespace) -> int:
    for address in args.address:
        fn = PciFunction(address)
        bind(fn, DRIVERS[args.driver])
        print(f"{fn.address}: {fn.driver()}")
    return 0


def run_unbind(args: argparse.Namespace) -> int:
    for address in args.address:
        fn = PciFunction(address)
        print(f"{fn.address}: {give_back(fn) or 'no driver'}")
    return 0
