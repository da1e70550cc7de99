"""The comparison scripts under bench/: how they read SPDK's output and compute their ratios.

They run peers and take minutes, so CI does not run them whole; these tests
pin down the parts a wrong number would come from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import compare  # noqa: E402
import net_rings  # noqa: E402
import server_time  # noqa: E402
import spdk  # noqa: E402
import turnaround  # noqa: E402
import vhost_blk_rings  # noqa: E402

from peers import qsd_binary  # noqa: E402

BDEVPERF_TAIL = """
 Job: VirtioBlk0 (Core Mask 0x2, workload: randread, depth: 32, IO size: 4096)
\t VirtioBlk0          :       1.00 1338450.51    5228.32       0.00     0.00      23.76       6.65    8116.38
 ===================================================================================================================
 Total                       :            1338450.51    5228.32       0.00     0.00      23.76       6.65    8116.38
"""


def test_parse_bdevperf_reads_iops_and_mean_latency_from_the_total_line() -> None:
    r = spdk.parse_bdevperf("Total cores available: 1\n" + BDEVPERF_TAIL)
    assert r.iops == pytest.approx(1338450.51)
    assert r.mean_latency_us == pytest.approx(23.76)


def test_parse_bdevperf_without_a_total_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="Total"):
        spdk.parse_bdevperf("[ERROR] bdev_virtio_attach_controller failed\n")


def test_find_build_names_a_folder_holding_bdevperf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPDK_BUILD", raising=False)
    monkeypatch.setattr(spdk, "_CANDIDATES", ())
    monkeypatch.setattr(spdk.tempfile, "gettempdir", lambda: str(tmp_path / "none"))
    assert spdk.find_build(str(tmp_path)) is None
    exe = tmp_path / "spdk" / "build" / "examples" / "bdevperf"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    assert spdk.find_build(str(tmp_path)) == tmp_path
    monkeypatch.setenv("SPDK_BUILD", str(tmp_path))
    assert spdk.find_build() == tmp_path


def row(r: int, qd: int, who: str, iops: float, lat: float | None = None) -> dict[str, object]:
    out: dict[str, object] = {"round": r, "qd": qd, "ring": 256, "who": who, "iops": iops}
    if lat is not None:
        out["lat_us"] = lat
    return out


def test_summary_ratios_are_median_over_median_and_best_over_best() -> None:
    rounds = [
        row(0, 1, "pyvirtio", 100, 10.0), row(1, 1, "pyvirtio", 300, 4.0), row(2, 1, "pyvirtio", 200, 5.0),
        row(0, 1, "python_stick", 150), row(1, 1, "python_stick", 250), row(2, 1, "python_stick", 200),
        row(0, 1, "numpy_stick", 50), row(1, 1, "numpy_stick", 60), row(2, 1, "numpy_stick", 70),
        row(0, 1, "spdk", 400, 2.5), row(1, 1, "spdk", 100, 9.0), row(2, 1, "spdk", 250, 4.0),
    ]
    s = compare.summarise(rounds, [1])[1]
    assert s["pyvirtio"] == {"median": 200, "best": 300, "lat_median_us": 5.0, "lat_best_us": 4.0}
    assert s["vs_stick_median"] == 1.0  # 200 / the better stick's median (200)
    assert s["vs_stick_best"] == 1.2  # 300 / 250
    assert s["vs_spdk_median"] == 0.8  # 200 / 250
    assert s["vs_spdk_best"] == 0.75  # 300 / 400
    assert s["lat_vs_spdk_median"] == 1.25  # 5.0 / 4.0


def test_summary_without_spdk_has_no_spdk_ratio() -> None:
    rounds = [row(0, 32, "pyvirtio", 10), row(0, 32, "numpy_stick", 20)]
    s = compare.summarise(rounds, [32])[32]
    assert s["vs_stick_median"] == 0.5
    assert "vs_spdk_median" not in s and "spdk" not in s


def test_contestants_leave_spdk_out_without_a_build_and_the_python_stick_out_above_qd85() -> None:
    assert set(compare.contestants(None, 1)) == {"pyvirtio", "numpy_stick", "python_stick"}
    assert set(compare.contestants(None, 128)) == {"pyvirtio", "numpy_stick"}
    assert "spdk" in compare.contestants(Path("/nonexistent"), 256)


def test_summary_takes_the_median_of_the_back_ends_sleeps_per_io() -> None:
    rounds = [row(r, 1, "spdk", 100, 3.0) for r in range(3)]
    for r, v in zip(range(3), (0.5, 0.01, 0.02), strict=True):
        rounds[r]["sleeps_per_io"] = v
    rounds += [row(0, 1, "pyvirtio", 100), row(0, 1, "python_stick", 100)]  # runs without the count
    s = compare.summarise(rounds, [1])[1]
    assert s["spdk"]["sleeps_per_io"] == 0.02  # type: ignore[index]
    assert "sleeps_per_io" not in s["pyvirtio"]  # type: ignore[operator]


def test_sleeps_counts_a_process_s_voluntary_context_switches() -> None:
    import time

    before = compare.sleeps(os.getpid())
    for _ in range(5):
        time.sleep(0.001)  # each sleep is a voluntary switch of this thread
    assert compare.sleeps(os.getpid()) >= before + 5
    assert compare.sleeps(2**22 + 12345) == 0  # no such process (above pid_max's default)


def test_turnaround_times_the_checkout_s_turn_and_fails_when_it_does_not_kick(monkeypatch: pytest.MonkeyPatch) -> None:
    assert turnaround.pyvirtio_turn(200) > 0  # a kick per turnaround, else SystemExit
    assert turnaround.python_minimal(2000) > 0
    from pyvirtio.ring import cycle_split

    # A cycle whose kicks go nowhere is reported, not timed as fast.
    real_init = cycle_split.SplitCycle.__init__

    def no_kicks(self: cycle_split.SplitCycle, fc: object, depth: int, notify: object) -> None:
        real_init(self, fc, depth, lambda: None)  # type: ignore[arg-type]

    monkeypatch.setattr(cycle_split.SplitCycle, "__init__", no_kicks)
    with pytest.raises(SystemExit, match="did not kick"):
        turnaround.pyvirtio_turn(10)


def test_compare_starts_qsd_with_its_export_in_an_iothread(tmp_path: Path) -> None:
    """``--backend qsd-iothread``: the daemon comes up, serving, with the IOThread object it was given."""
    qsd_binary()  # a missing daemon fails under CI=true, skips on a developer machine
    proc, sock = compare.start_qsd(str(tmp_path), "0", iothread=True)
    try:
        assert os.path.exists(sock)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"iothread,id=iot0" in cmdline
        assert any(arg.startswith(b"type=vhost-user-blk") and arg.endswith(b",iothread=iot0") for arg in cmdline)
    finally:
        proc.terminate()
        proc.wait(10)



def _fake_vhost_scripts(tmp_path: Path, body: str) -> Path:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "vhost_target.sh").write_text("#!/usr/bin/env bash\n" + body)
    return scripts


def test_start_vhost_hands_back_the_serving_pid_and_stops_by_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--backend spdk-vhost``: the PID whose sleeps are counted is vhost's (from the script's pidfile),
    not the script's; stop() ends the script, which stops vhost."""
    body = (
        'mkdir -p "$SPDK_BUILD/run"; sleep 300 & VH=$!; echo $VH > "$SPDK_BUILD/run/vhost.pid"\n'
        '[ "$VHOST_BDEV" = null ] && [ "$1" = blk ] && [ "$3" = 0x1 ] || exit 3\n'
        'touch "$SOCK_DIR/$2"; trap \'kill $VH; exit 0\' TERM; wait $VH\n'
    )
    monkeypatch.setattr(spdk, "scripts_dir", lambda: _fake_vhost_scripts(tmp_path, body))
    build = tmp_path / "build"
    socks = tmp_path / "socks"
    socks.mkdir()
    target = spdk.start_vhost(build, str(socks), 0, timeout=10)
    try:
        assert target.sock == str(socks / "vhost.0")
        assert target.pid != target.proc.pid
        assert Path(f"/proc/{target.pid}/cmdline").read_bytes().startswith(b"sleep\0")
    finally:
        target.stop()
    assert target.proc.returncode == 0
    assert not Path(f"/proc/{target.pid}").exists() or b"State:\tZ" in Path(f"/proc/{target.pid}/status").read_bytes()


def test_start_vhost_says_why_a_target_did_not_come_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = 'echo "ERROR: only 0 free 2MiB hugepages, need 128" >&2; exit 1\n'
    monkeypatch.setattr(spdk, "scripts_dir", lambda: _fake_vhost_scripts(tmp_path, body))
    with pytest.raises(RuntimeError, match="only 0 free 2MiB hugepages"):
        spdk.start_vhost(tmp_path / "build", str(tmp_path), 0, timeout=10)


def test_net_rings_ratio_is_median_over_median_and_paired_is_the_median_round_ratio() -> None:
    pairs = ((10e6, 8e6), (20e6, 10e6), (12e6, 12e6))  # (split, packed) per round: ratios 0.8, 0.5, 1.0
    rows = [{"split": {"pps": s}, "packed": {"pps": p}} for s, p in pairs]
    out = net_rings.summarise(rows)
    assert out["split_median"] == 12e6 and out["packed_median"] == 10e6
    assert out["ratio_median"] == pytest.approx(10 / 12)
    assert out["ratio_paired"] == pytest.approx(0.8)
    assert out["split_best"] == 20e6 and out["packed_best"] == 12e6


def test_server_time_medians_each_cell_over_its_rounds() -> None:
    rows: list[dict[str, object]] = [
        {"checkout": "c", "ring": "packed", "qd": 32, "iops": iops, "server_us": us, "per_batch": n}
        for iops, us, n in ((100_000.0, 7.0, 5.0), (80_000.0, 9.0, 2.0), (90_000.0, 8.0, 9.0))
    ]
    (cell,) = server_time.summary(rows)
    assert cell["iops"] == 90_000.0 and cell["server_us"] == 8.0 and cell["per_batch"] == 5.0
    assert cell["round_trip_us"] == pytest.approx(32e6 / 90_000.0)


def test_server_time_times_the_real_server_s_batches_on_both_rings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One short round on the embedded back end: each ring's IOPS, the server's time per request in
    its batches, which is part of the round trip (so above zero and below it), and the chains per
    batch (one at QD1: a batch never holds more than was in flight)."""
    root = Path(__file__).resolve().parent.parent
    argv = ["server_time.py", str(root), "--rounds", "1", "--seconds", "0.5", "--depths", "1", "--json"]
    monkeypatch.setattr(sys, "argv", argv)
    server_time.main()
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    assert sorted(c["ring"] for c in summary) == ["packed", "split"]
    for c in summary:
        assert c["iops"] > 0
        assert 0 < c["server_us"] < c["round_trip_us"]
        assert c["per_batch"] == 1.0


def test_vhost_blk_rings_pairs_packed_with_split_and_new_with_old_round_by_round() -> None:
    old, new = Path("/old"), Path("/new")
    res = {
        (old, "split"): {32: [100.0, 200.0, 300.0]},
        (old, "packed"): {32: [90.0, 100.0, 330.0]},
        (new, "split"): {32: [100.0, 100.0, 100.0]},
        (new, "packed"): {32: [110.0, 120.0, 300.0]},
    }
    table = {(r["checkout"], r["ring"]): r for r in vhost_blk_rings.summarise(res, [32])}
    assert table[str(old), "split"]["ratios"] == {}
    assert table[str(old), "packed"]["ratios"]["packed/split"] == pytest.approx((0.9, 0.5))  # 0.9, 0.5, 1.1
    assert table[str(new), "packed"]["ratios"]["packed/split"] == pytest.approx((1.2, 1.2))
    assert table[str(new), "packed"]["ratios"]["new/old"] == pytest.approx((1.2, 1.2))  # 1.222, 1.2, 0.909
    assert table[str(new), "split"]["ratios"]["new/old"] == pytest.approx((0.5, 0.5))
    assert table[str(new), "packed"]["median"] == 120.0 and table[str(new), "packed"]["best"] == 300.0
