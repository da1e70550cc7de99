"""The virtio-net benchmark engine: transmit, receive and echo load on one queue pair.

Theory of operation. A packet benchmark moves frames of one shape as fast
as the device takes (tx) or gives (rx) them. Per-frame Python is far too
slow for that (a few hundred ns of interpreter work per frame caps a loop
near 1-2 Mpps), so the tx and rx loops do *no per-frame work at all*:

* Layout once. Every slot of the ring carries the same frame (tx) or an
  empty buffer (rx), and slot ``p`` sits at avail-ring position ``p``, for
  good: re-posting the slots reaped from positions ``i .. i+n`` puts the
  same heads at the same positions, so the avail ring's entries never change
  and posting n slots is *one* avail-index store plus one kick decision.
* Reap and check in bulk. A device that completes in order (DPDK's vhost
  and the embedded back end do, split rings) writes at used position ``p``
  the head published at position ``p``. Each pass reads the used index once
  and checks the whole batch at once: tx compares the used entries' bytes
  with the expected ``(head, 0)`` pairs (one ``bytes ==``, a memcmp); rx
  compares the ids and bounds the lengths with NumPy (a handful of array
  operations per batch; with MRG_RXBUF it also checks every header's
  ``num_buffers`` is 1).
* Anything else (an entry out of order, a length out of bounds) drops to
  the validating path: :class:`~pyvirtio.ring.fixed.FixedChains` reaps the
  batch entry by entry, which reports the exact violation (queue broken), or
  accepts a legal out-of-order completion, after which the run continues on
  the general driver calls (slower, but correct).

Echo runs a closed loop of ``window`` frames in flight through the general
API (``send_batch`` / ``recv_batch``), each frame carrying a sequence
number; its round-trip time goes into the log-linear latency histogram of
:class:`~pyvirtio.bench.stats.Stats`, and every echoed frame is
checked against what was sent (payload byte-exact, MACs swapped or not).
"""

from __future__ import annotations

import gc
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.bench.stats import LatencyLog, Stats
from pyvirtio.drivers.net import HDR_SIZE, VirtioNet, parse_mac
from pyvirtio.errors import ConnectionLost, DeviceProtocolError, InvalidArgument, QueueBroken
from pyvirtio.ring import ordering
from pyvirtio.ring.fixed import FixedChains

MODES = ("tx", "rx", "echo")
SEQ_OFF = 42  # UDP payload offset in the template frame (14 + 20 + 8)


def udp_frame(size: int, dst: bytes, src: bytes, seq: int = 0) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``size`` bytes (198.18.0.1:9 -> 198.18.0.2:9, as testpmd's txonly)."""
    if size < 60:
        raise InvalidArgument(f"frame size {size} is below the Ethernet minimum of 60 (64 with FCS)")
    ip_len = size - 14
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0, 64, 17, 0, bytes([198, 18, 0, 1]),
                               bytes([198, 18, 0, 2])))
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", ip, 10, ~s & 0xFFFF)
    udp = struct.pack("!HHHH", 9, 9, ip_len - 20, 0)
    payload = bytearray(size - 42)
    for i in range(len(payload)):
        payload[i] = (i * 7 + 1) & 0xFF
    if len(payload) >= 8:
        struct.pack_into("<Q", payload, 0, seq)
    return dst + src + b"\x08\x00" + bytes(ip) + udp + bytes(payload)


def _fixed(slots: object) -> FixedChains:
    """The pre-linked chains of a driver queue: the engine's fast path needs a split ring without IN_ORDER."""
    if not isinstance(slots, FixedChains):
        raise InvalidArgument("the net engine runs on split rings without IN_ORDER (issue 12)")
    return slots


class NetStats(Stats):
    """Stats with packet names: ``ios`` are frames."""

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        secs = self.seconds or 1e-9
        return {
            "frames": self.ios,
            "bytes": self.bytes,
            "seconds": out["seconds"],
            "pps": round(self.ios / secs),
            "bps": round(self.bytes * 8 / secs),
            "latency_us": out["latency_us"],
            "errors": self.errors,
            "verify_errors": self.verify_errors,
            "kicks": self.kicks,
            "passes": self.passes,
            "path": getattr(self, "path", ""),
            # tx: frames handed to the device, including those still in the ring when the clock stopped
            "sent": self.ios + getattr(self, "drained", 0),
        }


class NetEngine:
    """Runs a packet workload on queue pair ``pair`` of ``net`` from the calling thread."""

    def __init__(
        self,
        net: VirtioNet,
        *,
        pair: int = 0,
        size: int = 64,
        dst_mac: str | bytes = "02:00:00:00:00:02",
        swapped: bool = True,
    ) -> None:
        if not 60 <= size <= net.max_frame:
            raise InvalidArgument(f"size must be 60..{net.max_frame}, got {size}")
        self.net = net
        self.pair = pair
        self.size = size
        self.dst = parse_mac(dst_mac)
        self.swapped = swapped
        self.frame = udp_frame(size, self.dst, net.mac)
        net.queue_pair(pair)  # acquire the pair for this thread now

    # -- transmit ---------------------------------------------------------------

    def run_tx(
        self, seconds: float, *, stop: threading.Event | None = None,
        progress: Callable[[NetStats], None] | None = None,
    ) -> NetStats:
        net = self.net
        p = net.queue_pair(self.pair)
        tx = p.tx
        net.flush_tx(self.pair)
        fixed = _fixed(tx.fixed)
        ring = fixed.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        size = ring.size
        mask = size - 1
        heads = fixed.heads
        view = tx.view
        d32 = ring._desc32
        data = bytes(HDR_SIZE) + self.frame
        for s in range(size):
            base = tx.slot_size * s
            view[base : base + len(data)] = data
            d32[4 * heads[s] + 2] = len(data)
            tx.hdr_dirty[s] = 0
        a16 = ring._avail16
        for pos in range(size):
            a16[2 + pos] = heads[pos]  # slot p lives at avail position p for the whole run
        expected = b"".join(struct.pack("<II", heads[pos], 0) for pos in range(size))
        used_b = ring._used32.cast("B")  # [idx/flags: 4 bytes][ring: 8 bytes per entry]...
        u16 = ring._used16
        kick = net.device.transport.notifier(tx.index)
        stats = NetStats()
        stats.path = "in-order"  # type: ignore[attr-defined]
        fence = ordering._fence_lock
        acquire, release = fence.acquire, fence.release
        event_idx = ring.event_idx
        avail_event_i = ring._avail_event_i
        check_alive = net.device.transport.check_alive
        perf = time.perf_counter_ns
        avail = ring.avail_idx
        last = ring.last_used
        kick_from = ring._kick_from
        outstanding = 0
        frames = kicks = passes = idle = 0
        fsize = self.size
        gc_was = gc.isenabled()
        gc.disable()
        t0 = perf()
        deadline = t0 + int(seconds * 1e9)
        next_check = t0 + 10_000_000
        next_progress = t0 + 500_000_000
        fell_back = False
        try:
            while True:
                # Post every free slot: one index store, one kick decision.
                free = size - outstanding
                if free:
                    avail = (avail + free) & 0xFFFF
                    outstanding = size
                    a16[1] = avail
                    acquire()
                    release()
                    if event_idx:
                        need = ((avail - u16[avail_event_i] - 1) & 0xFFFF) < ((avail - kick_from) & 0xFFFF)
                    else:
                        need = not u16[0] & 1
                    kick_from = avail
                    if need:
                        kick()
                        kicks += 1
                n = (u16[1] - last) & 0xFFFF
                passes += 1
                if n:
                    idle = 0
                    if n > outstanding:
                        fell_back = True
                        break
                    start = last & mask
                    end = start + n
                    if end <= size:
                        ok = used_b[4 + 8 * start : 4 + 8 * end] == expected[8 * start : 8 * end]
                    else:
                        end -= size
                        ok = (
                            used_b[4 + 8 * start : 4 + 8 * size] == expected[8 * start :]
                            and used_b[4 : 4 + 8 * end] == expected[: 8 * end]
                        )
                    if not ok:
                        fell_back = True
                        break
                    last = (last + n) & 0xFFFF
                    outstanding -= n
                    frames += n
                    t = perf()
                    if t >= next_check:
                        next_check = t + 10_000_000
                        if t >= deadline or (stop is not None and stop.is_set()):
                            break
                        if progress is not None and t >= next_progress:
                            next_progress = t + 500_000_000
                            self._fill(stats, frames, fsize, kicks, passes, t - t0)
                            progress(stats)
                else:
                    idle += 1
                    if not idle & 0x3FF:
                        t = perf()
                        if t >= deadline:
                            break
                        if not idle & 0xFFFF:
                            check_alive()
        finally:
            elapsed = perf() - t0
            if gc_was:
                gc.enable()
            self._sync_tx(avail, last, kick_from, outstanding)
        if fell_back:
            # Validate the batch entry by entry (raises on a violation), then go on generically.
            got = net.reclaim_tx(self.pair)
            frames += got
            more = self._generic_tx(max(0.0, (deadline - perf()) / 1e9), stop)
            frames += more
            elapsed = perf() - t0
            stats.path = "generic"  # type: ignore[attr-defined]
        self._fill(stats, frames, fsize, kicks, passes, elapsed)
        tx = net.queue_pair(self.pair).tx
        stats.drained = tx.nslots - len(tx.free)  # type: ignore[attr-defined]
        net.flush_tx(self.pair, timeout=5.0)
        return stats

    def _sync_tx(self, avail: int, last: int, kick_from: int, outstanding: int) -> None:
        """Write the loop's ring state back so the general driver calls can take over."""
        tx = self.net.queue_pair(self.pair).tx
        fixed = _fixed(tx.fixed)
        ring = fixed.ring
        size = ring.size
        ring.avail_idx = avail
        ring._kick_from = kick_from
        ring.last_used = last
        ring.outstanding = outstanding
        fixed.n_inflight = outstanding
        inflight = {(last + k) & (size - 1) for k in range(outstanding)}
        hw1 = fixed.hw1
        for pos in range(size):
            hw1[fixed.heads[pos]] = fixed.wlen[pos] + 1 if pos in inflight else 0
        tx.free = [s for s in range(size) if s not in inflight]

    def _generic_tx(self, seconds: float, stop: threading.Event | None) -> int:
        net = self.net
        frames = [self.frame] * 64
        done = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            done += net.send_batch(frames, self.pair)
        return done

    # -- receive ------------------------------------------------------------------

    def run_rx(
        self, seconds: float, *, stop: threading.Event | None = None,
        progress: Callable[[NetStats], None] | None = None,
    ) -> NetStats:
        import numpy as np

        net = self.net
        net.release_rx(self.pair)  # every receive buffer posted
        rx = net.queue_pair(self.pair).rx
        fixed = _fixed(rx.fixed)
        ring = fixed.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")
        size = ring.size
        mask = size - 1
        if rx.partial_want or fixed.n_inflight != size:
            raise InvalidArgument("the receive ring must have every buffer posted (no frame held)")
        a16 = ring._avail16
        # Expected head per avail position: what we published (a permutation of the heads, checked).
        exp = np.frombuffer(a16, dtype="<u2", count=size, offset=4).astype(np.int64)
        heads = np.asarray(fixed.heads, dtype=np.int64)
        if not np.array_equal(np.sort(exp), np.sort(heads)):
            raise InvalidArgument("the receive ring's avail entries are not one of each buffer")
        slot_of = np.asarray(fixed.slot_of, dtype=np.int64)
        slot_at = slot_of[exp]
        used = np.frombuffer(ring._used32, dtype="<u4", count=1 + 2 * size)
        ids = used[1::2]
        lens = used[2::2]
        nbv = np.frombuffer(rx.view, dtype="<u2")[5 :: rx.buf_size // 2] if net.mrg_rxbuf else None
        nb_at = nbv is not None
        bs = rx.buf_size
        min_len = HDR_SIZE + 14
        u16 = ring._used16
        kick = net.device.transport.notifier(rx.index)
        fence = ordering._fence_lock
        acquire, release = fence.acquire, fence.release
        event_idx = ring.event_idx
        avail_event_i = ring._avail_event_i
        check_alive = net.device.transport.check_alive
        stats = NetStats()
        stats.path = "in-order"  # type: ignore[attr-defined]
        perf = time.perf_counter_ns
        avail = ring.avail_idx
        last = ring.last_used
        kick_from = ring._kick_from
        frames = nbytes = kicks = passes = idle = 0
        gc_was = gc.isenabled()
        gc.disable()
        t0 = perf()
        deadline = t0 + int(seconds * 1e9)
        next_check = t0 + 10_000_000
        next_progress = t0 + 500_000_000
        fell_back = False
        try:
            while True:
                n = (u16[1] - last) & 0xFFFF
                passes += 1
                if n:
                    idle = 0
                    if n > size:
                        fell_back = True
                        break
                    start = last & mask
                    end = start + n
                    segs = ((start, end),) if end <= size else ((start, size), (0, end - size))
                    ok = True
                    got = 0
                    for a, b in segs:
                        ln = lens[a:b]
                        if (
                            not np.array_equal(ids[a:b], exp[a:b])
                            or int(ln.min()) < min_len
                            or int(ln.max()) > bs
                            or (nb_at and not (nbv[slot_at[a:b]] == 1).all())  # type: ignore[index]
                        ):
                            ok = False
                            break
                        got += int(ln.sum())
                    if not ok:
                        fell_back = True
                        break
                    nbytes += got - HDR_SIZE * n
                    frames += n
                    last = (last + n) & 0xFFFF
                    # Re-post the same buffers: same heads at the same positions, one index store.
                    avail = (avail + n) & 0xFFFF
                    a16[1] = avail
                    acquire()
                    release()
                    if event_idx:
                        need = ((avail - u16[avail_event_i] - 1) & 0xFFFF) < ((avail - kick_from) & 0xFFFF)
                    else:
                        need = not u16[0] & 1
                    kick_from = avail
                    if need:
                        kick()
                        kicks += 1
                    t = perf()
                    if t >= next_check:
                        next_check = t + 10_000_000
                        if t >= deadline or (stop is not None and stop.is_set()):
                            break
                        if progress is not None and t >= next_progress:
                            next_progress = t + 500_000_000
                            self._fill(stats, frames, 0, kicks, passes, t - t0, nbytes)
                            progress(stats)
                else:
                    idle += 1
                    if not idle & 0x3FF:
                        t = perf()
                        if t >= deadline or (stop is not None and stop.is_set()):
                            break
                        if not idle & 0xFFFF:
                            check_alive()
        finally:
            elapsed = perf() - t0
            if gc_was:
                gc.enable()
            ring.avail_idx = avail
            ring.last_used = last
            ring._kick_from = kick_from
        if fell_back:
            more, more_bytes = self._generic_rx(max(0.0, (deadline - perf()) / 1e9), stop)
            frames += more
            nbytes += more_bytes
            elapsed = perf() - t0
            stats.path = "generic"  # type: ignore[attr-defined]
        self._fill(stats, frames, 0, kicks, passes, elapsed, nbytes)
        return stats

    def _generic_rx(self, seconds: float, stop: threading.Event | None) -> tuple[int, int]:
        net = self.net
        frames = nbytes = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            got = net.recv_batch(256, self.pair)
            frames += len(got)
            nbytes += sum(len(f) for f in got)
        net.release_rx(self.pair)
        return frames, nbytes

    # -- echo ---------------------------------------------------------------------

    def run_echo(
        self, seconds: float, *, window: int = 32, stop: threading.Event | None = None,
        progress: Callable[[NetStats], None] | None = None, timeout: float = 1.0,
    ) -> NetStats:
        """Closed loop: ``window`` frames in flight, each checked and timed when it comes back."""
        net = self.net
        pair = self.pair
        if not 1 <= window <= 4096:
            raise InvalidArgument(f"window must be 1..4096, got {window}")
        template = bytearray(self.frame)
        want_head = (net.mac + self.dst) if self.swapped else (self.dst + net.mac)
        body = bytes(self.frame[12:SEQ_OFF]), bytes(self.frame[SEQ_OFF + 8 :])
        stats = NetStats()
        lats = LatencyLog(stats)
        raw = lats.raw
        sent_at: dict[int, int] = {}
        perf = time.perf_counter_ns
        seq = 0
        frames = verrs = lost = 0
        gc_was = gc.isenabled()
        gc.disable()
        t0 = perf()
        deadline = t0 + int(seconds * 1e9)
        last_progress = t0
        next_progress = t0 + 500_000_000
        try:
            while True:
                t = perf()
                if len(sent_at) < window and t < deadline and not (stop is not None and stop.is_set()):
                    batch = []
                    for _ in range(window - len(sent_at)):
                        struct.pack_into("<Q", template, SEQ_OFF, seq)
                        batch.append(bytes(template))
                        sent_at[seq] = t
                        seq += 1
                    queued = net.send_batch(batch, pair)
                    for k in range(queued, len(batch)):
                        del sent_at[seq - len(batch) + k]
                got = net.recv_batch(256, pair)
                t = perf()
                if got:
                    last_progress = t
                    for f in got:
                        if len(f) != self.size or f[:12] != want_head:
                            verrs += 1
                            continue
                        (s,) = struct.unpack_from("<Q", f, SEQ_OFF)
                        t_sent = sent_at.pop(s, None)
                        if t_sent is None or f[12:SEQ_OFF] != body[0] or f[SEQ_OFF + 8 :] != body[1]:
                            verrs += 1
                            continue
                        raw.append(t - t_sent)
                        frames += 1
                    if len(raw) >= 65536:
                        lats.flush()
                        raw = lats.raw
                elif t - last_progress > timeout * 1e9:
                    if t >= deadline and not sent_at:
                        break
                    lost += len(sent_at)  # the device dropped them: count and go on
                    sent_at.clear()
                    last_progress = t
                    net.device.transport.check_alive()
                if t >= deadline and (not sent_at or t - deadline > timeout * 1e9):
                    lost += len(sent_at)
                    break
                if progress is not None and t >= next_progress:
                    next_progress = t + 500_000_000
                    self._fill(stats, frames, self.size, 0, 0, t - t0, lats=lats)
                    raw = lats.raw
                    progress(stats)
        finally:
            elapsed = perf() - t0
            if gc_was:
                gc.enable()
            net.release_rx(pair)
        self._fill(stats, frames, self.size, 0, 0, min(elapsed, deadline - t0) if frames else elapsed, lats=lats)
        stats.verify_errors = verrs
        stats.errors = lost
        return stats

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    def _fill(
        stats: NetStats, frames: int, size: int, kicks: int, passes: int, elapsed_ns: int,
        nbytes: int | None = None, lats: LatencyLog | None = None,
    ) -> None:
        if lats is not None:
            lats.flush()
        stats.ios = frames
        stats.bytes = frames * size if nbytes is None else nbytes
        stats.kicks = kicks
        stats.passes = passes
        stats.seconds = elapsed_ns / 1e9


def run_pairs(
    net: VirtioNet, mode: str, seconds: float, pairs: int, *, size: int = 64, dst_mac: str = "02:00:00:00:00:02",
    window: int = 32, swapped: bool = True, progress: Callable[[NetStats], None] | None = None,
) -> NetStats:
    """Run ``mode`` on the first ``pairs`` queue pairs, one thread each; merged stats."""
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {', '.join(MODES)}")
    results: list[NetStats | BaseException | None] = [None] * pairs
    stop = threading.Event()

    def worker(i: int) -> None:
        try:
            eng = NetEngine(net, pair=i, size=size, dst_mac=dst_mac, swapped=swapped)
            cb = progress if i == 0 else None
            if mode == "tx":
                results[i] = eng.run_tx(seconds, stop=stop, progress=cb)
            elif mode == "rx":
                results[i] = eng.run_rx(seconds, stop=stop, progress=cb)
            else:
                results[i] = eng.run_echo(seconds, window=window, stop=stop, progress=cb)
            net.release_pair(i)
        except BaseException as exc:
            results[i] = exc
            stop.set()

    if pairs == 1:
        worker(0)
    else:
        threads = [threading.Thread(target=worker, args=(i,), name=f"net-bench-{i}") for i in range(pairs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    total = NetStats()
    for r in results:
        if isinstance(r, BaseException):
            if isinstance(r, DeviceProtocolError | ConnectionLost):
                raise r
            raise r
        assert r is not None
        total.merge(r)
    total.path = getattr(results[0], "path", "")  # type: ignore[attr-defined]
    total.drained = sum(getattr(r, "drained", 0) for r in results)  # type: ignore[attr-defined]
    return total


__all__ = ["MODES", "NetEngine", "NetStats", "run_pairs", "udp_frame"]
