"""The block facade shared by virtio-blk and a virtio-scsi LUN: one set of checks, one sync and async API.

Theory of operation. :class:`BlockDevice` is what a program sees of a
disk, whatever carries it: byte offsets and lengths, multiples of the
block size. A subclass supplies the geometry (``block_size``,
``capacity``, ``readonly``, ``max_transfer``, what it can do), the request
builders for *one* request each (``read_request``, ``write_request``,
``flush_request``, and ``discard_requests`` / ``write_zeroes_requests``,
split by the device's own limits), and the request engine that runs them
(:class:`~pyvirtio.drivers.requests.RequestEngine`):
:class:`~pyvirtio.drivers.blk.VirtioBlk` is its own engine,
:class:`~pyvirtio.drivers.scsi.ScsiDisk` uses its host adapter's.

Every argument is checked before a ring is touched, for the whole range
(so a bad range never half-completes), and each failure names the
caller's mistake (:class:`~pyvirtio.errors.InvalidArgument`): negative,
unaligned or zero lengths, a range beyond the capacity, a write to a
read-only device, an operation the device did not offer. The request
builders are strict (at most ``max_transfer`` bytes: a single request is
never split silently); the sync and async calls split a transfer above
``max_transfer`` into requests run together (as many in flight as the
queue and the shared memory allow). :meth:`BlockDevice.read_iter` and
:meth:`BlockDevice.write_from` stream large ranges in pieces of a chosen
size (``pyvirtio blk read / write --chunk``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Generic

from pyvirtio.drivers.requests import R, RequestEngine
from pyvirtio.errors import InvalidArgument
from pyvirtio.memory import Buffer

#: The default piece size of :meth:`BlockDevice.read_iter` / :meth:`BlockDevice.write_from` (1 MiB).
DEFAULT_CHUNK = 1 << 20


def split_range(offset: int, length: int, step: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of at most ``step`` bytes covering ``offset..offset+length``."""
    if step <= 0:
        raise InvalidArgument(f"piece size must be positive, got {step}")
    end = offset + length
    return [(o, min(step, end - o)) for o in range(offset, end, step)]


class BlockDevice(Generic[R]):
    """Block I/O with byte offsets (see the module docstring). Subclasses set the attributes below."""

    #: "device" or "LUN", in messages.
    what: ClassVar[str] = "device"
    __slots__ = ()  # subclasses set the attributes below, in their slots

    block_size: int
    capacity: int
    readonly: bool
    #: Why writes are refused, in messages ("the device is read-only").
    readonly_why: str
    #: The largest single read / write request, in bytes (a multiple of the block size).
    max_transfer: int
    can_flush: bool
    can_discard: bool
    can_write_zeroes: bool
    #: Runs this device's requests.
    engine: RequestEngine[R]

    # -- checks (before anything touches a ring) ---------------------------------------

    def check_range(self, op: str, offset: int, length: int) -> None:
        """``offset`` / ``length`` are block-aligned and inside the capacity (a zero length passes)."""
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{op}: negative offset or length ({offset}, {length})")
        bs = self.block_size
        if offset % bs or length % bs:
            raise InvalidArgument(f"{op}: offset {offset} and length {length} must be multiples of the block size {bs}")
        if offset + length > self.capacity:
            raise InvalidArgument(f"{op}: {offset}+{length} is beyond the {self.what} capacity {self.capacity}")

    def check_data(self, op: str, offset: int, length: int, limit: int | None = None) -> None:
        """:meth:`check_range` with a non-zero length of at most ``limit`` (default: :attr:`max_transfer`)."""
        bs = self.block_size
        if 0 < length and 0 <= offset and not (offset % bs or length % bs) and offset + length <= self.capacity:
            # check_range's conditions, passed without a call (every one-request read and write comes here)
            if length <= (self.max_transfer if limit is None else limit):
                return
        else:
            self.check_range(op, offset, length)
        if length == 0:
            raise InvalidArgument(f"{op}: zero length")
        limit = self.max_transfer if limit is None else limit
        if length > limit:
            raise InvalidArgument(f"{op}: length {length} exceeds the {self.what}'s largest transfer {limit}")

    def check_writable(self, op: str) -> None:
        if self.readonly:
            raise InvalidArgument(f"{op}: {self.readonly_why}")

    def _check_op(self, op: str, offset: int, length: int) -> None:
        """A whole range for a multi-request operation: aligned, inside, not empty."""
        self.check_data(op, offset, length, limit=self.capacity)

    # -- request builders (one request each; subclasses) --------------------------------

    def read_request(self, offset: int, length: int, into: Buffer | None = None) -> R:
        raise NotImplementedError

    def write_request(self, offset: int, data: bytes | memoryview | Buffer) -> R:
        raise NotImplementedError

    def flush_request(self) -> R:
        raise NotImplementedError

    def discard_requests(self, offset: int, length: int) -> list[R]:
        """Requests discarding the range (checked), split by the device's limits."""
        raise NotImplementedError

    def write_zeroes_requests(self, offset: int, length: int, unmap: bool = False) -> list[R]:
        """Requests zeroing the range (checked), split by the device's limits."""
        raise NotImplementedError

    def _read_result(self, req: R) -> bytes:
        """The data a completed read request brought (bounced reads)."""
        raise NotImplementedError

    # -- steps -------------------------------------------------------------------------

    def transfer_step(self, chunk: int | None = None) -> int:
        """Bytes per read / write request: ``chunk`` (default: the largest) capped by the device, block aligned."""
        want = self.max_transfer if chunk is None else min(chunk, self.max_transfer)
        step = want - want % self.block_size
        if step <= 0:
            raise InvalidArgument(f"chunk {chunk} is smaller than the block size {self.block_size}")
        return step

    def _buffer_pieces(self, offset: int, buf: Buffer) -> list[tuple[int, Buffer]]:
        """A Buffer above max_transfer as (offset, sub-Buffer) pieces of one request each (zero copy)."""
        return [
            (o, Buffer(buf.region, buf.offset + (o - offset), n))
            for o, n in split_range(offset, len(buf), self.max_transfer)
        ]

    def _write_requests(self, offset: int, data: bytes | memoryview | Buffer) -> list[R]:
        """Write requests covering ``data`` (any length, checked as a whole first)."""
        self.check_writable("write")
        self._check_op("write", offset, len(data))
        if isinstance(data, Buffer):
            return [self.write_request(o, b) for o, b in self._buffer_pieces(offset, data)]
        view = memoryview(data)
        return [
            self.write_request(o, view[o - offset : o - offset + k])
            for o, k in split_range(offset, len(view), self.max_transfer)
        ]

    # -- sync API ------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (split into requests above :attr:`max_transfer`)."""
        if 0 < length <= self.max_transfer:
            return self._read_result(self.engine.run(self.read_request(offset, length)))
        self._check_op("read", offset, length)
        reqs = [self.read_request(o, n) for o, n in split_range(offset, length, self.max_transfer)]
        self.engine.run_all(reqs)
        return b"".join(self._read_result(r) for r in reqs)

    def readinto(self, offset: int, buf: Buffer) -> int:
        """Zero copy: read ``len(buf)`` bytes into a Buffer from the device's pool; returns that length."""
        n = len(buf)
        if 0 < n <= self.max_transfer:
            self.engine.run(self.read_request(offset, n, buf))
            return n
        self._check_op("read", offset, n)
        self.engine.run_all([self.read_request(o, len(b), into=b) for o, b in self._buffer_pieces(offset, buf)])
        return n

    def write(self, offset: int, data: bytes | memoryview | Buffer) -> None:
        """Write ``data`` at ``offset`` (a Buffer from the device's pool: zero copy)."""
        n = len(data)
        if 0 < n <= self.max_transfer:
            self.engine.run(self.write_request(offset, data))
            return
        self.engine.run_all(self._write_requests(offset, data))

    def flush(self) -> None:
        """Make completed writes durable (the device's write cache flushed)."""
        self.engine.run(self.flush_request())

    def discard(self, offset: int, length: int) -> None:
        """Discard (trim, unmap) the range: its blocks need not keep their data."""
        self.engine.run_all(self.discard_requests(offset, length))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero the range without sending data (``unmap``: the device may deallocate it)."""
        self.engine.run_all(self.write_zeroes_requests(offset, length, unmap))

    # -- streams (large ranges in pieces: ``pyvirtio blk``) --------------------------------

    def read_iter(self, offset: int, length: int, chunk: int | None = DEFAULT_CHUNK) -> Iterator[bytes]:
        """The range in pieces of at most ``chunk`` bytes (capped by the device), one request each.

        The whole range is checked now, before the first request is sent
        (and before the caller opens anything for the data).
        """
        self._check_op("read", offset, length)
        return self._read_pieces(split_range(offset, length, self.transfer_step(chunk)))

    def _read_pieces(self, pieces: list[tuple[int, int]]) -> Iterator[bytes]:
        for o, n in pieces:
            yield self.read(o, n)

    def write_from(
        self,
        offset: int,
        source: Callable[[int], bytes],
        length: int | None = None,
        chunk: int | None = DEFAULT_CHUNK,
    ) -> int:
        """Write what ``source(n)`` returns (up to n bytes, ``b""`` at the end) at ``offset``; returns the count.

        ``length``: the bytes to write (None: until the source ends); with a
        length, the whole range is checked before the first request. The
        data must come to a multiple of the block size.
        """
        self.check_writable("write")
        if length is not None:
            self._check_op("write", offset, length)
        step = self.transfer_step(chunk)
        total = 0
        while length is None or total < length:
            want = step if length is None else min(step, length - total)
            data = source(want)
            if not data:
                break
            if len(data) > want:
                raise InvalidArgument(f"write: the source returned {len(data)} bytes for {want}")
            if len(data) % self.block_size:
                raise InvalidArgument(
                    f"write: the input ends {total + len(data)} bytes in, not a multiple of the block size "
                    f"{self.block_size}"
                )
            self.write(offset + total, data)
            total += len(data)
            if len(data) < want:
                break
        if length is not None and total < length:
            raise InvalidArgument(f"write: the input ended after {total} of {length} bytes")
        if total == 0:
            raise InvalidArgument("write: the input is empty")
        return total

    def fill(self, offset: int, length: int, byte: int, chunk: int | None = DEFAULT_CHUNK) -> None:
        """Write ``length`` copies of ``byte`` at ``offset`` (pieces of at most ``chunk`` bytes)."""
        if not 0 <= byte <= 255:
            raise InvalidArgument(f"fill: byte {byte} is not 0..255")
        self.check_writable("write")
        self._check_op("write", offset, length)
        step = self.transfer_step(chunk)
        block = bytes([byte]) * min(step, length)
        for o, n in split_range(offset, length, step):
            self.write(o, block[:n])

    # -- asyncio -----------------------------------------------------------------------

    async def aread(self, offset: int, length: int) -> bytes:
        if 0 < length <= self.max_transfer:
            return self._read_result(await self.engine.asubmit(self.read_request(offset, length)))
        self._check_op("read", offset, length)
        reqs = [self.read_request(o, n) for o, n in split_range(offset, length, self.max_transfer)]
        done = await asyncio.gather(*(self.engine.asubmit(r) for r in reqs))
        return b"".join(self._read_result(r) for r in done)

    async def awrite(self, offset: int, data: bytes | memoryview | Buffer) -> None:
        n = len(data)
        if 0 < n <= self.max_transfer:
            await self.engine.asubmit(self.write_request(offset, data))
            return
        await asyncio.gather(*(self.engine.asubmit(r) for r in self._write_requests(offset, data)))

    async def aflush(self) -> None:
        await self.engine.asubmit(self.flush_request())

    async def adiscard(self, offset: int, length: int) -> None:
        await self._arun_in_order(self.discard_requests(offset, length))

    async def awrite_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        await self._arun_in_order(self.write_zeroes_requests(offset, length, unmap))

    async def _arun_in_order(self, requests: Sequence[R]) -> None:
        for req in requests:
            await self.engine.asubmit(req)


__all__ = ["DEFAULT_CHUNK", "BlockDevice", "split_range"]
