"""ScsiBench: the loop ``pyvirtio scsi bench`` runs (moving to ``pyvirtio.bench``).

fio-like load on one LUN from the calling thread's request queue; see
:class:`ScsiBench`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.drivers.scsi.requests import ScsiRequest
from pyvirtio.errors import InvalidArgument, QueueFull, TransportTimeout

if TYPE_CHECKING:
    from pyvirtio.drivers.scsi.disk import ScsiDisk

# -- a benchmark loop (what ``pyvirtio scsi bench`` runs) -------------------------------------------

RW_MODES = ("read", "write", "randread", "randwrite", "randrw", "rw")


class ScsiBench:
    """fio-like load on one LUN from the calling thread's queue: ``iodepth`` commands in flight.

    Each slot owns a ``bs``-byte Buffer in shared memory (zero copy); a loop
    reaps every completion at once, records its latency and posts the slot's
    next command, one kick per pass. Returns a
    :class:`pyvirtio.drivers.blk_engine.Stats`, so the report is the blk bench's.
    """

    def __init__(
        self,
        disk: ScsiDisk,
        *,
        rw: str = "randread",
        bs: int = 4096,
        iodepth: int = 32,
        rwmixread: int = 50,
        seed: int | None = None,
        offset: int = 0,
        size: int | None = None,
    ) -> None:
        if rw not in RW_MODES:
            raise InvalidArgument(f"rw must be one of {', '.join(RW_MODES)}, not {rw!r}")
        if bs <= 0 or bs % disk.block_size or bs > disk.max_transfer:
            raise InvalidArgument(
                f"bs {bs} must be a positive multiple of the block size {disk.block_size} "
                f"up to the largest transfer {disk.max_transfer}"
            )
        if not 0 <= rwmixread <= 100:
            raise InvalidArgument("rwmixread must be 0..100")
        scsi = disk.scsi
        ctx = scsi.thread_queue()
        if not 1 <= iodepth <= ctx.vq.size // 4:
            raise InvalidArgument(f"iodepth must be 1..{ctx.vq.size // 4} for a queue of {ctx.vq.size} descriptors")
        size = disk.capacity - offset if size is None else size
        if offset < 0 or offset % bs or size < bs or offset + size > disk.capacity:
            raise InvalidArgument(f"region {offset}+{size} does not fit the LUN ({disk.capacity} bytes) with bs {bs}")
        self.reads_only = rw in ("read", "randread") or (rw in ("randrw", "rw") and rwmixread == 100)
        if not self.reads_only and disk.readonly:
            raise InvalidArgument(f"{rw}: the LUN is write-protected")
        self.disk = disk
        self.scsi = scsi
        self.ctx = ctx
        self.rw = rw
        self.bs = bs
        self.qd = iodepth
        self.rwmixread = 100 if rw in ("read", "randread") else 0 if rw in ("write", "randwrite") else rwmixread
        self.seed = random.getrandbits(32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.first = offset // bs
        self.nblocks = size // bs
        self.sequential = rw in ("read", "write", "rw")
        self._next = 0
        self.bufs = [scsi.pool.allocate(bs, align=4096) for _ in range(iodepth)]
        pattern = os.urandom(bs)
        for b in self.bufs:
            b.view[:] = pattern
        self.mode = "python"

    def close(self) -> None:
        for b in self.bufs:
            self.scsi.pool.free(b)
        self.bufs = []

    def _make(self, slot: int) -> ScsiRequest:
        if self.sequential:
            block = self._next
            self._next = (block + 1) % self.nblocks
        else:
            block = self.rng.randrange(self.nblocks)
        offset = (self.first + block) * self.bs
        write = self.rwmixread == 0 or (self.rwmixread < 100 and self.rng.randrange(100) >= self.rwmixread)
        buf = self.bufs[slot]
        if write:
            req = self.disk.write_request(offset, buf)
        else:
            req = self.disk.read_request(offset, self.bs, into=buf)
        req._cookie = slot
        return req

    def run(
        self,
        runtime: float,
        *,
        stop: threading.Event | None = None,
        progress: Callable[[Any], None] | None = None,
    ) -> Any:
        from pyvirtio.drivers.blk_engine import Stats, _bucket

        stats = Stats()
        hist = stats.hist
        scsi, ctx = self.scsi, self.ctx
        started = [0] * self.qd
        now = time.perf_counter_ns
        t_start = now()
        end = t_start + int(runtime * 1e9)
        next_report = t_start + 500_000_000
        first = [self._make(s) for s in range(self.qd)]
        for s in range(self.qd):
            started[s] = now()
        if scsi.submit(first) != self.qd:
            raise QueueFull(f"cannot post {self.qd} requests: {ctx.full_reason}")
        inflight = self.qd
        spins = 0
        stopping = False
        try:
            while inflight:
                done = scsi.reap()
                if not done:
                    # The driver's idle policy: spin a while, then sleep on the interrupt
                    # (a back end in this process needs the GIL to make progress).
                    scsi.idle(spins)
                    spins += 1
                    if not spins & 0x3FF and scsi.timeout is not None and now() > end + int(scsi.timeout * 1e9):
                        raise TransportTimeout(f"{inflight} requests not completed within {scsi.timeout} s")
                    continue
                spins = 0
                t = now()
                again: list[ScsiRequest] = []
                for req in done:
                    slot = req._cookie
                    lat = t - started[slot]
                    stats.lat_sum_ns += lat
                    if lat > stats.lat_max_ns:
                        stats.lat_max_ns = lat
                    hist[_bucket(lat)] += 1
                    if req.exception() is not None:
                        stats.errors += 1
                        if stats.error is None:
                            stats.error = str(req.exception())
                    else:
                        stats.ios += 1
                        stats.bytes += req.length
                        if req.data_in:
                            stats.reads += 1
                        else:
                            stats.writes += 1
                    inflight -= 1
                    if not stopping:
                        nreq = self._make(slot)
                        started[slot] = t
                        again.append(nreq)
                if again:
                    inflight += scsi.submit(again)
                stats.passes += 1
                if t >= end or (stop is not None and stop.is_set()):
                    stopping = True
                if progress is not None and t >= next_report:
                    stats.seconds = (t - t_start) / 1e9
                    progress(stats)
                    next_report = t + 500_000_000
        finally:
            stats.seconds = (now() - t_start) / 1e9
            stats.kicks = ctx.vq.kicks
        return stats


__all__ = ["RW_MODES", "ScsiBench"]
