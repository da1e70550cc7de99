"""A scsi back end without PROTOCOL_F_CONFIG, as SPDK's vhost-user-scsi targets are.

``ScsiBackend(config_space=False)`` does not offer CONFIG: the frontend keeps
the virtio-scsi config itself (QEMU's vhost-user-scsi does; pyvirtio's scsi
driver builds it from GET_QUEUE_NUM and the defaults). A raw frontend checks
the protocol (CONFIG not offered, GET_CONFIG refused with an empty payload,
SET_CONFIG with a failure ack, requests served with the default sizes);
pyvirtio's driver scans the back end and does I/O on it. (That last test
needs the scsi driver to build its config when CONFIG is missing.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import CONFIG, U64, HostileFrontend, scsi_io  # noqa: E402
from pyvirtio.backends.model import ModelHooks  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.drivers.scsi import VirtioScsi  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec import scsi as S  # noqa: E402

pytestmark = pytest.mark.timeout(30)

MIB = 1 << 20


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VhostUserServer, ScsiBackend]]:
    backend = ScsiBackend(
        {(0, 0): ram_lun(MIB), (1, 2): ram_lun(2 * MIB)}, max_target=3, request_queues=2, config_space=False
    )
    server = VhostUserServer(str(tmp_path / "noconfig.sock"), backend)
    server.start()
    try:
        yield server, backend
    finally:
        server.stop()
        assert server.wait(10)
        backend.close()


def test_the_knob_reaches_the_protocol_hooks() -> None:
    backend = ScsiBackend({(0, 0): ram_lun(MIB)}, config_space=False)
    try:
        assert ModelHooks.of(backend).config_space is False
        assert ModelHooks.of(ScsiBackend()).config_space is True
        assert backend.info()["config_space"] is False
    finally:
        backend.close()


def test_config_not_offered_and_refused(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, _backend = served
    with HostileFrontend(server.path) as fe:
        offered = fe.handshake()
        assert offered
        poffered = fe.u64(vu.GET_PROTOCOL_FEATURES)
        assert not poffered >> vu.PROTOCOL_F_CONFIG & 1
        assert poffered >> vu.PROTOCOL_F_MQ & 1
        assert fe.u64(vu.GET_QUEUE_NUM) == S.FIRST_REQUEST_QUEUE + 2  # the frontend's num_queues: 4 - 2
        assert fe.get_config(0, S.CONFIG_SIZE) == b""  # nothing to give: an empty payload
        assert fe.ack(vu.SET_CONFIG, CONFIG.pack(20, 4, 0) + (96).to_bytes(4, "little")) == 1
        fe.set_mem_table()
        for q in (S.CONTROL_QUEUE, S.EVENT_QUEUE, S.FIRST_REQUEST_QUEUE):
            fe.setup_ring(q)
        scsi_io(fe)  # requests with the default cdb_size 32 and sense_size 96


def test_acking_config_anyway_is_a_violation(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, _backend = served
    before = server.finished
    with HostileFrontend(server.path) as fe:
        fe.u64(vu.GET_FEATURES)
        fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(1 << vu.PROTOCOL_F_CONFIG))
        assert fe.expect_closed()
    deadline = time.monotonic() + 5
    while server.finished == before:
        assert time.monotonic() < deadline, "the disconnect was not recorded"
        time.sleep(0.005)
    assert "['CONFIG'], which were not offered" in server.disconnects[-1]


def test_pyvirtio_scans_and_does_io_without_config(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    """Needs the scsi driver to build the config in the frontend when CONFIG is missing (issue 11)."""
    server, _backend = served
    with VirtioScsi.open(server.path) as scsi:
        assert sorted(scsi.luns) == [(0, 0), (1, 2)]
        assert scsi.luns[(1, 2)].capacity == 2 * MIB
        disk = scsi.disk(1, 2)
        data = os.urandom(16384)
        disk.write(MIB, data)
        assert disk.read(MIB, 16384) == data
        assert scsi.disk(0, 0).read(0, 4096) == bytes(4096)
