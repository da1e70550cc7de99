"""Argument checks shared by the block-shaped drivers (virtio-blk, a virtio-scsi LUN).

They run before anything touches a ring, so a bad argument costs nothing
and names the caller's mistake (InvalidArgument).
"""

from __future__ import annotations

from pyvirtio.errors import InvalidArgument


def check_range(op: str, offset: int, length: int, *, block_size: int, capacity: int, what: str) -> None:
    """``offset``/``length`` are block-aligned and inside ``capacity`` (``what``: "device", "LUN")."""
    if offset < 0 or length < 0:
        raise InvalidArgument(f"{op}: negative offset or length ({offset}, {length})")
    if offset % block_size or length % block_size:
        raise InvalidArgument(
            f"{op}: offset {offset} and length {length} must be multiples of the block size {block_size}"
        )
    if offset + length > capacity:
        raise InvalidArgument(f"{op}: {offset}+{length} is beyond the {what} capacity {capacity}")


def check_data(
    op: str, offset: int, length: int, *, block_size: int, capacity: int, max_transfer: int, what: str
) -> None:
    """:func:`check_range`, plus a non-zero length no larger than one transfer may be."""
    check_range(op, offset, length, block_size=block_size, capacity=capacity, what=what)
    if length == 0:
        raise InvalidArgument(f"{op}: zero length")
    if length > max_transfer:
        raise InvalidArgument(f"{op}: length {length} exceeds the {what}'s largest transfer {max_transfer}")
