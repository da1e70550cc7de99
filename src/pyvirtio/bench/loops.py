"""The block engine's loops: plain Python, fused Python and NumPy over one FixedChains.

Theory of operation. Each loop keeps ``iodepth`` requests of the engine's
slots in flight (:class:`~pyvirtio.bench.block.BlockEngine`) until the
run's time is up, then drains the queue:

* :func:`run_python`: post the free slots (:meth:`FixedChains.post`), reap
  (:meth:`FixedChains.reap_slots`), book, repeat. Mixed workloads and
  ``verify`` run here.
* :func:`run_fused`: pure reads or pure writes, no verify: the ring's post
  and reap inlined, ring state in locals, spare slots published the moment
  a completion is seen (the fastest loop at low depth).
* :func:`run_numpy`: a fixed number of array operations per pass whatever
  the batch (the fastest at high depth).

They know nothing about the device: a slot's address and status are
stored and tested through what the engine's command format handed out
(:mod:`pyvirtio.bench.formats`), chosen once per run. Every used entry is
checked by the rules of :mod:`pyvirtio.ring.fixed` (virtio 1.2 §2.7.8); on
any anomaly a loop writes its ring state back and lets FixedChains find the
entry and raise, so the error and the completions reported are exact.

The fused and NumPy loops work on the split ring's shared arrays directly
(they are the ring's fast paths, kept here until the ring module offers
them as batch calls); every ring field they copy into locals is written
back (:meth:`BlockEngine.sync_ring`) before anything else reads it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.bench.formats import CommandFormat
from pyvirtio.bench.stats import LatencyLog, Stats
from pyvirtio.drivers.blk import pack_pattern
from pyvirtio.errors import ConnectionLost, QueueBroken
from pyvirtio.ring import ordering

if TYPE_CHECKING:
    from pyvirtio.bench.block import BlockEngine


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
    """The plain-Python loop with FixedChains' post and reap inlined (pure reads or pure writes).

    At a few completions per pass, function calls per pass cost more than
    the requests themselves, so this loop keeps the ring state in locals.

    Spare slots. Besides the ``iodepth`` slots in flight, ``e.spares``
    slots wait prepared (address chosen, status reset) in ``ready``.
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
    fixed = e.fixed
    ring = fixed.ring
    transport = e.device.transport
    qi = e.vq.index
    kick = transport.notifier(qi)
    check = e.vq.check_alive
    fmt = e.fmt
    lba, lk, lo = fmt.lba, fmt.lba_k, fmt.lba_o  # lba[lk * s + lo]: slot s's address
    st, unset = fmt.status, fmt.unset  # st[s]: nonzero if slot s failed
    spb = e.units_per_block
    first = e.first_block
    nblocks = e.nblocks
    rand = e.rng.random
    sequential = e.sequential
    all_write = e.rwmixread == 0
    qd = e.qd
    size = ring.size
    mask = size - 1
    a16 = ring._avail16
    u16 = ring._used16
    u32 = ring._used32
    avail_event_i = ring._avail_event_i
    used_event_i = ring._used_event_i
    event_idx = ring.event_idx
    signals = e.device_signals
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
    nxt = e.next_block
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
        lba[lk * s + lo] = (first + b) * spb
        st[s] = unset
    ready = list(range(fixed.nslots))  # prepared, not published; oldest first
    posted: list[int] = []  # published this pass, marked in flight at its end

    try:
        while True:
            n = (u16[1] - last) & 0xFFFF
            passes += 1
            if n or outstanding != qd:
                if n > outstanding:
                    e.sync_ring(avail_idx, kick_from, last, outstanding)
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
                            _fused_violation(e, posted, avail_idx, kick_from, last, outstanding)
                        hw1[head] = 0
                        last = (last + 1) & 0xFFFF
                        outstanding -= 1
                        s = slot_of[head]
                        if st[s]:
                            errors += 1
                            if stats.error is None:
                                stats.error = fmt.describe(s)
                        raw.append(t - sub_t[s])
                        if sequential:
                            b = nxt
                            nxt = nxt + 1 if nxt + 1 < nblocks else 0
                        else:
                            b = int(rand() * nblocks)
                        lba[lk * s + lo] = (first + b) * spb
                        st[s] = unset
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
                        e.snapshot(stats, ios, ios if all_write else 0, errors, 0, kicks, passes, t - t0, lats)
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
                        e.sync_ring(avail_idx, kick_from, last, outstanding)
                        e.recover(exc, stats, t)  # t: the last pass that reaped
                        kick_from = ring._kick_from
                        stuck_at = max(stuck_at, perf() + 5_000_000_000)
                    now = perf()
                    if now >= stuck_at:
                        raise ConnectionLost("the device stopped completing requests (5 s past the end of the run)")
                    if progress is not None and now >= next_progress:
                        next_progress = now + int(interval * 1e9)
                        e.snapshot(
                            stats, ios, ios if all_write else 0, errors, 0, kicks, passes, now - t0, lats
                        )
                        raw = lats.raw
                        progress(stats)
        e.sync_ring(avail_idx, kick_from, last, outstanding)
        synced = True
        errors += e.drain(stats)
    finally:
        if not synced and ring.broken is None:
            e.sync_ring(avail_idx, kick_from, last, outstanding)
        e.next_block = nxt
        e.snapshot(stats, ios, ios if all_write else 0, errors, 0, kicks, passes, perf() - t0, lats)
    return stats


def _fused_violation(
    e: BlockEngine, posted: list[int], avail_idx: int, kick_from: int, last: int, outstanding: int
) -> None:
    """A used entry broke a rule: mark this pass's published slots in flight, let reap_slots raise precisely."""
    fixed = e.fixed
    for s in posted:
        fixed.hw1[fixed.heads[s]] = fixed.wlen[s] + 1
    e.sync_ring(avail_idx, kick_from, last, outstanding)
    fixed.reap_slots()  # raises DeviceProtocolError naming the entry
    raise AssertionError("reap_slots accepted an entry the fused loop rejected")


def run_numpy(
    e: BlockEngine,
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
    lats = LatencyLog(stats, max_batch=e.fixed.nslots)
    sub_buf = lats.sub_buf
    pass_t = lats.pass_t
    pass_n = lats.pass_n
    chunk = lats.CHUNK
    idle_chunk = lats.IDLE_CHUNK
    take = np.take
    fixed = e.fixed
    ring = fixed.ring
    kick = e.device.transport.notifier(e.vq.index)
    nslots = fixed.nslots
    qd = e.qd
    size = ring.size
    mask = size - 1
    a = fixed._arrays()
    fmt = e.fmt
    views = fmt.numpy_views()
    hdr_sector = views.lba  # per slot: its address (sectors or LBAs), in the header
    status = views.status  # per slot: nonzero if failed
    unset = views.unset
    count_bad = views.count_bad
    set_directions = views.set_directions
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
    signals = e.device_signals
    fence = ordering._fence_lock
    acquire, release = fence.acquire, fence.release
    weak = not ordering.STRONGLY_ORDERED
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
    w1 = wlen1_np[0]  # every slot's writable bytes + 1, unless mixed
    count_writes = not e.reads_only
    sequential = e.sequential
    arange = a["arange"]
    nxt = e.next_block
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

    if ring.broken is not None:
        raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")

    def snapshot(now: int, lp: int) -> None:
        lats.pos = lp
        lats.flush()
        e.snapshot(stats, ios, nwrites, errors, 0, kicks, passes, now - t0)

    # Ready slots: a circular queue, rq[rh], rq[rh + 1], ... (nr of them, mod
    # nslots). Every slot starts ready and prepared (sequential sectors are
    # given at publication, to keep their order).
    rq = np.arange(nslots, dtype=intp)
    rh = 0
    nr = nslots
    if not sequential:
        hdr_sector[:] = rpool[:nslots]
        rpos = nslots
    status[:] = unset
    posted = rq[:0]
    k = 0
    synced = False
    try:
        while True:
            n = (u16[1] - last) & 0xFFFF
            passes += 1
            if n or outstanding != qd:
                if n > outstanding:
                    e.sync_ring(avail_idx, kick_from, last, outstanding)
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
                        _numpy_violation(e, posted, k, avail_idx, kick_from, last, outstanding)
                    hw[ids] = 0
                    if count_nonzero(hw) != outstanding - k - n:  # an id twice in the batch
                        hw[ids] = wlen1_np[slot_of_np[ids]]
                        _numpy_violation(e, posted, k, avail_idx, kick_from, last, outstanding)
                    last = (last + n) & 0xFFFF
                    outstanding -= n
                    slots = ids if ident else slot_of_np[ids]
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
                        set_directions(slots, w)
                    status[slots] = unset
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
                    e.sync_ring(avail_idx, kick_from, last, outstanding)
                    if e.check(stats, t):  # t: the last pass that posted or reaped
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
        e.sync_ring(avail_idx, kick_from, last, outstanding)
        synced = True
        errors += e.drain(stats)
    finally:
        if not synced and ring.broken is None:
            e.sync_ring(avail_idx, kick_from, last, outstanding)
        e.next_block = nxt
        snapshot(perf(), lp)
    return stats


def _numpy_violation(
    e: BlockEngine, posted: Any, k: int, avail_idx: int, kick_from: int, last: int, outstanding: int
) -> None:
    """A batch broke a rule: mark this pass's published slots in flight, let reap_many raise precisely."""
    fixed = e.fixed
    a = fixed._arrays()
    if k:
        a["head_wlen1"][a["heads"][posted]] = a["wlen1"][posted]
    e.sync_ring(avail_idx, kick_from, last, outstanding)
    fixed.reap_many()  # raises DeviceProtocolError naming the entry
    raise AssertionError("reap_many accepted a batch the NumPy loop rejected")



__all__ = ["run_fused", "run_numpy", "run_python"]
