"""Scatter-gather lists of the embedded back ends: a request's buffers as a list of memoryviews.

A chain's readable and writable parts (:class:`~pyvirtio.ring.device_side.Chain`)
are lists of views into the frontend's memory; a request's header, data and
status are byte ranges of those lists, split anywhere the driver chose
(virtio 1.2 §2.6.4, message framing: any layout). These helpers cut and copy
such ranges. They never allocate views beyond what they return and never
copy more than asked.
"""

from __future__ import annotations

__all__ = ["gather", "scatter", "skip", "take"]


def skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes."""
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def take(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``bufs`` (fewer if they hold fewer)."""
    out: list[memoryview] = []
    for b in bufs:
        if n <= 0:
            break
        piece = b[:n]
        out.append(piece)
        n -= len(piece)
    return out


def gather(bufs: list[memoryview], n: int) -> bytes:
    """A copy of the first ``n`` bytes of ``bufs``."""
    return b"".join(bytes(b) for b in take(bufs, n))


def scatter(bufs: list[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` into ``bufs`` in order; returns the bytes copied (at most what they hold)."""
    pos = 0
    for b in bufs:
        if pos >= len(data):
            break
        count = min(len(b), len(data) - pos)
        b[:count] = data[pos : pos + count]
        pos += count
    return pos
