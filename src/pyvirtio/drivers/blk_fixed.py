"""One request pre-linked for one buffer: :meth:`VirtioBlk.fixed_io`.

Theory of operation. The general API builds every request anew (request
object, argument checks, a slot, the chain, waiting with the general
machinery): ~10 µs of Python, which is what a loop of ``blk.readinto``
costs (docs/benchmarks.md §1.3). A program that reads or writes the same
buffer again and again can instead open a :class:`FixedIO` on it: the chain
(header, the buffer, status byte; the buffer device-writable for a read, its
alternate shape device-readable for a write) is prepared once by the ring's
fast path (:class:`~pyvirtio.ring.fixed.FixedChains`, on either ring
format); a call writes the header, publishes the chain, kicks if the device
wants a kick, and polls for the completion, validated as everywhere.

While it is open, the calling thread's queue belongs to it: the general
API on that thread raises until :meth:`FixedIO.close`. Other threads use
their own queues as usual. A lost device is recovered when the transport
has a reconnect policy (the request in flight is resubmitted once), as in
the general API; otherwise ConnectionLost.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from pyvirtio.drivers.blk import short_read
from pyvirtio.errors import (
    BlockIOError,
    ConnectionLost,
    InvalidArgument,
    OwnershipError,
    QueueStateError,
    TransportTimeout,
)
from pyvirtio.memory import Buffer
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.spec import blk as B

if TYPE_CHECKING:
    from pyvirtio.drivers.blk import VirtioBlk
    from pyvirtio.drivers.requests import QueueContext

_STATUS = 16  # status byte offset in the header allocation


class FixedIO:
    """Read into or write from one buffer at any offset, one call at a time (see the module docstring)."""

    def __init__(self, blk: VirtioBlk, buf: Buffer) -> None:
        n = len(buf)
        if n <= 0 or n % blk.block_size:
            raise InvalidArgument(f"fixed_io: a buffer of {n} bytes is not a multiple of {blk.block_size}")
        if n > blk.max_transfer or (blk.size_max and n > blk.size_max):
            raise InvalidArgument(f"fixed_io: a buffer of {n} bytes is larger than one request may be")
        if not blk.in_device_memory(buf):
            raise InvalidArgument(f"fixed_io: {buf!r} is not in the shared memory the device knows")
        ctx: QueueContext = blk.thread_queue()
        if ctx.held is not None or ctx.inflight:
            raise QueueStateError(f"queue {ctx.vq.index} is busy: close its FixedIO / wait for its requests first")
        self.blk = blk
        self.buf = buf
        self.length = n
        self._ctx = ctx
        self._owner = threading.get_ident()
        self._hdr = blk.allocate(32, align=64)
        try:
            hdr = self._hdr.addr
            self._fixed = FixedChains(  # a read; its alternate shape, a write
                ctx.vq.ring,
                [[(hdr, 16, False), (buf.addr, n, True), (hdr + _STATUS, 1, True)]],
                alternate=[[(hdr, 16, False), (buf.addr, n, False), (hdr + _STATUS, 1, True)]],
            )
        except BaseException:
            blk.free(self._hdr)
            raise
        self._head = self._fixed.heads[0]
        self._writing = False
        self._h = self._hdr.view
        self._kick = blk.device.transport.notifier(ctx.vq.index)
        self.closed = False
        ctx.held = self

    # -- the calls ----------------------------------------------------------------

    def read(self, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into the buffer."""
        self._run(B.T_IN, offset)

    def write(self, offset: int) -> None:
        """Write the buffer's bytes at ``offset``."""
        if self.blk.readonly:
            raise InvalidArgument("write: the device is read-only")
        self._run(B.T_OUT, offset)

    def _run(self, op: int, offset: int) -> None:
        if self.closed:
            raise QueueStateError("this FixedIO is closed")
        if threading.get_ident() != self._owner:
            raise OwnershipError("a FixedIO is used by the thread that opened it")
        blk = self.blk
        name = "read" if op == B.T_IN else "write"
        blk.check_range(name, offset, self.length)
        fixed = self._fixed
        write = op == B.T_OUT
        if write != self._writing:  # the data buffer's direction, and the bound on the used length
            fixed.use_alternate(0, write)
            self._writing = write
        B.OUTHDR.pack_into(self._h, 0, op, 0, offset // B.SECTOR_SIZE)
        self._h[_STATUS] = 0xFF
        if fixed.post((0,)):
            self._kick()
        done = fixed.reap(1)
        if not done:
            done = self._wait()
        written = done[0][1]
        status = self._h[_STATUS]
        if status != B.S_OK:
            raise BlockIOError(name, offset, self.length, status, B.STATUS_NAMES.get(status, "UNKNOWN"))
        if not write and short_read(written, self.length, fixed.ring.format):
            raise BlockIOError(
                name,
                offset,
                self.length,
                status,
                f"short read: the device reported {written} bytes written for {self.length} bytes of data",
            )

    def _wait(self) -> list[tuple[int, int]]:
        blk = self.blk
        fixed = self._fixed
        reap = fixed.reap
        vq = self._ctx.vq
        spins = 0
        deadline = None
        while True:
            done = reap(1)
            if done:
                return done
            spins += 1
            if spins & 0xFF == 0xFF:
                now = time.monotonic()
                if deadline is None:
                    deadline = None if blk.timeout is None else now + blk.timeout
                elif deadline is not None and now > deadline:
                    raise TransportTimeout(f"request not completed within {blk.timeout} s")
                try:
                    vq.check_alive()
                except ConnectionLost:
                    if not blk.device.can_reconnect:
                        raise
                    paused = blk.device.recover(vq, self._restart)
                    if deadline is not None:
                        deadline += paused
                if spins > 4096:
                    time.sleep(0.00005)

    def _restart(self, resubmit: bool) -> int:
        fixed = self._fixed
        return fixed.restart_base(resubmit)

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Give the descriptors back; the thread's queue serves the general API again.

        Never raises (it runs on the way out of a ``with`` block): if a call
        failed with its request still with the device (a timeout, a device
        lost without reconnect), the queue stays held until the VirtioBlk closes.
        """
        if self.closed:
            return
        self.closed = True
        fixed = self._fixed
        if fixed.n_inflight and fixed.ring.broken is None:
            return
        fixed.detach()
        self.blk.free(self._hdr)
        self._ctx.held = None

    def __enter__(self) -> FixedIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
