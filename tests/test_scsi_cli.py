"""``pyvirtio serve scsi``, ``pyvirtio scsi scan / bench / reset`` and ``pyvirtio info --type scsi``.

The issue's acceptance: ``pyvirtio scsi scan`` lists the LUNs of a
``pyvirtio serve scsi`` with two LUNs, and a benchmark runs on a scsi LUN.
Every command runs as ``python -m pyvirtio`` in a subprocess against a
server in another subprocess, which is stopped with SIGTERM (and must exit 0
and remove its socket).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.cli.scsi import parse_lun_spec

pytestmark = pytest.mark.timeout(60)


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class Serve:
    def __init__(self, sock: Path, *args: str) -> None:
        self.sock = str(sock)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtio", "serve", "scsi", "--socket", self.sock, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise AssertionError(f"serve scsi exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            assert time.monotonic() < deadline, "no socket after 15 s"
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def two_luns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("scsi-cli")
    image = tmp / "lun1.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    server = Serve(tmp / "scsi.sock", "--lun", "64M", "--lun", str(image))
    yield server
    assert server.stop() == 0
    assert not os.path.exists(server.sock)  # removed on SIGTERM


def test_scan_lists_both_luns(two_luns: Serve) -> None:
    res = cli("scsi", "scan", two_luns.sock, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    luns = {(d["target"], d["lun"]): d for d in out["luns"]}
    assert sorted(luns) == [(0, 0), (0, 1)]
    assert luns[(0, 0)]["capacity"] == 64 << 20 and luns[(0, 0)]["product"] == "RAM DISK"
    assert luns[(0, 1)]["capacity"] == 8 << 20 and luns[(0, 1)]["product"] == "FILE DISK"
    assert all(d["block_size"] == 512 and d["unmap"] and d["vendor"] == "PYVIRTIO" for d in luns.values())
    text = cli("scsi", "scan", "vhost-user:" + two_luns.sock)
    assert text.returncode == 0, text.stderr
    assert "2 LUN(s)" in text.stdout and "0:0" in text.stdout and "0:1" in text.stdout
    assert "64 MiB" in text.stdout and "8 MiB" in text.stdout


def test_bench_on_a_scsi_lun(two_luns: Serve) -> None:
    res = cli("scsi", "bench", two_luns.sock, "--lun", "0:1", "--rw", "randrw", "--bs", "4k",
              "--iodepth", "8", "--runtime", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["lun"] == "0:1" and report["errors"] == 0 and report["ios"] > 100
    assert report["reads"] and report["writes"] and report["ios"] == report["reads"] + report["writes"]
    assert report["device"] == {
        "type": "scsi", "capacity": 8 << 20, "block_size": 512, "ring": "split", "in_order": False,
    }
    assert report["engine"] == "python" and report["bs"] == 4096 and report["iodepth"] == 8
    assert {"mean", "p50", "p99", "max"} <= set(report["latency_us"])
    assert report["iops"] > 0 and report["mb_per_s"] > 0
    text = cli("scsi", "bench", two_luns.sock, "--runtime", "0.3", "--iodepth", "4")
    assert text.returncode == 0, text.stderr
    assert "IOPS" in text.stdout and "latency (us)" in text.stdout and "lun=0:0" in text.stdout


def test_info_on_a_scsi_device(two_luns: Serve) -> None:
    res = cli("info", two_luns.sock, "--type", "scsi", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["device_type"] == "scsi"
    assert "SCSI_HOTPLUG" in info["negotiated_features"]
    assert info["scsi"]["cdb_size"] == 32 and len(info["scsi"]["luns"]) == 2
    one = json.loads(cli("info", two_luns.sock, "--lun", "0:1", "--json").stdout)
    assert [(d["target"], d["lun"]) for d in one["scsi"]["luns"]] == [(0, 1)]
    text = cli("info", two_luns.sock, "--type", "scsi")
    assert text.returncode == 0 and "SCSI host" in text.stdout and "LUNs: 2" in text.stdout


def test_reset_a_lun(two_luns: Serve) -> None:
    res = cli("scsi", "reset", two_luns.sock, "--lun", "0:0")
    assert res.returncode == 0, res.stderr
    assert "function complete" in res.stdout


def test_errors_are_one_line(two_luns: Serve, tmp_path: Path) -> None:
    res = cli("info", two_luns.sock, "--lun", "0:7")
    assert res.returncode == 1 and res.stderr.startswith("pyvirtio: error: ") and res.stderr.count("\n") == 1
    assert "no LUN 0:7" in res.stderr
    res = cli("scsi", "scan", str(tmp_path / "nobody.sock"), "--connect-timeout", "0.1")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    res = cli("scsi", "bench", two_luns.sock, "--lun", "zero")
    assert res.returncode == 2 and "TARGET:LUN" in res.stderr


def test_serve_addresses_and_bad_lun_specs(tmp_path: Path) -> None:
    server = Serve(tmp_path / "addr.sock", "--lun", "3:7=1M", "--lun", "2M", "--block-size", "4096",
                   "--sense-format", "descriptor")
    try:
        out = json.loads(cli("scsi", "scan", server.sock, "--json").stdout)
        got = {(d["target"], d["lun"]): (d["capacity"], d["block_size"]) for d in out["luns"]}
        assert got == {(0, 0): (2 << 20, 4096), (3, 7): (1 << 20, 4096)}
    finally:
        assert server.stop() == 0
    res = cli("serve", "scsi", "--socket", str(tmp_path / "x.sock"), "--lun", str(tmp_path / "missing.img"))
    assert res.returncode == 1 and "No such file" in res.stderr
    res = cli("serve", "scsi", "--socket", str(tmp_path / "y.sock"), "--lun", "0:0=1M", "--lun", "0:0=1M")
    assert res.returncode == 2 and "given twice" in res.stderr


def test_parse_lun_spec() -> None:
    assert parse_lun_spec("64M") == (None, 64 << 20, None)
    assert parse_lun_spec("1:2=4k") == ((1, 2), 4096, None)
    assert parse_lun_spec("/tmp/a.img") == (None, None, "/tmp/a.img")
    assert parse_lun_spec("0:3=file:/x=y.img") == ((0, 3), None, "/x=y.img")
    assert parse_lun_spec("ram:1G") == (None, 1 << 30, None)


def test_serve_without_config_space(tmp_path: Path) -> None:
    """``serve scsi --no-config`` is SPDK's vhost-user-scsi shape: the driver keeps the config itself."""
    server = Serve(tmp_path / "nocfg.sock", "--lun", "1M", "--lun", "0:3=2M", "--queues", "2", "--no-config")
    try:
        info = json.loads(cli("info", server.sock, "--type", "scsi", "--json").stdout)
        scsi = info["scsi"]
        assert scsi["config_source"].startswith("frontend") and "PROTOCOL_F_CONFIG" in scsi["config_source"]
        assert (scsi["num_queues"], scsi["cdb_size"], scsi["sense_size"], scsi["max_target"]) == (2, 32, 96, 255)
        got = {(d["target"], d["lun"]): d["capacity"] for d in scsi["luns"]}
        assert got == {(0, 0): 1 << 20, (0, 3): 2 << 20}
        text = cli("info", server.sock, "--type", "scsi")
        assert text.returncode == 0 and "frontend" in text.stdout
    finally:
        assert server.stop() == 0
