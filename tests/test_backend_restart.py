"""A device restarted the way QEMU 7.2 restarts it (driver rebind, device reset), from a raw frontend.

QEMU's stop: SET_VRING_ENABLE 0, GET_VRING_BASE per ring (the back end drops
the ring's eventfds, as libvhost-user and DPDK do), and for
vhost-user-scsi RESET_DEVICE. Its start: SET_FEATURES, every ring's
SET_VRING_NUM / BASE / ADDR / KICK, SET_VRING_ENABLE 1, and only then
SET_VRING_CALL (the notifiers are unmasked last; QEMU's vhost-user-blk:
"guest_notifier_mask/pending not used yet, so just unmask everything here").
A request the guest queued as soon as the ring was enabled may be completed
before that SET_VRING_CALL is read: its notification must reach the call fd
when it comes, or the guest waits for it for ever (seen in the scsi guest
test: the SCSI scan after a rebind hung). Nothing is signalled when no
notification was missed.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import ADDR, STATE, U64, BlkBuilder, Chains, HostileFrontend  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec import blk as B  # noqa: E402
from pyvirtio.spec import scsi as S  # noqa: E402
from pyvirtio.testing.hostile import RawDriver  # noqa: E402

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def blk(tmp_path: object) -> Iterator[VhostUserServer]:
    storage = Storage(size=1 << 20)
    server = VhostUserServer(os.path.join(str(tmp_path), "blk.sock"), BlockBackend(storage, num_queues=1))
    try:
        with server:
            yield server
    finally:
        storage.close()


def _signalled(fd: int, timeout: float) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def _get_id(fe: HostileFrontend, rd: RawDriver, first: int) -> None:
    """Lay out a GET_ID request at descriptor ``first`` and publish it (no kick)."""
    BlkBuilder(fe, rd).request(first, B.T_GET_ID, data=B.ID_BYTES)
    rd.publish(first)


def _restart_without_call(fe: HostileFrontend, index: int, size: int = 64) -> RawDriver:
    """QEMU's start of a ring after a stop: a new ring, SET_VRING_NUM/BASE/ADDR/KICK, ENABLE; no call fd."""
    rd = fe.add_ring(index, size)
    fe.set(vu.SET_VRING_NUM, STATE.pack(index, size))
    fe.set(vu.SET_VRING_BASE, STATE.pack(index, 0))
    fe.set(vu.SET_VRING_ADDR, ADDR.pack(index, 0, rd.desc_addr, rd.used_addr, rd.avail_addr, 0))
    old = fe.kicks.pop(index, None)
    if old is not None:
        os.close(old)
    fe.send_kick(index)
    return rd


def test_a_completion_before_set_vring_call_is_signalled_on_the_call_fd(blk: VhostUserServer) -> None:
    with HostileFrontend(blk.path) as fe:
        rd = fe.start()
        _get_id(fe, rd, 0)
        fe.kick()
        assert fe.wait_used(0, 1)
        assert _signalled(fe.calls[0], 2)
        # QEMU's stop, then its start, the guest's request already queued when the ring is enabled.
        assert fe.call(vu.GET_VRING_BASE, STATE.pack(0, 0)) == STATE.pack(0, 1)
        rd = _restart_without_call(fe, 0)
        _get_id(fe, rd, 0)
        fe.kick()  # the guest's kick, as soon as its driver is ready
        fe.set(vu.SET_VRING_ENABLE, STATE.pack(0, 1))
        assert fe.wait_used(0, 1)
        call = fe.send_call(0)
        assert _signalled(call, 2), "the completion's notification was lost"
        assert os.eventfd_read(call) == 1
        # Nothing missed since: a new call fd is not signalled.
        call = fe.send_call(0)
        assert not _signalled(call, 0.2)
        # And the ring notifies as usual.
        _get_id(fe, rd, 4)
        fe.kick()
        assert fe.wait_used(0, 2)
        assert _signalled(call, 2)


def test_scsi_after_reset_device_too(tmp_path: object) -> None:
    """vhost-user-scsi's restart adds RESET_DEVICE: the call fds are gone, the request on a queue is not lost."""
    backend = ScsiBackend({(0, 0): ram_lun(1 << 20)}, max_target=0)
    server = VhostUserServer(os.path.join(str(tmp_path), "scsi.sock"), backend)
    try:
        with server, HostileFrontend(server.path) as fe:
            fe.handshake()
            fe.set_mem_table()
            queues = (S.CONTROL_QUEUE, S.EVENT_QUEUE, S.FIRST_REQUEST_QUEUE)
            for q in queues:
                fe.setup_ring(q)
            for q in queues:
                fe.call(vu.GET_VRING_BASE, STATE.pack(q, 0))
            fe.set(vu.RESET_DEVICE)
            fe.set(vu.SET_FEATURES, U64.pack(fe.features))
            for q in queues:
                _restart_without_call(fe, q)
            # A TEST UNIT READY on the request queue, posted and kicked before the rings are enabled.
            rq = Chains(fe, S.FIRST_REQUEST_QUEUE)
            header = S.CMD_REQ_HDR.pack(S.lun_address(0, 0), 1, 0, 0, 0) + bytes(S.CDB_SIZE)  # TUR: opcode 0
            resp = rq.buffer(12 + S.SENSE_SIZE)
            rq.post([(rq.buffer(header), len(header), False), (resp, 12 + S.SENSE_SIZE, True)])
            for q in queues:
                fe.set(vu.SET_VRING_ENABLE, STATE.pack(q, 1))
            rq.wait()
            assert S.CMD_RESP_HDR.unpack_from(resp.view)[4] == S.S_OK
            calls = {q: fe.send_call(q) for q in queues}
            assert _signalled(calls[S.FIRST_REQUEST_QUEUE], 2), "the completion's notification was lost"
            assert not _signalled(calls[S.CONTROL_QUEUE], 0)  # nothing completed there: nothing to tell
            assert not _signalled(calls[S.EVENT_QUEUE], 0)
    finally:
        backend.close()
