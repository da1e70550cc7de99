"""What the embedded servers say about themselves: VhostUserServer.info() and the models' info().

Each value is checked against what the test did: connections counted as
they come and go, the features the driver negotiated, the rings it started
and their sizes, the chains served, the LUN sizes and the net counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import HostileFrontend, net_io  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.net import NetBackend  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.drivers.scsi import VirtioScsi  # noqa: E402
from pyvirtio.spec import scsi as S  # noqa: E402
from pyvirtio.spec.common import VHOST_USER_F_PROTOCOL_FEATURES  # noqa: E402

pytestmark = pytest.mark.timeout(30)

MIB = 1 << 20


def wait_for(server: VhostUserServer, what: str, check: Any, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = server.info()
        if check(info):
            return info
        assert time.monotonic() < deadline, f"{what}: {info}"
        time.sleep(0.005)


@pytest.fixture
def blk_server(tmp_path: Path) -> Iterator[VhostUserServer]:
    storage = Storage(size=8 * MIB)
    with VhostUserServer(str(tmp_path / "blk.sock"), BlockBackend(storage, num_queues=2)) as server:
        yield server
    storage.close()


def test_blk_server_info_follows_the_connections(blk_server: VhostUserServer) -> None:
    info = blk_server.info()
    assert info == {
        "socket": blk_server.path,
        "connections": 0,
        "finished": 0,
        "device": {"capacity_bytes": 8 * MIB, "readonly": False, "file": None, "num_queues": 2},
    }
    with VirtioBlk.open(blk_server.path, num_queues=2, queue_size=64) as blk:
        conn = blk_server.info()["connection"]
        assert blk_server.info()["connections"] == 1
        assert conn["acked_features"] == blk.device.negotiated_features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        assert conn["ignored_features"] == 0
        assert conn["owner"] is True and conn["status"] & 0x4  # DRIVER_OK
        assert conn["regions"] >= 1
        assert conn["running_queues"] == [0, 1]
        assert [(r["index"], r["size"], r["enabled"], r["running"], r["kick"]) for r in conn["rings"]] == [
            (0, 64, True, True, "eventfd"),
            (1, 64, True, True, "eventfd"),
        ]
        before = conn["chains"]
        for i in range(10):
            blk.read(i * 4096, 4096)
        conn = blk_server.info()["connection"]
        assert conn["chains"] - before == 10
        assert conn["rings"][0]["used_idx"] - conn["rings"][0]["last_avail"] == 0  # all completed
    info = wait_for(blk_server, "the connection ends", lambda i: i["finished"] == 1)
    assert "connection" not in info and info["connections"] == 1
    with VirtioBlk.open(blk_server.path, num_queues=1):
        info = blk_server.info()
        assert info["connections"] == 2 and info["connection"]["running_queues"] == [0]
    wait_for(blk_server, "the second connection ends", lambda i: i["finished"] == 2)


def test_scsi_server_info_reports_the_luns(tmp_path: Path) -> None:
    backend = ScsiBackend({(0, 0): ram_lun(MIB), (0, 3): ram_lun(4 * MIB, block_size=4096)}, max_target=2)
    try:
        with VhostUserServer(str(tmp_path / "scsi.sock"), backend) as server:
            with VirtioScsi.open(server.path) as scsi:
                dev = server.info()["device"]
                assert dev["request_queues"] == 1 and dev["max_target"] == 2
                assert {k: (v["capacity_bytes"], v["block_size"]) for k, v in dev["luns"].items()} == {
                    "0:0": (MIB, 512),
                    "0:3": (4 * MIB, 4096),
                }
                assert {k: v.capacity for k, v in scsi.luns.items()} == {(0, 0): MIB, (0, 3): 4 * MIB}
                conn = server.info()["connection"]
                assert conn["running_queues"] == [S.CONTROL_QUEUE, S.EVENT_QUEUE, S.FIRST_REQUEST_QUEUE]
                backend.add_lun(1, 0, ram_lun(2 * MIB))
                deadline = time.monotonic() + 5
                while (1, 0) not in scsi.luns:
                    assert time.monotonic() < deadline
                    scsi.poll_events(0.1)
                dev = server.info()["device"]
                assert dev["luns"]["1:0"]["capacity_bytes"] == 2 * MIB and dev["events_sent"] >= 1
    finally:
        backend.close()


def test_net_server_info_counts_frames(tmp_path: Path) -> None:
    backend = NetBackend("loopback")
    try:
        with VhostUserServer(str(tmp_path / "net.sock"), backend) as server:
            info = server.info()
            assert info["device"]["counters"] == dict.fromkeys(
                ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "dropped", "bad"), 0
            )
            with HostileFrontend(server.path) as fe:
                fe.handshake()
                fe.set_mem_table()
                for i in (0, 1):
                    fe.setup_ring(i)
                net_io(fe)
                conn = server.info()["connection"]
                assert conn["chains"] == 2  # one frame out, one in
                assert conn["running_queues"] == [0, 1]
            counters = server.info()["device"]["counters"]
            assert (counters["tx_frames"], counters["rx_frames"], counters["dropped"]) == (1, 1, 0)
            assert counters["tx_bytes"] == counters["rx_bytes"] == 14 + 64
    finally:
        backend.close()
