"""``pyvirtio check TARGET``: test a vhost-user back end against the conformance catalogue, without a VM.

Runs the rules of :mod:`pyvirtio.conformance` against the back end listening
on TARGET (``vhost-user:PATH`` or ``PATH``) and prints one line per rule:
PASS, FAIL (with the exchange that led there, what came back and what the
rule expected), SKIP (with why), WEDGED (the back end stopped answering or
stopped accepting frontends; with ``--restart-cmd`` it is started again and
the run goes on). ``--json`` prints the report as JSON instead, ``--junit
FILE`` writes JUnit XML as well. The exit status is 0 when no MUST rule
failed or wedged, 1 otherwise (2 for bad arguments): CI can gate on it.

``--device`` says what the back end is (the default ``auto`` guesses from
its features and config); ``--rules`` takes comma-separated shell patterns
on rule ids or areas (``handshake``, ``ring.notify.*``, ``hostile``);
``--list`` prints the catalogue. ``--pid`` names the back end's process for
the rules that watch its fds and mappings (with ``--restart-cmd`` the
started process is used). ``--restart-cmd`` is run as ``sh -c "exec CMD"``
whenever nothing answers on the socket: needed for back ends that serve one
connection and exit (virtiofsd).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyvirtio.cli.common import positive_int, seconds_arg, stdout_is_tty
from pyvirtio.conformance import CATALOGUE, DEVICES, Report, Result, Runner, Settings
from pyvirtio.conformance import report as fmt
from pyvirtio.errors import InvalidArgument


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="test a vhost-user back end against the conformance rules",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="?", metavar="TARGET", help="vhost-user:PATH or PATH of the back end's socket")
    p.add_argument("--device", default="auto", choices=["auto", *DEVICES], help="device type (default: auto)")
    p.add_argument("--rules", metavar="PATTERN[,PATTERN]", help="rule ids or areas to run (shell patterns)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    p.add_argument("--restart-cmd", metavar="CMD", help="shell command that starts the back end (restarts too)")
    p.add_argument("--pid", type=positive_int, help="the back end's process id (fd and mapping growth rules)")
    p.add_argument("--timeout", type=seconds_arg, default=2.0, help="seconds to wait for a reply (default 2)")
    p.add_argument("--quiet-time", type=seconds_arg, default=0.2,
                   help="seconds to watch for what must not happen (default 0.2)")
    p.add_argument("--connections", type=positive_int, default=100, help="connections of the fd growth rule")
    p.add_argument("--list", action="store_true", help="list the rules and exit")
    p.set_defaults(func=run)


def _target_path(target: str) -> str:
    path = target[len("vhost-user:") :] if target.startswith("vhost-user:") else target
    if not path or ":" in target.partition("vhost-user:")[0]:
        raise InvalidArgument(f"TARGET must be vhost-user:PATH or a socket path, not {target!r}")
    return path


def _list() -> int:
    for r in CATALOGUE:
        scope = ",".join(sorted(r.devices)) or "all"
        print(f"{r.id:<44} {r.severity.value:<10} {scope:<5} {r.title}  [{r.section}]")
    print(f"{len(CATALOGUE)} rules")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    if not args.target:
        raise InvalidArgument("TARGET is required (or --list)")
    streaming = not args.json and not stdout_is_tty()

    def started(report: Report) -> None:
        if streaming:
            print("\n".join(fmt.header_lines(report)), flush=True)

    def progress(result: Result) -> None:
        if streaming:
            print("\n".join(fmt.result_lines(result)), flush=True)

    runner = Runner(
        _target_path(args.target),
        Settings(args.timeout, args.quiet_time, args.pid, args.connections),
        device=args.device,
        rules=[p.strip() for p in args.rules.split(",") if p.strip()] if args.rules else None,
        restart_cmd=args.restart_cmd,
        progress=progress,
        started=started,
    )
    report = runner.run()
    if args.junit:
        with open(args.junit, "w") as f:
            f.write(fmt.to_junit(report))
    if args.json:
        sys.stdout.write(fmt.to_json(report))
    elif streaming:
        print(fmt.summary_line(report))
    else:
        _print_rich_or_text(report)
    return report.exit_status()


def _print_rich_or_text(report: Report) -> None:
    try:
        from rich.console import Console
    except ImportError:
        sys.stdout.write(fmt.to_text(report))
        return
    Console().print(fmt.rich_table(report))
