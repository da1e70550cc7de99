"""``pyvirtio serve``: run an embedded vhost-user device back end.

``pyvirtio serve scsi --socket PATH --lun [T:L=]SIZE_OR_FILE [--lun ...]``
serves a virtio-scsi device with those LUNs (:mod:`pyvirtio.cli.scsi`).
``pyvirtio serve net --socket PATH --mode loopback|tap [--tap NAME]`` serves a
virtio-net device (:mod:`pyvirtio.cli.net`); ``--queues`` is its queue pairs.
``pyvirtio serve blk --socket PATH (--size SIZE | --file PATH)`` serves a
virtio-blk device (a RAM disk of SIZE bytes, or an existing regular file) to one
vhost-user frontend at a time (QEMU, qemu-storage-daemon's peers, SPDK,
pyvirtio itself) until SIGINT or SIGTERM, then removes its socket and exits
with status 0. A stale socket file is replaced; a socket another server
still answers on is an error. ``--inflight`` offers INFLIGHT_SHMFD, so a
restarted ``serve`` (after a crash) resubmits what its predecessor had in
flight; ``--client`` connects to a frontend that listens on the socket
(vhost-user client mode, e.g. ``pyvirtio bench --server``) and connects
again whenever the connection ends.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

from pyvirtio.errors import InvalidArgument

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_QUEUES = 256  # SET_VRING_KICK/CALL carry an 8-bit ring index


def _size_arg(text: str) -> int:
    try:
        from pyvirtio.cli.common import size_arg
    except ImportError:  # pragma: no cover - common.py always has it today
        return _local_size(text)
    value: int = size_arg(text)
    return value


def _local_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip()
    suffix = text[-1:] if text[-1:] in units else ""
    try:
        return int(text[: len(text) - len(suffix)], 0) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def _queues_arg(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid queue count {text!r}") from None
    if not 1 <= n <= MAX_QUEUES:
        raise argparse.ArgumentTypeError(f"--queues must be 1..{MAX_QUEUES}, got {n}")
    return n


def add_parser(subparsers: Any) -> None:
    """Register ``serve`` and its device sub-subcommands."""
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
    b.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (created)")
    backing = b.add_mutually_exclusive_group(required=True)
    backing.add_argument("--size", type=_size_arg, metavar="SIZE", help="RAM disk size (e.g. 1G, 512M, 4k)")
    backing.add_argument("--file", metavar="PATH", help="an existing regular file to serve")
    b.add_argument("--readonly", action="store_true", help="offer VIRTIO_BLK_F_RO and refuse writes")
    b.add_argument("--queues", type=_queues_arg, default=1, metavar="N", help="request queues (default 1)")
    b.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="default warning")
    b.add_argument(
        "--poll-us",
        type=float,
        default=None,
        metavar="US",
        help="poll a drained ring this long before sleeping on its kick (default 50)",
    )
    b.add_argument(
        "--inflight",
        action="store_true",
        help="offer INFLIGHT_SHMFD: after a restart, resubmit what the previous process left in flight",
    )
    b.add_argument(
        "--client",
        action="store_true",
        help="connect to a frontend listening on --socket (vhost-user client mode) and reconnect when it goes",
    )
    b.set_defaults(func=run)

    def shared_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--queues", type=_queues_arg, default=1, metavar="N", help="request queues (default 1)")
        q.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="default warning")
        q.add_argument("--poll-us", type=float, default=None, metavar="US",
                       help="poll a drained ring this long before sleeping on its kick (default 50)")

    from pyvirtio.cli.scsi import add_serve_parser as add_scsi

    add_scsi(devices, shared_options)

    from pyvirtio.cli.net import add_serve_parser as add_net

    add_net(devices, shared_options)


#: The name pyvirtio.cli.main looks for.
register = add_parser


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    from pyvirtio.backends.blk import BlockBackend, Storage
    from pyvirtio.backends.server import DEFAULT_POLL_US, VhostUserClient, VhostUserServer

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("pyvirtio.backends")
    if args.size is not None and args.size < 512:
        raise InvalidArgument(f"--size must be at least 512 bytes, got {args.size}")
    storage = Storage(size=args.size, path=args.file, readonly=args.readonly)
    try:
        if storage.size < 512:
            raise InvalidArgument(f"{args.file} is smaller than one sector")
        model = BlockBackend(storage, num_queues=args.queues)
        poll_us = DEFAULT_POLL_US if args.poll_us is None else args.poll_us
        kind = VhostUserClient if getattr(args, "client", False) else VhostUserServer
        server = kind(args.socket, model, poll_us=poll_us, inflight=bool(args.inflight))
        server.listen()
        previous = _install_signals(server.stop)
        try:
            log.info(
                "virtio-blk %s: %d bytes%s, %d queue(s) on %s",
                args.file or "RAM disk",
                storage.size,
                " read-only" if args.readonly else "",
                args.queues,
                args.socket,
            )
            server.serve()
        finally:
            _restore_signals(previous)
            server.close()
    finally:
        storage.close()
    return 0


def _install_signals(stop: Any) -> dict[int, Any]:
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: the caller stops the server itself
            break
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """``python -m pyvirtio.cli.serve blk ...``: the same command without the main parser."""
    from pyvirtio.cli.common import run as run_command

    parser = argparse.ArgumentParser(prog="pyvirtio")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
