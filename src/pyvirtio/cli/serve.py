"""``pyvirtio serve``: run an embedded vhost-user device back end.

``pyvirtio serve blk --socket PATH (--size SIZE | --file PATH)`` serves a
virtio-blk device (a RAM disk of SIZE bytes, or an existing regular file);
``pyvirtio serve scsi --socket PATH --lun [T:L=]SIZE_OR_FILE [--lun ...]``
a virtio-scsi device with those LUNs (:mod:`pyvirtio.cli.scsi`);
``pyvirtio serve net --socket PATH --mode loopback|tap [--tap NAME]`` a
virtio-net device (:mod:`pyvirtio.cli.net`; ``--queues`` is its queue pairs).

Each serves one vhost-user frontend at a time (QEMU, SPDK, DPDK's
virtio-user, pyvirtio itself) until SIGINT or SIGTERM, then removes its
socket and exits with status 0. A stale socket file is replaced; a socket
another server still answers on is an error. ``--client`` connects to a
frontend that listens on the socket instead (vhost-user client mode, e.g.
``pyvirtio bench --server``) and connects again whenever the connection
ends. ``serve blk --inflight`` offers INFLIGHT_SHMFD, so a restarted
``serve`` (after a crash) resubmits what its predecessor had in flight.
What the sub-commands share is :mod:`pyvirtio.cli.serving`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyvirtio.cli.common import size_arg
from pyvirtio.cli.serving import add_serve_options, serve_model, setup_logging
from pyvirtio.errors import InvalidArgument


def add_parser(subparsers: Any) -> None:
    """Register ``serve`` and its device sub-subcommands."""
    from pyvirtio.cli.net import add_serve_parser as add_net
    from pyvirtio.cli.scsi import add_serve_parser as add_scsi

    p = subparsers.add_parser(
        "serve",
        help="run an embedded vhost-user device back end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    devices = p.add_subparsers(dest="device", metavar="DEVICE")
    devices.required = True
    b = devices.add_parser(
        "blk",
        help="a virtio-blk device over RAM or a file",
        description="Serve a virtio-blk device on a vhost-user socket until SIGINT/SIGTERM.",
    )
    add_serve_options(b)
    backing = b.add_mutually_exclusive_group(required=True)
    backing.add_argument("--size", type=size_arg, metavar="SIZE", help="RAM disk size (e.g. 1G, 512M, 4k)")
    backing.add_argument("--file", metavar="PATH", help="an existing regular file to serve")
    b.add_argument("--readonly", action="store_true", help="offer VIRTIO_BLK_F_RO and refuse writes")
    b.add_argument(
        "--inflight",
        action="store_true",
        help="offer INFLIGHT_SHMFD: after a restart, resubmit what the previous process left in flight",
    )
    b.set_defaults(func=run)
    add_scsi(devices)
    add_net(devices)


#: The name pyvirtio.cli.main looks for.
register = add_parser


def run(args: argparse.Namespace) -> int:
    """``serve blk``: serve until SIGINT/SIGTERM; returns the exit status."""
    from pyvirtio.backends.blk import BlockBackend, Storage

    log = setup_logging(args.log_level)
    if args.size is not None and args.size < 512:
        raise InvalidArgument(f"--size must be at least 512 bytes, got {args.size}")
    storage = Storage(size=args.size, path=args.file, readonly=args.readonly)
    try:
        if storage.size < 512:
            raise InvalidArgument(f"{args.file} is smaller than one sector")
        model = BlockBackend(storage, num_queues=args.queues)

        def announce() -> None:
            log.info(
                "virtio-blk %s: %d bytes%s, %d queue(s) on %s",
                args.file or "RAM disk",
                storage.size,
                " read-only" if args.readonly else "",
                args.queues,
                args.socket,
            )

        return serve_model(args, model, announce, inflight=bool(args.inflight))
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m pyvirtio.cli.serve blk ...``: the same command without the main parser."""
    from pyvirtio.cli.common import run as run_command

    parser = argparse.ArgumentParser(prog="pyvirtio")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
