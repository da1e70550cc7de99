"""VIRTIO_SCSI_F_CHANGE in the embedded scsi back end: a LUN's capacity changes, the driver is told.

ScsiBackend offers the feature; ``resize_lun`` changes a LUN's size. A
driver that negotiated CHANGE gets a VIRTIO_SCSI_T_PARAM_CHANGE event
(reason: ASC 2Ah, ASCQ 09h, CAPACITY DATA HAS CHANGED, virtio 1.2 §5.6.6.3);
every driver gets the UNIT ATTENTION on the LUN's next command, as from a
real target. Checked with pyvirtio's scsi driver (its public API: events,
the LUN table, a disk) over vhost-user and in process, and with a raw
frontend that reads the event buffer and the sense data byte for byte.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import U64, Chains, HostileFrontend  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, loopback_scsi, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.device import VirtioDevice  # noqa: E402
from pyvirtio.drivers.scsi import ScsiEvent, VirtioScsi  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec import scsi as S  # noqa: E402
from pyvirtio.spec import t10 as T  # noqa: E402
from pyvirtio.spec.common import F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES  # noqa: E402

pytestmark = pytest.mark.timeout(30)

MIB = 1 << 20
CAPACITY_CHANGED = T.ASC_CAPACITY_CHANGED[0] | T.ASC_CAPACITY_CHANGED[1] << 8


@pytest.fixture
def served(tmp_path: object) -> Iterator[tuple[VhostUserServer, ScsiBackend]]:
    backend = ScsiBackend({(0, 0): ram_lun(MIB), (0, 1): ram_lun(MIB)}, max_target=3)
    server = VhostUserServer(os.path.join(str(tmp_path), "scsi.sock"), backend)
    server.start()
    try:
        yield server, backend
    finally:
        server.stop()
        assert server.wait(10)
        backend.close()


def events_until(scsi: VirtioScsi, kinds: set[str], timeout: float = 5.0) -> list[ScsiEvent]:
    seen: list[ScsiEvent] = []
    deadline = time.monotonic() + timeout
    while not kinds <= {e.kind for e in seen}:
        assert time.monotonic() < deadline, f"events seen: {[e.kind for e in seen]}"
        seen.extend(scsi.poll_events(0.1))
    return seen


def test_the_feature_is_offered(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    _server, backend = served
    assert backend.features() >> S.F_CHANGE & 1


def test_a_resize_reaches_a_driver_that_took_change(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, backend = served
    with VirtioScsi.open(server.path, extra_features=1 << S.F_CHANGE) as scsi:
        assert scsi.luns[(0, 0)].capacity == MIB
        assert server.info()["device"]["change_events"] is True
        assert backend.resize_lun(0, 0, 2 * MIB) == 2 * MIB // 512
        events = events_until(scsi, {"param_change", "changed"})
        change = next(e for e in events if e.kind == "param_change")
        assert (change.target, change.lun, change.event, change.reason) == (0, 0, S.T_PARAM_CHANGE, CAPACITY_CHANGED)
        changed = next(e for e in events if e.kind == "changed")
        assert changed.info is not None and changed.info.capacity == 2 * MIB
        assert scsi.luns[(0, 0)].capacity == 2 * MIB
        assert scsi.luns[(0, 1)].capacity == MIB  # only the resized LUN
        # The new blocks are there: written and read back past the old end.
        disk = scsi.disk(0, 0)
        data = os.urandom(8192)
        disk.write(MIB + 4096, data)
        assert disk.read(MIB + 4096, 8192) == data
    assert server.info()["device"]["luns"]["0:0"]["capacity_bytes"] == 2 * MIB


def test_without_change_no_event_is_sent(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, backend = served
    with VirtioScsi.open(server.path) as scsi:
        assert backend.change_events is False
        sent = backend.events_sent
        backend.resize_lun(0, 1, MIB // 2)
        assert scsi.poll_events(0.3) == []
        assert backend.events_sent == sent
        # A rescan finds it (the unit attention is consumed on the way).
        changed = [e for e in scsi.rescan() if e.kind == "changed"]
        assert [(e.target, e.lun) for e in changed] == [(0, 1)]
        assert scsi.luns[(0, 1)].capacity == MIB // 2


def test_in_process_too() -> None:
    backend = ScsiBackend({(0, 0): ram_lun(MIB)}, max_target=1)
    transport = loopback_scsi(backend)
    try:
        scsi = VirtioScsi(VirtioDevice("change", transport, pool_size=8 << 20), extra_features=1 << S.F_CHANGE)
        try:
            assert backend.change_events
            backend.resize_lun(0, 0, 3 * MIB)
            kinds = {e.kind for e in events_until(scsi, {"param_change", "changed"})}
            assert kinds == {"param_change", "changed"}
            assert scsi.luns[(0, 0)].capacity == 3 * MIB
        finally:
            scsi.close()
    finally:
        backend.close()


def test_raw_event_and_unit_attention(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, backend = served
    with HostileFrontend(server.path) as fe:
        offered = fe.u64(vu.GET_FEATURES)
        fe.protocol = fe.u64(vu.GET_PROTOCOL_FEATURES) & (1 << vu.PROTOCOL_F_REPLY_ACK)
        fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol))
        fe.set(vu.SET_OWNER)
        fe.features = offered & (1 << F_VERSION_1 | 1 << S.F_CHANGE) | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        assert fe.features >> S.F_CHANGE & 1
        fe.set(vu.SET_FEATURES, U64.pack(fe.features))
        fe.set_mem_table()
        for q in (S.CONTROL_QUEUE, S.EVENT_QUEUE, S.FIRST_REQUEST_QUEUE):
            fe.setup_ring(q)
        events = Chains(fe, S.EVENT_QUEUE)
        slot = events.buffer(S.EVENT.size)
        events.post([(slot, S.EVENT.size, True)])
        rq = Chains(fe, S.FIRST_REQUEST_QUEUE)

        def tur() -> tuple[int, T.Sense | None]:
            header = S.CMD_REQ_HDR.pack(S.lun_address(0, 0), 9, 0, 0, 0) + bytes(S.CDB_SIZE)  # TEST UNIT READY
            resp = rq.buffer(12 + S.SENSE_SIZE)
            rq.send([(rq.buffer(header), len(header), False), (resp, 12 + S.SENSE_SIZE, True)])
            sense_len, _resid, _q, status, response = S.CMD_RESP_HDR.unpack_from(resp.view)
            assert response == S.S_OK
            return status, T.parse_sense(bytes(resp.view[12 : 12 + sense_len]))

        while tur()[0] != T.GOOD:  # the fresh LUN's POWER ON, RESET first
            pass
        backend.resize_lun(0, 0, 4 * MIB)
        (written,) = events.wait()
        assert written == S.EVENT.size
        assert S.EVENT.unpack(bytes(slot.view)) == (S.T_PARAM_CHANGE, S.lun_address(0, 0), CAPACITY_CHANGED)
        status, sense = tur()
        assert status == T.CHECK_CONDITION and sense is not None
        assert (sense.key, sense.asc, sense.ascq) == (T.UNIT_ATTENTION, *T.ASC_CAPACITY_CHANGED)
        assert tur()[0] == T.GOOD  # reported once


def test_resizing_what_is_not_there() -> None:
    backend = ScsiBackend({(0, 0): ram_lun(MIB)}, max_target=1)
    try:
        with pytest.raises(ValueError, match="no LUN 0:5"):
            backend.resize_lun(0, 5, MIB)
        with pytest.raises(ValueError, match="hold no 512-byte block"):
            backend.resize_lun(0, 0, 100)
        assert backend.luns[(0, 0)].capacity == MIB
    finally:
        backend.close()
