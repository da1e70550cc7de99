"""``pyvirtio trace --listen PATH --connect PATH``: see the conversation between a frontend and a back end.

A proxy (:mod:`pyvirtio.trace`): point the frontend (QEMU's
``-chardev socket,path=LISTEN``, ``pyvirtio bench vhost-user:LISTEN``) at
the ``--listen`` socket; every message it sends goes on to the back end at
``--connect`` and back, unchanged (same bytes, same fds), and is printed
decoded: time since the first message, direction (``->`` frontend to back
end, ``<-`` back), request name, flags, every field by name, fds, and for a
reply the request it answers and how long that took. ``--json`` prints one
JSON object per line instead. ``--rings`` also relays each ring's kick and
call eventfds (counting them) and maps the frontend's memory read-only to
sample each ring's indices every ``--interval`` seconds. ``--device`` names
device feature bits. Runs until SIGINT / SIGTERM, or until the first
frontend leaves with ``--once``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from pyvirtio.cli.common import seconds_arg
from pyvirtio.spec.common import DEVICE_TYPE_NAMES
from pyvirtio.trace import Event, RingSample, TraceItem, TraceProxy

_DEVICE_IDS = {name: ident for ident, name in DEVICE_TYPE_NAMES.items()}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "trace",
        help="proxy between a vhost-user frontend and back end, printing every message decoded",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", required=True, metavar="PATH", help="socket the frontend connects to")
    p.add_argument("--connect", required=True, metavar="PATH", help="the back end's socket")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--rings", action="store_true", help="relay kicks and calls and sample the rings")
    p.add_argument("--interval", type=seconds_arg, default=1.0, help="seconds between ring samples (default 1)")
    p.add_argument("--device", choices=sorted(_DEVICE_IDS), help="device type, to name its feature bits")
    p.add_argument("--once", action="store_true", help="exit when the first frontend leaves")
    p.set_defaults(func=run)


def _printer(as_json: bool) -> Any:
    def emit(item: TraceItem) -> None:
        if as_json:
            if isinstance(item, Event | RingSample):
                obj: dict[str, Any] = item.to_json()
                obj["kind"] = "message" if isinstance(item, Event) else "ring"
            else:
                obj = {"kind": "note", "text": item}
            line = json.dumps(obj)
        else:
            line = item if isinstance(item, str) else item.to_text()
        print(line, flush=True)

    return emit


def run(args: argparse.Namespace) -> int:
    device_type = _DEVICE_IDS[args.device] if args.device else 0
    proxy = TraceProxy(
        args.listen,
        args.connect,
        _printer(args.json),
        rings=args.rings,
        interval=args.interval,
        once=args.once,
        device_type=device_type,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _s, _f: proxy.stop())
    if not args.json:
        print(f"tracing {args.listen} -> {args.connect}", file=sys.stderr, flush=True)
    proxy.serve()
    return 0
