"""Events of the embedded scsi back end only for drivers that negotiated them (virtio 1.2 §5.6.6.3).

"The device MUST NOT send VIRTIO_SCSI_T_TRANSPORT_RESET messages with
reason set to VIRTIO_SCSI_EVT_RESET_REMOVED or VIRTIO_SCSI_EVT_RESET_RESCAN
unless VIRTIO_SCSI_F_HOTPLUG was negotiated." A raw frontend posts event
buffers and negotiates with or without HOTPLUG; LUNs are added and removed;
the event buffers say what was sent, byte for byte. PARAM_CHANGE follows
VIRTIO_SCSI_F_CHANGE the same way. Events queued for a driver that took the
feature do not reach a later one that did not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import U64, Chains, HostileFrontend  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec import scsi as S  # noqa: E402
from pyvirtio.spec import t10 as T  # noqa: E402
from pyvirtio.spec.common import F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES  # noqa: E402

pytestmark = pytest.mark.timeout(30)

MIB = 1 << 20


@pytest.fixture
def served(tmp_path: object) -> Iterator[tuple[VhostUserServer, ScsiBackend]]:
    backend = ScsiBackend({(0, 0): ram_lun(MIB)}, max_target=3)
    try:
        with VhostUserServer(os.path.join(str(tmp_path), "scsi.sock"), backend) as server:
            yield server, backend
    finally:
        backend.close()


def _connect(fe: HostileFrontend, device_features: int) -> Chains:
    """Handshake acking VERSION_1 and ``device_features``; rings up; event buffers posted."""
    offered = fe.u64(vu.GET_FEATURES)
    fe.protocol = fe.u64(vu.GET_PROTOCOL_FEATURES) & (1 << vu.PROTOCOL_F_REPLY_ACK)
    fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol))
    fe.set(vu.SET_OWNER)
    fe.features = offered & (1 << F_VERSION_1 | device_features) | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    assert fe.features & device_features == device_features, "the back end offers the feature"
    fe.set(vu.SET_FEATURES, U64.pack(fe.features))
    fe.set_mem_table()
    for q in (S.CONTROL_QUEUE, S.EVENT_QUEUE, S.FIRST_REQUEST_QUEUE):
        fe.setup_ring(q)
    return Chains(fe, S.EVENT_QUEUE)


def _post(events: Chains, count: int) -> list[object]:
    slots = [events.buffer(S.EVENT.size) for _ in range(count)]
    for slot in slots:
        events.post([(slot, S.EVENT.size, True)])
    return slots


def test_without_hotplug_no_lun_event_is_sent(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, backend = served
    with HostileFrontend(server.path) as fe:
        events = _connect(fe, 0)
        _post(events, 4)
        assert server.info()["device"]["hotplug_events"] is False
        backend.add_lun(1, 0, ram_lun(MIB))
        backend.remove_lun(1, 0)
        backend.add_lun(0, 1, ram_lun(MIB))  # a busy target: its LUN 0 reports it as a unit attention
        backend.resize_lun(0, 0, 2 * MIB)  # and no CHANGE either
        assert not fe.wait_used(S.EVENT_QUEUE, 1, timeout=0.5), "an event buffer was used"
        assert backend.events_sent == 0
        assert T.ASC_REPORTED_LUNS_CHANGED in backend.luns[(0, 0)].pending_ua  # the spec's other path


def test_with_hotplug_added_and_removed_luns_are_sent(served: tuple[VhostUserServer, ScsiBackend]) -> None:
    server, backend = served
    with HostileFrontend(server.path) as fe:
        events = _connect(fe, 1 << S.F_HOTPLUG)
        first, second = _post(events, 2)
        assert server.info()["device"]["hotplug_events"] is True
        backend.add_lun(1, 0, ram_lun(MIB))
        backend.remove_lun(1, 0)
        assert events.wait(2) == [S.EVENT.size, S.EVENT.size]
        assert S.EVENT.unpack(bytes(first.view)) == (S.T_TRANSPORT_RESET, S.lun_address(1, 0), S.EVT_RESET_RESCAN)
        assert S.EVENT.unpack(bytes(second.view)) == (S.T_TRANSPORT_RESET, S.lun_address(1, 0), S.EVT_RESET_REMOVED)
        backend.resize_lun(0, 0, 2 * MIB)  # HOTPLUG without CHANGE: no PARAM_CHANGE
        assert not fe.wait_used(S.EVENT_QUEUE, 3, timeout=0.3)


def test_events_queued_for_one_driver_do_not_reach_the_next() -> None:
    backend = ScsiBackend({(0, 0): ram_lun(MIB)}, max_target=3)
    try:
        backend.negotiated(1 << S.F_HOTPLUG | 1 << S.F_CHANGE)
        backend.add_lun(2, 0, ram_lun(MIB))
        backend.resize_lun(0, 0, 2 * MIB)
        backend.push_event(S.T_ASYNC_NOTIFY, 0, 0, 1 << 4)  # not feature-bound
        assert backend.pending(S.EVENT_QUEUE) == 3
        # A driver with CHANGE but without HOTPLUG negotiates before any buffer was posted.
        backend.negotiated(1 << S.F_CHANGE)
        assert backend.pending(S.EVENT_QUEUE) == 2  # the RESCAN went, PARAM_CHANGE and ASYNC_NOTIFY stay
        backend.negotiated(0)
        assert backend.pending(S.EVENT_QUEUE) == 1
    finally:
        backend.close()
