"""Tests for pyvirtio.protocol.vhost_user: the sans-I/O vhost-user codec.

The fds used here are plain numbers (the codec never touches them), except
in the close_pending_fds test, which uses real pipes.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.errors import (
    DeviceError,
    DeviceProtocolError,
    DriverProtocolError,
    InvalidArgument,
    PyvirtioError,
)
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.protocol import vhost_user_decode as vu_decode
from pyvirtio.protocol.vhost_user import (
    BackendCodec,
    ConfigSpace,
    FrontendCodec,
    InflightInfo,
    LogInfo,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    Outgoing,
    RequestPayload,
    VringAddr,
    VringFile,
    VringState,
)

FE = FrontendCodec()
BE = BackendCodec()

REGION = MemRegion(0x1000_0000, 0x400_0000, 0x7F00_0000_0000, 0x2000)
REGIONS = tuple(MemRegion(i << 30, 1 << 30, 0x7F00_0000_0000 + (i << 30), 0) for i in range(8))
ADDR = VringAddr(3, vu.VRING_F_LOG, 0x7F00_1000, 0x7F00_3000, 0x7F00_2000, 0x5000)
INFLIGHT = InflightInfo(0x10000, 0x40, 4, 256)


def frame(request: int, flags: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
    return Message(request, flags, payload, tuple(fds))


def through_reader(out: Outgoing, error: type[PyvirtioError] = DriverProtocolError) -> Message:
    reader = MessageReader(error)
    reader.feed(out.data, out.fds)
    msg = reader.next_message()
    assert msg is not None
    assert reader.next_message() is None
    assert reader.buffered == 0
    return msg


def reply_message(
    request: int, payload: bytes, fds: Sequence[int] = (), flags: int = vu.VERSION | vu.REPLY
) -> Message:
    return frame(request, flags, payload, fds)


# -- constants ------------------------------------------------------------------------


def test_request_codes_match_the_spec() -> None:
    expected = {
        "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4, "SET_MEM_TABLE": 5,
        "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9,
        "SET_VRING_BASE": 10, "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13,
        "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16,
        "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18, "SEND_RARP": 19, "NET_SET_MTU": 20,
        "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23, "GET_CONFIG": 24,
        "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
        "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
        "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
        "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39,
        "GET_STATUS": 40, "GET_SHARED_OBJECT": 41, "SET_DEVICE_STATE_FD": 42, "CHECK_DEVICE_STATE": 43,
    }  # fmt: skip
    for name, code in expected.items():
        assert getattr(vu, name) == code, name
        assert vu.REQUEST_NAMES[code] == name
    assert len(vu.REQUEST_NAMES) == len(expected)


def test_protocol_feature_bits_match_the_spec() -> None:
    names = [
        "MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "CROSS_ENDIAN",
        "CRYPTO_SESSION", "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD", "HOST_NOTIFIER",
        "INFLIGHT_SHMFD", "RESET_DEVICE", "INBAND_NOTIFICATIONS", "CONFIGURE_MEM_SLOTS", "STATUS",
        "XEN_MMAP", "SHARED_OBJECT", "DEVICE_STATE",
    ]  # fmt: skip
    for bit, name in enumerate(names):
        assert getattr(vu, f"PROTOCOL_F_{name}") == bit
        assert vu.PROTOCOL_FEATURE_NAMES[bit] == name


def test_protocol_feature_names() -> None:
    assert vu.protocol_feature_names(0) == []
    mask = 1 << vu.PROTOCOL_F_MQ | 1 << vu.PROTOCOL_F_REPLY_ACK | 1 << vu.PROTOCOL_F_CONFIG | 1 << 40
    assert vu.protocol_feature_names(mask) == ["MQ", "REPLY_ACK", "CONFIG", "bit 40"]


def test_header_constants() -> None:
    assert (vu.VERSION, vu.VERSION_MASK, vu.REPLY, vu.NEED_REPLY) == (1, 3, 4, 8)
    assert (vu.VRING_IDX_MASK, vu.VRING_NOFD_MASK) == (0xFF, 0x100)
    assert vu.HEADER_SIZE == 12
    assert vu.VHOST_MEMORY_BASELINE_NREGIONS == 8
    assert vu.MAX_PAYLOAD >= 8 + 8 * 32 and vu.MAX_PAYLOAD >= 12 + 256
    assert vu.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert vu.request_name(999) == "request 999"


def test_wire_layout_is_native_packed() -> None:
    out = FE.set_vring_addr(ADDR)
    assert out.data[:12] == struct.pack("=III", vu.SET_VRING_ADDR, vu.VERSION, 40)
    assert len(out.data) == 12 + 40
    assert len(FE.set_mem_table(REGIONS[:3], [3, 4, 5]).data) == 12 + 8 + 3 * 32
    assert len(FE.get_inflight_fd(2, 128).data) == 12 + 24
    assert len(FE.add_mem_reg(REGION, 3).data) == 12 + 40


_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/vhost_types.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu\n",
           sizeof(struct vhost_vring_state), sizeof(struct vhost_vring_addr),
           offsetof(struct vhost_vring_addr, desc_user_addr),
           offsetof(struct vhost_vring_addr, log_guest_addr),
           sizeof(struct vhost_memory_region), offsetof(struct vhost_memory, regions));
    return 0;
}
"""


@pytest.mark.skipif(
    shutil.which("cc") is None or not Path("/usr/include/linux/vhost_types.h").exists(),
    reason="needs a C compiler and linux/vhost_types.h",
)
def test_layouts_match_linux_headers(tmp_path: Path) -> None:
    src = tmp_path / "probe.c"
    src.write_text(_PROBE)
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    state, addr, desc_off, log_off, region, regions_off = map(int, out.split())
    assert state == 8 == len(FE.set_vring_num(0, 1).data) - 12
    assert addr == 40 == len(FE.set_vring_addr(ADDR).data) - 12
    assert (desc_off, log_off) == (8, 32)
    assert region == 32
    assert regions_off == 8


# -- round trips: front end encode -> reader -> back end decode --------------------------


RoundTrip = tuple[str, Callable[[], Outgoing], RequestPayload, tuple[int, ...], bool]

ROUND_TRIPS: list[RoundTrip] = [
    ("GET_FEATURES", FE.get_features, None, (), True),
    ("SET_FEATURES", lambda: FE.set_features(1 << 32 | 1 << 30), 1 << 32 | 1 << 30, (), False),
    ("SET_OWNER", FE.set_owner, None, (), False),
    ("RESET_OWNER", FE.reset_owner, None, (), False),
    (
        "SET_MEM_TABLE",
        lambda: FE.set_mem_table(REGIONS, range(10, 18)),
        MemTable(REGIONS),
        tuple(range(10, 18)),
        False,
    ),
    ("SET_LOG_BASE", lambda: FE.set_log_base(4096, 64, 9), LogInfo(4096, 64), (9,), True),
    ("SET_LOG_FD", lambda: FE.set_log_fd(9), None, (9,), False),
    ("SET_VRING_NUM", lambda: FE.set_vring_num(1, 256), VringState(1, 256), (), False),
    ("SET_VRING_ADDR", lambda: FE.set_vring_addr(ADDR), ADDR, (), False),
    ("SET_VRING_BASE", lambda: FE.set_vring_base(2, 0xFFFF), VringState(2, 0xFFFF), (), False),
    ("GET_VRING_BASE", lambda: FE.get_vring_base(255), VringState(255, 0), (), True),
    ("SET_VRING_KICK", lambda: FE.set_vring_kick(5, 7), VringFile(5, False), (7,), False),
    ("SET_VRING_CALL", lambda: FE.set_vring_call(0, None), VringFile(0, True), (), False),
    ("SET_VRING_ERR", lambda: FE.set_vring_err(1, 8), VringFile(1, False), (8,), False),
    ("GET_PROTOCOL_FEATURES", FE.get_protocol_features, None, (), True),
    ("SET_PROTOCOL_FEATURES", lambda: FE.set_protocol_features(0x209), 0x209, (), False),
    ("GET_QUEUE_NUM", FE.get_queue_num, None, (), True),
    ("SET_VRING_ENABLE", lambda: FE.set_vring_enable(3, True), VringState(3, 1), (), False),
    ("SEND_RARP", lambda: FE.send_rarp(b"\x52\x54\x00\x12\x34\x56"), b"\x52\x54\x00\x12\x34\x56", (), False),
    ("NET_SET_MTU", lambda: FE.net_set_mtu(9000), 9000, (), False),
    ("SET_BACKEND_REQ_FD", lambda: FE.set_backend_req_fd(11), None, (11,), False),
    ("SET_VRING_ENDIAN", lambda: FE.set_vring_endian(0, True), VringState(0, 1), (), False),
    ("GET_CONFIG", lambda: FE.get_config(20, 4), ConfigSpace(20, 4, 0, bytes(4)), (), True),
    ("SET_CONFIG", lambda: FE.set_config(32, b"\x01", flags=1), ConfigSpace(32, 1, 1, b"\x01"), (), False),
    ("CLOSE_CRYPTO_SESSION", lambda: FE.close_crypto_session(77), 77, (), False),
    ("GET_INFLIGHT_FD", lambda: FE.get_inflight_fd(4, 256), InflightInfo(0, 0, 4, 256), (), True),
    ("SET_INFLIGHT_FD", lambda: FE.set_inflight_fd(INFLIGHT, 12), INFLIGHT, (12,), False),
    ("GPU_SET_SOCKET", lambda: FE.gpu_set_socket(13), None, (13,), False),
    ("RESET_DEVICE", FE.reset_device, None, (), False),
    ("VRING_KICK", lambda: FE.vring_kick(4), VringState(4, 0), (), False),
    ("GET_MAX_MEM_SLOTS", FE.get_max_mem_slots, None, (), True),
    ("ADD_MEM_REG", lambda: FE.add_mem_reg(REGION, 14), REGION, (14,), False),
    ("REM_MEM_REG", lambda: FE.rem_mem_reg(REGION), REGION, (), False),
    ("SET_STATUS", lambda: FE.set_status(0x0F), 0x0F, (), False),
    ("GET_STATUS", FE.get_status, None, (), True),
    ("CHECK_DEVICE_STATE", FE.check_device_state, None, (), True),
]


def test_round_trips_cover_every_supported_request() -> None:
    covered = {getattr(vu, name) for name, *_ in ROUND_TRIPS}
    assert covered == set(vu_decode.RULES)


@pytest.mark.parametrize(
    ("name", "make", "expected", "fds", "expects_reply"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS]
)
def test_round_trip(
    name: str,
    make: Callable[[], Outgoing],
    expected: RequestPayload,
    fds: tuple[int, ...],
    expects_reply: bool,
) -> None:
    out = make()
    assert out.request == getattr(vu, name)
    assert out.name == name
    assert out.fds == fds
    assert out.expects_reply is expects_reply
    msg = through_reader(out)
    assert msg.request == out.request
    assert msg.flags == vu.VERSION
    assert not msg.need_reply and not msg.is_reply
    assert msg.fds == fds
    assert msg.to_bytes() == out.data
    assert vu.decode_request(msg) == expected
    assert BE.decode_request(msg) == expected


def test_rem_mem_reg_may_carry_one_fd() -> None:
    out = FE.rem_mem_reg(REGION, 5)
    msg = through_reader(out)
    assert msg.fds == (5,)
    assert vu.decode_request(msg) == REGION


def test_need_reply_sets_flag_and_acks_round_trip() -> None:
    out = FE.set_features(1, need_reply=True)
    assert out.expects_reply
    msg = through_reader(out)
    assert msg.need_reply and msg.flags == vu.VERSION | vu.NEED_REPLY
    assert vu.decode_request(msg) == 1
    ack = through_reader(BE.encode_ack(msg.request, True), DeviceProtocolError)
    assert ack.is_reply
    value = FE.parse_reply(out, ack)
    assert value == 0
    vu.check_ack(out.request, value)
    nack = through_reader(BE.encode_ack(msg.request, False), DeviceProtocolError)
    value = FE.parse_reply(out, nack)
    assert value == 1
    with pytest.raises(DeviceError, match="refused SET_FEATURES"):
        vu.check_ack(out.request, value)


def test_natural_reply_requests_never_set_need_reply() -> None:
    for out in (FE.get_features(), FE.get_vring_base(0), FE.get_config(0, 8), FE.set_log_base(1, 0, 3)):
        assert out.expects_reply
        assert struct.unpack_from("=I", out.data, 4)[0] == vu.VERSION


def test_mem_table_padded_to_eight_regions_is_accepted() -> None:
    # SPDK sends the whole C struct (8 regions) whatever nregions says.
    regions = b"".join(
        struct.pack("=QQQQ", r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        for r in REGIONS
    )
    payload = struct.pack("=II", 2, 0) + regions
    msg = frame(vu.SET_MEM_TABLE, vu.VERSION, payload, (3, 4))
    assert vu.decode_request(msg) == MemTable(REGIONS[:2])


# -- replies: back end encode -> reader -> front end parse ------------------------------------


def parse_via_reader(sent: Outgoing, reply: Outgoing) -> vu.ReplyValue:
    return FE.parse_reply(sent, through_reader(reply, DeviceProtocolError))


@pytest.mark.parametrize(
    ("sent", "value"),
    [
        (FE.get_features(), 1 << 32 | 1 << 30 | 1 << 28),
        (FE.get_protocol_features(), 0x8E2B),
        (FE.get_queue_num(), 2),
        (FE.get_max_mem_slots(), 32),
        (FE.get_status(), 0x0F),
        (FE.check_device_state(), 0),
        (FE.set_log_base(4096, 0, 3), 4096),
        (FE.get_vring_base(1), VringState(1, 0x1234)),
    ],
    ids=lambda v: v.name if isinstance(v, Outgoing) else "",
)
def test_reply_round_trip(sent: Outgoing, value: vu.ReplyValue) -> None:
    assert parse_via_reader(sent, BE.encode_reply(sent.request, value)) == value


def test_get_config_reply_round_trip() -> None:
    sent = FE.get_config(16, 8)
    reply = ConfigSpace(16, 8, 0, bytes(range(8)))
    assert parse_via_reader(sent, BE.encode_reply(vu.GET_CONFIG, reply)) == reply


def test_get_config_refusal_is_a_device_error_not_a_protocol_error() -> None:
    sent = FE.get_config(0, 60)
    with pytest.raises(DeviceError, match="refused GET_CONFIG") as info:
        parse_via_reader(sent, BE.encode_reply(vu.GET_CONFIG, None))
    assert not isinstance(info.value, DeviceProtocolError)


def test_get_inflight_fd_reply_round_trip() -> None:
    sent = FE.get_inflight_fd(4, 256)
    reply = BE.encode_reply(vu.GET_INFLIGHT_FD, INFLIGHT, fds=[21])
    msg = through_reader(reply, DeviceProtocolError)
    assert msg.fds == (21,)
    assert FE.parse_reply(sent, msg) == INFLIGHT


def test_inflight_reply_without_area_is_a_refusal() -> None:
    sent = FE.get_inflight_fd(4, 256)
    with pytest.raises(DeviceError, match="inflight"):
        parse_via_reader(sent, BE.encode_reply(vu.GET_INFLIGHT_FD, InflightInfo(0, 0, 4, 256)))


def test_reply_tolerates_need_reply_flag_echo() -> None:
    msg = reply_message(vu.GET_FEATURES, struct.pack("=Q", 5), flags=vu.VERSION | vu.REPLY | vu.NEED_REPLY)
    assert vu.parse_reply(vu.GET_FEATURES, msg) == 5


# -- malformed replies -----------------------------------------------------------------------


U64_REPLY = struct.pack("=Q", 1)


@pytest.mark.parametrize(
    ("code", "msg", "match"),
    [
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, U64_REPLY, flags=vu.VERSION), "flags 0x1"),
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, U64_REPLY, flags=0x2 | vu.REPLY), "flags 0x6"),
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, U64_REPLY, flags=0x15), "flags 0x15"),
        (vu.GET_FEATURES, reply_message(vu.GET_PROTOCOL_FEATURES, U64_REPLY), "carries request code 15"),
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, b"\x01" * 4), "must be 8 bytes, got 4"),
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, b""), "must be 8 bytes, got 0"),
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, U64_REPLY + b"\0"), "got 9"),
        (vu.GET_FEATURES, reply_message(vu.GET_FEATURES, U64_REPLY, fds=(5,)), "unexpected file descriptor"),
        (vu.SET_OWNER, reply_message(vu.SET_OWNER, b""), "must be 8 bytes"),
        (vu.GET_VRING_BASE, reply_message(vu.GET_VRING_BASE, b"\0" * 12), "must be 8 bytes"),
        (vu.GET_STATUS, reply_message(vu.GET_STATUS, struct.pack("=Q", 0x100)), "8 bits"),
        (vu.GET_INFLIGHT_FD, reply_message(vu.GET_INFLIGHT_FD, b"\0" * 20), "must be 24 bytes"),
        (
            vu.GET_INFLIGHT_FD,
            reply_message(vu.GET_INFLIGHT_FD, struct.pack("=QQHH4x", 4096, 0, 1, 8)),
            "expected 1",
        ),
        (
            vu.GET_INFLIGHT_FD,
            reply_message(vu.GET_INFLIGHT_FD, struct.pack("=QQHH4x", 4096, 0, 1, 8), (3, 4)),
            "got 2",
        ),
        (
            vu.GET_INFLIGHT_FD,
            reply_message(vu.GET_INFLIGHT_FD, struct.pack("=QQHH4x", 0, 0, 1, 8), (3,)),
            "empty",
        ),
    ],
)
def test_malformed_reply(code: int, msg: Message, match: str) -> None:
    with pytest.raises(DeviceProtocolError, match=match):
        vu.parse_reply(code, msg)


def test_get_vring_base_reply_for_another_ring() -> None:
    sent = FE.get_vring_base(1)
    with pytest.raises(DeviceProtocolError, match="ring index 2, asked for 1"):
        FE.parse_reply(sent, reply_message(vu.GET_VRING_BASE, struct.pack("=II", 2, 0)))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (struct.pack("=III", 0, 4, 0) + bytes(4), "asked for offset 0 size 8"),  # smaller than asked
        (struct.pack("=III", 4, 8, 0) + bytes(8), "offset 4 size 8, asked for offset 0"),
        (struct.pack("=III", 0, 8, 0) + bytes(4), "size field 8 but 4 data bytes"),
        (struct.pack("=III", 0, 8, 0) + bytes(9), "size field 8 but 9"),
        (struct.pack("=III", 0, 300, 0) + bytes(300), "exceeds 256"),
        (struct.pack("=II", 0, 8), "at least 12 bytes"),
    ],
)
def test_get_config_reply_size_mismatch(payload: bytes, match: str) -> None:
    sent = FE.get_config(0, 8)
    with pytest.raises(DeviceProtocolError, match=match):
        FE.parse_reply(sent, reply_message(vu.GET_CONFIG, payload))


def test_parse_reply_misuse_is_the_callers_fault() -> None:
    with pytest.raises(InvalidArgument):
        vu.parse_reply(vu.IOTLB_MSG, reply_message(vu.IOTLB_MSG, U64_REPLY))
    with pytest.raises(InvalidArgument, match="asked="):
        vu.parse_reply(vu.GET_CONFIG, reply_message(vu.GET_CONFIG, struct.pack("=III", 0, 1, 0) + b"\0"))


# -- malformed requests (back end side) ----------------------------------------------------------


def test_unknown_and_unsupported_requests() -> None:
    with pytest.raises(DriverProtocolError, match="unknown request code 99"):
        vu.decode_request(frame(99, vu.VERSION))
    with pytest.raises(DriverProtocolError, match="unknown request code 0"):
        vu.decode_request(frame(0, vu.VERSION))
    for code in (vu.IOTLB_MSG, vu.CREATE_CRYPTO_SESSION, vu.POSTCOPY_ADVISE, vu.GET_SHARED_OBJECT):
        with pytest.raises(DriverProtocolError, match="not supported"):
            vu.decode_request(frame(code, vu.VERSION, b"\0" * 8))


def test_reply_flag_or_bad_version_on_request() -> None:
    with pytest.raises(DriverProtocolError, match="reply flag"):
        vu.decode_request(frame(vu.GET_FEATURES, vu.VERSION | vu.REPLY))
    with pytest.raises(DriverProtocolError, match="version 2"):
        vu.decode_request(frame(vu.GET_FEATURES, 2))


@pytest.mark.parametrize(
    ("name", "make", "expected", "fds", "expects_reply"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS]
)
def test_wrong_payload_size_rejected(
    name: str,
    make: Callable[[], Outgoing],
    expected: RequestPayload,
    fds: tuple[int, ...],
    expects_reply: bool,
) -> None:
    msg = through_reader(make())
    longer = Message(msg.request, msg.flags, msg.payload + b"\0", msg.fds)
    if name in ("GET_CONFIG", "SET_CONFIG"):
        # Tolerated: more data than the size field (SPDK sends its whole struct); the size rules.
        value = vu.decode_request(longer)
        assert isinstance(value, vu.ConfigSpace) and isinstance(expected, vu.ConfigSpace)
        assert value.size == expected.size and value.data[: value.size] == expected.data
    else:
        with pytest.raises(DriverProtocolError, match=name):
            vu.decode_request(longer)
    if msg.payload:
        shorter = Message(msg.request, msg.flags, msg.payload[:-1], msg.fds)
        with pytest.raises(DriverProtocolError, match=name):
            vu.decode_request(shorter)


@pytest.mark.parametrize(
    ("name", "make", "expected", "fds", "expects_reply"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS]
)
def test_wrong_fd_count_rejected(
    name: str,
    make: Callable[[], Outgoing],
    expected: RequestPayload,
    fds: tuple[int, ...],
    expects_reply: bool,
) -> None:
    msg = through_reader(make())
    extra = Message(msg.request, msg.flags, msg.payload, msg.fds + (99, 98))
    with pytest.raises(DriverProtocolError, match="file descriptor"):
        vu.decode_request(extra)
    if msg.fds:
        missing = Message(msg.request, msg.flags, msg.payload, msg.fds[:-1])
        with pytest.raises(DriverProtocolError, match="file descriptor"):
            vu.decode_request(missing)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (frame(vu.SET_MEM_TABLE, 1, struct.pack("=II", 9, 0) + bytes(9 * 32), range(8)), "9 regions"),
        (frame(vu.SET_MEM_TABLE, 1, struct.pack("=II", 2, 0) + bytes(3 * 32), (1, 2)), "must be 72 or 264"),
        (frame(vu.SET_MEM_TABLE, 1, struct.pack("=I", 2)), "at least 8 bytes"),
        (frame(vu.SET_MEM_TABLE, 1, struct.pack("=II", 2, 0) + bytes(2 * 32), (1,)), "expected 2 file"),
        (frame(vu.SET_VRING_KICK, 1, struct.pack("=Q", 1)), "expected 1 file descriptor"),
        (frame(vu.SET_VRING_CALL, 1, struct.pack("=Q", 1 | vu.VRING_NOFD_MASK), (4,)), "expected 0 file"),
        (frame(vu.SET_VRING_CALL, 1, struct.pack("=Q", 1 | 1 << 9), (4,)), "reserved bits"),
        (frame(vu.ADD_MEM_REG, 1, bytes(40)), "expected 1 file descriptor"),
        (frame(vu.REM_MEM_REG, 1, bytes(40), (1, 2)), "expected 0 to 1"),
        (frame(vu.GET_CONFIG, 1, struct.pack("=III", 0, 257, 0) + bytes(257)), "exceeds 256"),
        (frame(vu.GET_CONFIG, 1, struct.pack("=III", 250, 8, 0) + bytes(8)), "exceeds 256"),
        (frame(vu.SET_CONFIG, 1, struct.pack("=III", 0, 8, 0) + bytes(4)), "size field 8 but 4"),
        (frame(vu.SET_LOG_BASE, 1, struct.pack("=Q", 4096), (3,)), "must be 16 bytes"),
        (frame(vu.SET_FEATURES, 1, b"", ()), "must be 8 bytes, got 0"),
        (frame(vu.GET_FEATURES, 1, bytes(8), ()), "must be 0 bytes, got 8"),
        (frame(vu.SET_OWNER, 1, b"", range(9)), "9 file descriptors"),
    ],
)
def test_malformed_request(msg: Message, match: str) -> None:
    with pytest.raises(DriverProtocolError, match=match):
        vu.decode_request(msg)


# -- encoder argument validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: FE.set_features(-1),
        lambda: FE.set_features(1 << 64),
        lambda: FE.set_features(True),
        lambda: FE.set_vring_num(256, 128),
        lambda: FE.set_vring_num(-1, 128),
        lambda: FE.set_vring_num(0, 1 << 32),
        lambda: FE.get_vring_base(300),
        lambda: FE.set_vring_kick(0, -1),
        lambda: FE.set_vring_call(256, 3),
        lambda: FE.set_vring_addr(VringAddr(0, 0, 1 << 64, 0, 0)),
        lambda: FE.set_mem_table(REGIONS + (REGION,), range(9)),
        lambda: FE.set_mem_table(REGIONS[:2], [3]),
        lambda: FE.set_mem_table([MemRegion(-1, 1, 0)], [3]),
        lambda: FE.add_mem_reg(REGION, -5),
        lambda: FE.add_mem_reg(MemRegion(0, 1 << 64, 0), 3),
        lambda: FE.get_config(0, 0),
        lambda: FE.get_config(0, 257),
        lambda: FE.get_config(200, 64),
        lambda: FE.set_config(0, b""),
        lambda: FE.set_config(255, b"ab"),
        lambda: FE.set_status(0x100),
        lambda: FE.send_rarp(b"\x01\x02"),
        lambda: FE.get_inflight_fd(1 << 16, 1),
        lambda: FE.set_inflight_fd(InflightInfo(1, 0, 1, 1 << 16), 3),
        lambda: BE.encode_reply(vu.GET_FEATURES, VringState(0, 0)),
        lambda: BE.encode_reply(vu.GET_VRING_BASE, 5),
        lambda: BE.encode_reply(vu.GET_CONFIG, 5),
        lambda: BE.encode_reply(vu.GET_CONFIG, ConfigSpace(0, 4, 0, b"ab")),
        lambda: BE.encode_reply(vu.GET_INFLIGHT_FD, INFLIGHT),
        lambda: BE.encode_reply(vu.GET_FEATURES, 1, fds=[3]),
        lambda: BE.encode_reply(vu.IOTLB_MSG, 0),
        lambda: BE.vring_call(256),
    ],
)
def test_encoders_reject_bad_arguments(call: Callable[[], object]) -> None:
    with pytest.raises(InvalidArgument):
        call()


# -- the back-end channel ------------------------------------------------------------------------


def test_backend_channel_round_trip() -> None:
    for out, expected in (
        (BE.config_change(need_reply=True), None),
        (BE.vring_call(3), VringState(3, 0)),
        (BE.vring_err(1), VringState(1, 0)),
    ):
        reader = MessageReader(DeviceProtocolError, names=vu.BACKEND_REQUEST_NAMES)
        reader.feed(out.data)
        msg = reader.next_message()
        assert msg is not None
        assert vu.decode_backend_request(msg) == expected
        assert msg.need_reply is out.expects_reply
    ack = FE.encode_ack(vu.BACKEND_CONFIG_CHANGE_MSG, True)
    assert BE.parse_ack(vu.BACKEND_CONFIG_CHANGE_MSG, through_reader(ack)) == 0
    with pytest.raises(DriverProtocolError):
        BE.parse_ack(vu.BACKEND_CONFIG_CHANGE_MSG, frame(vu.BACKEND_CONFIG_CHANGE_MSG, 1, bytes(8)))
    with pytest.raises(DeviceProtocolError, match="not supported"):
        vu.decode_backend_request(frame(vu.BACKEND_IOTLB_MSG, 1, bytes(32)))
    with pytest.raises(DeviceProtocolError, match="unknown"):
        vu.decode_backend_request(frame(77, 1))
    with pytest.raises(DeviceProtocolError, match="must be 8 bytes"):
        vu.decode_backend_request(frame(vu.BACKEND_VRING_CALL, 1, bytes(4)))


# -- framing -----------------------------------------------------------------------------------------


def _stream() -> list[Outgoing]:
    return [
        FE.get_features(),
        FE.set_mem_table(REGIONS[:2], [40, 41]),
        FE.set_vring_call(0, 42),
        FE.set_vring_num(0, 128),
        FE.set_config(0, b"\x07" * 16),
        FE.set_vring_kick(0, 43),
    ]


def test_framing_across_every_split_point() -> None:
    outs = _stream()
    blob = b"".join(o.data for o in outs)
    boundaries = {0}
    pos = 0
    for o in outs:
        pos += len(o.data)
        boundaries.add(pos)
    for split in range(1, len(blob)):
        reader = MessageReader(DriverProtocolError)
        got: list[Message] = []
        # Each sendmsg's fds arrive with its first byte: feed chunk by chunk,
        # cutting the stream at message boundaries and at ``split``.
        cuts = sorted(boundaries | {split, len(blob)})
        starts = {}
        pos = 0
        for o in outs:
            starts[pos] = o.fds
            pos += len(o.data)
        for a, b in zip(cuts, cuts[1:], strict=False):
            reader.feed(blob[a:b], starts.get(a, ()))
            while (msg := reader.next_message()) is not None:
                got.append(msg)
        assert [m.to_bytes() for m in got] == [o.data for o in outs]
        assert [m.fds for m in got] == [o.fds for o in outs]
        assert reader.pending_fds() == () and reader.buffered == 0


def test_byte_at_a_time() -> None:
    out = FE.set_mem_table(REGIONS, range(8))
    reader = MessageReader(DriverProtocolError)
    for i in range(len(out.data)):
        reader.feed(out.data[i : i + 1], out.fds if i == 0 else ())
        if i < len(out.data) - 1:
            assert reader.next_message() is None
            assert reader.pending_fds() == out.fds
    msg = reader.next_message()
    assert msg is not None and msg.fds == out.fds
    assert vu.decode_request(msg) == MemTable(REGIONS)


def test_fds_go_to_the_message_they_arrived_with_even_if_undrained() -> None:
    first, second = FE.get_features(), FE.set_vring_call(0, 5)
    reader = MessageReader(DriverProtocolError)
    reader.feed(first.data)
    reader.feed(second.data, second.fds)
    m1, m2 = reader.next_message(), reader.next_message()
    assert m1 is not None and m2 is not None
    assert m1.fds == () and m2.fds == (5,)
    assert list(reader) == []


def test_fds_with_a_chunk_that_starts_in_the_previous_message() -> None:
    # Linux may start the read that delivers M2's fds with M1's last bytes.
    a, b = FE.set_vring_num(0, 64), FE.set_vring_call(0, 5)
    reader = MessageReader(DriverProtocolError)
    reader.feed(a.data[:7])
    reader.feed(a.data[7:] + b.data[:2], b.fds)
    reader.feed(b.data[2:])
    assert [m.fds for m in reader] == [(), (5,)]
    # ... and the read stops at the end of the sendmsg that carried them.
    reader.feed(a.data[:3])
    reader.feed(a.data[3:] + b.data, b.fds)
    assert [m.fds for m in reader] == [(), (5,)]


def test_short_header_waits_for_more() -> None:
    reader = MessageReader(DeviceProtocolError)
    data = FE.get_features().data
    reader.feed(data[:11])
    assert reader.next_message() is None
    assert reader.buffered == 11
    reader.feed(data[11:])
    assert reader.next_message() == Message(vu.GET_FEATURES, vu.VERSION)


@pytest.mark.parametrize("error", [DeviceProtocolError, DriverProtocolError])
@pytest.mark.parametrize("flags", [0, 2, 3, vu.REPLY, 0x7])
def test_bad_version_raises_the_readers_error(error: type[PyvirtioError], flags: int) -> None:
    reader = MessageReader(error)
    good = FE.get_features().data
    reader.feed(good + struct.pack("=III", vu.GET_FEATURES, flags, 0))
    assert reader.next_message() == Message(vu.GET_FEATURES, vu.VERSION)  # earlier messages still delivered
    with pytest.raises(error, match="version"):
        reader.next_message()
    assert reader.broken
    with pytest.raises(error):  # stays broken
        reader.feed(good)
        reader.next_message()


def test_oversize_payload_rejected_from_the_header_alone() -> None:
    reader = MessageReader(DriverProtocolError)
    reader.feed(struct.pack("=III", vu.SET_CONFIG, vu.VERSION, vu.MAX_PAYLOAD + 1))
    with pytest.raises(DriverProtocolError, match="exceeds the limit"):
        reader.next_message()
    ok = MessageReader(DriverProtocolError)
    ok.feed(struct.pack("=III", vu.SET_CONFIG, vu.VERSION, vu.MAX_PAYLOAD) + bytes(vu.MAX_PAYLOAD))
    assert ok.next_message() is not None


def test_too_many_fds() -> None:
    reader = MessageReader(DriverProtocolError)
    reader.feed(b"\x05", range(100, 109))
    with pytest.raises(DriverProtocolError, match="9 file descriptors"):
        reader.next_message()
    assert reader.pending_fds() == tuple(range(100, 109))
    # Across several feeds into one message.
    reader = MessageReader(DeviceProtocolError)
    data = FE.get_features().data
    reader.feed(data[:4], range(5))
    reader.feed(data[4:], range(5, 10))
    with pytest.raises(DeviceProtocolError, match="file descriptors"):
        reader.next_message()
    assert len(reader.pending_fds()) == 10


def test_fds_fed_after_failure_are_kept_for_closing() -> None:
    reader = MessageReader(DriverProtocolError)
    reader.feed(struct.pack("=III", 1, 0, 0))
    reader.feed(b"x", (7,))
    assert reader.pending_fds() == (7,)


def test_close_pending_fds_closes_real_fds() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        reader = MessageReader(DriverProtocolError)
        out = FE.set_vring_call(0, r1)
        reader.feed(out.data, out.fds)  # complete, not yet returned
        reader.feed(FE.set_vring_kick(0, r2).data[:5], (r2,))  # incomplete
        assert set(reader.pending_fds()) == {r1, r2}
        reader.close_pending_fds()
        assert reader.pending_fds() == ()
        assert reader.next_message() is None
        for fd in (r1, r2):
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        for fd in (w1, w2):
            os.close(fd)


@pytest.mark.parametrize("bufsize", [1, 7, 13, 4096])
def test_real_socketpair_with_scm_rights(bufsize: int) -> None:
    """One real AF_UNIX exchange: fds sent with a message come out attached to it."""
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    received: list[int] = []
    try:
        outs = [FE.get_features(), FE.set_vring_call(0, r), FE.set_mem_table([REGION], [w])]
        for out in outs:
            if out.fds:
                socket.send_fds(front, [out.data], list(out.fds))
            else:
                front.sendall(out.data)
        reader = MessageReader(DriverProtocolError)
        got: list[Message] = []
        while len(got) < len(outs):
            data, fds, _flags, _addr = socket.recv_fds(back, bufsize, vu.MAX_FDS)
            received.extend(fds)
            reader.feed(data, fds)
            got.extend(reader)
        assert [vu.decode_request(m) for m in got] == [None, VringFile(0, False), MemTable((REGION,))]
        assert [len(m.fds) for m in got] == [0, 1, 1]
        assert reader.pending_fds() == ()
    finally:
        for fd in [r, w, *received]:
            os.close(fd)
        front.close()
        back.close()


# -- fuzzing: only declared errors come out ---------------------------------------------------------

# PYVIRTIO_FUZZ_EXAMPLES=20000 for a long run; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("PYVIRTIO_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BACKEND_ERRORS = (DriverProtocolError,)
FRONTEND_ERRORS = (DeviceProtocolError, DeviceError)
FAKE_FD = st.integers(min_value=1000, max_value=1100)


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


def run_backend(chunks: list[bytes], fd_groups: list[list[int]]) -> None:
    reader = MessageReader(DriverProtocolError)
    try:
        for i, chunk in enumerate(chunks):
            reader.feed(chunk, fd_groups[i] if i < len(fd_groups) else ())
            while (msg := reader.next_message()) is not None:
                try:
                    vu.decode_request(msg)
                except BACKEND_ERRORS:
                    pass
    except BACKEND_ERRORS:
        pass


_ASKED: dict[int, RequestPayload] = {
    vu.GET_CONFIG: ConfigSpace(0, 8, 0, bytes(8)),
    vu.GET_VRING_BASE: VringState(0, 0),
}


def run_frontend(chunks: list[bytes], fd_groups: list[list[int]], request: int) -> None:
    reader = MessageReader(DeviceProtocolError)
    try:
        for i, chunk in enumerate(chunks):
            reader.feed(chunk, fd_groups[i] if i < len(fd_groups) else ())
            while (msg := reader.next_message()) is not None:
                try:
                    vu.parse_reply(request, msg, asked=_ASKED.get(request))
                except FRONTEND_ERRORS:
                    pass
                try:
                    vu.decode_backend_request(msg)
                except FRONTEND_ERRORS:
                    pass
    except FRONTEND_ERRORS:
        pass


@FUZZ
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6),
    fd_groups=st.lists(st.lists(FAKE_FD, max_size=10), max_size=4),
    request=st.sampled_from(sorted(vu_decode.RULES)),
)
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int], fd_groups: list[list[int]], request: int) -> None:
    chunks = chunks_of(data, cuts)
    run_backend(chunks, fd_groups)
    run_frontend(chunks, fd_groups, request)


@st.composite
def plausible_messages(draw: st.DrawFn) -> bytes:
    """Headers that pass framing, so the payload decoders get exercised."""
    request = draw(st.one_of(st.sampled_from(sorted(vu.REQUEST_NAMES)), st.integers(0, 2**32 - 1)))
    flags = draw(st.sampled_from([1, 1 | vu.REPLY, 1 | vu.NEED_REPLY, 1 | vu.REPLY | vu.NEED_REPLY, 0x101]))
    size = draw(st.sampled_from([0, 8, 12, 16, 20, 24, 40, 72, 264, 268]) | st.integers(0, 300))
    head = draw(st.binary(min_size=0, max_size=16))
    payload = (head + bytes(size))[:size]
    if size >= 12 and draw(st.booleans()):  # plausible config / mem table heads
        payload = struct.pack("=III", draw(st.integers(0, 300)), draw(st.integers(0, 300)), 0) + payload[12:]
    return struct.pack("=III", request, flags, len(payload)) + payload


@FUZZ
@given(
    messages=st.lists(plausible_messages(), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    fd_groups=st.lists(st.lists(FAKE_FD, max_size=9), max_size=4),
    request=st.sampled_from(sorted(vu_decode.RULES)),
)
def test_fuzz_plausible_messages(
    messages: list[bytes], cuts: list[int], fd_groups: list[list[int]], request: int
) -> None:
    chunks = chunks_of(b"".join(messages), cuts)
    run_backend(chunks, fd_groups)
    run_frontend(chunks, fd_groups, request)


@FUZZ
@given(
    request=st.sampled_from(sorted(vu_decode.RULES)),
    flags=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
    nfds=st.integers(0, 10),
)
def test_fuzz_decoders_directly(request: int, flags: int, payload: bytes, nfds: int) -> None:
    msg = Message(request, flags, payload, tuple(range(1000, 1000 + nfds)))
    try:
        vu.decode_request(msg)
    except DriverProtocolError:
        pass
    try:
        vu.parse_reply(request, msg, asked=_ASKED.get(request))
    except FRONTEND_ERRORS:
        pass
