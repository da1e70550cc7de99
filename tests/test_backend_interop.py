"""The embedded back ends (blk, scsi, net) against what real frontends send.

A raw frontend (tests/hostile_frontend.py) replays, message for message, what
QEMU 7.2, SPDK v24.01's virtio-user initiator and DPDK's virtio-user PMD send
to a vhost-user back end (their orders, their GET_CONFIG sizes, their
feature bits), against each of the three back ends, and then does real I/O
on the rings: a blk write read back, a scsi WRITE(10) / READ(10), a net frame
transmitted and received in loopback. A back end that refused a message,
answered it wrongly or set a ring up wrongly fails the test.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import ADDR, CONFIG, STATE, U64, HostileFrontend, blk_io, net_io, scsi_io  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.model import DeviceModel  # noqa: E402
from pyvirtio.backends.net import NetBackend  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec.common import (  # noqa: E402
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
)

pytestmark = pytest.mark.timeout(60)

KINDS = ("blk", "scsi", "net")
#: Device features the replayed frontends ack (when offered).
WANTED = (1 << F_VERSION_1) | (1 << F_RING_INDIRECT_DESC)


@dataclass
class Served:
    kind: str
    server: VhostUserServer
    model: DeviceModel
    rings: tuple[int, ...]  # the rings a frontend sets up
    queue_num: int  # the GET_QUEUE_NUM answer
    io: Callable[[HostileFrontend], None]  # real I/O once the rings run

    @property
    def path(self) -> str:
        return self.server.path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    d = tmp_path_factory.mktemp("interop")
    storage = Storage(size=4 << 20)
    blk = BlockBackend(storage, num_queues=1)
    scsi = ScsiBackend({(0, 0): ram_lun(1 << 20)})
    net = NetBackend("loopback")
    served = {
        "blk": Served("blk", VhostUserServer(str(d / "blk.sock"), blk), blk, (0,), 1, blk_io),
        "scsi": Served("scsi", VhostUserServer(str(d / "scsi.sock"), scsi), scsi, (0, 1, 2), 3, scsi_io),
        "net": Served("net", VhostUserServer(str(d / "net.sock"), net), net, (0, 1), 1, net_io),
    }
    for s in served.values():
        s.server.start()
    try:
        yield served
    finally:
        for s in served.values():
            s.server.stop()
            assert s.server.wait(10)
        storage.close()
        scsi.close()
        net.close()


@pytest.fixture(params=KINDS)
def served(request: pytest.FixtureRequest, servers: dict[str, Served]) -> Served:
    return servers[request.param]


@pytest.fixture
def fe(served: Served) -> Iterator[HostileFrontend]:
    with HostileFrontend(served.path) as f:
        yield f


def dropped(fe: HostileFrontend, served: Served, before: int, pattern: str) -> None:
    assert fe.expect_closed(), "the back end kept the connection open"
    server = served.server
    deadline = time.monotonic() + 5
    while server.finished <= before:
        assert time.monotonic() < deadline, "the server did not record the disconnect"
        time.sleep(0.005)
    assert server.disconnects[-1].startswith("protocol violation") and pattern in server.disconnects[-1], (
        server.disconnects[-1]
    )


# -- GET_CONFIG past the end of the config (SPDK's 256 bytes) ----------------------------------


def test_get_config_of_256_bytes_answers_the_config_then_zeros(served: Served, fe: HostileFrontend) -> None:
    config = served.model.config()
    assert 0 < len(config) < 256
    fe.handshake()
    reply = fe.get_config(0, 256)
    assert CONFIG.unpack_from(reply) == (0, 256, 0)
    assert reply[12:] == config + bytes(256 - len(config))
    # A window that starts inside and ends past it, and one wholly past it.
    assert fe.get_config(len(config) - 4, 16)[12:] == config[-4:] + bytes(12)
    assert fe.get_config(200, 56)[12:] == bytes(56)
    # Exactly the config, as QEMU asks: the same bytes.
    assert fe.get_config(0, len(config))[12:] == config
    assert fe.is_open()


def test_get_config_with_more_data_than_its_size_field_is_answered_in_the_requests_length(
    served: Served, fe: HostileFrontend
) -> None:
    """SPDK's virtio-user sends its whole 256-byte struct whatever size it asks for, and refuses a
    reply of another length (a build patched to ask the config's exact size still does)."""
    config = served.model.config()
    fe.handshake()
    reply = fe.call(vu.GET_CONFIG, CONFIG.pack(0, 24, 0) + bytes(256))
    assert CONFIG.unpack_from(reply) == (0, 24, 0)
    assert len(reply) == 12 + 256
    assert reply[12 : 12 + 24] == config[:24]
    assert reply[12 + 24 :] == bytes(256 - 24)
    assert fe.is_open()


@pytest.mark.parametrize(
    ("head", "data", "why"),
    [
        (CONFIG.pack(0, 16, 0), bytes(8), "config size field 16 but 8 data bytes"),
        (CONFIG.pack(0, 8, 0), bytes(257), "257 config data bytes, at most 256"),
        (CONFIG.pack(0, 257, 0), bytes(257), "exceeds 256 bytes"),
        (CONFIG.pack(250, 8, 0), bytes(8), "exceeds 256 bytes"),
    ],
)
def test_get_config_whose_size_disagrees_or_exceeds_256_is_a_violation(
    served: Served, fe: HostileFrontend, head: bytes, data: bytes, why: str
) -> None:
    before = served.server.finished
    fe.handshake()
    fe.send(vu.GET_CONFIG, head + data)
    dropped(fe, served, before, why)


# -- message orders of real frontends ---------------------------------------------------------


def raw_layout(fe: HostileFrontend, index: int, size: int = 64) -> None:
    """SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR without asking for acks (DPDK, SPDK)."""
    rd = fe.add_ring(index, size)
    fe.send(vu.SET_VRING_NUM, STATE.pack(index, size))
    fe.send(vu.SET_VRING_BASE, STATE.pack(index, 0))
    fe.send(vu.SET_VRING_ADDR, ADDR.pack(index, 0, rd.desc_addr, rd.used_addr, rd.avail_addr, 0))


def test_qemu_order(served: Served, fe: HostileFrontend) -> None:
    """QEMU 7.2 (vhost-user-blk-pci, vhost-user-scsi-pci, -netdev vhost-user): negotiate, own, config,
    then at start SET_FEATURES, SET_MEM_TABLE (acked), per ring NUM, BASE, ADDR, KICK, CALL, then
    SET_VRING_ENABLE each, SET_STATUS, and later a new call fd (guest notifiers) on a running ring."""
    offered = fe.u64(vu.GET_FEATURES)
    assert offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1
    fe.protocol = fe.u64(vu.GET_PROTOCOL_FEATURES) & (
        (1 << vu.PROTOCOL_F_MQ) | (1 << vu.PROTOCOL_F_REPLY_ACK) | (1 << vu.PROTOCOL_F_CONFIG)
        | (1 << vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS) | (1 << vu.PROTOCOL_F_RESET_DEVICE) | (1 << vu.PROTOCOL_F_STATUS)
    )
    fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol))
    assert fe.u64(vu.GET_QUEUE_NUM) == served.queue_num
    assert fe.u64(vu.GET_MAX_MEM_SLOTS) == 32
    fe.set(vu.SET_OWNER)
    if served.kind == "blk":  # vhost-user-blk reads its config, exactly its size
        config = served.model.config()
        assert fe.get_config(0, len(config))[12:] == config
    fe.features = (offered & WANTED) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    fe.set(vu.SET_FEATURES, U64.pack(fe.features))
    fe.set_mem_table()
    for i in served.rings:
        fe.send_layout(i)
        fe.send_kick(i)
        fe.send_call(i)
    for i in served.rings:
        fe.enable(i)
    fe.set(vu.SET_STATUS, U64.pack(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK))
    fe.send_call(served.rings[0])  # the guest's notifiers replace the call fd of a running ring
    served.io(fe)
    assert fe.u64(vu.GET_STATUS) == 0x0F


def test_spdk_order(served: Served, fe: HostileFrontend) -> None:
    """SPDK v24.01's virtio-user initiator: SET_OWNER, GET_FEATURES, a 256-byte GET_CONFIG before
    SET_FEATURES and before protocol features (as v18.04 did), SET_FEATURES, then protocol features
    (MQ, CONFIG), a GET_CONFIG of 256 bytes per field read, SET_VRING_ENABLE before any ring exists,
    at DRIVER_OK GET_QUEUE_NUM, SET_VRING_CALL each before SET_MEM_TABLE, GET_FEATURES as a
    barrier after it, then per ring NUM, BASE, ADDR, KICK. Nothing asks for an ack."""
    config = served.model.config()
    padded = config + bytes(256 - len(config))
    fe.send(vu.SET_OWNER)
    offered = fe.u64(vu.GET_FEATURES)
    assert fe.get_config(0, 256)[12:] == padded
    fe.features = (offered & WANTED) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    fe.send(vu.SET_FEATURES, U64.pack(fe.features))
    fe.protocol = fe.u64(vu.GET_PROTOCOL_FEATURES) & ((1 << vu.PROTOCOL_F_MQ) | (1 << vu.PROTOCOL_F_CONFIG))
    fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol))
    for _field in range(3):
        assert fe.get_config(0, 256)[12:] == padded
    for i in served.rings:
        fe.enable(i)
    assert fe.u64(vu.GET_QUEUE_NUM) == served.queue_num
    for i in served.rings:
        fe.send_call(i)
    fe.set_mem_table()
    assert fe.u64(vu.GET_FEATURES) == offered  # the barrier: SET_MEM_TABLE was handled
    for i in served.rings:
        raw_layout(fe, i)
        fe.send_kick(i)
    served.io(fe)


def test_dpdk_virtio_user_order(served: Served, fe: HostileFrontend) -> None:
    """DPDK's virtio-user (drivers/net/virtio/virtio_user): SET_OWNER, GET_FEATURES, protocol features
    (MQ, REPLY_ACK, STATUS); at FEATURES_OK SET_VRING_CALL for every ring before SET_FEATURES and
    SET_MEM_TABLE, then SET_FEATURES, SET_STATUS (acked); at DRIVER_OK SET_MEM_TABLE (acked), per
    ring NUM, BASE, ADDR, KICK (not acked), SET_VRING_ENABLE, SET_STATUS (acked)."""
    fe.send(vu.SET_OWNER)
    offered = fe.u64(vu.GET_FEATURES)
    fe.protocol = fe.u64(vu.GET_PROTOCOL_FEATURES) & (
        (1 << vu.PROTOCOL_F_MQ) | (1 << vu.PROTOCOL_F_REPLY_ACK) | (1 << vu.PROTOCOL_F_STATUS)
    )
    fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol))
    assert fe.acks
    for i in served.rings:
        fe.send_call(i)
    fe.features = (offered & WANTED) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    fe.send(vu.SET_FEATURES, U64.pack(fe.features))
    fe.set(vu.SET_STATUS, U64.pack(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK))
    fe.set_mem_table()
    for i in served.rings:
        raw_layout(fe, i)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.kicks[i] = kick
        fe.send(vu.SET_VRING_KICK, U64.pack(i), fds=[kick])
    for i in served.rings:
        fe.send(vu.SET_VRING_ENABLE, STATE.pack(i, 1))
    fe.set(vu.SET_STATUS, U64.pack(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK))
    served.io(fe)
    assert fe.u64(vu.GET_STATUS) == 0x0F


def test_the_raw_helpers_see_a_broken_ring(served: Served, fe: HostileFrontend) -> None:
    """The orders above prove something only if a ring that is not running makes the I/O fail."""
    fe.handshake()
    fe.set_mem_table()
    for i in served.rings:
        fe.send_layout(i)
        fe.send_kick(i)
        fe.send_call(i)  # never enabled: with protocol features the rings stay stopped
    fe.timeout = 0.3
    with pytest.raises(AssertionError, match="not completed"):
        served.io(fe)


# -- SET_FEATURES with bits never offered (QEMU 7.2's vhost-user-scsi-pci) ----------------------


def unoffered_device_bits(offered: int) -> int:
    """A device-type bit in 0..23 and one in 50..63 that the back end did not offer."""
    low = next(b for b in range(24) if not offered >> b & 1)
    high = next(b for b in range(63, 49, -1) if not offered >> b & 1)
    return 1 << low | 1 << high


def test_unoffered_device_bits_are_ignored_and_logged_once(
    served: Served, fe: HostileFrontend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pyvirtio.backends")
    offered = fe.u64(vu.GET_FEATURES)
    extra = unoffered_device_bits(offered)
    fe.protocol = fe.u64(vu.GET_PROTOCOL_FEATURES) & ((1 << vu.PROTOCOL_F_MQ) | (1 << vu.PROTOCOL_F_REPLY_ACK))
    fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol))
    fe.set(vu.SET_OWNER)
    fe.features = (offered & WANTED) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    assert fe.ack(vu.SET_FEATURES, U64.pack(fe.features | extra)) == 0  # accepted, not dropped
    assert fe.ack(vu.SET_FEATURES, U64.pack(fe.features | extra)) == 0  # again: not logged again
    conn = served.server.info()["connection"]
    assert conn["acked_features"] == fe.features  # masked off: the device never sees them
    assert conn["ignored_features"] == extra
    logged = [r for r in caplog.records if "were not offered: ignored" in r.getMessage()]
    assert len(logged) == 1 and f"0x{extra:x}" in logged[0].getMessage()
    fe.set_mem_table()
    for i in served.rings:
        fe.setup_ring(i)
    served.io(fe)


@pytest.mark.parametrize("bit", [24, 31, 33, 40, 45])
def test_unoffered_transport_bits_are_still_a_violation(served: Served, fe: HostileFrontend, bit: int) -> None:
    before = served.server.finished
    offered = fe.u64(vu.GET_FEATURES)
    assert not offered >> bit & 1
    fe.send(vu.SET_FEATURES, U64.pack((offered & WANTED) | 1 << bit))
    dropped(fe, served, before, f"SET_FEATURES acks features 0x{1 << bit:x} that were not offered")
