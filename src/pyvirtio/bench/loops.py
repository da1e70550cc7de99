"""The block engine's loops: plain Python, fused Python and NumPy over one FixedChains.

Theory of operation. Each loop keeps ``iodepth`` requests of the engine's
slots in flight (:class:`~pyvirtio.bench.block.BlockEngine`) until the
run's time is up, then drains the queue:

* :func:`run_python`: post the free slots (:meth:`FixedChains.post`), reap
  (:meth:`FixedChains.reap_slots`), book, repeat. Mixed workloads and
  ``verify`` run here.
* :func:`run_fused`: pure reads or pure writes, no verify: one call of the
  ring's cycle per pass (:meth:`FixedChains.cycle`), which publishes a
  prepared spare slot the moment a completion is seen, decides the kick and
  checks the completions; the loop books them and prepares their slots
  (the fastest loop at low depth).
* :func:`run_numpy`: the same with the ring's vectorised cycle, a fixed
  number of array operations per pass whatever the batch (the fastest at
  high depth).

They know nothing about the device: a slot's address and status are
stored and tested through what the engine's command format handed out
(:mod:`pyvirtio.bench.formats`), chosen once per run. Nor about the ring's
format: every used entry is checked by the ring module
(:mod:`pyvirtio.ring.fixed`), which raises
:class:`~pyvirtio.errors.DeviceProtocolError` naming the exact entry, and
keeps the ring's state current after every call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.bench.formats import CommandFormat
from pyvirtio.bench.stats import LatencyLog, Stats
from pyvirtio.drivers.blk import pack_pattern
from pyvirtio.errors import ConnectionLost

if TYPE_CHECKING:
    from pyvirtio.bench.block import BlockEngine

#: Polls of the used side per idle turn of the ring's cycle (inside the ring's loop, with its state in
#: locals, as the loops polled before the cycle moved into the ring); the idle checks run every 1024 turns.
IDLE_SPINS = 32


def _first_failure(fmt: CommandFormat, slots: Any) -> str:
    """The description of the first failed slot among ``slots`` (an error path)."""
    st = fmt.status
    for s in slots:
        if st[int(s)]:
            return fmt.describe(int(s))
    return "a request failed"


def run_python(
    e: BlockEngine,
    seconds: float,
    stop: threading.Event | None,
    progress: Callable[[Stats], None] | None,
    interval: float,
) -> Stats:
    stats = Stats()
    lats = LatencyLog(stats)
    raw = lats.raw
    fixed = e.fixed
    post, reap = fixed.post, fixed.reap_slots
    transport = e.device.transport
    qi = e.vq.index
    notify = transport.notify_queue
    fmt = e.fmt
    lba, lk, lo = fmt.lba, fmt.lba_k, fmt.lba_o  # lba[lk * s + lo]: slot s's address
    st, unset = fmt.status, fmt.unset  # st[s]: nonzero if slot s failed
    set_dir = fmt.set_direction
    dv = e.data.view
    bs = e.bs
    spb = e.units_per_block
    first = e.first_block
    nblocks = e.nblocks
    rand = e.rng.random
    mixed = 0 < e.rwmixread < 100
    all_write = e.rwmixread == 0
    mix = e.rwmixread / 100.0
    sequential = e.sequential
    verify = e.verify
    written = e.written
    expect = bytearray(e.qd)  # per slot: its read's block was written before the read was posted
    seed = e.seed
    block_of = e.block_of
    is_write = e.is_write
    sub_t = [0] * e.qd
    perf = time.perf_counter_ns
    free = list(range(e.qd))
    ios = nwrites = errors = verrs = kicks = passes = idle = 0
    t0 = t = perf()
    deadline = t0 + int(seconds * 1e9)
    stuck_at = deadline + 5_000_000_000
    next_progress = t0 + int(interval * 1e9)
    nxt = e.next_block

    def snapshot(now: int) -> None:
        lats.flush()
        e.snapshot(stats, ios, nwrites, errors, verrs, kicks, passes, now - t0)

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
                            set_dir(s, w)
                            is_write[s] = w
                    else:
                        w = all_write
                    lba[lk * s + lo] = (first + b) * spb
                    st[s] = unset
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
                if post(free):
                    notify(qi)
                    kicks += 1
                free = []
            done = reap()
            passes += 1
            if done:
                idle = 0
                t = perf()
                for s in done:
                    raw.append(t - sub_t[s])
                    if st[s]:
                        errors += 1
                        if stats.error is None:
                            stats.error = fmt.describe(s)
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
                    if e.check(stats, t):  # t: the last pass that posted or reaped
                        stuck_at = max(stuck_at, perf() + 5_000_000_000)
                    now = perf()
                    if now >= stuck_at:
                        raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                    if progress is not None and now >= next_progress:
                        next_progress = now + int(interval * 1e9)
                        snapshot(now)
                        raw = lats.raw
                        progress(stats)
        errors += e.drain(stats)
    finally:
        e.next_block = nxt
        snapshot(perf())
    return stats


def run_fused(
    e: BlockEngine,
    seconds: float,
    stop: threading.Event | None,
    progress: Callable[[Stats], None] | None,
    interval: float,
) -> Stats:
    """One call of the ring's cycle per pass (pure reads or pure writes).

    At a few completions per pass, function calls per pass cost more than
    the requests themselves, so the ring does a whole pass in one call and
    this loop keeps its own state in locals.

    Spare slots. Besides the ``iodepth`` slots in flight, ``e.spares``
    slots wait prepared (address chosen, status reset) in the cycle. When
    a pass sees n completions the ring first publishes n spares and makes
    its kick decision, and only then checks the completed entries, whose
    slots become spares in turn once this loop has booked and prepared
    them. The device's next work is in the ring one avail store after its
    last completion is seen: measured against qemu-storage-daemon at QD1,
    the device thread is often still awake then, while a longer turnaround
    lets it fall asleep (docs/benchmarks.md §1.2). The depth is unchanged:
    a slot is published for a completion already seen.
    """
    stats = Stats()
    lats = LatencyLog(stats)
    raw = lats.raw
    fixed = e.fixed
    check = e.vq.check_alive
    fmt = e.fmt
    lba, lk, lo = fmt.lba, fmt.lba_k, fmt.lba_o  # lba[lk * s + lo]: slot s's address
    at = [lk * s + lo for s in range(fixed.nslots)]  # lba[at[s]]: slot s's address
    st, unset = fmt.status, fmt.unset  # st[s]: nonzero if slot s failed
    spb = e.units_per_block
    first = e.first_block
    base = first * spb
    nblocks = e.nblocks
    rand = e.rng.random
    sequential = e.sequential
    all_write = e.rwmixread == 0
    sub_t = [0] * fixed.nslots
    perf = time.perf_counter_ns
    ios = errors = passes = idle = 0
    nxt = e.next_block
    # Every slot starts prepared: a spare; the first turn publishes qd of them.
    for s in range(fixed.nslots):
        if sequential:
            b = nxt
            nxt = nxt + 1 if nxt + 1 < nblocks else 0
        else:
            b = int(rand() * nblocks)
        lba[at[s]] = (first + b) * spb
        st[s] = unset
    cyc = fixed.cycle(e.qd, e.device.transport.notifier(e.vq.index))
    turn = cyc.stepper()  # the ring's cheapest way to call turn
    t0 = t = perf()
    deadline = t0 + int(seconds * 1e9)
    stuck_at = deadline + 5_000_000_000
    next_progress = t0 + int(interval * 1e9) if progress is not None else deadline
    next_event = min(deadline, next_progress, t0 + 10_000_000)

    try:
        while True:
            done = turn(IDLE_SPINS)
            passes += 1
            if done is not None:
                t = perf()
                for s in cyc.posted:
                    sub_t[s] = t
                for s in done:
                    if st[s]:
                        errors += 1
                        if stats.error is None:
                            stats.error = fmt.describe(s)
                    raw.append(t - sub_t[s])
                    # The slot's next request, before the next turn publishes it.
                    if sequential:
                        lba[at[s]] = (first + nxt) * spb
                        nxt = nxt + 1 if nxt + 1 < nblocks else 0
                    else:
                        lba[at[s]] = base + int(rand() * nblocks) * spb
                    st[s] = unset
                ios += len(done)
                if t >= next_event:  # deadline, stop flag, progress, histogram: every ~10 ms at most
                    if t >= deadline or (stop is not None and stop.is_set()):
                        break
                    if progress is not None and t >= next_progress:
                        next_progress = t + int(interval * 1e9)
                        e.snapshot(stats, ios, ios if all_write else 0, errors, 0, cyc.kicks, passes, t - t0, lats)
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
                        e.recover(exc, stats, t)  # t: the last pass that reaped
                        stuck_at = max(stuck_at, perf() + 5_000_000_000)
                    now = perf()
                    if now >= stuck_at:
                        raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                    if progress is not None and now >= next_progress:
                        next_progress = now + int(interval * 1e9)
                        e.snapshot(
                            stats, ios, ios if all_write else 0, errors, 0, cyc.kicks, passes, now - t0, lats
                        )
                        raw = lats.raw
                        progress(stats)
        errors += e.drain(stats)
    finally:
        e.next_block = nxt
        e.snapshot(stats, ios, ios if all_write else 0, errors, 0, cyc.kicks, passes, perf() - t0, lats)
    return stats


def run_numpy(
    e: BlockEngine,
    seconds: float,
    stop: threading.Event | None,
    progress: Callable[[Stats], None] | None,
    interval: float,
) -> Stats:
    """The NumPy loop: the ring's vectorised cycle, a fixed number of array operations per pass.

    Like the fused Python loop, one call of the ring's cycle per pass
    publishes one spare per completion seen, decides the kick, checks the
    batch and returns its slots; the loop books them (latencies, statuses,
    writes) and prepares them, and they join the spares at the back: slots
    are published oldest first, so a device that completes in order sees
    them in a fixed cyclic order, which keeps its reads of headers
    sequential in memory (measured with perf on qemu-storage-daemon:
    publishing in another order made its header loads the hottest
    instruction of its request path).

    Each array operation costs ~0.2-0.7 us whatever its size (measured,
    docs/benchmarks.md §1.1), so the pass is written for few of them:
    addresses are uint64 like the header field and random ones are drawn
    64k at a time, latencies are one ``take`` per pass (:class:`LatencyLog`).
    """
    import numpy as np

    stats = Stats()
    fixed = e.fixed
    nslots = fixed.nslots
    lats = LatencyLog(stats, max_batch=nslots)
    sub_buf = lats.sub_buf
    pass_t = lats.pass_t
    pass_n = lats.pass_n
    chunk = lats.CHUNK
    idle_chunk = lats.IDLE_CHUNK
    take = np.take
    fmt = e.fmt
    views = fmt.numpy_views()
    hdr_sector = views.lba  # per slot: its address (sectors or LBAs), in the header
    status = views.status  # per slot: nonzero if failed
    unset = views.unset
    count_bad = views.count_bad
    set_directions = views.set_directions
    is_write_np = np.frombuffer(e.is_write, dtype=np.uint8)
    rng = np.random.default_rng(e.seed)
    spb = e.units_per_block
    first = e.first_block
    nblocks = e.nblocks

    def draw() -> Any:  # 64k random addresses
        return ((rng.integers(0, nblocks, 1 << 16) + first) * spb).astype(np.uint64)

    rpool = draw()
    rpos = 0
    mixed = 0 < e.rwmixread < 100
    mixp = e.rwmixread / 100.0
    count_writes = not e.reads_only
    sequential = e.sequential
    arange = np.arange(nslots, dtype=np.uint64)
    nxt = e.next_block
    sub_t = np.zeros(nslots, dtype=np.int64)
    count_nonzero = np.count_nonzero
    perf = time.perf_counter_ns
    ios = nwrites = errors = passes = idle = lp = 0
    # Every slot starts prepared: a spare (sequential addresses in the order they are published).
    if sequential:
        hdr_sector[:] = ((nxt + arange) % nblocks + first) * spb
        nxt = (nxt + nslots) % nblocks
    else:
        hdr_sector[:] = rpool[:nslots]
        rpos = nslots
    status[:] = unset
    cyc = fixed.cycle(e.qd, e.device.transport.notifier(e.vq.index), vectorised=True)
    turn = cyc.stepper()  # the ring's cheapest way to call turn
    t0 = t = perf()
    deadline = t0 + int(seconds * 1e9)
    stuck_at = deadline + 5_000_000_000
    next_progress = t0 + int(interval * 1e9)

    def snapshot(now: int, lp: int) -> None:
        lats.pos = lp
        lats.flush()
        e.snapshot(stats, ios, nwrites, errors, 0, cyc.kicks, passes, now - t0)

    try:
        while True:
            slots = turn(IDLE_SPINS)
            passes += 1
            if slots is not None:
                t = perf()
                posted = cyc.posted
                if len(posted):
                    sub_t[posted] = t
                n = len(slots)
                if n:
                    idle = 0
                    take(sub_t, slots, out=sub_buf[lp : lp + n], mode="wrap")  # latencies: see LatencyLog
                    pass_t.append(t)
                    pass_n.append(n)
                    lp += n
                    bad = int(count_bad(status[slots]))
                    if bad:
                        errors += bad
                        if stats.error is None:
                            stats.error = _first_failure(fmt, slots)
                    if count_writes:
                        nwrites += int(count_nonzero(is_write_np[slots]))
                    ios += n
                    # The batch's slots get their next request before the next turn publishes them.
                    if sequential:
                        hdr_sector[slots] = ((nxt + arange[:n]) % nblocks + first) * spb
                        nxt = (nxt + n) % nblocks
                    else:
                        if rpos + n > 65536:
                            rpool = draw()
                            rpos = 0
                        hdr_sector[slots] = rpool[rpos : rpos + n]
                        rpos += n
                    if mixed:
                        w = rng.random(n) >= mixp
                        is_write_np[slots] = w
                        set_directions(slots, w)
                    status[slots] = unset
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
                    if e.check(stats, t):  # t: the last pass that posted or reaped
                        stuck_at = max(stuck_at, perf() + 5_000_000_000)
                    now = perf()
                    if now >= stuck_at:
                        raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                    if progress is not None and now >= next_progress:
                        next_progress = now + int(interval * 1e9)
                        snapshot(now, lp)
                        lp = 0
                        progress(stats)
        errors += e.drain(stats)
    finally:
        e.next_block = nxt
        snapshot(perf(), lp)
    return stats


__all__ = ["run_fused", "run_numpy", "run_python"]
