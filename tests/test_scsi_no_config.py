"""virtio-scsi against a back end without a config space (SPDK's vhost-user-scsi target).

SPDK's target does not offer PROTOCOL_F_CONFIG: the frontend keeps the
virtio-scsi config, as QEMU's vhost-user-scsi does. The driver must build it
(num_queues from the back end's queues minus control and event, seg_max =
ring size - 2, max_sectors 0xFFFF, cdb_size 32, sense_size 96, max_target
255, max_lun 16383), say so in ``info()``, scan and do I/O as usual, and
never send a config read or write to the back end. Two setups: the embedded
back end over a real socket with PROTOCOL_F_CONFIG not negotiated by the
frontend (the back end then answers no GET_CONFIG / SET_CONFIG), and an
in-process device whose transport has no config at all and fails the test
if it is asked for one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.backends.scsi import ScsiBackend, ScsiLoopback, ram_lun
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.scsi import VirtioScsi, frontend_config
from pyvirtio.errors import InvalidArgument, TransportError
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import scsi as S
from pyvirtio.spec.common import DEVICE_ID_SCSI
from pyvirtio.transport.vhost_user import WANTED_PROTOCOL_FEATURES, VhostUserTransport

pytestmark = pytest.mark.timeout(60)

NO_CONFIG = "frontend (the back end has no PROTOCOL_F_CONFIG)"


class NoConfigTransport(VhostUserTransport):
    """A vhost-user frontend that does not negotiate PROTOCOL_F_CONFIG and counts any config access."""

    def __init__(self, path: str) -> None:
        self.config_calls = 0
        super().__init__(
            path, device_type=DEVICE_ID_SCSI, protocol_features=WANTED_PROTOCOL_FEATURES & ~(1 << vu.PROTOCOL_F_CONFIG)
        )

    def read_config(self, offset: int, length: int) -> bytes:
        self.config_calls += 1
        return super().read_config(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_calls += 1
        super().write_config(offset, data)


class Served:
    def __init__(self, path: str) -> None:
        self.backend = ScsiBackend(
            {(0, 0): ram_lun(4 << 20), (7, 300): ram_lun(2 << 20, block_size=4096)}, request_queues=2, max_target=7
        )
        self.server = VhostUserServer(path, self.backend)
        self.server.start()
        self.path = path

    def close(self) -> None:
        self.server.stop()
        assert self.server.wait(10)
        self.backend.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(str(tmp_path / "scsi.sock"))
    yield s
    s.close()


def test_scan_and_io_with_the_config_kept_in_the_frontend(served: Served) -> None:
    transport = NoConfigTransport(served.path)
    assert not transport.has_config()
    with pytest.raises(TransportError, match="does not offer PROTOCOL_F_CONFIG"):
        transport.read_config(0, S.CONFIG_SIZE)  # what `pyvirtio scsi scan` stopped on
    transport.config_calls = 0
    with VirtioScsi(VirtioDevice("no-config", transport)) as scsi:
        # QEMU's vhost-user-scsi values; num_queues from GET_QUEUE_NUM (4) minus control and event.
        assert scsi.config == {
            "num_queues": 2,
            "seg_max": transport.queue_size - 2,
            "max_sectors": 0xFFFF,
            "cmd_per_lun": 128,
            "event_info_size": S.EVENT.size,
            "sense_size": 96,
            "cdb_size": 32,
            "max_channel": 0,
            "max_target": 255,
            "max_lun": 16383,
        }
        assert (scsi.max_queues, scsi.max_target, scsi.max_lun) == (2, 255, 16383)
        assert (scsi.max_sectors, scsi.cdb_size, scsi.sense_size) == (0xFFFF, 32, 96)
        # The scan covers targets 0..255: the back end answers BAD_TARGET beyond its 7.
        assert sorted(scsi.luns) == [(0, 0), (7, 300)]
        assert scsi.luns[(7, 300)].block_size == 4096
        for key in sorted(scsi.luns):
            disk = scsi.disk(*key)
            data = os.urandom(3 * disk.block_size)
            disk.write(disk.block_size, data)
            assert disk.read(disk.block_size, len(data)) == data
        info = scsi.info()
        assert info["scsi"]["config_source"] == NO_CONFIG
        assert info["virtio"]["config"] == NO_CONFIG
        assert "CONFIG" not in info["virtio"]["protocol_features"]
        # The driver may write sense_size / cdb_size, but not change them: the back end cannot be told.
        scsi.device.write_config(24, struct.pack("<I", 32))
        with pytest.raises(InvalidArgument, match="cdb_size 64"):
            scsi.device.write_config(24, struct.pack("<I", 64))
        with pytest.raises(InvalidArgument, match="read-only"):
            scsi.device.write_config(0, struct.pack("<I", 1))
        assert S.parse_config(scsi.device.read_config(0, S.CONFIG_SIZE))["cdb_size"] == 32
        assert transport.config_calls == 0  # not one config access reached the back end
    assert served.backend.cdb_size == 32


def test_with_config_the_back_ends_is_used(served: Served) -> None:
    with VirtioScsi.open(served.path) as scsi:
        assert scsi.info()["scsi"]["config_source"] == "device"
        assert "config" not in scsi.info()["virtio"]
        assert (scsi.max_target, scsi.config["seg_max"]) == (7, 126)  # the back end's values
        # write_config over vhost-user reaches the back end (SET_CONFIG; virtio 1.2 §5.6.4: cdb_size is writable).
        scsi.device.write_config(24, struct.pack("<I", 64))
        assert served.backend.cdb_size == 64
        assert S.parse_config(scsi.device.read_config(0, S.CONFIG_SIZE))["cdb_size"] == 64
        with pytest.raises(Exception, match="refused SET_CONFIG"):
            scsi.device.write_config(0, struct.pack("<I", 1))  # the back end refuses; the connection lives on
        scsi.device.write_config(24, struct.pack("<I", 32))  # back to the CDB size the driver's slots use
        assert served.backend.cdb_size == 32
        assert scsi.disk(0, 0).read(0, 512) == bytes(512)


class ConfigLessLoopback(ScsiLoopback):
    """An in-process scsi device whose transport has no config space; any access fails the test."""

    def has_config(self) -> bool:
        return False

    def read_config(self, offset: int, length: int) -> bytes:
        raise AssertionError("read_config reached a transport without a config space")

    def write_config(self, offset: int, data: bytes) -> None:
        raise AssertionError("write_config reached a transport without a config space")


def test_in_process_device_without_config() -> None:
    backend = ScsiBackend({(3, 1): ram_lun(1 << 20)}, request_queues=3, max_target=3)
    transport = ConfigLessLoopback(backend, queue_size=128)
    try:
        with VirtioScsi(VirtioDevice("loop-no-config", transport), num_queues=2, queue_size=64) as scsi:
            assert scsi.config == S.parse_config(frontend_config(backend.num_queues, 64))
            assert (scsi.config["num_queues"], scsi.config["seg_max"]) == (3, 62)  # ring size as used: 64
            assert scsi.num_queues == 2 and sorted(scsi.luns) == [(3, 1)]
            disk = scsi.disk(3, 1)
            disk.write(0, b"c" * 1024)
            assert disk.read(0, 1024) == b"c" * 1024
            scsi.device.write_config(20, struct.pack("<I", 96))  # sense_size, unchanged: accepted, kept here
    finally:
        backend.close()


def test_frontend_config_layout() -> None:
    cfg = frontend_config(6, 128)
    assert len(cfg) == S.CONFIG_SIZE
    assert struct.unpack_from("<IIIIIII", cfg, 0) == (4, 126, 0xFFFF, 128, S.EVENT.size, 96, 32)
    assert struct.unpack_from("<HHI", cfg, 28) == (0, 255, 16383)
    assert S.parse_config(S.pack_config(S.parse_config(cfg))) == S.parse_config(cfg)
    with pytest.raises(ValueError, match="not virtio-scsi config fields"):
        S.pack_config({"colour": 1})
