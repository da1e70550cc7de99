"""The block benchmark engine: fio-like load on one queue of virtio-blk or one virtio-scsi LUN.

Theory of operation. A benchmark issues requests of one shape (header,
``bs`` bytes of data, status) as fast as the device completes them, keeping
``iodepth`` in flight. :class:`BlockEngine` gives each slot a fixed
pre-linked chain (:class:`~pyvirtio.ring.fixed.FixedChains`): ``iodepth``
slots in flight plus up to as many *spare* slots, prepared and waiting. A
pass that sees n completions publishes n spares at once (one avail index
store, one kick decision), then checks every used entry, books it, and
prepares the completed slots as the next spares. Only the address (and, for
mixed workloads, the direction) of a slot changes per request.

What a request looks like is the *command format*'s business
(:mod:`pyvirtio.bench.formats`): a virtio-blk header and status byte, or a
virtio-scsi command with a READ(16) / WRITE(16) CDB and its response. The
format is chosen once, when the engine is built on a
:class:`~pyvirtio.drivers.blk.VirtioBlk` or a
:class:`~pyvirtio.drivers.scsi.ScsiDisk`; the loops
(:mod:`pyvirtio.bench.loops`) only use the arrays and calls it hands out, so
one engine and one set of loops drive both devices, with the same options
and the same report.

Three loops share that ring (:mod:`pyvirtio.bench.loops`): plain Python,
fused Python (pure reads or writes, one call of the ring's cycle per pass),
fastest at low depth, and NumPy (the ring's vectorised cycle), whose cost
per pass does not grow with the number of requests, fastest at high depth.
The engine works on split and packed rings alike: everything it does to the
ring goes through the FixedChains API. ``mode="auto"`` picks NumPy when
it is installed and the depth is at least :data:`NUMPY_MIN_DEPTH` (measured:
docs/benchmarks.md).

Latencies are measured per request from the pass that posted it to the pass
that reaped it, into the log-linear histogram of
:class:`~pyvirtio.bench.stats.Stats`. A request whose status is not good
counts as an error (the first one is described in ``Stats.error``).

``verify=True`` writes a per-block pattern (block number, seed) and checks
every block read back: a read-only workload first fills the region; a
write workload reads back every block it wrote at the end.

Reconnect. When the device's transport has a reconnect policy
(``VirtioBlk.open(..., reconnect=...)``, ``pyvirtio bench --reconnect``), a
lost back end does not end the run: the loop notices in its idle checks
(every 1024 empty passes), and the queue is
restored (:meth:`VirtioDevice.recover <pyvirtio.device.VirtioDevice.recover>`):
the slots in flight that did not complete are resubmitted once, those that
did are reaped as usual. The loops do no extra work per request for this.
Each reconnect is counted with its *pause*: from the last pass that posted
or reaped before the loss to the first completion on the new connection
(total and longest in :class:`~pyvirtio.bench.stats.Stats`).
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtio.bench import loops
from pyvirtio.bench.formats import CommandFormat, command_format
from pyvirtio.bench.stats import LatencyLog, Stats, have_numpy
from pyvirtio.drivers.blk import VirtioBlk, pack_pattern
from pyvirtio.drivers.scsi import ScsiDisk
from pyvirtio.errors import ConnectionLost, InvalidArgument
from pyvirtio.ring.fixed import FixedChains

NUMPY_MIN_DEPTH = 64
#: At most this many bytes of data buffers for the fused loop's spare slots.
SPARE_BYTES = 4 << 20
RW_MODES = ("read", "write", "randread", "randwrite", "randrw", "rw")
MODES = ("auto", "python", "numpy")
#: Descriptors per request: header, data, status.
DESCS_PER_REQUEST = 3


class BlockEngine:
    """Runs a workload on the calling thread's queue of a VirtioBlk, or of the VirtioScsi of a LUN.

    ``target``: a :class:`~pyvirtio.drivers.blk.VirtioBlk`, a
    :class:`~pyvirtio.drivers.scsi.ScsiDisk` (``scsi.disk(t, l)``) or a
    :class:`~pyvirtio.bench.formats.CommandFormat`.
    """

    def __init__(
        self,
        target: VirtioBlk | ScsiDisk | CommandFormat,
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
        if not 0 <= rwmixread <= 100:
            raise InvalidArgument("rwmixread must be 0..100")
        if mode not in MODES:
            raise InvalidArgument("mode must be auto, python or numpy")
        fmt = command_format(target)
        if bs <= 0 or bs % fmt.block_size:
            raise InvalidArgument(f"bs {bs} must be a positive multiple of the block size {fmt.block_size}")
        if bs > fmt.max_transfer:
            raise InvalidArgument(f"bs {bs} exceeds the device's largest single-segment transfer ({fmt.max_transfer})")
        self.reads_only = rw in ("read", "randread") or (rw in ("randrw", "rw") and rwmixread == 100)
        if not self.reads_only and fmt.readonly:
            raise InvalidArgument(f"{rw}: the device is read-only")
        size = fmt.capacity - offset if size is None else size
        if offset < 0 or offset % bs or size < bs or offset + size > fmt.capacity:
            raise InvalidArgument(f"region {offset}+{size} does not fit the device ({fmt.capacity} bytes) with bs {bs}")
        vq = fmt.vq
        max_qd = vq.size // DESCS_PER_REQUEST
        if not 1 <= iodepth <= max_qd:
            raise InvalidArgument(f"iodepth must be 1..{max_qd} for a queue of {vq.size} descriptors")
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
        self.fmt = fmt
        self.device = fmt.device
        self.vq = vq
        self.rw = rw
        self.bs = bs
        self.qd = iodepth
        self.rwmixread = 100 if rw in ("read", "randread") else 0 if rw in ("write", "randwrite") else rwmixread
        self.verify = verify
        self.seed = random.getrandbits(32) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.first_block = offset // bs
        self.nblocks = size // bs
        #: Address units (blk: sectors; scsi: the LUN's blocks) per ``bs`` block.
        self.units_per_block = bs // fmt.lba_size
        self.sequential = rw in ("read", "write", "rw")
        self.next_block = 0
        # The fused loop (pure reads or pure writes, no verify) keeps spare slots
        # prepared beyond the depth, so that a completion is answered by
        # publishing a ready request before anything else is done (see loops.run_fused).
        self.fused = mode == "python" and not verify and self.rwmixread in (0, 100)
        self.spares = min(iodepth, max_qd - iodepth, max(1, SPARE_BYTES // bs)) if self.fused or mode == "numpy" else 0
        nslots = iodepth + self.spares
        initial_write = not self.reads_only and self.rwmixread == 0
        fmt.layout(nslots, bs, initial_write)  # headers and statuses first, then the data (as measured)
        try:
            self.data = fmt.allocate(bs * nslots, 4096)
        except BaseException:
            fmt.close()
            raise
        try:
            first, other = fmt.chains(self.data.addr)
            self.fixed = FixedChains(vq.ring, first, alternate=other)
        except BaseException:
            fmt.close()
            fmt.free(self.data)
            raise
        fmt.bind(self.fixed)
        self.is_write = bytearray([1 if initial_write else 0] * nslots)
        self.written: bytearray | None = bytearray(self.nblocks) if verify else None
        self.block_of = [0] * iodepth

    def close(self) -> None:
        """Give the chains and buffers back (only with nothing in flight)."""
        try:
            self.fixed.detach()
        finally:
            self.fmt.close()
            self.fmt.free(self.data)

    # -- helpers --------------------------------------------------------------

    def set_direction(self, s: int, write: bool) -> None:
        """Make slot s a write or a read."""
        self.fmt.set_direction(s, write)
        self.is_write[s] = 1 if write else 0

    def prefill(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Write the verify pattern over the whole region (used by --verify on read workloads)."""
        for s in range(self.qd):
            self.set_direction(s, True)
        block = 0
        fixed = self.fixed
        free = list(range(self.qd))
        fmt = self.fmt
        lba, lk, lo = fmt.lba, fmt.lba_k, fmt.lba_o
        st, unset = fmt.status, fmt.unset
        dv = self.data.view
        bs = self.bs
        idle = 0
        while block < self.nblocks or fixed.n_inflight:
            batch = []
            while free and block < self.nblocks:
                s = free.pop()
                self.block_of[s] = block
                lba[lk * s + lo] = (self.first_block + block) * self.units_per_block
                dv[bs * s : bs * s + bs] = pack_pattern(self.first_block + block, self.seed, bs)
                st[s] = unset
                batch.append(s)
                block += 1
            if batch and fixed.post(batch):
                self.device.transport.notify_queue(self.vq.index)
            done = fixed.reap_slots()
            for s in done:
                if st[s] != 0:
                    raise ConnectionLost(f"prefill write of block {self.block_of[s]} failed: {fmt.describe(s)}")
                assert self.written is not None
                self.written[self.block_of[s]] = 1
                free.append(s)
            idle = 0 if done or batch else idle + 1
            if idle and not idle & 0x3FF:
                self.check(None, time.perf_counter_ns())
            if progress is not None:
                progress(block, self.nblocks)
        for s in range(self.qd):
            self.set_direction(s, False)

    # -- the run ----------------------------------------------------------------

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
        fixed = self.fixed
        if self.device_signals:
            # Let the device signal the call eventfd per batch although we poll.
            # Measured against qemu-storage-daemon on this kind of machine it
            # cuts round-trip latency at low depth from ~16 to ~6 us (p50), as
            # if the signalling syscall kept the device's thread from a slower
            # sleep path (docs/benchmarks.md). Nobody reads the eventfd.
            fixed.enable_interrupts()
        try:
            if self.mode == "numpy":
                stats = loops.run_numpy(self, seconds, stop, progress, progress_interval)
            elif self.fused:
                stats = loops.run_fused(self, seconds, stop, progress, progress_interval)
            else:
                stats = loops.run_python(self, seconds, stop, progress, progress_interval)
        finally:
            if self.device_signals:
                fixed.disable_interrupts()
            if gc_was_enabled:
                gc.enable()
        if self.verify and not self.reads_only and stats.error is None:
            stats.verify_errors += self._read_back()
        return stats

    # -- shared with the loops ----------------------------------------------------

    def drain(self, stats: Stats | None = None) -> int:
        """Reap what is still in flight so the queue can be reused; returns errors seen."""
        st = self.fmt.status
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
                if st[s] != 0:
                    errors += 1
                    if stats is not None and stats.error is None:
                        stats.error = self.fmt.describe(s)
            if slots:
                last = time.perf_counter_ns()
            if time.monotonic() > deadline:
                raise ConnectionLost("the device stopped completing requests while draining")
            if self.check(stats, last):
                deadline = time.monotonic() + 5.0
        return errors

    def snapshot(
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
        """Write a loop's counters into ``stats`` (after flushing ``lats`` into its histogram)."""
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

    # -- reconnect ----------------------------------------------------------------

    def check(self, stats: Stats | None, since_ns: int) -> bool:
        """Is the device there? If it went away: recover (True), or raise ConnectionLost."""
        try:
            self.vq.check_alive()
        except ConnectionLost as exc:
            self.recover(exc, stats, since_ns)
            return True
        return False

    def recover(self, lost: ConnectionLost, stats: Stats | None, since_ns: int) -> None:
        """Restore the queue after the device was lost, or raise ``lost`` if the transport cannot.

        Returns at the first completion on the new connection (at once if
        nothing was left for the device), and counts the pause from
        ``since_ns``.
        """
        device = self.device
        if not device.can_reconnect:
            raise lost
        fixed = self.fixed
        vq = self.vq
        ready = [fixed.pending()]  # completions the old device left in the ring, reaped as usual

        def restart(resubmit: bool) -> int:
            base = fixed.restart_base(resubmit)
            ready[0] = fixed.pending()
            return base

        device.recover(vq, restart)
        policy = device.reconnecting.reconnect_policy if device.reconnecting is not None else None
        deadline = time.monotonic() + (policy.timeout if policy is not None else 30.0)
        spins = 0
        # Left for the new device: what is in flight and was not in the used ring when it started.
        while fixed.n_inflight > ready[0] and fixed.pending() == ready[0]:
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

    # -- verify -------------------------------------------------------------------

    def _read_back(self) -> int:
        """Read every block this run wrote and count those whose pattern is wrong."""
        assert self.written is not None
        bad = 0
        for b in range(self.nblocks):
            if self.written[b]:
                data = self.fmt.read((self.first_block + b) * self.bs, self.bs)
                if data != pack_pattern(self.first_block + b, self.seed, self.bs):
                    bad += 1
        return bad


# -- several queues -----------------------------------------------------------------


@dataclass
class QueuesResult:
    """What :func:`run_queues` measured."""

    #: Every queue's stats, merged.
    stats: Stats
    #: The loop that ran ("python" or "numpy").
    mode: str
    #: The run was cut short by Ctrl-C (KeyboardInterrupt in the calling thread).
    interrupted: bool = False


def run_queues(
    target: VirtioBlk | ScsiDisk,
    seconds: float,
    *,
    queues: int = 1,
    seed: int | None = None,
    verify: bool = False,
    bs: int = 4096,
    progress: Callable[[Stats], None] | None = None,
    progress_interval: float = 0.5,
    stop: threading.Event | None = None,
    **engine_kw: Any,
) -> QueuesResult:
    """Run a :class:`BlockEngine` on ``queues`` queues of ``target``, one thread each, for ``seconds``.

    The threads start their loops together (after a ``verify`` prefill);
    queue q gets seed ``seed + q`` and, with ``verify``, a slice of the
    device of its own (so that checks do not race). ``progress`` receives
    the merged stats of all queues. Ctrl-C in the calling thread stops
    every queue and returns what was measured (``interrupted``); an error
    in any queue stops the others and is raised.
    """
    if seconds <= 0:
        raise InvalidArgument(f"the run time must be positive, got {seconds}")
    if queues < 1:
        raise InvalidArgument(f"queues must be positive, got {queues}")
    stop = threading.Event() if stop is None else stop
    results: list[Stats | BaseException | None] = [None] * queues
    modes: list[str] = []
    ready = threading.Barrier(queues)
    live = [Stats() for _ in range(queues)]
    # Waited for with events: a Thread.join() interrupted by Ctrl-C may return early
    # afterwards on CPython 3.11 (the thread still running, its result not yet there).
    finished = [threading.Event() for _ in range(queues)]

    def merged_progress(q: int) -> Callable[[Stats], None] | None:
        if progress is None:
            return None

        def cb(stats: Stats) -> None:
            live[q] = stats
            if q == 0:
                total = Stats()
                for s in live:
                    total.merge(s)
                total.seconds = stats.seconds
                progress(total)

        return cb

    per = target.capacity // queues // bs * bs if verify and queues > 1 else 0
    if verify and queues > 1 and not per:
        raise InvalidArgument(f"{target.capacity} bytes cannot be split into {queues} regions of bs {bs} to verify")

    def worker(q: int) -> None:
        try:
            engine = BlockEngine(
                target,
                seed=None if seed is None else seed + q,
                verify=verify,
                bs=bs,
                offset=q * per,
                size=per or None,
                **engine_kw,
            )
            try:
                modes.append(engine.mode)
                if verify and engine.reads_only:
                    engine.prefill()
                ready.wait()
                results[q] = engine.run(
                    seconds, stop=stop, progress=merged_progress(q), progress_interval=progress_interval
                )
            finally:
                if engine.fixed.n_inflight == 0 or engine.fixed.ring.broken is not None:
                    engine.close()
        except BaseException as exc:  # reported by the calling thread
            results[q] = exc
            stop.set()
            ready.abort()
        finally:
            finished[q].set()

    threads = [threading.Thread(target=worker, args=(q,), name=f"bench-q{q}") for q in range(queues)]
    for t in threads:
        t.start()
    interrupted = False
    try:
        for done in finished:
            while not done.wait(0.2):
                pass
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        for done in finished:
            done.wait()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, threading.BrokenBarrierError)]
    if errors:
        raise errors[0]
    total = Stats()
    for r in results:
        assert isinstance(r, Stats)
        total.merge(r)
    return QueuesResult(total, modes[0] if modes else "python", interrupted)


__all__ = ["MODES", "NUMPY_MIN_DEPTH", "RW_MODES", "BlockEngine", "QueuesResult", "run_queues"]
