"""The block benchmark engine: fio-like load on one VirtioBlk queue.

Theory of operation. A benchmark issues requests of one shape (header,
``bs`` bytes of data, status byte) as fast as the device completes them,
keeping ``iodepth`` in flight. :class:`BlkEngine` gives each slot a fixed
pre-linked chain (:class:`~pyvirtio.ring.fixed.FixedChains`): ``iodepth``
slots in flight plus up to as many *spare* slots, prepared and waiting. A
pass that sees n completions publishes n spares at once (one avail index
store, one kick decision), then checks every used entry, books it, and
prepares the completed slots as the next spares. Only the sector (and, for
mixed workloads, the direction) of a slot changes per request.

Two loops share that ring: plain Python, fastest at low depth, and NumPy,
whose cost per pass does not grow with the number of requests, fastest at
high depth. ``mode="auto"`` picks NumPy when it is installed and the depth
is at least :data:`NUMPY_MIN_DEPTH` (measured: docs/benchmarks.md).

Latencies are measured per request from the pass that posted it to the pass
that reaped it, into a log-linear histogram (16 sub-buckets per power of
two: under 6 % error) from which mean and percentiles are read.

``verify=True`` writes a per-block pattern (block number, seed) and checks
every block read back: a read-only workload first fills the region; a
write workload reads back every block it wrote at the end.

Reconnect. When the device's transport has a reconnect policy
(``VirtioBlk.open(..., reconnect=...)``, ``pyvirtio bench --reconnect``), a
lost back end does not end the run: the loop notices in its idle checks
(every 1024 empty passes), writes its ring state back, and the queue is
restored (:meth:`VirtioDevice.recover <pyvirtio.device.VirtioDevice.recover>`):
the slots in flight that did not complete are resubmitted once, those that
did are reaped as usual. The loops do no extra work per request for this.
Each reconnect is counted with its *pause*: from the last pass that posted
or reaped before the loss to the first completion on the new connection
(total and longest in :class:`Stats`).
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.bench.stats import LatencyLog, Stats, have_numpy
from pyvirtio.drivers.blk import VirtioBlk, pack_pattern
from pyvirtio.errors import ConnectionLost, InvalidArgument, QueueBroken
from pyvirtio.ring import ordering
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.spec import blk as B
from pyvirtio.spec.ring import DESC_F_NEXT, DESC_F_WRITE

NUMPY_MIN_DEPTH = 64
#: At most this many bytes of data buffers for the fused loop's spare slots.
SPARE_BYTES = 4 << 20
RW_MODES = ("read", "write", "randread", "randwrite", "randrw", "rw")


class BlkEngine:
    """Runs a workload on the calling thread's queue of ``blk``."""

    def __init__(
        self,
        blk: VirtioBlk,
        *,
        rw: str = "randread",
        bs: int = 4096,
        iodepth: int = 32,
        rwmixread: int = 50,
        verify: bool = False,
        seed: int | None = None,
        offset: int = 0,
        size: int | None = None,
        mode: str = "auto",
        device_signals: bool = True,
    ) -> None:
        if rw not in RW_MODES:
            raise InvalidArgument(f"rw must be one of {', '.join(RW_MODES)}, not {rw!r}")
        if bs <= 0 or bs % blk.block_size:
            raise InvalidArgument(f"bs {bs} must be a positive multiple of the block size {blk.block_size}")
        if bs > blk.max_transfer or (blk.size_max and bs > blk.size_max):
            raise InvalidArgument(f"bs {bs} exceeds the device's largest single-segment transfer")
        if not 0 <= rwmixread <= 100:
            raise InvalidArgument("rwmixread must be 0..100")
        self.reads_only = rw in ("read", "randread") or (rw in ("randrw", "rw") and rwmixread == 100)
        if not self.reads_only and blk.readonly:
            raise InvalidArgument(f"{rw}: the device is read-only")
        size = blk.capacity - offset if size is None else size
        if offset < 0 or offset % bs or size < bs or offset + size > blk.capacity:
            raise InvalidArgument(f"region {offset}+{size} does not fit the device ({blk.capacity} bytes) with bs {bs}")
        ctx = blk._ctx()
        max_qd = ctx.vq.size // 3
        if not 1 <= iodepth <= max_qd:
            raise InvalidArgument(f"iodepth must be 1..{max_qd} for a queue of {ctx.vq.size} descriptors")
        if mode not in ("auto", "python", "numpy"):
            raise InvalidArgument("mode must be auto, python or numpy")
        numpy_ok = have_numpy()
        if mode == "numpy" and not numpy_ok:
            raise InvalidArgument("mode numpy needs numpy installed (pip install 'pyvirtio[fast]')")
        if mode == "auto":
            mode = "numpy" if numpy_ok and iodepth >= NUMPY_MIN_DEPTH and not verify else "python"
        if verify and mode == "numpy":
            raise InvalidArgument("verify runs in the python mode")
        self.mode = mode
        # On by default: measured faster in both loops (docs/benchmarks.md §1.2).
        self.device_signals = device_signals
        self.blk = blk
        self.ctx = ctx
        self.rw = rw
        self.bs = bs
        self.qd = iodepth
        self.rwmixread = 100 if rw in ("read", "randread") else 0 if rw in ("write", "randwrite") else rwmixread
        self.verify = verify
        self.seed = random.getrandbits(32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.first_block = offset // bs
        self.nblocks = size // bs
        self.sectors_per_block = bs // B.SECTOR_SIZE
        self.sequential = rw in ("read", "write", "rw")
        self._next_block = 0
        # The fused loop (pure reads or pure writes, no verify) keeps spare slots
        # prepared beyond the depth, so that a completion is answered by
        # publishing a ready request before anything else is done (see _run_fused).
        self.fused = mode == "python" and not verify and self.rwmixread in (0, 100)
        self.spares = min(iodepth, max_qd - iodepth, max(1, SPARE_BYTES // bs)) if self.fused or mode == "numpy" else 0
        nslots = iodepth + self.spares
        self.hdrs = blk.allocate(16 * nslots, align=64)  # thread-safe: one engine per bench thread
        self.status = blk.allocate(nslots, align=64)
        self.data = blk.allocate(bs * nslots, align=4096)
        initial_write = not self.reads_only and self.rwmixread == 0
        chains = [
            [
                (self.hdrs.addr + 16 * s, 16, False),
                (self.data.addr + bs * s, bs, not initial_write),
                (self.status.addr + s, 1, True),
            ]
            for s in range(nslots)
        ]
        self.fixed = FixedChains(ctx.vq.ring, chains)
        self.is_write = bytearray([1 if initial_write else 0] * nslots)
        h32 = self.hdrs.view.cast("I")
        for s in range(nslots):
            h32[4 * s] = B.T_OUT if initial_write else B.T_IN
        self.written: bytearray | None = bytearray(self.nblocks) if verify else None
        self.block_of = [0] * iodepth

    def close(self) -> None:
        """Give the chains and buffers back (only with nothing in flight)."""
        try:
            self.fixed.detach()
        finally:
            for b in (self.hdrs, self.status, self.data):
                self.blk.free(b)

    # -- helpers --------------------------------------------------------------

    def _pick_block(self) -> int:
        if self.sequential:
            b = self._next_block
            self._next_block = (b + 1) % self.nblocks
            return b
        return self.rng.randrange(self.nblocks)

    def _set_direction(self, s: int, write: bool) -> None:
        """Flip slot s between read and write: header type, data flags, writable bytes."""
        ring = self.fixed.ring
        d = self.fixed._descs[s][1]
        ring._desc16[8 * d + 6] = DESC_F_NEXT if write else DESC_F_NEXT | DESC_F_WRITE
        self.fixed.wlen[s] = 1 if write else self.bs + 1
        self.hdrs.view.cast("I")[4 * s] = B.T_OUT if write else B.T_IN
        self.is_write[s] = 1 if write else 0

    def prefill(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Write the verify pattern over the whole region (used by --verify on read workloads)."""
        for s in range(self.qd):
            self._set_direction(s, True)
        block = 0
        fixed = self.fixed
        free = list(range(self.qd))
        h64 = self.hdrs.view.cast("Q")
        dv = self.data.view
        st = self.status.view
        bs = self.bs
        idle = 0
        while block < self.nblocks or fixed.n_inflight:
            batch = []
            while free and block < self.nblocks:
                s = free.pop()
                self.block_of[s] = block
                h64[2 * s + 1] = (self.first_block + block) * self.sectors_per_block
                dv[bs * s : bs * s + bs] = pack_pattern(self.first_block + block, self.seed, bs)
                st[s] = 0xFF
                batch.append(s)
                block += 1
            if batch and fixed.post(batch):
                self.blk.device.transport.notify_queue(self.ctx.vq.index)
            done = fixed.reap_slots()
            for s in done:
                if st[s] != 0:
                    raise ConnectionLost(f"prefill write of block {self.block_of[s]} failed with status {st[s]}")
                assert self.written is not None
                self.written[self.block_of[s]] = 1
                free.append(s)
            idle = 0 if done or batch else idle + 1
            if idle and not idle & 0x3FF:
                self._check(None, time.perf_counter_ns())
            if progress is not None:
                progress(block, self.nblocks)
        for s in range(self.qd):
            self._set_direction(s, False)

    # -- the loops --------------------------------------------------------------

    def run(
        self,
        seconds: float,
        *,
        stop: threading.Event | None = None,
        progress: Callable[[Stats], None] | None = None,
        progress_interval: float = 0.5,
    ) -> Stats:
        # The cyclic garbage collector would stop the loop for milliseconds at
        # random (a full collection walks every object of the process): it is
        # off for the run, which allocates no reference cycles.
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        ring = self.fixed.ring
        if self.device_signals:
            # Let the device signal the call eventfd per batch although we poll.
            # Measured against qemu-storage-daemon on this kind of machine it
            # cuts round-trip latency at low depth from ~16 to ~6 us (p50), as
            # if the signalling syscall kept the device's thread from a slower
            # sleep path (docs/benchmarks.md). Nobody reads the eventfd.
            ring.enable_interrupts()
        try:
            if self.mode == "numpy":
                stats = self._run_numpy(seconds, stop, progress, progress_interval)
            elif self.fused:
                stats = self._run_fused(seconds, stop, progress, progress_interval)
            else:
                stats = self._run_python(seconds, stop, progress, progress_interval)
        finally:
            if self.device_signals:
                ring.disable_interrupts()
            if gc_was_enabled:
                gc.enable()
        if self.verify and not self.reads_only and stats.error is None:
            stats.verify_errors += self._read_back()
        return stats

    def _run_python(
        self,
        seconds: float,
        stop: threading.Event | None,
        progress: Callable[[Stats], None] | None,
        interval: float,
    ) -> Stats:
        stats = Stats()
        lats = LatencyLog(stats)
        raw = lats.raw
        fixed = self.fixed
        transport = self.blk.device.transport
        qi = self.ctx.vq.index
        notify = transport.notify_queue
        h64 = self.hdrs.view.cast("Q")
        st = self.status.view
        dv = self.data.view
        bs = self.bs
        spb = self.sectors_per_block
        first = self.first_block
        nblocks = self.nblocks
        rand = self.rng.random
        mixed = 0 < self.rwmixread < 100
        all_write = self.rwmixread == 0
        mix = self.rwmixread / 100.0
        sequential = self.sequential
        verify = self.verify
        written = self.written
        expect = bytearray(self.qd)  # per slot: its read's block was written before the read was posted
        seed = self.seed
        block_of = self.block_of
        is_write = self.is_write
        sub_t = [0] * self.qd
        perf = time.perf_counter_ns
        free = list(range(self.qd))
        ios = nwrites = errors = verrs = kicks = passes = idle = 0
        t0 = t = perf()
        deadline = t0 + int(seconds * 1e9)
        stuck_at = deadline + 5_000_000_000
        next_progress = t0 + int(interval * 1e9)
        nxt = self._next_block

        def snapshot(now: int) -> None:
            lats.flush()
            self._snapshot(stats, ios, nwrites, errors, verrs, kicks, passes, now - t0)

        try:
            while True:
                if free:
                    t = perf()
                    for s in free:
                        if sequential:
                            b = nxt
                            nxt = nxt + 1 if nxt + 1 < nblocks else 0
                        else:
                            b = int(rand() * nblocks)
                        if mixed:
                            w = rand() >= mix
                            if w != is_write[s]:
                                self._set_direction(s, w)
                        else:
                            w = all_write
                        h64[2 * s + 1] = (first + b) * spb
                        st[s] = 0xFF
                        sub_t[s] = t
                        if verify:
                            block_of[s] = b
                            if w:
                                dv[bs * s : bs * s + bs] = pack_pattern(first + b, seed, bs)
                            else:
                                # Checked only if written (acknowledged) before this read was posted:
                                # a write still in flight may land after the read (virtio orders nothing).
                                assert written is not None
                                expect[s] = written[b]
                    if fixed.post(free):
                        notify(qi)
                        kicks += 1
                    free = []
                done = fixed.reap_slots()
                passes += 1
                if done:
                    idle = 0
                    t = perf()
                    for s in done:
                        raw.append(t - sub_t[s])
                        if st[s]:
                            errors += 1
                        elif verify:
                            assert written is not None
                            b = block_of[s]
                            if is_write[s]:
                                written[b] = 1
                            elif expect[s] and dv[bs * s : bs * s + bs] != pack_pattern(first + b, seed, bs):
                                verrs += 1
                        if is_write[s]:
                            nwrites += 1
                        free.append(s)
                    ios += len(done)
                    if len(raw) >= LatencyLog.CHUNK:
                        lats.flush()
                        raw = lats.raw
                    if t >= deadline or (stop is not None and stop.is_set()):
                        break
                    if progress is not None and t >= next_progress:
                        next_progress = t + int(interval * 1e9)
                        snapshot(t)
                        raw = lats.raw
                        progress(stats)
                else:
                    idle += 1
                    if not idle & 0x3FF:
                        if self._check(stats, t):  # t: the last pass that posted or reaped
                            stuck_at = max(stuck_at, perf() + 5_000_000_000)
                        now = perf()
                        if now >= stuck_at:
                            raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                        if progress is not None and now >= next_progress:
                            next_progress = now + int(interval * 1e9)
                            snapshot(now)
                            raw = lats.raw
                            progress(stats)
            errors += self._drain(st, stats)
        finally:
            self._next_block = nxt
            snapshot(perf())
        return stats

    def _run_fused(
        self,
        seconds: float,
        stop: threading.Event | None,
        progress: Callable[[Stats], None] | None,
        interval: float,
    ) -> Stats:
        """The plain-Python loop with FixedChains' post and reap inlined (pure reads or pure writes).

        At a few completions per pass, function calls per pass cost more than
        the requests themselves, so this loop keeps the ring state in locals.

        Spare slots. Besides the ``iodepth`` slots in flight, ``self.spares``
        slots wait prepared (sector chosen, status byte reset) in ``ready``.
        When a pass sees n completions it first publishes n ready slots and
        makes its kick decision, and only then checks and books the completed
        entries, which become ready in turn. The device's next work is in the
        ring one avail store after its last completion is seen: measured
        against qemu-storage-daemon at QD1, the device thread is often still
        awake then, while a longer turnaround lets it fall asleep
        (docs/benchmarks.md §1.2). The depth is unchanged: a slot is
        published for a completion already seen.

        The used entries get the same checks as FixedChains.reap_slots. The
        slots published ahead are marked in flight only after the batch is
        checked, so an entry naming one of them (which the device cannot have
        been given yet) is rejected. On any anomaly the loop writes its state
        back and lets reap_slots find the entry and raise, so the error and
        the completions reported are exact.
        """
        stats = Stats()
        lats = LatencyLog(stats)
        raw = lats.raw
        fixed = self.fixed
        ring = fixed.ring
        transport = self.blk.device.transport
        qi = self.ctx.vq.index
        kick = transport.notifier(qi)
        check = self.ctx.vq.check_alive
        h64 = self.hdrs.view.cast("Q")
        st = self.status.view
        spb = self.sectors_per_block
        first = self.first_block
        nblocks = self.nblocks
        rand = self.rng.random
        sequential = self.sequential
        all_write = self.rwmixread == 0
        qd = self.qd
        size = ring.size
        mask = size - 1
        a16 = ring._avail16
        u16 = ring._used16
        u32 = ring._used32
        avail_event_i = ring._avail_event_i
        used_event_i = ring._used_event_i
        event_idx = ring.event_idx
        signals = self.device_signals
        fence = ordering._fence_lock  # full_barrier() inlined: acquire + release of a lock
        acquire, release = fence.acquire, fence.release
        weak = not ordering.STRONGLY_ORDERED
        hw1 = fixed.hw1
        heads = fixed.heads
        slot_of = fixed.slot_of
        wl1 = [w + 1 for w in fixed.wlen]
        sub_t = [0] * fixed.nslots
        perf = time.perf_counter_ns
        ios = errors = kicks = passes = idle = 0
        avail_idx = ring.avail_idx
        kick_from = ring._kick_from
        last = ring.last_used
        outstanding = ring.outstanding
        nxt = self._next_block
        t0 = t = perf()
        deadline = t0 + int(seconds * 1e9)
        stuck_at = deadline + 5_000_000_000
        next_progress = t0 + int(interval * 1e9) if progress is not None else deadline
        next_event = min(deadline, next_progress, t0 + 10_000_000)

        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        synced = False
        # Every slot starts prepared and ready; the first pass publishes qd of them.
        for s in range(fixed.nslots):
            if sequential:
                b = nxt
                nxt = nxt + 1 if nxt + 1 < nblocks else 0
            else:
                b = int(rand() * nblocks)
            h64[2 * s + 1] = (first + b) * spb
            st[s] = 0xFF
        ready = list(range(fixed.nslots))  # prepared, not published; oldest first
        posted: list[int] = []  # published this pass, marked in flight at its end

        try:
            while True:
                n = (u16[1] - last) & 0xFFFF
                passes += 1
                if n or outstanding != qd:
                    if n > outstanding:
                        self._sync_ring(avail_idx, kick_from, last, outstanding)
                        fixed.reap_slots()  # raises with the exact reason
                    t = perf()
                    # 1. Publish one ready slot per completion seen (and any
                    #    shortfall from a pass that had too few ready), kick.
                    want = n + qd - outstanding
                    posted = ready[:want]
                    del ready[:want]
                    for s in posted:
                        a16[2 + (avail_idx & mask)] = heads[s]
                        avail_idx = (avail_idx + 1) & 0xFFFF
                    if posted:
                        if weak:
                            ordering.write_barrier()
                        a16[1] = avail_idx
                        # Kick decision (virtio 1.2 §2.7.10), as SplitQueue.kick_prepare.
                        if event_idx:
                            if signals:
                                a16[used_event_i] = (last + n) & 0xFFFF
                            elif (a16[used_event_i] - last) & 0xFFFF < 0x8000:  # as kick_prepare
                                a16[used_event_i] = (last - size - 1) & 0xFFFF
                            acquire()
                            release()
                            need = ((avail_idx - u16[avail_event_i] - 1) & 0xFFFF) < ((avail_idx - kick_from) & 0xFFFF)
                        else:
                            acquire()
                            release()
                            need = not u16[0] & 1
                        kick_from = avail_idx
                        if need:
                            kick()
                            kicks += 1
                        outstanding += len(posted)
                    # 2. Check and book the completions; their slots become ready.
                    if n:
                        idle = 0
                        if weak:
                            ordering.read_barrier()
                        for _ in range(n):
                            pos = 1 + 2 * (last & mask)
                            head = u32[pos]
                            # hw1[head]: writable bytes + 1 if in flight, else 0 (also
                            # after its first completion in this batch: a duplicate fails).
                            if head >= size or u32[pos + 1] >= hw1[head]:
                                self._fused_violation(posted, avail_idx, kick_from, last, outstanding)
                            hw1[head] = 0
                            last = (last + 1) & 0xFFFF
                            outstanding -= 1
                            s = slot_of[head]
                            if st[s]:
                                errors += 1
                            raw.append(t - sub_t[s])
                            if sequential:
                                b = nxt
                                nxt = nxt + 1 if nxt + 1 < nblocks else 0
                            else:
                                b = int(rand() * nblocks)
                            h64[2 * s + 1] = (first + b) * spb
                            st[s] = 0xFF
                            ready.append(s)
                        ios += n
                    # 3. What was published this pass is in flight from now on.
                    for s in posted:
                        hw1[heads[s]] = wl1[s]
                        sub_t[s] = t
                    if t >= next_event:  # deadline, stop flag, progress, histogram: every ~10 ms at most
                        if t >= deadline or (stop is not None and stop.is_set()):
                            break
                        if progress is not None and t >= next_progress:
                            next_progress = t + int(interval * 1e9)
                            self._snapshot(stats, ios, ios if all_write else 0, errors, 0, kicks, passes, t - t0, lats)
                            raw = lats.raw
                            progress(stats)
                        elif len(raw) >= LatencyLog.CHUNK:
                            lats.flush()
                            raw = lats.raw
                        next_event = min(deadline, next_progress, t + 10_000_000)
                else:
                    idle += 1
                    if not idle & 0x3FF:
                        try:
                            check()
                        except ConnectionLost as exc:
                            self._sync_ring(avail_idx, kick_from, last, outstanding)
                            self._recover(exc, stats, t)  # t: the last pass that reaped
                            kick_from = ring._kick_from
                            stuck_at = max(stuck_at, perf() + 5_000_000_000)
                        now = perf()
                        if now >= stuck_at:
                            raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                        if progress is not None and now >= next_progress:
                            next_progress = now + int(interval * 1e9)
                            self._snapshot(
                                stats, ios, ios if all_write else 0, errors, 0, kicks, passes, now - t0, lats
                            )
                            raw = lats.raw
                            progress(stats)
            self._sync_ring(avail_idx, kick_from, last, outstanding)
            synced = True
            errors += self._drain(st, stats)
        finally:
            if not synced and ring.broken is None:
                self._sync_ring(avail_idx, kick_from, last, outstanding)
            self._next_block = nxt
            self._snapshot(stats, ios, ios if all_write else 0, errors, 0, kicks, passes, perf() - t0, lats)
        return stats

    def _fused_violation(self, posted: list[int], avail_idx: int, kick_from: int, last: int, outstanding: int) -> None:
        """A used entry broke a rule: mark this pass's published slots in flight, let reap_slots raise precisely."""
        fixed = self.fixed
        for s in posted:
            fixed.hw1[fixed.heads[s]] = fixed.wlen[s] + 1
        self._sync_ring(avail_idx, kick_from, last, outstanding)
        fixed.reap_slots()  # raises DeviceProtocolError naming the entry
        raise AssertionError("reap_slots accepted an entry the fused loop rejected")

    def _sync_ring(self, avail_idx: int, kick_from: int, last: int, outstanding: int) -> None:
        """Write a loop's local ring state back to the queue and its FixedChains."""
        ring = self.fixed.ring
        ring.avail_idx = avail_idx
        ring._kick_from = kick_from
        ring.last_used = last
        ring.outstanding = outstanding
        self.fixed.n_inflight = outstanding

    def _drain(self, st: memoryview, stats: Stats | None = None) -> int:
        """Reap what is still in flight so the queue can be reused; returns errors seen."""
        errors = 0
        deadline = time.monotonic() + 5.0
        last = time.perf_counter_ns()
        while self.fixed.n_inflight:
            if self.mode == "numpy":
                got = self.fixed.reap_many()
                slots = [] if got is None else [int(x) for x in got[0]]
            else:
                slots = self.fixed.reap_slots()
            for s in slots:
                errors += st[s] != 0
            if slots:
                last = time.perf_counter_ns()
            if time.monotonic() > deadline:
                raise ConnectionLost("the device stopped completing requests while draining")
            if self._check(stats, last):
                deadline = time.monotonic() + 5.0
        return errors

    # -- reconnect ----------------------------------------------------------------

    def _check(self, stats: Stats | None, since_ns: int) -> bool:
        """Is the device there? If it went away: recover (True), or raise ConnectionLost."""
        try:
            self.ctx.vq.check_alive()
        except ConnectionLost as exc:
            self._recover(exc, stats, since_ns)
            return True
        return False

    def _in_flight_heads(self) -> list[int]:
        fixed = self.fixed
        if fixed._np is not None:
            hw = fixed._np["head_wlen1"]
            return [int(h) for h in hw[: fixed.ring.size].nonzero()[0]]
        hw1 = fixed.hw1
        return [h for h in fixed.heads if hw1[h]]

    def _recover(self, lost: ConnectionLost, stats: Stats | None, since_ns: int) -> None:
        """Restore the queue after the device was lost, or raise ``lost`` if the transport cannot.

        The ring state must have been written back (the fused loop's
        _sync_ring). Returns at the first completion on the new connection
        (at once if nothing was left for the device), and counts the pause
        from ``since_ns``.
        """
        device = self.blk.device
        if not device.can_reconnect:
            raise lost
        ring = self.fixed.ring
        vq = self.ctx.vq
        base = [ring._used16[1]]

        def restart(resubmit: bool) -> int:
            base[0] = ring.restart_base(resubmit, in_flight=self._in_flight_heads())
            return base[0]

        device.recover(vq, restart)
        policy = getattr(device.transport, "reconnect_policy", None)
        deadline = time.monotonic() + (policy.timeout if policy is not None else 30.0)
        spins = 0
        # Left for the new device: what is in flight and was not in the used ring when it started.
        while ring.outstanding > (base[0] - ring.last_used) & 0xFFFF and ring._used16[1] == base[0]:
            spins += 1
            if not spins & 0x3F:
                try:
                    vq.check_alive()
                except ConnectionLost:
                    device.recover(vq, restart)  # lost again: the same pause goes on
                if time.monotonic() > deadline:
                    raise ConnectionLost("the device completed nothing after reconnecting")
            time.sleep(0.0001)
        if stats is not None:
            stats.add_pause(time.perf_counter_ns() - since_ns)

    def _snapshot(
        self,
        stats: Stats,
        ios: int,
        nwrites: int,
        errors: int,
        verrs: int,
        kicks: int,
        passes: int,
        elapsed_ns: int,
        lats: LatencyLog | None = None,
    ) -> None:
        if lats is not None:
            lats.flush()
        stats.ios = ios
        stats.writes = nwrites
        stats.reads = ios - nwrites
        stats.bytes = ios * self.bs
        stats.errors = errors
        stats.verify_errors = verrs
        stats.kicks = kicks
        stats.passes = passes
        stats.seconds = elapsed_ns / 1e9

    def _run_numpy(
        self,
        seconds: float,
        stop: threading.Event | None,
        progress: Callable[[Stats], None] | None,
        interval: float,
    ) -> Stats:
        """The NumPy loop: a fixed number of array operations per pass, whatever the batch.

        Like the fused Python loop it keeps spare slots prepared and, on
        seeing n completions, first publishes up to n of them and makes its
        kick decision; then it checks and books the batch, marks what it
        published in flight, and prepares the batch's slots, which join the
        ready ones at the back: slots are published oldest first, so a device
        that completes in order sees them in a fixed cyclic order, which keeps
        its reads of headers sequential in memory (measured with perf on
        qemu-storage-daemon: publishing in another order made its header
        loads the hottest instruction of its request path). It works on FixedChains' arrays directly (no calls per
        pass) and writes the ring state back before anything that reads it
        (the idle checks, a reconnect, the end, an error).

        Each array operation costs ~0.2-0.7 us whatever its size (measured,
        docs/benchmarks.md §1.1), so the pass is written for few of them:
        used ids are converted to intp once (indexing with uint32 arrays is
        several times slower), bounds are uint32 like the used lengths, ready
        slots are a circular queue in one array (slices, no copies but at the
        wrap), ring positions are slices, random sectors are drawn 64k at a time.
        With ``heads_are_slots`` a used id is the slot.
        """
        import numpy as np

        stats = Stats()
        lats = LatencyLog(stats, max_batch=self.fixed.nslots)
        sub_buf = lats.sub_buf
        pass_t = lats.pass_t
        pass_n = lats.pass_n
        chunk = lats.CHUNK
        idle_chunk = lats.IDLE_CHUNK
        take = np.take
        fixed = self.fixed
        ring = fixed.ring
        kick = self.blk.device.transport.notifier(self.ctx.vq.index)
        nslots = fixed.nslots
        qd = self.qd
        size = ring.size
        mask = size - 1
        hdr_sector = np.frombuffer(self.hdrs.view, dtype="<u8").reshape(nslots, 2)[:, 1]
        hdr_type = np.frombuffer(self.hdrs.view, dtype="<u4").reshape(nslots, 4)[:, 0]
        status = np.frombuffer(self.status.view, dtype=np.uint8)
        a = fixed._arrays()
        avail = a["avail"]  # flags, idx, ring[size], used_event
        idx2 = a["idx2"]
        used_id = a["used_id"]
        used_len = a["used_len"]
        hw = a["head_wlen1"]
        wlen1_np = a["wlen1"]
        ident = fixed.heads_are_slots
        heads_np = a["heads"]
        slot_of_np = a["slot_of"]
        intp = np.intp
        a16 = ring._avail16
        u16 = ring._used16
        avail_event_i = ring._avail_event_i
        used_event_i = ring._used_event_i
        event_idx = ring.event_idx
        signals = self.device_signals
        fence = ordering._fence_lock
        acquire, release = fence.acquire, fence.release
        weak = not ordering.STRONGLY_ORDERED
        desc16 = np.frombuffer(ring._desc16, dtype="<u2")
        data_desc = np.asarray([c[1] for c in fixed._descs], dtype=np.int64)
        is_write_np = np.frombuffer(self.is_write, dtype=np.uint8)
        rng = np.random.default_rng(self.seed)
        spb = self.sectors_per_block
        first = self.first_block
        nblocks = self.nblocks

        def draw() -> Any:  # 64k random sectors, as the header's dtype
            return ((rng.integers(0, nblocks, 1 << 16) + first) * spb).astype(np.uint64)

        rpool = draw()
        rpos = 0
        mixed = 0 < self.rwmixread < 100
        mixp = self.rwmixread / 100.0
        w1 = wlen1_np[0]  # every slot's writable bytes + 1, unless mixed
        count_writes = not self.reads_only
        sequential = self.sequential
        arange = a["arange"]
        nxt = self._next_block
        sub_t = np.zeros(nslots, dtype=np.int64)
        count_nonzero = np.count_nonzero
        perf = time.perf_counter_ns
        ios = nwrites = errors = kicks = passes = idle = lp = 0
        avail_idx = ring.avail_idx
        kick_from = ring._kick_from
        last = ring.last_used
        outstanding = ring.outstanding
        t0 = t = perf()
        deadline = t0 + int(seconds * 1e9)
        stuck_at = deadline + 5_000_000_000
        next_progress = t0 + int(interval * 1e9)
        read_flags = DESC_F_NEXT | DESC_F_WRITE

        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")

        def snapshot(now: int, lp: int) -> None:
            lats.pos = lp
            lats.flush()
            self._snapshot(stats, ios, nwrites, errors, 0, kicks, passes, now - t0)

        # Ready slots: a circular queue, rq[rh], rq[rh + 1], ... (nr of them, mod
        # nslots). Every slot starts ready and prepared (sequential sectors are
        # given at publication, to keep their order).
        rq = np.arange(nslots, dtype=intp)
        rh = 0
        nr = nslots
        if not sequential:
            hdr_sector[:] = rpool[:nslots]
            rpos = nslots
        status[:] = 0xFF
        posted = rq[:0]
        k = 0
        synced = False
        try:
            while True:
                n = (u16[1] - last) & 0xFFFF
                passes += 1
                if n or outstanding != qd:
                    if n > outstanding:
                        self._sync_ring(avail_idx, kick_from, last, outstanding)
                        fixed.reap_many()  # raises with the exact reason
                    t = perf()
                    # 1. Publish one ready slot per completion seen (and any shortfall), kick.
                    k = n + qd - outstanding
                    if k > nr:
                        k = nr
                    if k:
                        if rh + k <= nslots:
                            posted = rq[rh : rh + k]
                        else:
                            posted = np.concatenate((rq[rh:], rq[: rh + k - nslots]))
                        rh = (rh + k) % nslots
                        nr -= k
                        if sequential:
                            hdr_sector[posted] = ((nxt + arange[:k]) % nblocks + first) * spb
                            nxt = (nxt + k) % nblocks
                        ph = posted if ident else heads_np[posted]
                        start = avail_idx & mask
                        if start + k <= size:
                            avail[2 + start : 2 + start + k] = ph
                        else:
                            cut = size - start
                            avail[2 + start : 2 + size] = ph[:cut]
                            avail[2 : 2 + k - cut] = ph[cut:]
                        avail_idx = (avail_idx + k) & 0xFFFF
                        if weak:
                            ordering.write_barrier()
                        a16[1] = avail_idx
                        if event_idx:  # kick decision (virtio 1.2 §2.7.10), as SplitQueue.kick_prepare
                            if signals:
                                a16[used_event_i] = (last + n) & 0xFFFF
                            elif (a16[used_event_i] - last) & 0xFFFF < 0x8000:
                                a16[used_event_i] = (last - size - 1) & 0xFFFF
                            acquire()
                            release()
                            need = ((avail_idx - u16[avail_event_i] - 1) & 0xFFFF) < ((avail_idx - kick_from) & 0xFFFF)
                        else:
                            acquire()
                            release()
                            need = not u16[0] & 1
                        kick_from = avail_idx
                        if need:
                            kick()
                            kicks += 1
                        outstanding += k
                    # 2. Check and book the batch. hw[h]: writable bytes + 1 if h heads
                    #    an in-flight slot, else 0 (the slots just published are not
                    #    marked yet: the device cannot complete them in this batch);
                    #    ids out of range clip to a permanent 0.
                    if n:
                        idle = 0
                        if weak:
                            ordering.read_barrier()
                        start = last & mask
                        pos = idx2[start : start + n]
                        ids = used_id[pos].astype(intp)
                        if count_nonzero(used_len[pos] >= hw.take(ids, mode="clip")):
                            self._numpy_violation(posted, k, avail_idx, kick_from, last, outstanding)
                        hw[ids] = 0
                        if count_nonzero(hw) != outstanding - k - n:  # an id twice in the batch
                            hw[ids] = wlen1_np[slot_of_np[ids]]
                            self._numpy_violation(posted, k, avail_idx, kick_from, last, outstanding)
                        last = (last + n) & 0xFFFF
                        outstanding -= n
                        slots = ids if ident else slot_of_np[ids]
                        take(sub_t, slots, out=sub_buf[lp : lp + n], mode="wrap")  # latencies: see LatencyLog
                        pass_t.append(t)
                        pass_n.append(n)
                        lp += n
                        errors += int(count_nonzero(status[slots]))
                        if count_writes:
                            nwrites += int(count_nonzero(is_write_np[slots]))
                        ios += n
                    # 3. What was published this pass is in flight from now on.
                    if k:
                        hw[ph] = wlen1_np[posted] if mixed else w1
                        sub_t[posted] = t
                        k = 0
                    # 4. The batch's slots get their next request and join the ready ones.
                    if n:
                        if not sequential:
                            if rpos + n > 65536:
                                rpool = draw()
                                rpos = 0
                            hdr_sector[slots] = rpool[rpos : rpos + n]
                            rpos += n
                        if mixed:
                            w = rng.random(n) >= mixp
                            is_write_np[slots] = w
                            hdr_type[slots] = np.where(w, B.T_OUT, B.T_IN)
                            desc16[8 * data_desc[slots] + 6] = np.where(w, DESC_F_NEXT, read_flags)
                            wlen1_np[slots] = np.where(w, 2, self.bs + 2)  # writable bytes + 1
                        status[slots] = 0xFF
                        # (At the back of the queue: never over the slots just published.)
                        tail = (rh + nr) % nslots
                        if tail + n <= nslots:
                            rq[tail : tail + n] = slots
                        else:
                            cut = nslots - tail
                            rq[tail:] = slots[:cut]
                            rq[: n - cut] = slots[cut:]
                        nr += n
                    if lp >= chunk:
                        lats.pos = lp
                        lats.flush()
                        lp = 0
                    if t >= deadline or (stop is not None and stop.is_set()):
                        break
                    if progress is not None and t >= next_progress:
                        next_progress = t + int(interval * 1e9)
                        snapshot(t, lp)
                        lp = 0
                        progress(stats)
                else:
                    idle += 1
                    if lp >= idle_chunk:
                        lats.pos = lp
                        lats.flush()
                        lp = 0
                    elif not idle & 0x3FF:
                        self._sync_ring(avail_idx, kick_from, last, outstanding)
                        if self._check(stats, t):  # t: the last pass that posted or reaped
                            kick_from = ring._kick_from
                            stuck_at = max(stuck_at, perf() + 5_000_000_000)
                        now = perf()
                        if now >= stuck_at:
                            raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                        if progress is not None and now >= next_progress:
                            next_progress = now + int(interval * 1e9)
                            snapshot(now, lp)
                            lp = 0
                            progress(stats)
            self._sync_ring(avail_idx, kick_from, last, outstanding)
            synced = True
            errors += self._drain(self.status.view, stats)
        finally:
            if not synced and ring.broken is None:
                self._sync_ring(avail_idx, kick_from, last, outstanding)
            self._next_block = nxt
            snapshot(perf(), lp)
        return stats

    def _numpy_violation(
        self, posted: Any, k: int, avail_idx: int, kick_from: int, last: int, outstanding: int
    ) -> None:
        """A batch broke a rule: mark this pass's published slots in flight, let reap_many raise precisely."""
        fixed = self.fixed
        a = fixed._arrays()
        if k:
            a["head_wlen1"][a["heads"][posted]] = a["wlen1"][posted]
        self._sync_ring(avail_idx, kick_from, last, outstanding)
        fixed.reap_many()  # raises DeviceProtocolError naming the entry
        raise AssertionError("reap_many accepted a batch the NumPy loop rejected")

    def _read_back(self) -> int:
        """Read every block this run wrote and count those whose pattern is wrong."""
        assert self.written is not None
        bad = 0
        for b in range(self.nblocks):
            if self.written[b]:
                data = self.blk.read((self.first_block + b) * self.bs, self.bs)
                if data != pack_pattern(self.first_block + b, self.seed, self.bs):
                    bad += 1
        return bad


__all__ = ["BlkEngine", "NUMPY_MIN_DEPTH", "RW_MODES", "Stats"]
