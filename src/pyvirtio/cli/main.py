"""Entry point of the ``pyvirtio`` command."""

from __future__ import annotations

import argparse
import sys

from pyvirtio import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvirtio", description="A pure-Python userspace virtio driver stack.")
    p.add_argument("--version", action="version", version=f"pyvirtio {__version__}")
    p.add_subparsers(dest="command", metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
