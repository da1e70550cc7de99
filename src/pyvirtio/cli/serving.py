"""What every ``pyvirtio serve`` device sub-command shares.

``pyvirtio serve blk|scsi|net`` each build a device model from their own
options and then run it the same way: :func:`add_serve_options` gives the
options they share (``--socket``, ``--queues``, ``--log-level``,
``--poll-us``, ``--client``), :func:`serve_model` logs at the chosen level,
listens on the socket (or, with ``--client``, connects to a frontend that
listens there and connects again whenever the connection ends), serves
until SIGINT or SIGTERM, then removes the socket and returns exit status 0.

The device sub-commands import this module; :mod:`pyvirtio.cli.serve`
imports theirs to register them, so nothing imports back.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_QUEUES = 256  # SET_VRING_KICK/CALL carry an 8-bit ring index


def queues_arg(text: str) -> int:
    """argparse ``type=`` for a queue count (1..:data:`MAX_QUEUES`)."""
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid queue count {text!r}") from None
    if not 1 <= n <= MAX_QUEUES:
        raise argparse.ArgumentTypeError(f"--queues must be 1..{MAX_QUEUES}, got {n}")
    return n


def add_serve_options(p: argparse.ArgumentParser, *, queues_help: str = "request queues (default 1)") -> None:
    """The options every ``serve`` device sub-command takes."""
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket to listen on (created), or with --client the frontend's socket")
    p.add_argument("--queues", type=queues_arg, default=1, metavar="N", help=queues_help)
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="default warning")
    p.add_argument("--poll-us", type=float, default=None, metavar="US",
                   help="poll a drained ring this long before sleeping on its kick (default 50)")
    p.add_argument("--client", action="store_true",
                   help="connect to a frontend listening on --socket (vhost-user client mode) and reconnect "
                   "when it goes")


def setup_logging(level: str) -> logging.Logger:
    """Log to stderr at ``level``; the back ends' logger."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger("pyvirtio.backends")


def install_signals(stop: Callable[[], None]) -> dict[int, Any]:
    """Call ``stop()`` on SIGINT / SIGTERM; the previous handlers, for :func:`restore_signals`.

    Outside the main thread nothing is installed (the caller stops the server itself).
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            break
    return previous


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def serve_model(
    args: argparse.Namespace, model: Any, announce: Callable[[], None] | None = None, *, inflight: bool = False
) -> int:
    """Serve ``model`` on ``args.socket`` until SIGINT / SIGTERM (see the module docstring); returns 0.

    ``announce()`` runs once the socket exists (log what is served). The
    caller closes the model afterwards.
    """
    from pyvirtio.backends.server import DEFAULT_POLL_US, VhostUserClient, VhostUserServer

    poll_us = DEFAULT_POLL_US if args.poll_us is None else args.poll_us
    kind = VhostUserClient if args.client else VhostUserServer
    server = kind(args.socket, model, poll_us=poll_us, inflight=inflight)
    server.listen()
    previous = install_signals(server.stop)
    try:
        if announce is not None:
            announce()
        server.serve()
    finally:
        restore_signals(previous)
        server.close()
    return 0


__all__ = [
    "LOG_LEVELS",
    "MAX_QUEUES",
    "add_serve_options",
    "install_signals",
    "queues_arg",
    "restore_signals",
    "serve_model",
    "setup_logging",
]
