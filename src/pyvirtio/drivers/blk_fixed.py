"""One request pre-linked for one buffer: :meth:`VirtioBlk.fixed_io`.

Theory of operation. The general API builds every request anew (request
object, argument checks, a slot, the chain, waiting with the general
machinery): ~10 µs of Python, which is what a loop of ``blk.readinto``
costs (docs/benchmarks.md §1.3). A program that reads or writes the same
buffer again and again can instead open a :class:`FixedIO` on it: the two
chains (header, the buffer, status byte; the buffer device-writable for a
read, device-readable for a write) are built once; a call writes the
header, publishes the chain, kicks if the device wants a kick, and polls for
the completion, validated as everywhere.

On a split ring without VIRTIO_F_IN_ORDER the two chains are linked once in
the descriptor table (:class:`~pyvirtio.ring.fixed.FixedChains`, one slot
each), so a call is one avail-ring store. On a packed ring, or with
IN_ORDER (whose rings lay chains out in ring order), a call submits the
prebuilt chain through the ring protocol
(:class:`~pyvirtio.ring.base.RingQueue`): still no request object, no slot
and no argument re-checks.

While it is open, the calling thread's queue belongs to it: the general
API on that thread raises until :meth:`FixedIO.close`. Other threads use
their own queues as usual. A lost device is recovered when the transport
has a reconnect policy (the request in flight is resubmitted once), as in
the general API; otherwise ConnectionLost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
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
from pyvirtio.ring.split import SplitQueue
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
        hdr = self._hdr.addr
        # Slot 0 reads into the buffer, slot 1 writes from it.
        self._chains = [
            [(hdr, 16, False), (buf.addr, n, True), (hdr + _STATUS, 1, True)],
            [(hdr, 16, False), (buf.addr, n, False), (hdr + _STATUS, 1, True)],
        ]
        ring = ctx.vq.ring
        self._ring = ring
        self._fixed: FixedChains | None = None
        if isinstance(ring, SplitQueue) and not ring.in_order and ring.num_free >= 6:
            try:
                self._fixed = FixedChains(ring, self._chains)
            except BaseException:
                blk.free(self._hdr)
                raise
        self._h = self._hdr.view
        self._kick = blk.device.transport.notifier(ctx.vq.index)
        self._slot = 0  # the slot of the request last posted
        self._in_flight = False
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
        write = op == B.T_OUT
        slot = 1 if write else 0
        B.OUTHDR.pack_into(self._h, 0, op, 0, offset // B.SECTOR_SIZE)
        self._h[_STATUS] = 0xFF
        self._slot = slot
        fixed = self._fixed
        done: Sequence[tuple[object, int]]
        if fixed is not None:
            if fixed.post((slot,)):
                self._kick()
            done = fixed.reap(1)
        else:
            ring = self._ring
            ring.submit(slot, self._chains[slot])
            self._in_flight = True
            if ring.kick_prepare():
                self._kick()
            done = ring.reap(1)
        if not done:
            done = self._wait()
        self._in_flight = False
        written = done[0][1]
        status = self._h[_STATUS]
        if status != B.S_OK:
            raise BlockIOError(name, offset, self.length, status, B.STATUS_NAMES.get(status, "UNKNOWN"))
        if not write and short_read(written, self.length, self._ring.format):
            raise BlockIOError(
                name,
                offset,
                self.length,
                status,
                f"short read: the device reported {written} bytes written for {self.length} bytes of data",
            )

    def _wait(self) -> Sequence[tuple[object, int]]:
        blk = self.blk
        fixed = self._fixed
        reap: Callable[[int], Sequence[tuple[object, int]]] = fixed.reap if fixed is not None else self._ring.reap
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
        if fixed is None:
            return self._ring.restart_base(resubmit)
        return fixed.ring.restart_base(resubmit, in_flight=[fixed.heads[self._slot]] if fixed.n_inflight else [])

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
        if fixed is not None:
            if fixed.n_inflight and fixed.ring.broken is None:
                return
            fixed.detach()
        elif self._in_flight and self._ring.broken is None:
            return
        self.blk.free(self._hdr)
        self._ctx.held = None

    def __enter__(self) -> FixedIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
