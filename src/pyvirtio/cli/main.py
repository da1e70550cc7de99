"""Entry point of the ``pyvirtio`` command.

Subcommands live in their own modules under :mod:`pyvirtio.cli`; each has
``register(subparsers)`` (or ``add_parser(subparsers)``), which adds its
parser and sets ``func`` (called with the parsed arguments, returns the exit
status). :func:`main` runs it
through :func:`pyvirtio.cli.common.run`: an expected failure
(:class:`~pyvirtio.errors.PyvirtioError` or :class:`OSError`) prints one line
``pyvirtio: error: <message>`` on stderr and exits 1, never a traceback; bad
arguments exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from pyvirtio import __version__
from pyvirtio.cli.common import run

#: Subcommand modules, in help order. A module that is not there (yet) is skipped.
SUBCOMMAND_MODULES = (
    "pyvirtio.cli.info",
    "pyvirtio.cli.blk",
    "pyvirtio.cli.scsi",
    "pyvirtio.cli.net",
    "pyvirtio.cli.bench",
    "pyvirtio.cli.serve",
    "pyvirtio.cli.check",
    "pyvirtio.cli.trace",
    "pyvirtio.cli.pci",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvirtio", description="A pure-Python userspace virtio driver stack.")
    p.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        register = getattr(module, "register", None) or getattr(module, "add_parser", None)
        if register is not None:
            register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if args.command is None or func is None:
        parser.print_help(sys.stderr)
        return 2
    return run(func, args)


if __name__ == "__main__":
    sys.exit(main())
