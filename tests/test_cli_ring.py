"""``--ring``, ``--in-order`` and ``--packed-zero-wrap`` on the device commands, and the format in ``info`` (issue 12).

Against the embedded back ends (which offer RING_PACKED and IN_ORDER), run as
``python -m pyvirtio`` subprocesses: ``info`` (blk and scsi, human and
JSON) says the ring format and IN_ORDER negotiated, and the back end's own
view of its rings agrees; ``blk write``/``read`` round-trip data on a packed
ring (and with its bases in lap 0); ``scsi scan`` and ``net info`` / ``send``
take the options; a format the device does not offer is a one-line error.
The bench commands take the same options through cli/ring_option.py
(tested with them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.net import NetBackend
from pyvirtio.backends.scsi import ScsiBackend, ram_lun
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.cli.ring_option import add_ring_arguments, ring_options
from pyvirtio.spec.common import F_IN_ORDER, F_RING_PACKED

pytestmark = pytest.mark.timeout(60)


def cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyvirtio", *args], input=input, capture_output=True, timeout=30,
                          env=dict(os.environ))


def test_ring_options_parse() -> None:
    p = argparse.ArgumentParser()
    add_ring_arguments(p)
    assert ring_options(p.parse_args([])) == {"ring": "auto", "in_order": "auto", "packed_zero_wrap": False}
    got = ring_options(p.parse_args(["--ring", "packed", "--in-order", "on", "--packed-zero-wrap"]))
    assert got == {"ring": "packed", "in_order": True, "packed_zero_wrap": True}
    assert ring_options(p.parse_args(["--ring", "split", "--in-order", "off"]))["in_order"] is False
    with pytest.raises(SystemExit):
        p.parse_args(["--ring", "ring"])


@pytest.fixture
def blk_server(sockdir: str) -> Iterator[VhostUserServer]:
    storage = Storage(size=4 << 20)
    server = VhostUserServer(os.path.join(sockdir, "blk.sock"), BlockBackend(storage))
    server.start()
    yield server
    server.stop()
    assert server.wait(10)
    storage.close()


@pytest.mark.parametrize(
    ("flags", "ring", "in_order"),
    [([], "split", False), (["--ring", "packed"], "packed", False), (["--ring", "packed", "--in-order", "on"],
     "packed", True), (["--ring", "split", "--in-order", "on"], "split", True)],
    ids=["default", "packed", "packed-in-order", "split-in-order"],
)
def test_info_shows_the_ring_format_and_in_order(blk_server: VhostUserServer, flags: list[str], ring: str,
                                                 in_order: bool) -> None:
    r = cli("info", blk_server.path, "--json", *flags)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["virtio"]["ring"], info["virtio"]["in_order"]) == (ring, in_order)
    assert ("RING_PACKED" in info["negotiated_features"]) == (ring == "packed")
    assert ("IN_ORDER" in info["negotiated_features"]) == in_order
    r = cli("info", blk_server.path, *flags)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert any(line.split() == ["ring", "format", ring] for line in lines), lines
    assert any(line.split() == ["in", "order", "yes" if in_order else "no"] for line in lines), lines


@pytest.mark.parametrize("zero_wrap", [False, True], ids=["wrap-1", "zero-wrap"])
def test_blk_write_read_on_a_packed_ring(blk_server: VhostUserServer, zero_wrap: bool) -> None:
    data = os.urandom(64 << 10)
    extra = ["--ring", "packed", "--in-order", "on"] + (["--packed-zero-wrap"] if zero_wrap else [])
    r = cli("blk", "write", blk_server.path, "--offset", "8k", "--input", "-", *extra, input=data)
    assert r.returncode == 0, r.stderr
    r = cli("blk", "read", blk_server.path, "--offset", "8k", "--length", "64k", "-o", "-", *extra)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_a_format_the_device_does_not_offer_is_a_one_line_error(sockdir: str) -> None:
    class SplitOnly(BlockBackend):
        def features(self) -> int:
            return super().features() & ~((1 << F_RING_PACKED) | (1 << F_IN_ORDER))

    storage = Storage(size=1 << 20)
    server = VhostUserServer(os.path.join(sockdir, "split.sock"), SplitOnly(storage))
    server.start()
    try:
        for flags, name in ((["--ring", "packed"], "RING_PACKED"), (["--in-order", "on"], "IN_ORDER")):
            r = cli("blk", "read", server.path, "--offset", "0", "--length", "512", "-o", "-", *flags)
            assert r.returncode == 1
            err = r.stderr.decode().strip()
            assert len(err.splitlines()) == 1 and name in err, err
    finally:
        server.stop()
        assert server.wait(10)
        storage.close()


def test_scsi_scan_and_info_on_a_packed_ring(sockdir: str) -> None:
    backend = ScsiBackend({(0, 0): ram_lun(1 << 20)})
    server = VhostUserServer(os.path.join(sockdir, "scsi.sock"), backend)
    server.start()
    try:
        r = cli("scsi", "scan", server.path, "--json", "--ring", "packed", "--in-order", "on")
        assert r.returncode == 0, r.stderr
        assert [(x["target"], x["lun"]) for x in json.loads(r.stdout)["luns"]] == [(0, 0)]
        r = cli("info", server.path, "--type", "scsi", "--json", "--ring", "packed")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["virtio"]["ring"] == "packed"
    finally:
        server.stop()
        assert server.wait(10)
        backend.close()


def test_net_info_and_send_on_a_packed_ring(sockdir: str) -> None:
    model = NetBackend("loopback", pairs=1, swap_mac=True)
    server = VhostUserServer(os.path.join(sockdir, "n.sock"), model, poll_us=50)
    server.start()
    try:
        r = cli("net", "info", server.path, "--json", "--ring", "packed", "--in-order", "on")
        assert r.returncode == 0, r.stderr
        virtio = json.loads(r.stdout)["virtio"]
        assert (virtio["ring"], virtio["in_order"]) == ("packed", True)
        r = cli("net", "info", server.path, "--ring", "packed")
        assert r.returncode == 0, r.stderr
        assert any(line.split() == ["ring", "format", "packed"] for line in r.stdout.decode().splitlines())
        r = cli("net", "send", server.path, "--count", "300", "--json", "--ring", "packed")
        assert r.returncode == 0, r.stderr
    finally:
        server.stop()
        server.wait(10)
        model.close()
