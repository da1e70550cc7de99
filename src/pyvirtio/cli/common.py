"""Helpers shared by the ``pyvirtio`` subcommands: sizes, targets, errors, output.

Every subcommand module exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` (a callable taking the parsed arguments and
returning an exit status) with ``set_defaults``. :func:`run` calls it and
turns the errors a user can cause (a :class:`~pyvirtio.errors.PyvirtioError`
or an :class:`OSError`) into one line on stderr and exit status 1; argparse
reports bad arguments itself with exit status 2, and so does :class:`UsageError`
for combinations argparse cannot check.

Output works with and without a terminal: :func:`print_table` uses ``rich``
when stdout is a TTY and rich is installed, and plain aligned text otherwise
(pipes, files, CI logs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from pyvirtio.errors import InvalidArgument, PyvirtioError, UsageError

PROG = "pyvirtio"

#: Suffixes accepted by :func:`parse_size` (powers of 1024).
SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_SIZE_RE = re.compile(r"\s*(0[xX][0-9a-fA-F]+|\d+)\s*([kKMGT]?)\s*")

#: The largest chunk one CLI request moves (the bounce buffer in shared memory).
DEFAULT_CHUNK = 1 << 20


def parse_size(text: str) -> int:
    """Bytes in ``text``: a non-negative integer (decimal or 0x hex), optionally
    followed by k/K (KiB), M (MiB), G (GiB) or T (TiB).

    >>> parse_size("4k"), parse_size("1M"), parse_size("512")
    (4096, 1048576, 512)
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"size must be a string, got {type(text).__name__}")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise InvalidArgument(
            f"invalid size {text!r}: expected an integer with an optional suffix k, K, M, G or T"
        )
    number, suffix = m.groups()
    return int(number, 0) * SIZE_SUFFIXES[suffix]


def size_arg(text: str) -> int:
    """argparse ``type=`` wrapper of :func:`parse_size` (bad input exits with status 2)."""
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def byte_arg(text: str) -> int:
    """argparse ``type=`` for one byte value: 0..255, decimal or 0x hex."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid byte {text!r}: expected 0..255 (170, 0xaa)") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"byte {text!r} is out of range 0..255")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count of at least 1."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seconds_arg(text: str) -> float:
    """argparse ``type=`` for a duration of more than 0 seconds."""
    value = positive_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def lun_arg(text: str) -> tuple[int, int]:
    """argparse ``type=`` for ``T:L`` (target 0..255, LUN 0..16383)."""
    try:
        t_text, l_text = text.split(":")
        target, lun = int(t_text, 0), int(l_text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid LUN {text!r}: expected TARGET:LUN, e.g. 0:1") from None
    if not 0 <= target <= 255 or not 0 <= lun <= 16383:
        raise argparse.ArgumentTypeError(f"LUN {text!r} out of range (target 0..255, LUN 0..16383)")
    return target, lun


def format_size(n: int) -> str:
    """``1073741824`` -> ``'1 GiB'``; exact binary units only, otherwise bytes."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


# -- targets ------------------------------------------------------------------


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional TARGET and the connection options every device command takes."""
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="the device: vhost-user:PATH, a plain path to a vhost-user socket, or "
        "pci:DDDD:BB:SS.F[,legacy][,irq][,uio|,vfio] (a function bound with pyvirtio pci bind)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how long to wait for the socket to accept a connection (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a reply or a request completion (default 10)",
    )


def open_blk(args: argparse.Namespace, **kw: Any) -> Any:
    """A started :class:`~pyvirtio.drivers.blk.VirtioBlk` for ``args.target`` (with the ring options)."""
    from pyvirtio.cli.ring_option import ring_options
    from pyvirtio.drivers.blk import VirtioBlk
    from pyvirtio.targets import open_device

    opts = ring_options(args)
    zero_wrap = opts.pop("packed_zero_wrap")
    device = open_device(
        args.target, connect_timeout=args.connect_timeout, timeout=args.timeout, packed_zero_wrap=zero_wrap
    )
    try:
        return VirtioBlk(device, timeout=args.timeout, **opts, **kw)
    except BaseException:
        device.close()
        raise


def chunks(offset: int, length: int, step: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most ``step`` bytes covering ``offset..offset+length``."""
    if step <= 0:
        raise InvalidArgument(f"chunk size must be positive, got {step}")
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        yield offset, n
        offset += n


def align_down(value: int, align: int) -> int:
    return value - value % align


# -- errors and running -------------------------------------------------------


def error_line(message: object) -> str:
    """The one line printed for an expected failure (newlines folded)."""
    text = " ".join(str(message).split()) or type(message).__name__
    return f"{PROG}: error: {text}"


def run(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call a subcommand; expected failures become one line on stderr and status 1."""
    try:
        status = func(args)
    except UsageError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``pyvirtio blk read ... | head``): stop quietly.
        _silence_stdout()
        return 1
    except (PyvirtioError, OSError) as exc:
        print(error_line(_describe(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(error_line("interrupted"), file=sys.stderr)
        return 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 1
    return 0 if status is None else status


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, PyvirtioError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# -- output -------------------------------------------------------------------


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column key / value table: rich on a terminal, plain text otherwise."""
    if stdout_is_tty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
            table.add_column(style="bold")
            table.add_column(overflow="fold")
            for key, value in rows:
                table.add_row(key, value)
            Console().print(table)
            return
    print(f"{title}:")
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def hexdump(pieces: Iterable[bytes], base: int = 0) -> Iterator[str]:
    """``hexdump -C`` style lines over consecutive ``pieces`` of data starting at ``base``.

    Runs of identical 16-byte lines collapse to ``*``; the last line is the end offset.
    """
    prev: bytes | None = None
    starred = False
    pos = base
    tail = b""
    for piece in pieces:
        data = tail + bytes(piece)
        full = len(data) - len(data) % 16
        tail = data[full:]
        for off in range(0, full, 16):
            line = data[off : off + 16]
            if line == prev:
                if not starred:
                    yield "*"
                    starred = True
            else:
                prev, starred = line, False
                yield _hexline(pos, line)
            pos += 16
    if tail:
        yield _hexline(pos, tail)
        pos += len(tail)
    yield f"{pos:08x}"


def _hexline(pos: int, line: bytes) -> str:
    hexpart = " ".join(f"{b:02x}" for b in line[:8]) + "  " + " ".join(f"{b:02x}" for b in line[8:])
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in line)
    return f"{pos:08x}  {hexpart:<48}  |{text}|"


__all__ = [
    "DEFAULT_CHUNK",
    "UsageError",
    "add_target_arguments",
    "align_down",
    "byte_arg",
    "chunks",
    "error_line",
    "format_size",
    "hexdump",
    "lun_arg",
    "open_blk",
    "parse_size",
    "positive_int",
    "print_json",
    "print_table",
    "run",
    "seconds_arg",
    "size_arg",
]
