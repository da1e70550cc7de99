"""The virtio-net benchmark engine: transmit, receive and echo load on one queue pair.

Theory of operation. A packet benchmark moves frames of one shape as fast
as the device takes (tx) or gives (rx) them. Per-frame Python is far too
slow for that (a few hundred ns of interpreter work per frame caps a loop
near 1-2 Mpps), so the tx and rx loops do *no per-frame work at all*:

* Layout once. Every slot of the ring carries the same frame (tx) or an
  empty buffer (rx), and each slot sits at its own ring position for good
  (the ring's *stream*, :meth:`FixedChains.stream
  <pyvirtio.ring.fixed.FixedChains.stream>`): re-posting the slots reaped
  puts the same buffers at the same positions, so posting n slots is *one*
  store plus one kick decision on a split ring (the avail index); on a
  packed ring each slot's prepared descriptors are written again
  (:mod:`pyvirtio.ring.stream_packed`); with IN_ORDER the slots taken are
  submitted again through the ring protocol (:mod:`pyvirtio.ring.fixed_ring`).
* Reap and check in bulk. A device that completes in order (DPDK's vhost
  and the embedded back end do) writes at used position ``p`` the buffer
  published at position ``p``. Each pass checks the whole batch at once
  against those expected entries (:meth:`Stream.peek
  <pyvirtio.ring.fixed.Stream.peek>`: tx, the entries' bytes in one
  comparison; rx, :meth:`~pyvirtio.ring.fixed.Stream.peek_many`: ids and
  length bounds with NumPy, and here every header's ``num_buffers`` is 1
  with MRG_RXBUF), then takes and re-posts it.
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
from pyvirtio.errors import ConnectionLost, DeviceProtocolError, InvalidArgument

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
        fixed = tx.fixed
        size = tx.nslots
        view = tx.view
        data = bytes(HDR_SIZE) + self.frame
        for s in range(size):
            base = tx.slot_size * s
            view[base : base + len(data)] = data
            fixed.set_length(s, 0, len(data))
            tx.hdr_dirty[s] = 0
        # Every slot at its own ring position; re-posting is one store (the ring's stream).
        stream = fixed.stream(net.device.transport.notifier(tx.index))
        peek, advance = stream.peek, stream.advance
        stats = NetStats()
        stats.path = "in-order"  # type: ignore[attr-defined]
        check_alive = net.device.transport.check_alive
        perf = time.perf_counter_ns
        frames = passes = idle = 0
        fsize = self.size
        gc_was = gc.isenabled()
        gc.disable()
        t0 = perf()
        deadline = t0 + int(seconds * 1e9)
        next_check = t0 + 10_000_000
        next_progress = t0 + 500_000_000
        fell_back = False
        try:
            advance(0)  # post every slot
            while True:
                n = peek()
                passes += 1
                if n > 0:
                    idle = 0
                    advance(n)  # take them, post them again: one index store, one kick decision
                    frames += n
                    t = perf()
                    if t >= next_check:
                        next_check = t + 10_000_000
                        if t >= deadline or (stop is not None and stop.is_set()):
                            break
                        if progress is not None and t >= next_progress:
                            next_progress = t + 500_000_000
                            self._fill(stats, frames, fsize, stream.kicks, passes, t - t0)
                            progress(stats)
                elif n < 0:
                    fell_back = True
                    break
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
            stream.close()
            busy = set(fixed.in_flight())
            tx.free = [s for s in range(size) if s not in busy]
        kicks = stream.kicks
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
        fixed = rx.fixed
        if rx.partial_want or fixed.n_inflight != rx.nslots:
            raise InvalidArgument("the receive ring must have every buffer posted (no frame held)")
        # A frame is at least a header and an Ethernet header (virtio 1.2 §5.1.6.4); shorter: the exact path.
        stream = fixed.stream(net.device.transport.notifier(rx.index), min_len=HDR_SIZE + 14)
        peek_many, advance = stream.peek_many, stream.advance
        nbv = np.frombuffer(rx.view, dtype="<u2")[5 :: rx.buf_size // 2] if net.mrg_rxbuf else None
        check_alive = net.device.transport.check_alive
        stats = NetStats()
        stats.path = "in-order"  # type: ignore[attr-defined]
        perf = time.perf_counter_ns
        frames = nbytes = passes = idle = 0
        gc_was = gc.isenabled()
        gc.disable()
        t0 = perf()
        deadline = t0 + int(seconds * 1e9)
        next_check = t0 + 10_000_000
        next_progress = t0 + 500_000_000
        fell_back = False
        try:
            while True:
                got = peek_many()
                passes += 1
                if got:
                    idle = 0
                    slots, lens = got
                    if nbv is not None and not (nbv[slots] == 1).all():  # a merged frame: the general path
                        fell_back = True
                        break
                    n = len(lens)
                    nbytes += int(lens.sum()) - HDR_SIZE * n
                    frames += n
                    advance(n)  # re-post the same buffers: same positions, one index store
                    t = perf()
                    if t >= next_check:
                        next_check = t + 10_000_000
                        if t >= deadline or (stop is not None and stop.is_set()):
                            break
                        if progress is not None and t >= next_progress:
                            next_progress = t + 500_000_000
                            self._fill(stats, frames, 0, stream.kicks, passes, t - t0, nbytes)
                            progress(stats)
                elif got is not None:
                    fell_back = True
                    break
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
            stream.close()
        if fell_back:
            more, more_bytes = self._generic_rx(max(0.0, (deadline - perf()) / 1e9), stop)
            frames += more
            nbytes += more_bytes
            elapsed = perf() - t0
            stats.path = "generic"  # type: ignore[attr-defined]
        self._fill(stats, frames, 0, stream.kicks, passes, elapsed, nbytes)
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
