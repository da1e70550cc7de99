"""What a benchmark run measured: counters, the latency histogram, the report.

Theory of operation. Every engine of :mod:`pyvirtio.bench` (block requests
on virtio-blk or a virtio-scsi LUN, frames on virtio-net) counts into one
:class:`Stats`: requests, bytes, errors, kicks, passes, reconnects and their
pauses, and a *log-linear* latency histogram. Below :data:`SUB` ns a bucket
is one nanosecond; above, each power of two is cut into :data:`SUB` equal
sub-buckets, so a bucket's width is at most 1/16 of its value (under 6 %
error) and 1024 buckets span every 64-bit latency. :func:`bucket` maps a
latency to its bucket, :func:`bucket_value` a bucket to the latency it
stands for (its middle); :meth:`Stats.percentile` walks the histogram.
Histograms of several queues (threads) add up: :meth:`Stats.merge`.

Engines do not bucket latencies one by one in their hot loops. They hand
them to a :class:`LatencyLog` in bulk: Python loops append raw latencies to
a list, the NumPy loop records per pass which submission times it reaped and
when; :meth:`LatencyLog.flush` turns either into histogram counts (with
NumPy, a handful of array operations per chunk: the array form of
:func:`bucket`).

:meth:`Stats.summary` is the report as a dict: the keys of
``pyvirtio bench --json`` (docs/benchmarks.md), which ``bench/compare.py``
parses; keep them stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Histogram sub-buckets per power of two.
SUB = 16
#: Buckets in a histogram: 64 powers of two.
NBUCKETS = 64 * SUB


def bucket(ns: int) -> int:
    """The histogram bucket of a latency of ``ns`` nanoseconds (negative counts as 0)."""
    if ns < SUB:
        return max(ns, 0)
    e = ns.bit_length() - 5
    return (e + 1) * SUB + ((ns >> e) & (SUB - 1))


def bucket_value(b: int) -> float:
    """The latency (ns) bucket ``b`` stands for: the middle of its range."""
    if b < SUB:
        return float(b)
    e = b // SUB - 1
    return float(((SUB + b % SUB) << e) + (1 << e) / 2)


def have_numpy() -> bool:
    """Is NumPy importable (the ``fast`` extra)?"""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Stats:
    """Counters and the latency histogram of one run (mergeable across queues)."""

    ios: int = 0
    reads: int = 0
    writes: int = 0
    bytes: int = 0
    errors: int = 0
    verify_errors: int = 0
    lat_sum_ns: int = 0
    lat_max_ns: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    seconds: float = 0.0
    kicks: int = 0
    passes: int = 0
    #: The first failed request, described (None if none failed).
    error: str | None = None
    reconnects: int = 0
    pause_total_ns: int = 0
    pause_max_ns: int = 0

    def merge(self, other: Stats) -> None:
        self.ios += other.ios
        self.reads += other.reads
        self.writes += other.writes
        self.bytes += other.bytes
        self.errors += other.errors
        self.verify_errors += other.verify_errors
        self.lat_sum_ns += other.lat_sum_ns
        self.lat_max_ns = max(self.lat_max_ns, other.lat_max_ns)
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]
        self.seconds = max(self.seconds, other.seconds)
        self.kicks += other.kicks
        self.passes += other.passes
        self.error = self.error or other.error
        self.reconnects += other.reconnects
        self.pause_total_ns += other.pause_total_ns
        self.pause_max_ns = max(self.pause_max_ns, other.pause_max_ns)

    def percentile(self, p: float) -> float:
        """The latency (ns) below which ``p`` percent of the requests completed (bucket precision)."""
        total = sum(self.hist)
        if not total:
            return 0.0
        want = total * p / 100.0
        seen = 0
        for b, c in enumerate(self.hist):
            seen += c
            if seen >= want and c:
                return min(bucket_value(b), float(self.lat_max_ns))
        return float(self.lat_max_ns)

    def summary(self) -> dict[str, Any]:
        """The report: rates, latency percentiles (us), errors, kicks, reconnects."""
        secs = self.seconds or 1e-9
        n = max(self.ios, 1)
        return {
            "ios": self.ios,
            "reads": self.reads,
            "writes": self.writes,
            "seconds": round(self.seconds, 3),
            "iops": round(self.ios / secs),
            "bandwidth_bytes_per_s": round(self.bytes / secs),
            "mb_per_s": round(self.bytes / secs / 1e6, 2),
            "latency_us": {
                "mean": round(self.lat_sum_ns / n / 1e3, 2),
                "p50": round(self.percentile(50) / 1e3, 2),
                "p99": round(self.percentile(99) / 1e3, 2),
                "p99.9": round(self.percentile(99.9) / 1e3, 2),
                "max": round(self.lat_max_ns / 1e3, 2),
            },
            "errors": self.errors,
            "verify_errors": self.verify_errors,
            "kicks": self.kicks,
            "reconnects": self.reconnects,
            "pause_ms": {
                "total": round(self.pause_total_ns / 1e6, 3),
                "max": round(self.pause_max_ns / 1e6, 3),
            },
        }

    def add_pause(self, ns: int) -> None:
        """Count one reconnect that stopped completions for ``ns`` nanoseconds."""
        self.reconnects += 1
        self.pause_total_ns += ns
        self.pause_max_ns = max(self.pause_max_ns, ns)


class LatencyLog:
    """Raw latencies, bucketed into a Stats histogram in bulk (NumPy if present).

    The Python loops append latencies to ``raw``. The NumPy loop spends one
    array operation per pass: it copies the submission times of the slots it
    reaped into ``sub_buf`` (a ``take``) and notes the pass's time and count
    in ``pass_t`` / ``pass_n``, advancing ``pos``; :meth:`flush` turns that
    into latencies (each pass's time, repeated, minus the submission times).
    The loop flushes in a pass that found nothing to do once
    :data:`IDLE_CHUNK` requests are buffered (a short job, done while the
    device is busy with a full ring), and at :data:`CHUNK` in any pass.
    """

    __slots__ = ("stats", "raw", "sub_buf", "pass_t", "pass_n", "pos")

    #: Requests per NumPy chunk (the buffer's size: flushed in any pass).
    CHUNK = 16384
    #: Requests after which an idle pass of the NumPy loop flushes: a flush of
    #: 16k requests took ~0.25 ms, long enough for qemu-storage-daemon to empty
    #: a ring of 256 and go to sleep (kicks per run matched flushes per run).
    IDLE_CHUNK = 2048

    def __init__(self, stats: Stats, max_batch: int = 0) -> None:
        self.stats = stats
        self.raw: list[int] = []
        self.pass_t: list[int] = []
        self.pass_n: list[int] = []
        self.pos = 0
        self.sub_buf: Any = None
        if max_batch:
            import numpy as np

            self.sub_buf = np.empty(self.CHUNK + max_batch, dtype=np.int64)

    def flush(self) -> None:
        """Move everything logged into the histogram and the sum / max."""
        stats = self.stats
        if self.raw:
            if have_numpy():
                import numpy as np

                self._add_array(np.asarray(self.raw, dtype=np.int64))
            else:
                hist = stats.hist
                for lat in self.raw:
                    hist[bucket(lat)] += 1
                stats.lat_sum_ns += sum(self.raw)
                stats.lat_max_ns = max(stats.lat_max_ns, max(self.raw))
            self.raw = []
        if self.pos:
            import numpy as np

            lat = np.repeat(np.asarray(self.pass_t, dtype=np.int64), self.pass_n) - self.sub_buf[: self.pos]
            self.pass_t.clear()
            self.pass_n.clear()
            self.pos = 0
            self._add_array(lat)

    def _add_array(self, lat: Any) -> None:
        import numpy as np

        stats = self.stats
        stats.lat_sum_ns += int(lat.sum())
        stats.lat_max_ns = max(stats.lat_max_ns, int(lat.max()))
        lat = np.maximum(lat, 0)
        # bucket() in array form: with e = max(bit_length - 5, 0) the bucket is 16 e + (lat >> e).
        e = np.maximum(np.frexp(lat)[1] - 5, 0)
        idx = (e << 4) + (lat >> e)
        counts = np.bincount(np.minimum(idx, NBUCKETS - 1), minlength=NBUCKETS)
        stats.hist = (np.asarray(stats.hist, dtype=np.int64) + counts).tolist()


__all__ = ["NBUCKETS", "SUB", "LatencyLog", "Stats", "bucket", "bucket_value", "have_numpy"]
