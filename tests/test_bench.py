"""`pyvirtio bench` and its engine: against qemu-storage-daemon, the embedded back end, and a dying peer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtio import VirtioDevice
from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk
from pyvirtio.bench.block import BlockEngine
from pyvirtio.bench.stats import LatencyLog, Stats, bucket
from pyvirtio.drivers.blk import VirtioBlk, pack_pattern
from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueBroken
from pyvirtio.testing.hostile import HostilePackedDevice

pytest_plugins = ["peers"]


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", "bench", *args], capture_output=True, text=True, timeout=timeout
    )


def _json(out: subprocess.CompletedProcess[str]) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# -- against qemu-storage-daemon ------------------------------------------------


@pytest.mark.peer
@pytest.mark.timeout(60)
@pytest.mark.parametrize("iodepth,mode", [(1, "python"), (32, "python"), (128, "numpy")])
def test_bench_null_2s(qsd_null, iodepth, mode):
    r = _json(bench(qsd_null.target, "--runtime", "2", "--iodepth", str(iodepth), "--mode", mode, "--json"))
    assert r["ios"] > 100
    assert r["errors"] == 0
    assert r["engine"] == mode
    assert r["device_signals"] is True  # the default
    assert r["iodepth"] == iodepth
    assert r["backend"] == qsd_null.target
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"] + 1e-9
    assert r["iops"] == pytest.approx(r["ios"] / r["seconds"], rel=0.01)


@pytest.mark.peer
@pytest.mark.timeout(60)
def test_bench_human_report_and_randrw(qsd_null):
    out = bench(qsd_null.target, "--runtime", "1", "--rw", "randrw", "--rwmixread", "70", "--iodepth", "8")
    assert out.returncode == 0, out.stderr
    for word in ("IOPS", "bandwidth", "latency (us)", "p99.9", "errors: 0", "rwmixread=70"):
        assert word in out.stdout
    r = _json(bench(qsd_null.target, "--runtime", "1", "--rw", "randrw", "--rwmixread", "70", "--json"))
    assert r["reads"] > 0 and r["writes"] > 0
    assert 0.55 < r["reads"] / r["ios"] < 0.85


@pytest.mark.peer
@pytest.mark.timeout(90)
def test_bench_verify_on_raw_file(qsd_factory):
    q = qsd_factory(kind="raw", size=8 << 20)
    r = _json(bench(q.target, "--runtime", "1", "--rw", "randwrite", "--verify", "--seed", "7", "--json"))
    assert r["errors"] == 0 and r["verify_errors"] == 0 and r["writes"] > 0
    q.stop()
    # Every block the run wrote holds its pattern on disk; the rest are still zero.
    with open(q.image, "rb") as f:
        data = f.read()
    written = 0
    for block in range(len(data) // 4096):
        got = data[block * 4096 : (block + 1) * 4096]
        if got != bytes(4096):
            assert got == pack_pattern(block, 7, 4096), f"block {block} corrupt"
            written += 1
    assert written > 0


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_bench_exits_nonzero_quickly_when_the_daemon_dies(qsd_null):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "bench", qsd_null.target, "--runtime", "30", "--iodepth", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    killed = time.monotonic()
    qsd_null.kill()
    _out, err = proc.communicate(timeout=15)
    elapsed = time.monotonic() - killed
    assert proc.returncode != 0
    assert elapsed < 5.0, f"took {elapsed:.1f} s to notice"
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("pyvirtio: error:")
    assert "Traceback" not in err
    assert "connection" in lines[-1].lower() or "closed" in lines[-1].lower()


# -- against the embedded back end (the README's main job) ----------------------


@pytest.mark.timeout(60)
def test_bench_without_target_uses_the_embedded_backend():
    r = _json(bench("--runtime", "1", "--json", "--size", "64M"))
    assert r["backend"] == "embedded pyvirtio RAM back end"
    assert r["ios"] > 100 and r["errors"] == 0
    out = bench("--runtime", "0.5", "--size", "16M")
    assert out.returncode == 0, out.stderr
    assert "back end: embedded pyvirtio RAM back end" in out.stdout


#: The keys of ``pyvirtio bench --json`` (docs/benchmarks.md; bench/compare.py reads "iops").
REPORT_KEYS = {
    "ios", "reads", "writes", "seconds", "iops", "bandwidth_bytes_per_s", "mb_per_s", "latency_us", "errors",
    "verify_errors", "kicks", "reconnects", "pause_ms", "backend", "rw", "rwmixread", "bs", "iodepth", "queues",
    "queue_size", "runtime", "engine", "device_signals", "verify", "reconnect", "device", "first_error",
}


@pytest.mark.timeout(60)
def test_bench_report_keys_and_figures_agree():
    r = _json(bench("--runtime", "0.5", "--size", "8M", "--rw", "randrw", "--bs", "8k", "--iodepth", "4", "--json"))
    assert set(r) == REPORT_KEYS
    assert set(r["latency_us"]) == {"mean", "p50", "p99", "p99.9", "max"}
    assert r["device"] == {"type": "blk", "capacity": 8 << 20, "block_size": 512, "ring": "split", "in_order": False}
    assert r["ios"] == r["reads"] + r["writes"] and r["reads"] and r["writes"]
    assert r["bandwidth_bytes_per_s"] == pytest.approx(r["ios"] * 8192 / r["seconds"], rel=0.01)
    assert r["rwmixread"] == 70 and r["queue_size"] == 256 and r["engine"] == "python"
    assert r["errors"] == 0 and r["first_error"] is None and r["reconnects"] == 0 and r["reconnect"] is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("ring", "args"), [
    ("packed", ("--iodepth", "8", "--rw", "randrw", "--verify")),
    ("packed", ("--iodepth", "64", "--mode", "numpy")),
    ("split", ("--iodepth", "4", "--in-order", "on")),
])
def test_bench_ring_option_runs_the_engines_on_that_format(ring, args):
    r = _json(bench("--ring", ring, "--runtime", "0.4", "--size", "8M", *args, "--json"))
    assert r["device"]["ring"] == ring and r["device"]["in_order"] == ("on" in args)
    assert r["ios"] > 0 and r["errors"] == 0 and r["verify_errors"] == 0
    assert r["engine"] == ("numpy" if "numpy" in args else "python")


@pytest.mark.timeout(60)
def test_bench_device_signals_off():
    r = _json(bench("--runtime", "0.3", "--size", "4M", "--device-signals", "off", "--json"))
    assert r["device_signals"] is False and r["ios"] > 0 and r["errors"] == 0


def test_bench_embedded_verify_read_workload_prefills():
    r = _json(bench("--runtime", "0.5", "--size", "4M", "--verify", "--iodepth", "4", "--json"))
    assert r["reads"] > 0 and r["verify_errors"] == 0 and r["errors"] == 0


def test_bench_bad_arguments_exit_cleanly():
    for args, needle in (
        (("--iodepth", "0"), "--iodepth: '0' must be at least 1"),
        (("--queues", "-1"), "--queues: '-1' must be at least 1"),
        (("--runtime", "0"), "--runtime: '0' must be more than 0 seconds"),
        (("--bs", "4q"), "--bs: invalid size"),
        (("--lun", "zero"), "expected TARGET:LUN"),
    ):
        out = bench(*args)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = bench("--rwmixread", "101", "--runtime", "0.2", "--size", "4M", "--rw", "randrw")
    assert out.returncode == 1 and out.stderr == "pyvirtio: error: rwmixread must be 0..100\n"
    out = bench("vhost-user:/nonexistent/sock", "--runtime", "1")
    assert out.returncode == 1 and out.stderr.startswith("pyvirtio: error:") and "Traceback" not in out.stderr


# -- the engine on the loopback device --------------------------------------------


@pytest.fixture
def loop_blk():
    be = BlockBackend(Storage(size=4 << 20))
    blk = VirtioBlk(VirtioDevice("loop", loopback_blk(be, queue_size=256), pool_size=16 << 20))
    yield blk
    blk.close()


@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize("rw", ["randread", "read", "randwrite", "write", "randrw"])
def test_engine_modes(loop_blk, mode, rw):
    e = BlockEngine(loop_blk, rw=rw, iodepth=16, mode=mode, rwmixread=50, seed=1)
    st = e.run(0.2)
    e.close()
    assert st.ios > 0 and st.errors == 0
    if rw in ("randread", "read"):
        assert st.writes == 0
    elif rw in ("randwrite", "write"):
        assert st.writes == st.ios
    else:
        assert 0 < st.writes < st.ios
    assert sum(st.hist) == st.ios


def test_engine_verify_catches_corruption(loop_blk):
    e = BlockEngine(loop_blk, rw="randwrite", iodepth=4, verify=True, seed=3, size=64 * 4096)
    st = e.run(0.2)
    assert st.verify_errors == 0 and st.writes > 0
    e.close()
    # Corrupt one written block behind the driver's back: a verify read-back finds it.
    e2 = BlockEngine(loop_blk, rw="randread", iodepth=4, verify=True, seed=3, size=64 * 4096)
    e2.prefill()
    loop_blk.write(5 * 4096, b"\xee" * 4096)
    st2 = e2.run(0.3)
    e2.close()
    assert st2.verify_errors > 0


RINGS = ["split", "packed"]
#: The reason each format gives for a used id that is not in flight.
NOT_IN_FLIGHT = "not the head of an in-flight request|is not in flight"


class PackedLiar:
    """``add_used`` for a packed ring that writes whatever it is told (HostilePackedDevice), bypassing the
    honest device side, which refuses ids it did not pop."""

    def __init__(self, ring) -> None:
        self.dev = HostilePackedDevice(ring)
        self.ndescs: dict[int, int] = {}

    def add_used(self, head: int, length: int) -> None:
        self.ndescs.update(self.dev.available())
        self.dev.use(head, length, self.ndescs.get(head, 1), write=True)


@contextlib.contextmanager
def blk_completing(complete, ring="split", liar=False):
    """A VirtioBlk on an in-process device whose used entries ``complete(q, [(chain, written), ...])`` writes.

    With ``liar`` on a packed ring, ``q.add_used`` writes any id (:class:`PackedLiar`).
    """
    be = BlockBackend(Storage(size=1 << 20))
    t = loopback_blk(be, queue_size=64)
    liars: dict[int, PackedLiar] = {}

    def process(index, limit=None):
        q = t.queues[index]
        chains = []
        while (chain := q.pop()) is not None:
            chains.append((chain, be.handle(index, chain)))
        if liar and ring == "packed":
            if index not in liars:
                liars[index] = PackedLiar(blk.device.queue(index).ring)
            complete(liars[index], chains)
        else:
            complete(q, chains)
        if chains and q.flush_used():
            t.signal(index)
        q.enable_notifications()
        return len(chains)

    t.process = process  # type: ignore[method-assign]
    blk = VirtioBlk(VirtioDevice("liar", t, pool_size=4 << 20), ring=ring)
    assert blk.device.ring_format == ring
    try:
        yield blk
    finally:
        for lr in liars.values():
            lr.dev.release()
        blk.device.close()


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", ["python", "numpy"])
def test_engine_validates_used_entries(mode, ring):
    # Every request completed with an id that heads no chain (split: the queue's
    # last descriptor, the engine's 8 chains take the first 24 of 64; packed: an
    # id no slot has).
    def complete(q, chains):
        for _, written in chains:
            q.add_used(63, written)

    with blk_completing(complete, ring, liar=True) as blk:
        e = BlockEngine(blk, iodepth=4, mode=mode)
        with pytest.raises(DeviceProtocolError, match=NOT_IN_FLIGHT):
            e.run(1.0)
        assert e.fixed.ring.broken is not None
        with pytest.raises(QueueBroken):
            if mode == "python":
                e.fixed.post([0])
            else:
                import numpy as np

                e.fixed.post_many(np.asarray([0]))


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize(
    ("lie", "reason"),
    [
        ("duplicate", NOT_IN_FLIGHT),
        ("too_long", "exceeds"),
        ("out_of_range", "out of range"),
        ("too_many", "used index moved by|with no request in flight"),
    ],
)
def test_engine_rejects_bad_completions(mode, lie, reason, ring):
    """A duplicate id within one batch, a length beyond what the chain offered, an id beyond
    the ring, or more entries than requests in flight must fail."""

    def complete(q, chains):
        if lie == "duplicate" and len(chains) >= 2:
            # As many entries as are in flight (so the index check passes), one id twice.
            for c, _ in [chains[0], chains[0], *chains[1:-1]]:
                q.add_used(c.head, 1)
        elif lie == "too_long":
            for c, _ in chains:
                q.add_used(c.head, 4096 + 2)
        elif lie == "out_of_range":
            for i, (c, written) in enumerate(chains):
                q.add_used((70000 if ring == "split" else 0xFFFF) if i == len(chains) - 1 else c.head, written)
        elif lie == "too_many":
            for c, written in [*chains, chains[0]]:
                q.add_used(c.head, written)

    with blk_completing(complete, ring, liar=True) as blk:
        e = BlockEngine(blk, iodepth=4, mode=mode)
        with pytest.raises(DeviceProtocolError, match=reason):
            e.run(1.0)
        assert e.fixed.ring.broken is not None


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", ["python", "numpy"])
@pytest.mark.parametrize("iodepth", [1, 5, 16])
def test_engine_keeps_at_most_iodepth_in_flight(mode, iodepth, ring):
    """Spare slots are published ahead of the batch's checks, but only one per completion seen."""
    seen: list[int] = []

    def complete(q, chains):
        seen.append(len(chains))  # everything earlier was completed: this is what is in flight
        for c, written in chains:
            q.add_used(c.head, written)

    with blk_completing(complete, ring) as blk:
        e = BlockEngine(blk, iodepth=iodepth, mode=mode)
        assert e.spares > 0
        st = e.run(0.2)
        e.close()
    assert st.ios > 100 and st.errors == 0
    assert max(seen) == iodepth


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", ["python", "numpy"])
def test_engine_rejects_the_completion_of_a_spare_slot(mode, ring):
    """A spare slot is prepared but not published: a device naming its head is lying."""
    spare_head: list[int] = []

    def complete(q, chains):
        for i, (c, _) in enumerate(chains):
            q.add_used(spare_head[0] if i == 0 else c.head, 1)

    with blk_completing(complete, ring, liar=True) as blk:
        e = BlockEngine(blk, iodepth=4, mode=mode)
        spare_head.append(e.fixed.heads[e.qd])  # the first spare: published only after a completion
        with pytest.raises(DeviceProtocolError, match=NOT_IN_FLIGHT):
            e.run(1.0)
        assert e.fixed.ring.broken is not None


def test_engine_argument_checks(loop_blk):
    with pytest.raises(InvalidArgument):
        BlockEngine(loop_blk, bs=1000)
    with pytest.raises(InvalidArgument):
        BlockEngine(loop_blk, iodepth=1000)
    with pytest.raises(InvalidArgument):
        BlockEngine(loop_blk, rw="sideways")


def test_stats_percentiles_and_merge():
    a, b = Stats(), Stats()
    for ns in range(1000, 101000, 1000):
        a.hist[bucket(ns)] += 1
    a.lat_max_ns = 100000
    b.hist[bucket(5000)] += 1
    b.lat_max_ns = 5000
    a.merge(b)
    assert sum(a.hist) == 101
    assert 45000 <= a.percentile(50) <= 55000
    assert 95000 <= a.percentile(99) <= 100000
    assert a.percentile(100) <= a.lat_max_ns


def _bench_backends(tmpdir: str) -> list[int]:
    """PIDs of `pyvirtio serve blk` processes whose socket is under ``tmpdir`` (where this test's bench put it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(a.startswith(tmpdir.encode()) for a in argv):
            pids.append(int(entry))
    return pids


def test_bench_stops_its_embedded_backend(tmp_path: Path) -> None:
    # A private TMPDIR: the back end's socket directory, and so its command line, names it
    # (other benches running on the machine at the same time are not this one's).
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "bench", "--runtime", "1", "--size", "4M", "--json", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 30
    while not _bench_backends(str(tmp_path)):  # it is there while the bench runs
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["ios"] > 0
    assert _bench_backends(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []  # its socket directory is gone too


@pytest.mark.timeout(60)
def test_bench_on_a_scsi_lun(tmp_path):
    sock = str(tmp_path / "scsi.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "serve", "scsi", "--socket", sock, "--lun", "16M", "--lun", "8M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert server.poll() is None and time.monotonic() < deadline, "serve scsi did not start"
            time.sleep(0.05)
        r = _json(bench(sock, "--lun", "0:1", "--runtime", "0.5", "--iodepth", "4", "--json"))
        assert r["ios"] > 100 and r["errors"] == 0 and r["writes"] == 0 and r["lun"] == "0:1"
        assert r["device"] == {
            "type": "scsi", "capacity": 8 << 20, "block_size": 512, "ring": "split", "in_order": False,
        }
        out = bench(sock, "--lun", "0:9", "--runtime", "0.5")
        assert out.returncode == 1 and out.stderr.startswith("pyvirtio: error:")
    finally:
        server.terminate()
        server.wait(10)



def test_latency_chunks_bucket_like_the_python_path():
    """The NumPy loop's latency chunks (pass times minus submission times) give the exact histogram."""
    import random

    rng = random.Random(7)
    stats = Stats()
    log = LatencyLog(stats, max_batch=64)
    expect = [0] * len(stats.hist)
    lats = []
    t = 10**9
    for _ in range(2000):
        n = rng.randrange(1, 64)
        t += rng.randrange(1, 10**6)
        subs = [t - rng.choice([0, 1, 15, 16, 31, 32, 999, rng.randrange(10**7), 2**33]) for _ in range(n)]
        log.sub_buf[log.pos : log.pos + n] = subs
        log.pass_t.append(t)
        log.pass_n.append(n)
        log.pos += n
        for s in subs:
            expect[min(bucket(t - s), len(expect) - 1)] += 1
            lats.append(t - s)
        if log.pos >= log.CHUNK:
            log.flush()
    log.flush()
    assert stats.hist == expect
    assert stats.lat_sum_ns == sum(lats) and stats.lat_max_ns == max(lats)
