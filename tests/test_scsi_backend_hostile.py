"""The vhost-user-scsi back end against a frontend that sends hostile requests.

A raw frontend (tests/hostile_frontend.py) lays virtio-scsi requests out by
hand: headers too short or split over many descriptors, LUN fields the spec
does not allow, CDBs asking for more data than the buffers hold, LBAs past
the end, malformed UNMAP parameter lists, oversized transfers, unknown
opcodes, event buffers the device could read, short control requests. Each
test asserts the answer (virtio response, SCSI status, sense key / ASC, used
length) and that the device goes on; the module's teardown checks that
pyvirtio's own driver still gets normal service from the same server.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import HostileFrontend  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.drivers.scsi import VirtioScsi, rw_cdb  # noqa: E402
from pyvirtio.memory import Buffer  # noqa: E402
from pyvirtio.spec import scsi as S  # noqa: E402
from pyvirtio.spec import t10 as T  # noqa: E402
from pyvirtio.spec.ring import DESC_F_WRITE  # noqa: E402
from pyvirtio.testing.hostile import RawDriver  # noqa: E402

pytestmark = pytest.mark.timeout(30)

BLOCKS = 2048  # 1 MiB of 512-byte blocks
REQ = 19 + S.CDB_SIZE
RESP = 12 + S.SENSE_SIZE
RQ = S.FIRST_REQUEST_QUEUE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserServer]:
    luns = {
        (0, 0): ram_lun(BLOCKS * 512, max_transfer_blocks=16, max_unmap_descriptors=2, max_unmap_blocks=64),
        (0, 1): ram_lun(BLOCKS * 512, readonly=True),
    }
    backend = ScsiBackend(luns, max_target=3)
    srv = VhostUserServer(str(tmp_path_factory.mktemp("scsi-hostile") / "scsi.sock"), backend)
    srv.start()
    yield srv
    # The same server still serves pyvirtio's own driver normally.
    with VirtioScsi.open(srv.path) as scsi:
        disk = scsi.disk(0, 0)
        data = os.urandom(4096)
        disk.write(8192, data)
        assert disk.read(8192, 4096) == data
    srv.stop()
    assert srv.wait(10)
    backend.close()


class Frontend:
    """A hostile frontend with the control, event and one request ring running."""

    def __init__(self, server: VhostUserServer) -> None:
        self.server = server
        self.backend: ScsiBackend = server.model  # type: ignore[assignment]
        self.fe = HostileFrontend(server.path)
        self.fe.handshake()
        self.fe.set_mem_table()
        self.rings = {q: self.fe.setup_ring(q, 64) for q in (S.CONTROL_QUEUE, S.EVENT_QUEUE, RQ)}
        self.next_desc = {q: 0 for q in self.rings}
        self.done = {q: 0 for q in self.rings}

    def buffer(self, data: bytes | int) -> Buffer:
        size = data if isinstance(data, int) else len(data)
        buf = self.fe.pool.allocate(max(size, 1), align=16)
        buf.view[:] = bytes(len(buf.view)) if isinstance(data, int) else data.ljust(len(buf.view), b"\0")
        return buf

    def send(self, queue: int, parts: list[tuple[Buffer, int, bool]]) -> int:
        """Chain (buffer, length, writable) parts, publish, kick, wait; returns the used length."""
        rd: RawDriver = self.rings[queue]
        first = self.next_desc[queue]
        rd.chain(first, [(b.addr, n, DESC_F_WRITE if w else 0) for b, n, w in parts])
        self.next_desc[queue] = (first + len(parts)) % rd.size
        rd.publish(first)
        self.fe.kick(queue)
        self.done[queue] += 1
        assert self.fe.wait_used(queue, self.done[queue]), "the request was not completed"
        return rd.used_entry(self.done[queue] - 1)[1]

    def command(
        self,
        cdb: bytes,
        *,
        lun8: bytes = S.lun_address(0, 0),
        data_out: bytes | None = None,
        data_in: int = 0,
        req_size: int = REQ,
        resp_size: int = RESP,
        split_header: bool = False,
    ) -> tuple[int, tuple[int, int, int, int, int], bytes, bytes]:
        """One command: (used length, response header fields, sense, data-in)."""
        header = (S.CMD_REQ_HDR.pack(lun8, 7, 0, 0, 0) + cdb.ljust(S.CDB_SIZE, b"\0"))[:req_size]
        parts: list[tuple[Buffer, int, bool]] = []
        if split_header:
            for i in range(len(header)):  # one descriptor per byte
                parts.append((self.buffer(header[i : i + 1]), 1, False))
        else:
            parts.append((self.buffer(header), len(header), False))
        if data_out is not None:
            parts.append((self.buffer(data_out), len(data_out), False))
        resp = self.buffer(b"\xee" * resp_size)
        parts.append((resp, resp_size, True))
        din = self.buffer(data_in) if data_in else None
        if din is not None:
            parts.append((din, data_in, True))
        used = self.send(RQ, parts)
        raw = bytes(resp.view[:resp_size])
        fields = S.CMD_RESP_HDR.unpack_from(raw) if resp_size >= 12 else (0, 0, 0, 0, 0)
        sense = raw[12 : 12 + fields[0]] if resp_size >= 12 else b""
        return used, fields, sense, bytes(din.view[:data_in]) if din is not None else b""

    def good(self, cdb: bytes, **kw: object) -> bytes:
        _used, (_sl, _resid, _q, status, response), sense, data = self.command(cdb, **kw)  # type: ignore[arg-type]
        assert (response, status) == (S.S_OK, T.GOOD), (response, status, T.parse_sense(sense))
        return data

    def close(self) -> None:
        self.fe.close()


@pytest.fixture
def fe(server: VhostUserServer) -> Iterator[Frontend]:
    f = Frontend(server)
    # A fresh LUN state per test: no leftover unit attention.
    for unit in f.backend.luns.values():
        unit.pending_ua.clear()
    try:
        yield f
        assert f.fe.is_open(), "the back end dropped the connection"
        # The device goes on: an ordinary command still works on the same ring.
        f.good(bytes(6))
    finally:
        f.close()
    deadline = time.monotonic() + 5
    while server.finished < server.connections:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def check_condition(fe: Frontend, cdb: bytes, key: int, code: tuple[int, int], **kw: object) -> None:
    _used, (sense_len, _r, _q, status, response), sense, _d = fe.command(cdb, **kw)  # type: ignore[arg-type]
    assert (response, status) == (S.S_OK, T.CHECK_CONDITION)
    parsed = T.parse_sense(sense)
    assert parsed is not None and sense_len == len(sense)
    assert (parsed.key, (parsed.asc, parsed.ascq)) == (key, code), parsed


# -- framing -------------------------------------------------------------------------------


def test_header_split_one_byte_per_descriptor(fe: Frontend) -> None:
    data = fe.good(bytes([T.INQUIRY, 0, 0, 0, 36, 0]), data_in=36, split_header=True)
    assert data[8:16] == b"PYVIRTIO"


def test_header_too_short(fe: Frontend, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "pyvirtio.backends.scsi"):
        used, fields, _s, _d = fe.command(bytes(6), req_size=40)
    assert used == RESP and fields[4] == S.S_FAILURE
    assert "request header of 40 bytes" in caplog.text


def test_response_buffer_too_small(fe: Frontend) -> None:
    used, _f, _s, _d = fe.command(bytes(6), resp_size=50)
    assert used == 0  # nowhere to answer: completed empty


def test_data_in_overrun(fe: Frontend) -> None:
    used, fields, _s, _d = fe.command(rw_cdb(False, 0, 2), data_in=512)
    assert fields[4] == S.S_OVERRUN and used == RESP


def test_data_out_overrun(fe: Frontend) -> None:
    _u, fields, _s, _d = fe.command(rw_cdb(True, 0, 2), data_out=bytes(512))
    assert fields[4] == S.S_OVERRUN


def test_allocation_length_larger_than_the_buffer_is_fine_when_the_data_fits(fe: Frontend) -> None:
    used, fields, _s, data = fe.command(bytes([T.INQUIRY, 0, 0, 0, 255, 0]), data_in=100)
    assert fields[3:] == (T.GOOD, S.S_OK) and fields[1] == 100 - 36 and used == RESP + 36


# -- addressing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lun8, response",
    [
        (bytes([2, 0, 0, 0, 0, 0, 0, 0]), S.S_BAD_TARGET),  # lun[0] must be 1
        (bytes([1, 3, 0, 0, 0, 0, 0, 0]), S.S_BAD_TARGET),  # no such target
        (bytes([1, 0, 0, 0, 0, 0, 0, 1]), S.S_INCORRECT_LUN),  # not single-level
        (bytes([1, 0, 0x81, 0, 0, 0, 0, 0]), S.S_INCORRECT_LUN),  # address method 2
        (bytes([1, 0, 0x05, 0, 0, 0, 0, 0]), S.S_INCORRECT_LUN),  # a bus number
    ],
)
def test_bad_lun_fields(fe: Frontend, lun8: bytes, response: int) -> None:
    _u, fields, _s, _d = fe.command(bytes(6), lun8=lun8)
    assert fields[4] == response


def test_missing_lun_on_a_present_target(fe: Frontend) -> None:
    data = fe.good(bytes([T.INQUIRY, 0, 0, 0, 36, 0]), lun8=S.lun_address(0, 9), data_in=36)
    assert data[0] == 0x7F  # qualifier 3, type 0x1F
    lst = fe.good(bytes([T.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0]), lun8=S.lun_address(0, 9), data_in=256)
    assert lst[:4] == struct.pack(">I", 16) and lst[8:10] == b"\0\0" and lst[16:18] == b"\0\1"
    check_condition(fe, bytes(6), T.ILLEGAL_REQUEST, T.ASC_LUN_NOT_SUPPORTED, lun8=S.lun_address(0, 9))


# -- CDBs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what, cdb, kw, key, code",
    [
        ("unknown opcode", bytes([0xC0]) + bytes(15), {}, T.ILLEGAL_REQUEST, T.ASC_INVALID_OPCODE),
        ("WRITE SAME(10) unsupported", bytes([T.WRITE_SAME_10]) + bytes(9), {}, T.ILLEGAL_REQUEST,
         T.ASC_INVALID_OPCODE),
        ("read past the end", rw_cdb(False, BLOCKS, 1), {"data_in": 512}, T.ILLEGAL_REQUEST, T.ASC_LBA_OUT_OF_RANGE),
        ("LBA wraps", rw_cdb(False, (1 << 64) - 1, 2, force16=True), {"data_in": 1024}, T.ILLEGAL_REQUEST,
         T.ASC_LBA_OUT_OF_RANGE),
        ("above max transfer", rw_cdb(False, 0, 17), {"data_in": 17 * 512}, T.ILLEGAL_REQUEST,
         T.ASC_INVALID_FIELD_IN_CDB),
        ("page code without EVPD", bytes([T.INQUIRY, 0, 0x80, 0, 36, 0]), {"data_in": 36}, T.ILLEGAL_REQUEST,
         T.ASC_INVALID_FIELD_IN_CDB),
        ("unknown VPD page", bytes([T.INQUIRY, 1, 0xC7, 0, 36, 0]), {"data_in": 36}, T.ILLEGAL_REQUEST,
         T.ASC_INVALID_FIELD_IN_CDB),
        ("REPORT LUNS allocation < 16", bytes([T.REPORT_LUNS]) + bytes(8) + b"\x08", {"data_in": 8},
         T.ILLEGAL_REQUEST, T.ASC_INVALID_FIELD_IN_CDB),
        ("REPORT LUNS select 9", bytes([T.REPORT_LUNS, 0, 9, 0, 0, 0, 0, 0, 1, 0]), {"data_in": 256},
         T.ILLEGAL_REQUEST, T.ASC_INVALID_FIELD_IN_CDB),
        ("WRITE SAME of 0 blocks", bytes([T.WRITE_SAME_16, 0]) + bytes(14), {"data_out": bytes(512)},
         T.ILLEGAL_REQUEST, T.ASC_INVALID_FIELD_IN_CDB),
        ("MODE SENSE saved values", bytes([T.MODE_SENSE_6, 0, 0xC8, 0, 64, 0]), {"data_in": 64}, T.ILLEGAL_REQUEST,
         T.ASC_SAVING_PARAMETERS_NOT_SUPPORTED),
        ("READ CAPACITY service action 0x11", bytes([T.SERVICE_ACTION_IN_16, 0x11]) + bytes(14), {"data_in": 32},
         T.ILLEGAL_REQUEST, T.ASC_INVALID_FIELD_IN_CDB),
    ],
)
def test_bad_cdb(fe: Frontend, what: str, cdb: bytes, kw: dict[str, object], key: int, code: tuple[int, int]) -> None:
    check_condition(fe, cdb, key, code, **kw)


def _unmap(
    descs: list[tuple[int, int]], *, plen: int | None = None, desc_len: int | None = None
) -> tuple[bytes, bytes]:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
    params = struct.pack(">HH4x", 6 + len(body), len(body) if desc_len is None else desc_len) + body
    n = len(params) if plen is None else plen
    return bytes([T.UNMAP, 0, 0, 0, 0, 0, 0]) + struct.pack(">H", n) + b"\0", params


@pytest.mark.parametrize(
    "what, descs, extra, code",
    [
        ("parameter list shorter than its header", [], {"plen": 4}, T.ASC_PARAMETER_LIST_LENGTH_ERROR),
        ("descriptor length not a multiple of 16", [(0, 1)], {"desc_len": 15}, T.ASC_PARAMETER_LIST_LENGTH_ERROR),
        ("descriptors past the list", [(0, 1)], {"desc_len": 32}, T.ASC_PARAMETER_LIST_LENGTH_ERROR),
        ("more descriptors than allowed", [(0, 1), (2, 1), (4, 1)], {}, T.ASC_INVALID_FIELD_IN_PARAMETER_LIST),
        ("more blocks than allowed", [(0, 65)], {}, T.ASC_INVALID_FIELD_IN_PARAMETER_LIST),
        ("past the end", [(BLOCKS - 1, 2)], {}, T.ASC_LBA_OUT_OF_RANGE),
    ],
)
def test_bad_unmap(fe: Frontend, what: str, descs: list[tuple[int, int]], extra: dict[str, int],
                   code: tuple[int, int]) -> None:
    fe.good(rw_cdb(True, 0, 1), data_out=b"\x77" * 512)
    cdb, params = _unmap(descs, **extra)
    check_condition(fe, cdb, T.ILLEGAL_REQUEST, code, data_out=params)
    assert fe.good(rw_cdb(False, 0, 1), data_in=512) == b"\x77" * 512  # nothing was unmapped


def test_unmap_parameter_list_longer_than_the_buffer(fe: Frontend) -> None:
    cdb, params = _unmap([(0, 1)], plen=200)
    _u, fields, _s, _d = fe.command(cdb, data_out=params)
    assert fields[4] == S.S_OVERRUN


def test_writes_to_a_write_protected_lun(fe: Frontend) -> None:
    ro = S.lun_address(0, 1)
    check_condition(fe, rw_cdb(True, 0, 1), T.DATA_PROTECT, T.ASC_WRITE_PROTECTED, lun8=ro, data_out=bytes(512))
    cdb, params = _unmap([(0, 1)])
    check_condition(fe, cdb, T.DATA_PROTECT, T.ASC_WRITE_PROTECTED, lun8=ro, data_out=params)
    mode = fe.good(bytes([T.MODE_SENSE_6, 0x08, 0x3F, 0, 4, 0]), lun8=ro, data_in=4)
    assert mode[2] & 0x80  # WP


def test_every_read_write_size(fe: Frontend) -> None:
    """READ / WRITE (6), (10), (12), (16) all reach the same blocks; READ(6) length 0 means 256."""
    writes = [
        bytes([T.WRITE_6, 0, 0, 10, 1, 0]),
        bytes([T.WRITE_10, 0]) + struct.pack(">I", 11) + b"\0\0\1\0",
        bytes([T.WRITE_12, 0]) + struct.pack(">II", 12, 1) + b"\0\0",
        bytes([T.WRITE_16, 0]) + struct.pack(">QI", 13, 1) + b"\0\0",
    ]
    for k, cdb in enumerate(writes):
        fe.good(cdb, data_out=bytes([k + 1]) * 512)
    got = fe.good(bytes([T.READ_12, 0]) + struct.pack(">II", 10, 4) + b"\0\0", data_in=2048)
    assert got == b"".join(bytes([k + 1]) * 512 for k in range(4))
    # LUN 0:1 has no small transfer limit: 256 blocks asked for, a 512-byte buffer given.
    _u, fields, _s, _d = fe.command(bytes([T.READ_6, 0, 0, 0, 0, 0]), data_in=512, lun8=S.lun_address(0, 1))
    assert fields[4] == S.S_OVERRUN


def test_report_luns_and_capacity(fe: Frontend) -> None:
    lst = fe.good(bytes([T.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0]), data_in=256)
    assert struct.unpack(">I", lst[:4])[0] == 16
    cap10 = fe.good(bytes([T.READ_CAPACITY_10]) + bytes(9), data_in=8)
    assert struct.unpack(">II", cap10) == (BLOCKS - 1, 512)
    cap16 = fe.good(bytes([T.SERVICE_ACTION_IN_16, 0x10]) + bytes(8) + struct.pack(">I", 32) + b"\0\0", data_in=32)
    assert struct.unpack(">QI", cap16[:12]) == (BLOCKS - 1, 512) and cap16[14] & 0x80  # LBPME
    modes = fe.good(bytes([T.MODE_SENSE_10, 0x10, 0x3F, 0, 0, 0, 0, 0, 255, 0]), data_in=255)
    assert modes[4] & 1 and struct.unpack(">H", modes[6:8])[0] == 16  # long LBA descriptor


def test_request_sense_returns_and_clears_a_unit_attention(fe: Frontend) -> None:
    fe.backend.luns[(0, 0)].pending_ua.append(T.ASC_BUS_DEVICE_RESET)
    sense = fe.good(bytes([T.REQUEST_SENSE, 1, 0, 0, 64, 0]), data_in=64)  # DESC=1: descriptor format
    parsed = T.parse_sense(sense)
    assert parsed is not None and parsed.format == "descriptor"
    assert (parsed.key, parsed.asc, parsed.ascq) == (T.UNIT_ATTENTION, 0x29, 0x03)
    fe.good(bytes(6))  # cleared


# -- control and event queues -------------------------------------------------------------------


def _tmf(fe: Frontend, subtype: int, lun8: bytes, size: int = S.CTRL_TMF_REQ.size) -> tuple[int, int]:
    req = fe.buffer(S.CTRL_TMF_REQ.pack(S.T_TMF, subtype, lun8, 99)[:size])
    resp = fe.buffer(b"\xee")
    used = fe.send(S.CONTROL_QUEUE, [(req, size, False), (resp, 1, True)])
    return used, resp.view[0]


def test_task_management(fe: Frontend) -> None:
    assert _tmf(fe, S.T_TMF_LOGICAL_UNIT_RESET, S.lun_address(0, 0)) == (1, S.S_OK)
    check_condition(fe, bytes(6), T.UNIT_ATTENTION, T.ASC_BUS_DEVICE_RESET)
    assert _tmf(fe, S.T_TMF_ABORT_TASK, S.lun_address(0, 0)) == (1, S.S_OK)
    assert _tmf(fe, S.T_TMF_LOGICAL_UNIT_RESET, S.lun_address(3, 0)) == (1, S.S_BAD_TARGET)
    assert _tmf(fe, S.T_TMF_LOGICAL_UNIT_RESET, S.lun_address(0, 5)) == (1, S.S_INCORRECT_LUN)
    assert _tmf(fe, 77, S.lun_address(0, 0)) == (1, S.S_FUNCTION_REJECTED)
    assert _tmf(fe, S.T_TMF_ABORT_TASK, S.lun_address(0, 0), size=12) == (0, 0xEE)  # too short: ignored


def test_async_notification_query(fe: Frontend) -> None:
    req = fe.buffer(S.CTRL_AN_REQ.pack(S.T_AN_QUERY, S.lun_address(0, 0), 0xFF))
    resp = fe.buffer(b"\xee" * S.CTRL_AN_RESP.size)
    used = fe.send(S.CONTROL_QUEUE, [(req, S.CTRL_AN_REQ.size, False), (resp, S.CTRL_AN_RESP.size, True)])
    assert used == S.CTRL_AN_RESP.size
    assert S.CTRL_AN_RESP.unpack(bytes(resp.view)) == (0, S.S_OK)  # no notification supported


def test_event_buffers_wait_for_an_event(fe: Frontend) -> None:
    good = fe.buffer(S.EVENT.size)
    rd = fe.rings[S.EVENT_QUEUE]
    rd.chain(0, [(good.addr, S.EVENT.size, DESC_F_WRITE)])
    rd.publish(0)
    fe.fe.kick(S.EVENT_QUEUE)
    assert not fe.fe.wait_used(S.EVENT_QUEUE, 1, timeout=0.2)  # posted, not consumed: no event yet
    fe.backend.push_event(S.T_ASYNC_NOTIFY, 0, 0, 42)
    assert fe.fe.wait_used(S.EVENT_QUEUE, 1)
    assert S.EVENT.unpack(bytes(good.view)) == (S.T_ASYNC_NOTIFY, S.lun_address(0, 0), 42)
    fe.done[S.EVENT_QUEUE] = 1


def test_event_buffer_the_device_could_read_is_refused(fe: Frontend) -> None:
    bad = fe.buffer(S.EVENT.size)
    rd = fe.rings[S.EVENT_QUEUE]
    rd.chain(0, [(bad.addr, S.EVENT.size, 0)])  # readable: not an event buffer
    rd.publish(0)
    fe.backend.push_event(S.T_ASYNC_NOTIFY, 0, 0, 1)
    assert fe.fe.wait_used(S.EVENT_QUEUE, 1)
    assert rd.used_entry(0) == (0, 0)
    assert fe.backend.pending(S.EVENT_QUEUE) == 1  # the event was kept for a proper buffer
    fe.done[S.EVENT_QUEUE] = 1
    fe.backend.reset()


def test_short_control_request(fe: Frontend) -> None:
    req = fe.buffer(b"\0\0")
    resp = fe.buffer(b"\xee")
    assert fe.send(S.CONTROL_QUEUE, [(req, 2, False), (resp, 1, True)]) == 0
    assert resp.view[0] == 0xEE


def test_sense_and_cdb_sizes_can_be_set_within_bounds() -> None:
    backend = ScsiBackend({(0, 0): ram_lun(1 << 20)})
    try:
        backend.set_config(20, struct.pack("<I", 32))
        assert backend.sense_size == 32
        for offset, value in ((24, 8), (24, 300), (0, 4), (20, 1000)):
            with pytest.raises(ValueError):
                backend.set_config(offset, struct.pack("<I", value))
        backend.reset()
        assert (backend.sense_size, backend.cdb_size) == (S.SENSE_SIZE, S.CDB_SIZE)
    finally:
        backend.close()
