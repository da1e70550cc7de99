"""``pyvirtio blk ...``: one-off block requests against a virtio-blk device.

Subcommands: ``read``, ``write``, ``flush``, ``discard``, ``write-zeroes``,
``get-id``. Offsets and lengths take size suffixes (``4k``, ``1M``, ...) and
must be multiples of the device's block size. Large reads and writes are
split into requests of at most ``--chunk`` bytes (default 1 MiB, never more
than the device's largest transfer); discard and write-zeroes ranges are
split by the device's per-request limits. The whole range is checked before
the first request is sent, so a bad range never half-completes. All of that
is the driver's (:class:`~pyvirtio.drivers.block.BlockDevice`: ``read_iter``,
``write_from``, ``fill``, ``discard``, ``write_zeroes``); this module parses
arguments and moves bytes between files and the device.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from pyvirtio.cli.common import (
    DEFAULT_CHUNK,
    UsageError,
    add_target_arguments,
    byte_arg,
    hexdump,
    open_blk,
    size_arg,
    stdout_is_tty,
)
from pyvirtio.cli.ring_option import add_ring_arguments

if TYPE_CHECKING:
    from pyvirtio.drivers.blk import VirtioBlk

READ_HELP = """\
Read LENGTH bytes at OFFSET.

Where the data goes:
  -o FILE     raw bytes into FILE (created or truncated)
  -o -        raw bytes to stdout
  (no -o)     a hexdump (like `hexdump -C`) when stdout is a terminal,
              raw bytes when stdout is a pipe or a file
  --hex       force the hexdump
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "blk", help="block requests: read, write, flush, discard, write-zeroes, get-id", description=__doc__
    )
    sub = p.add_subparsers(dest="blk_command", metavar="OP", required=True)

    r = sub.add_parser(
        "read", help="read bytes", description=READ_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_target_arguments(r)
    add_ring_arguments(r)
    _range_arguments(r)
    r.add_argument("-o", "--output", metavar="FILE", help="write the raw bytes to FILE ('-' for stdout)")
    r.add_argument("--hex", action="store_true", help="print a hexdump even when stdout is not a terminal")
    _chunk_argument(r)
    r.set_defaults(func=cmd_read)

    w = sub.add_parser(
        "write",
        help="write bytes from a file or a repeated byte",
        description="Write the bytes of --input (all of it, or --length bytes) or --length copies of "
        "--pattern at OFFSET. The length must be a multiple of the block size.",
    )
    add_target_arguments(w)
    add_ring_arguments(w)
    w.add_argument("--offset", type=size_arg, required=True, help="byte offset (suffixes k, M, G, T)")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", "-i", metavar="FILE", help="the data to write ('-' for stdin)")
    src.add_argument("--pattern", type=byte_arg, metavar="BYTE", help="repeat this byte (0..255 or 0x..)")
    w.add_argument("--length", type=size_arg, help="bytes to write (required with --pattern)")
    _chunk_argument(w)
    w.set_defaults(func=cmd_write)

    f = sub.add_parser("flush", help="flush the device's write cache")
    add_target_arguments(f)
    add_ring_arguments(f)
    f.set_defaults(func=cmd_flush)

    d = sub.add_parser("discard", help="discard (trim) a range")
    add_target_arguments(d)
    add_ring_arguments(d)
    _range_arguments(d)
    d.set_defaults(func=cmd_discard)

    z = sub.add_parser("write-zeroes", help="zero a range without sending data")
    add_target_arguments(z)
    add_ring_arguments(z)
    _range_arguments(z)
    z.add_argument("--unmap", action="store_true", help="allow the device to deallocate the range")
    z.set_defaults(func=cmd_write_zeroes)

    g = sub.add_parser("get-id", help="print the device's serial number (GET_ID)")
    add_target_arguments(g)
    add_ring_arguments(g)
    g.set_defaults(func=cmd_get_id)


def _range_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offset", type=size_arg, required=True, help="byte offset (suffixes k, M, G, T)")
    p.add_argument("--length", type=size_arg, required=True, help="byte count (suffixes k, M, G, T)")


def _chunk_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chunk",
        type=size_arg,
        default=DEFAULT_CHUNK,
        metavar="SIZE",
        help="largest single request (default 1M; capped by the device's limits)",
    )


# -- commands -----------------------------------------------------------------


def cmd_read(args: argparse.Namespace) -> int:
    blk = open_blk(args, num_queues=1)
    try:
        pieces = blk.read_iter(args.offset, args.length, args.chunk)  # the whole range is checked here
        if args.output not in (None, "-"):
            with open(args.output, "wb") as out:
                _copy(pieces, out)
            print(f"read {args.length} bytes at offset {args.offset} into {args.output}")
        elif args.hex or (args.output is None and stdout_is_tty()):
            for line in hexdump(pieces, args.offset):
                print(line)
        else:
            sys.stdout.flush()
            _copy(pieces, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    finally:
        blk.close()
    return 0


def _copy(pieces: Iterator[bytes], out: IO[bytes]) -> None:
    for piece in pieces:
        out.write(piece)


def cmd_write(args: argparse.Namespace) -> int:
    if args.pattern is not None and args.length is None:
        raise UsageError("blk write: --pattern needs --length")
    blk = open_blk(args, num_queues=1)
    try:
        if args.pattern is not None:
            blk.fill(args.offset, args.length, args.pattern, args.chunk)
            total = args.length
        else:
            total = _write_file(blk, args)
        print(f"wrote {total} bytes at offset {args.offset}")
    finally:
        blk.close()
    return 0


def _write_file(blk: VirtioBlk, args: argparse.Namespace) -> int:
    blk.check_writable("write")  # before the input is opened
    if args.input == "-":
        src: IO[bytes] = sys.stdin.buffer
        close = False
    else:
        src = open(args.input, "rb")  # closed in the finally below
        close = True
    try:
        length = args.length
        if length is None and not (args.input == "-") and os.path.isfile(args.input):
            length = os.fstat(src.fileno()).st_size
        return blk.write_from(args.offset, lambda n: _read_exact(src, n), length, args.chunk)
    finally:
        if close:
            src.close()


def _read_exact(src: IO[bytes], n: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        data = src.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def cmd_flush(args: argparse.Namespace) -> int:
    blk = open_blk(args, num_queues=1)
    try:
        blk.flush()
    finally:
        blk.close()
    print("flushed")
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    blk = open_blk(args, num_queues=1)
    try:
        blk.discard(args.offset, args.length)  # split by the device's limits, checked as a whole first
    finally:
        blk.close()
    print(f"discarded {args.length} bytes at offset {args.offset}")
    return 0


def cmd_write_zeroes(args: argparse.Namespace) -> int:
    blk = open_blk(args, num_queues=1)
    try:
        blk.write_zeroes(args.offset, args.length, unmap=args.unmap)
    finally:
        blk.close()
    print(f"zeroed {args.length} bytes at offset {args.offset}")
    return 0


def cmd_get_id(args: argparse.Namespace) -> int:
    blk = open_blk(args, num_queues=1)
    try:
        ident = blk.get_id()
    finally:
        blk.close()
    print(ident)
    return 0
