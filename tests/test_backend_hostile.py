"""The vhost-user back end against a frontend that breaks the rules.

One test per rule of the server's docstring: malformed messages (version
bits, reply flag, truncated or oversized payloads, fds where none belong),
unknown requests (failure ack with NEED_REPLY, disconnect without),
requests out of order or out of range, ring and region addresses outside
what was given, bad descriptor chains (loop, out of range, nested or
misplaced indirect, longer than the ring), and bad virtio-blk requests
(which fail with a status and leave the device running). Each asserts the
answer (the reply, the status byte, or the server closing the connection
with the reason it logs) and, in the fixture's teardown, that the same
server then serves pyvirtio's own frontend normally.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Iterator

import pytest

from pyvirtio.testing import fds_opened_since, open_fds

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import ADDR, REGION, STATE, U64, BlkBuilder, HostileFrontend  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.server import MAX_MEM_SLOTS, VhostUserServer  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec import blk as B  # noqa: E402
from pyvirtio.spec.common import F_RING_RESET  # noqa: E402
from pyvirtio.spec.ring import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE  # noqa: E402

pytestmark = pytest.mark.timeout(30)

CAPACITY = 8 << 20
QUEUES = 2


def start_server(path: str, *, readonly: bool = False) -> VhostUserServer:
    storage = Storage(size=CAPACITY, readonly=readonly)
    server = VhostUserServer(path, BlockBackend(storage, num_queues=QUEUES))
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserServer]:
    srv = start_server(str(tmp_path_factory.mktemp("hostile") / "blk.sock"))
    yield srv
    srv.stop()
    assert srv.wait(10)
    srv.model.storage.close()  # type: ignore[attr-defined]


def assert_serves(server: VhostUserServer) -> None:
    """pyvirtio's own frontend gets normal service."""
    with VirtioBlk.open("vhost-user:" + server.path, num_queues=1) as blk:
        data = os.urandom(4096)
        blk.write(8192, data)
        assert blk.read(8192, 4096) == data
        assert blk.get_id() == "pyvirtio"


def wait_reason(server: VhostUserServer, before: int, timeout: float = 5.0) -> str:
    """Why connection number ``before`` (counted from 0) ended, once it has."""
    deadline = time.monotonic() + timeout
    while server.finished <= before:
        assert time.monotonic() < deadline, "the server did not finish with the connection"
        time.sleep(0.005)
    return server.disconnects[before - server.finished]


def wait_idle(server: VhostUserServer, timeout: float = 5.0) -> int:
    """Wait until every accepted connection has ended; returns how many have."""
    deadline = time.monotonic() + timeout
    while server.finished < server.connections:
        assert time.monotonic() < deadline, "the server is still busy with a connection"
        time.sleep(0.005)
    return server.finished


class Case:
    """A hostile connection, plus what the server said when it ended."""

    def __init__(self, server: VhostUserServer) -> None:
        self.server = server
        self.before = wait_idle(server)
        self.fe = HostileFrontend(server.path)

    def dropped(self, pattern: str) -> str:
        """Assert the server closed the connection, for a reason matching ``pattern``."""
        assert self.fe.expect_closed(), "the back end kept the connection open"
        reason = wait_reason(self.server, self.before)
        assert re.search(pattern, reason), reason
        assert reason.startswith("protocol violation"), reason
        return reason


@pytest.fixture
def case(server: VhostUserServer) -> Iterator[Case]:
    c = Case(server)
    try:
        yield c
    finally:
        c.fe.close()
    wait_reason(server, c.before)
    assert_serves(server)


# -- malformed messages -----------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 3])
def test_bad_version_bits(case: Case, version: int) -> None:
    case.fe.send(vu.GET_FEATURES, flags=version)
    case.dropped(r"header version")


def test_reply_flag_on_a_request(case: Case) -> None:
    case.fe.send(vu.GET_FEATURES, flags=vu.VERSION | vu.REPLY)
    case.dropped(r"reply flag set on a request")


def test_truncated_payload(case: Case) -> None:
    # SET_VRING_NUM carries 8 bytes (index, num); 4 are sent and the header says so.
    case.fe.handshake()
    case.fe.send(vu.SET_VRING_NUM, struct.pack("=I", 0))
    case.dropped(r"SET_VRING_NUM: vring state payload must be 8 bytes, got 4")


def test_message_cut_by_disconnect(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyvirtio.backends")
    case.fe.send_raw(struct.pack("=III", vu.SET_VRING_NUM, vu.VERSION, 8) + b"\0\0\0")
    case.fe.sock.shutdown(2 - 1)  # SHUT_WR: the frontend is done sending
    assert case.fe.expect_closed()
    assert wait_reason(case.server, case.before).startswith("truncated message (15 bytes)")
    assert "inside a message" in caplog.text


def test_size_above_max_payload(case: Case) -> None:
    case.fe.send(vu.SET_CONFIG, b"", size=vu.MAX_PAYLOAD + 1)
    case.dropped(r"payload size 4097 exceeds the limit of 4096")


def test_payload_on_a_request_without_one(case: Case) -> None:
    case.fe.send(vu.GET_FEATURES, U64.pack(0))
    case.dropped(r"GET_FEATURES: no payload payload must be 0 bytes, got 8")


def test_fd_on_a_request_that_takes_none(case: Case) -> None:
    fd = os.eventfd(0)
    try:
        case.fe.send(vu.SET_OWNER, fds=[fd])
    finally:
        os.close(fd)
    case.dropped(r"SET_OWNER: expected 0 file descriptor\(s\), got 1")


def test_more_fds_than_a_message_may_carry(case: Case) -> None:
    fds = [os.eventfd(0) for _ in range(vu.MAX_FDS + 1)]
    try:
        case.fe.send(vu.SET_OWNER, fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    case.dropped(r"file descriptors")


# -- unknown and unsupported requests -------------------------------------------------


@pytest.mark.parametrize(
    "request_code, payload",
    [(99, b""), (vu.GET_SHARED_OBJECT, b""), (vu.SEND_RARP, bytes(8)), (vu.NET_SET_MTU, U64.pack(1500))],
)
def test_unsupported_request_with_need_reply_gets_a_failure_ack(
    case: Case, request_code: int, payload: bytes
) -> None:
    case.fe.handshake()
    assert case.fe.ack(request_code, payload) == 1
    assert case.fe.is_open()  # and the connection goes on
    case.fe.close()
    assert wait_reason(case.server, case.before) == "frontend disconnected"


@pytest.mark.parametrize("request_code", [99, vu.SEND_RARP])
def test_unsupported_request_without_need_reply_drops(case: Case, request_code: int) -> None:
    case.fe.send(request_code, bytes(8) if request_code == vu.SEND_RARP else b"")
    case.dropped(r"is not supported")


# -- out of order, out of range -----------------------------------------------------------


def test_mem_table_before_set_owner(case: Case) -> None:
    case.fe.handshake(owner=False)
    payload, fds = case.fe.mem_table_payload()
    case.fe.send(vu.SET_MEM_TABLE, payload, fds=fds)
    case.dropped(r"SET_MEM_TABLE before SET_OWNER")


def test_vring_addr_before_mem_table(case: Case) -> None:
    case.fe.handshake()
    rd = case.fe.add_ring(0, 64)
    case.fe.set(vu.SET_VRING_NUM, STATE.pack(0, 64))
    case.fe.send(vu.SET_VRING_ADDR, ADDR.pack(0, 0, rd.desc_addr, rd.used_addr, rd.avail_addr, 0))
    case.dropped(r"SET_VRING_ADDR before SET_MEM_TABLE")


def test_vring_kick_for_a_ring_the_device_lacks(case: Case) -> None:
    case.fe.handshake()
    fd = os.eventfd(0)
    try:
        case.fe.send(vu.SET_VRING_KICK, U64.pack(QUEUES), fds=[fd])
    finally:
        os.close(fd)
    case.dropped(rf"SET_VRING_KICK for ring {QUEUES}: the device has {QUEUES}")


@pytest.mark.parametrize("num", [0, 100, 65536])
def test_vring_num_not_a_power_of_two_up_to_32768(case: Case, num: int) -> None:
    case.fe.handshake()
    case.fe.send(vu.SET_VRING_NUM, STATE.pack(0, num))
    case.dropped(rf"SET_VRING_NUM {num} for ring 0: not a power of 2 up to 32768")


def test_vring_num_on_a_running_ring(case: Case) -> None:
    case.fe.start()
    case.fe.send(vu.SET_VRING_NUM, STATE.pack(0, 128))
    case.dropped(r"SET_VRING_NUM on running ring 0")


def test_vring_base_beyond_16_bits(case: Case) -> None:
    case.fe.handshake()
    case.fe.send(vu.SET_VRING_BASE, STATE.pack(0, 0x10000))
    case.dropped(r"a split ring index is 16 bits")


def test_vring_enable_value(case: Case) -> None:
    case.fe.handshake()
    case.fe.send(vu.SET_VRING_ENABLE, STATE.pack(0, 2))
    case.dropped(r"must be 0 or 1")


def test_features_not_offered(case: Case) -> None:
    case.fe.u64(vu.GET_FEATURES)
    case.fe.send(vu.SET_FEATURES, U64.pack(1 << F_RING_RESET))  # a ring feature the back ends do not offer
    case.dropped(r"SET_FEATURES acks features 0x10000000000 that were not offered")


def test_protocol_features_not_offered(case: Case) -> None:
    case.fe.send(vu.SET_PROTOCOL_FEATURES, U64.pack(1 << vu.PROTOCOL_F_LOG_SHMFD))
    case.dropped(r"\['LOG_SHMFD'\], which were not offered")


def test_add_mem_reg_without_configure_mem_slots(case: Case) -> None:
    case.fe.handshake(protocol=1 << vu.PROTOCOL_F_REPLY_ACK)
    region = case.fe.pool.regions[0]
    payload = U64.pack(0) + REGION.pack(region.guest_addr, region.size, region.user_addr, 0)
    case.fe.send(vu.ADD_MEM_REG, payload, fds=[region.fd])
    case.dropped(r"ADD_MEM_REG without PROTOCOL_F_CONFIGURE_MEM_SLOTS")


def test_status_beyond_8_bits(case: Case) -> None:
    case.fe.send(vu.SET_STATUS, U64.pack(0x100))
    case.dropped(r"does not fit in 8 bits")


def test_get_config_past_the_config_reads_zeros(case: Case) -> None:
    case.fe.handshake()
    ok = case.fe.call(vu.GET_CONFIG, struct.pack("=III", 0, 8, 0) + bytes(8))
    assert struct.unpack("=IIIQ", ok) == (0, 8, 0, CAPACITY // 512)
    config = case.server.model.config()
    assert len(config) == B.CONFIG_SIZE_V11
    past = case.fe.call(vu.GET_CONFIG, struct.pack("=III", 0, 100, 0) + bytes(100))
    assert past == struct.pack("=III", 0, 100, 0) + config + bytes(100 - len(config))
    tail = case.fe.call(vu.GET_CONFIG, struct.pack("=III", 56, 8, 0) + bytes(8))
    assert tail == struct.pack("=III", 56, 8, 0) + config[56:] + bytes(8 - len(config[56:]))
    # Size 0: nothing to answer, an empty payload (vhost-user.rst's refusal).
    assert case.fe.call(vu.GET_CONFIG, struct.pack("=III", 0, 0, 0)) == b""
    # SET_CONFIG: the blk model's config is read-only, a failure ack.
    assert case.fe.ack(vu.SET_CONFIG, struct.pack("=III", 32, 1, 0) + b"\1") == 1
    assert case.fe.is_open()


# -- memory regions and ring addresses ----------------------------------------------------


@pytest.mark.parametrize("part", ["desc", "avail", "used"])
def test_ring_address_outside_the_memory_table(case: Case, part: str) -> None:
    fe = case.fe
    fe.handshake()
    fe.set_mem_table()
    rd = fe.add_ring(0, 64)
    end = fe.pool.regions[0].user_addr + fe.pool.regions[0].size
    addrs = {"desc": rd.desc_addr, "avail": rd.avail_addr, "used": rd.used_addr}
    addrs[part] = end - 16  # starts inside, ends outside
    fe.set(vu.SET_VRING_NUM, STATE.pack(0, 64))
    fe.send(vu.SET_VRING_ADDR, ADDR.pack(0, 0, addrs["desc"], addrs["used"], addrs["avail"], 0))
    case.dropped(r"ring 0: frontend address 0x[0-9a-f]+\+\d+ is outside the memory table")


def test_ring_address_misaligned(case: Case) -> None:
    fe = case.fe
    fe.handshake()
    fe.set_mem_table()
    rd = fe.add_ring(0, 64)
    fe.send(vu.SET_VRING_ADDR, ADDR.pack(0, 0, rd.desc_addr + 8, rd.used_addr, rd.avail_addr, 0))
    case.dropped(r"descriptor table address 0x[0-9a-f]+ not 16-byte aligned")


def _region_message(fe: HostileFrontend, size: int, offset: int = 0) -> bytes:
    region = fe.pool.regions[0]
    return STATE.pack(1, 0) + REGION.pack(region.guest_addr, size, region.user_addr, offset)


def test_region_larger_than_its_file(case: Case) -> None:
    fe = case.fe
    fe.handshake()
    region = fe.pool.regions[0]
    fe.send(vu.SET_MEM_TABLE, _region_message(fe, region.size + 4096), fds=[region.fd])
    case.dropped(r"exceeds its file")


def test_region_offset_not_page_aligned(case: Case) -> None:
    fe = case.fe
    fe.handshake()
    fe.send(vu.SET_MEM_TABLE, _region_message(fe, 4096, offset=100), fds=[fe.pool.regions[0].fd])
    case.dropped(r"mmap_offset 0x64 is not page aligned")


def test_region_fd_not_a_file(case: Case) -> None:
    fe = case.fe
    fe.handshake()
    r, w = os.pipe()
    try:
        fe.send(vu.SET_MEM_TABLE, _region_message(fe, 4096), fds=[r])
    finally:
        os.close(r)
        os.close(w)
    case.dropped(r"not a regular file")


def test_overlapping_regions(case: Case) -> None:
    fe = case.fe
    fe.handshake()
    region = fe.pool.regions[0]
    one = REGION.pack(region.guest_addr, 8192, region.user_addr, 0)
    two = REGION.pack(region.guest_addr + 4096, 8192, region.user_addr + 4096, 4096)
    fe.send(vu.SET_MEM_TABLE, STATE.pack(2, 0) + one + two, fds=[region.fd, region.fd])
    case.dropped(r"overlaps an existing one")


def test_kick_fd_that_is_not_an_eventfd(case: Case) -> None:
    fe = case.fe
    fe.handshake()
    r, w = os.pipe()
    try:
        fe.send(vu.SET_VRING_KICK, U64.pack(0), fds=[r])
    finally:
        os.close(r)
        os.close(w)
    case.dropped(r"SET_VRING_KICK for ring 0: the fd is not an eventfd")


# -- descriptor chains -----------------------------------------------------------------------


def _get_id(blk: BlkBuilder, first: int) -> object:
    status, _ = blk.request(first, B.T_GET_ID, data=B.ID_BYTES)
    return status


def test_descriptor_address_outside_the_memory_table(case: Case) -> None:
    rd = case.fe.start()
    blk = BlkBuilder(case.fe, rd)
    blk.request(0, B.T_IN, data=512)
    region = case.fe.pool.regions[0]
    rd.desc(1, region.guest_addr + region.size - 256, 512, DESC_F_WRITE | DESC_F_NEXT, 2)
    rd.publish(0)
    case.fe.kick()
    case.dropped(r"queue 0: descriptor 1: guest address 0x[0-9a-f]+\+512 is outside the memory table")
    assert rd.used_idx == 0


def test_chain_that_loops(case: Case) -> None:
    rd = case.fe.start()
    BlkBuilder(case.fe, rd).request(0, B.T_IN, data=512)
    rd.desc(1, *DESC.unpack(bytes(rd._desc[DESC_SIZE : 2 * DESC_SIZE]))[:2], DESC_F_WRITE | DESC_F_NEXT, 1)
    rd.publish(0)
    case.fe.kick()
    case.dropped(r"queue 0: descriptor chain from 0 loops or exceeds the ring")


def test_chain_longer_than_the_ring_via_indirect(case: Case) -> None:
    rd = case.fe.start(size=16)
    blk = BlkBuilder(case.fe, rd)
    hdr = blk.header(B.T_IN)
    data = blk.buffer(512)
    status = blk.buffer(1)
    # 1 header + 16 data + 1 status = 18 > 16 descriptors, all chained with NEXT.
    entries = [(hdr.addr, 16, DESC_F_NEXT, 1)]
    entries += [(data.addr + 32 * k, 32, DESC_F_WRITE | DESC_F_NEXT, k + 2) for k in range(16)]
    entries.append((status.addr, 1, DESC_F_WRITE, 0))
    addr, length = rd.table(entries)
    rd.desc(0, addr, length, DESC_F_INDIRECT)
    rd.publish(0)
    case.fe.kick()
    case.dropped(r"queue 0: indirect chain from 0 loops, or exceeds its table or 16 descriptors")


def test_nested_indirect_table(case: Case) -> None:
    rd = case.fe.start()
    inner_addr, inner_len = rd.table([(0, 0, 0, 0)])
    addr, length = rd.table([(inner_addr, inner_len, DESC_F_INDIRECT, 0)])
    rd.desc(0, addr, length, DESC_F_INDIRECT)
    rd.publish(0)
    case.fe.kick()
    case.dropped(r"nested indirect descriptor")


def test_indirect_together_with_next(case: Case) -> None:
    rd = case.fe.start()
    blk = BlkBuilder(case.fe, rd)
    _get_id(blk, 1)
    addr, length = rd.table([(blk.header(B.T_GET_ID).addr, 16, 0, 0)])
    rd.desc(0, addr, length, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    rd.publish(0)
    case.fe.kick()
    case.dropped(r"indirect descriptor 0 inside a chain")


def test_avail_head_out_of_range(case: Case) -> None:
    rd = case.fe.start()
    rd.publish(64)
    case.fe.kick()
    case.dropped(r"avail head 64 out of range")


def test_avail_index_jumps_beyond_the_ring(case: Case) -> None:
    rd = case.fe.start()
    rd.set_avail_idx(65)
    case.fe.kick()
    case.dropped(r"avail index moved 65 > size")


def test_readable_after_writable(case: Case) -> None:
    rd = case.fe.start()
    blk = BlkBuilder(case.fe, rd)
    blk.request(0, B.T_IN, data=512)
    rd.desc(2, blk.buffer(1).addr, 1, 0, 0)  # the status: device-readable after the data
    rd.publish(0)
    case.fe.kick()
    case.dropped(r"readable descriptor 2 after a writable one")


def test_good_chains_before_a_bad_one_are_completed(case: Case) -> None:
    rd = case.fe.start()
    blk = BlkBuilder(case.fe, rd)
    status, ident = blk.request(0, B.T_GET_ID, data=B.ID_BYTES)
    rd.desc(3, blk.buffer(16).addr, 16, DESC_F_NEXT, 3)  # a chain that loops
    rd.publish(0, 3)
    case.fe.kick()
    case.dropped(r"loops")
    assert rd.used_idx == 1
    assert rd.used_entry(0) == (0, B.ID_BYTES + 1)
    assert bytes(status.view) == bytes([B.S_OK])
    assert ident is not None and bytes(ident.view).rstrip(b"\0") == b"pyvirtio"


# -- bad virtio-blk requests: an error status, and the device goes on ---------------------------


def _run(fe: HostileFrontend, rd_first: int, count: int) -> None:
    fe.kick()
    assert fe.wait_used(0, count), "the request was not completed"


@pytest.mark.parametrize(
    "what, build, status_byte, used_len",
    [
        ("8-byte header", dict(rtype=B.T_IN, data=512, hdr_size=8), B.S_IOERR, 1),
        ("unknown request type", dict(rtype=0x77, data=None), B.S_UNSUPP, 1),
        ("read beyond the capacity", dict(rtype=B.T_IN, sector=CAPACITY // 512, data=512), B.S_IOERR, 1),
        ("length not a multiple of 512", dict(rtype=B.T_OUT, data=b"x" * 100), B.S_IOERR, 1),
        ("status descriptor read-only", dict(rtype=B.T_FLUSH, data=None, status_writable=False), 0xEE, 0),
    ],
)
def test_bad_blk_request_fails_and_the_device_goes_on(
    case: Case, what: str, build: dict[str, object], status_byte: int, used_len: int
) -> None:
    fe = case.fe
    rd = fe.start()
    blk = BlkBuilder(fe, rd)
    status, _ = blk.request(0, **build)  # type: ignore[arg-type]
    rd.publish(0)
    _run(fe, 0, 1)
    assert rd.used_entry(0) == (0, used_len), what
    assert bytes(status.view) == bytes([status_byte]), what
    # The same ring carries on.
    ok = _get_id(blk, 8)
    rd.publish(8)
    _run(fe, 8, 2)
    assert bytes(ok.view) == bytes([B.S_OK])  # type: ignore[attr-defined]
    assert fe.is_open()


def test_write_on_a_readonly_device_fails(tmp_path: pytest.TempPathFactory) -> None:
    server = start_server(str(tmp_path / "ro.sock"), readonly=True)  # type: ignore[operator]
    try:
        with HostileFrontend(server.path) as fe:
            rd = fe.start()
            blk = BlkBuilder(fe, rd)
            write_status, _ = blk.request(0, B.T_OUT, data=b"w" * 512)
            dwz = struct.pack("<QII", 0, 8, 0)
            discard_status, _ = blk.request(4, B.T_DISCARD, data=dwz)
            read_status, _ = blk.request(8, B.T_IN, data=512)
            rd.publish(0, 4, 8)
            _run(fe, 0, 3)
            assert bytes(write_status.view) == bytes([B.S_IOERR])
            assert bytes(discard_status.view) == bytes([B.S_IOERR])
            assert bytes(read_status.view) == bytes([B.S_OK])
        with VirtioBlk.open("vhost-user:" + server.path) as vblk:
            assert vblk.readonly
            assert vblk.read(0, 512) == bytes(512)
    finally:
        server.stop()
        assert server.wait(10)


# -- nothing leaks ----------------------------------------------------------------------------


def _memfd_maps(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"memfd:{name}" in line)


def test_connections_leave_no_fds_or_mappings_behind(server: VhostUserServer) -> None:
    assert_serves(server)
    fds_before = open_fds()  # after a collection: earlier tests' garbage may hold fds
    for k in range(6):
        before = wait_idle(server)
        fe = HostileFrontend(server.path)
        rd = fe.start()
        fe.setup_ring(1, 32)
        if k % 3 == 1:  # dropped for a bad chain while running
            rd.publish(rd.size)
            fe.kick()
            assert fe.expect_closed()
        elif k % 3 == 2:  # a second memory table while rings run
            fe.set_mem_table()
        fe.close()
        wait_reason(server, before)
    assert _memfd_maps("hostile") == 0  # the back end unmapped every region it was given
    assert fds_opened_since(fds_before) == {}
    assert MAX_MEM_SLOTS == 32
