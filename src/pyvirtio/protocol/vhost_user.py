"""Sans-I/O codec for the vhost-user protocol (QEMU docs/interop/vhost-user.rst).

Theory of operation
-------------------
A vhost-user connection carries messages of a 12-byte header (``request``
u32, ``flags`` u32, ``size`` u32, machine byte order) and ``size`` bytes of
payload; file descriptors travel as SCM_RIGHTS ancillary data with the first
byte of the message they belong to. This module never touches a socket:
:class:`FrontendCodec` turns calls into :class:`Outgoing` records (header and
payload bytes, fds to attach, whether a reply must be awaited) and
:func:`parse_reply` checks and types what the back end answers;
:func:`decode_request` and :class:`BackendCodec` do the mirror work for an
embedded back end. :class:`MessageReader` cuts a byte stream, fed in chunks
of any size together with the fds each chunk arrived with, into
:class:`Message` records. The transport (``transport/vhost_user.py``) or the
back end (``backends/``) performs the actual sendmsg/recvmsg. Only message
*syntax* is checked here (sizes, version, fd counts, value ranges of the wire
format); whether a request is allowed *now* (after which negotiation, in
which ring state) is the caller's business. Whose fault a malformed message
is depends on the direction: a bad reply is the back end's
(:class:`~pyvirtio.errors.DeviceProtocolError`), a bad request is the
frontend's (:class:`~pyvirtio.errors.DriverProtocolError`), a bad argument to
an encoder is the caller's (:class:`~pyvirtio.errors.InvalidArgument`). When
a decoder raises, the fds of the offending message still belong to the caller,
who must close them.

Front-end requests: payload, fds and reply (vhost-user.rst, "Front-end
message types"; "ack" = u64, 0 for success, only when NEED_REPLY was set
under ``PROTOCOL_F_REPLY_ACK``, see "VHOST_USER_PROTOCOL_F_REPLY_ACK")::

    id  request                 request payload           fds      reply
     1  GET_FEATURES            -                         0        u64
     2  SET_FEATURES            u64                       0        ack
     3  SET_OWNER               -                         0        ack
     4  RESET_OWNER             -                         0        ack
     5  SET_MEM_TABLE           memory regions (<= 8)     nregions ack
     6  SET_LOG_BASE            log (size, offset)        1        u64
     7  SET_LOG_FD              -                         1        ack
     8  SET_VRING_NUM           vring state               0        ack
     9  SET_VRING_ADDR          vring address             0        ack
    10  SET_VRING_BASE          vring state               0        ack
    11  GET_VRING_BASE          vring state               0        vring state
    12  SET_VRING_KICK          u64 index | NOFD bit      0 or 1   ack
    13  SET_VRING_CALL          u64 index | NOFD bit      0 or 1   ack
    14  SET_VRING_ERR           u64 index | NOFD bit      0 or 1   ack
    15  GET_PROTOCOL_FEATURES   -                         0        u64
    16  SET_PROTOCOL_FEATURES   u64                       0        ack
    17  GET_QUEUE_NUM           -                         0        u64
    18  SET_VRING_ENABLE        vring state               0        ack
    19  SEND_RARP               u64 (first 6 bytes: MAC)  0        ack
    20  NET_SET_MTU             u64                       0        ack
    21  SET_BACKEND_REQ_FD      -                         1        ack
    23  SET_VRING_ENDIAN        vring state               0        ack
    24  GET_CONFIG              config space              0        config space
    25  SET_CONFIG              config space              0        ack
    27  CLOSE_CRYPTO_SESSION    u64                       0        ack
    31  GET_INFLIGHT_FD         inflight description      0        inflight + 1 fd
    32  SET_INFLIGHT_FD         inflight description      1        ack
    33  GPU_SET_SOCKET          -                         1        ack
    34  RESET_DEVICE            -                         0        ack
    35  VRING_KICK              vring state               0        ack
    36  GET_MAX_MEM_SLOTS       -                         0        u64
    37  ADD_MEM_REG             single memory region      1        ack
    38  REM_MEM_REG             single memory region      0 or 1   ack
    39  SET_STATUS              u64                       0        ack
    40  GET_STATUS              -                         0        u64
    43  CHECK_DEVICE_STATE      -                         0        u64

IOTLB_MSG (22), CREATE_CRYPTO_SESSION (26), the postcopy requests (28-30),
GET_SHARED_OBJECT (41) and SET_DEVICE_STATE_FD (42) have names and codes here
but no encoder or decoder: decoding one raises DriverProtocolError ("not
supported"), and a back end answers it with a NACK or drops the connection.

Layouts (vhost-user.rst, "Payload"): u64 ``Q``; vring state ``II``
(index, num); vring address ``IIQQQQ`` (index, flags, desc, used, avail,
log); memory regions ``II`` (nregions, padding) + nregions x ``QQQQ``
(guest_phys_addr, memory_size, userspace_addr, mmap_offset); single region
``Q`` padding + ``QQQQ``; config space ``III`` (offset, size, flags) + size
bytes; inflight ``QQHH`` + 4 bytes padding (24, as QEMU's C struct); log
``QQ`` (mmap_size, mmap_offset, what QEMU sends, although the request table
of the spec says u64). GET_CONFIG's request carries ``size`` zero bytes after
its 12-byte head, and its reply must have exactly the size asked; a reply
with an empty payload is the back end's way to refuse.

Back-end requests (sent by the back end on the SET_BACKEND_REQ_FD channel)
are named in :data:`BACKEND_REQUEST_NAMES`; CONFIG_CHANGE_MSG (no payload),
VRING_CALL and VRING_ERR (vring state) can be encoded by
:class:`BackendCodec` and decoded by :func:`decode_backend_request`.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from pyvirtio.errors import (
    DeviceError,
    DeviceProtocolError,
    DriverProtocolError,
    InvalidArgument,
    PyvirtioError,
)
from pyvirtio.spec.common import VHOST_USER_F_PROTOCOL_FEATURES

__all__ = [
    "ADD_MEM_REG",
    "BACKEND_CONFIG_CHANGE_MSG",
    "BACKEND_IOTLB_MSG",
    "BACKEND_REQUEST_NAMES",
    "BACKEND_SHARED_OBJECT_ADD",
    "BACKEND_SHARED_OBJECT_LOOKUP",
    "BACKEND_SHARED_OBJECT_REMOVE",
    "BACKEND_VRING_CALL",
    "BACKEND_VRING_ERR",
    "BACKEND_VRING_HOST_NOTIFIER_MSG",
    "CHECK_DEVICE_STATE",
    "CLOSE_CRYPTO_SESSION",
    "CONFIG_FLAG_LIVE_MIGRATION",
    "CONFIG_FLAG_WRITABLE",
    "CREATE_CRYPTO_SESSION",
    "GET_CONFIG",
    "GET_FEATURES",
    "GET_INFLIGHT_FD",
    "GET_MAX_MEM_SLOTS",
    "GET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_SHARED_OBJECT",
    "GET_STATUS",
    "GET_VRING_BASE",
    "GPU_SET_SOCKET",
    "HEADER_SIZE",
    "IOTLB_MSG",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "NEED_REPLY",
    "NET_SET_MTU",
    "POSTCOPY_ADVISE",
    "POSTCOPY_END",
    "POSTCOPY_LISTEN",
    "PROTOCOL_FEATURE_NAMES",
    "PROTOCOL_F_BACKEND_REQ",
    "PROTOCOL_F_BACKEND_SEND_FD",
    "PROTOCOL_F_CONFIG",
    "PROTOCOL_F_CONFIGURE_MEM_SLOTS",
    "PROTOCOL_F_CROSS_ENDIAN",
    "PROTOCOL_F_CRYPTO_SESSION",
    "PROTOCOL_F_DEVICE_STATE",
    "PROTOCOL_F_HOST_NOTIFIER",
    "PROTOCOL_F_INBAND_NOTIFICATIONS",
    "PROTOCOL_F_INFLIGHT_SHMFD",
    "PROTOCOL_F_LOG_SHMFD",
    "PROTOCOL_F_MQ",
    "PROTOCOL_F_NET_MTU",
    "PROTOCOL_F_PAGEFAULT",
    "PROTOCOL_F_RARP",
    "PROTOCOL_F_REPLY_ACK",
    "PROTOCOL_F_RESET_DEVICE",
    "PROTOCOL_F_SHARED_OBJECT",
    "PROTOCOL_F_STATUS",
    "PROTOCOL_F_XEN_MMAP",
    "REM_MEM_REG",
    "REPLY",
    "REQUEST_NAMES",
    "RESET_DEVICE",
    "RESET_OWNER",
    "SEND_RARP",
    "SET_BACKEND_REQ_FD",
    "SET_CONFIG",
    "SET_DEVICE_STATE_FD",
    "SET_FEATURES",
    "SET_INFLIGHT_FD",
    "SET_LOG_BASE",
    "SET_LOG_FD",
    "SET_MEM_TABLE",
    "SET_OWNER",
    "SET_PROTOCOL_FEATURES",
    "SET_STATUS",
    "SET_VRING_ADDR",
    "SET_VRING_BASE",
    "SET_VRING_CALL",
    "SET_VRING_ENABLE",
    "SET_VRING_ENDIAN",
    "SET_VRING_ERR",
    "SET_VRING_KICK",
    "SET_VRING_NUM",
    "VERSION",
    "VERSION_MASK",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VRING_F_LOG",
    "VRING_IDX_MASK",
    "VRING_KICK",
    "VRING_NOFD_MASK",
    "BackendCodec",
    "ConfigSpace",
    "FrontendCodec",
    "InflightInfo",
    "LogInfo",
    "MemRegion",
    "MemTable",
    "Message",
    "MessageReader",
    "Outgoing",
    "ReplyValue",
    "RequestPayload",
    "VringAddr",
    "VringFile",
    "VringState",
    "check_ack",
    "decode_backend_request",
    "decode_request",
    "encode_ack",
    "encode_reply",
    "parse_reply",
    "protocol_feature_names",
    "request_name",
]

# -- constants ----------------------------------------------------------------

# Front-end request codes (vhost-user.rst, "Front-end message types").
GET_FEATURES: Final = 1
SET_FEATURES: Final = 2
SET_OWNER: Final = 3
RESET_OWNER: Final = 4
SET_MEM_TABLE: Final = 5
SET_LOG_BASE: Final = 6
SET_LOG_FD: Final = 7
SET_VRING_NUM: Final = 8
SET_VRING_ADDR: Final = 9
SET_VRING_BASE: Final = 10
GET_VRING_BASE: Final = 11
SET_VRING_KICK: Final = 12
SET_VRING_CALL: Final = 13
SET_VRING_ERR: Final = 14
GET_PROTOCOL_FEATURES: Final = 15
SET_PROTOCOL_FEATURES: Final = 16
GET_QUEUE_NUM: Final = 17
SET_VRING_ENABLE: Final = 18
SEND_RARP: Final = 19
NET_SET_MTU: Final = 20
SET_BACKEND_REQ_FD: Final = 21  # formerly SET_SLAVE_REQ_FD
IOTLB_MSG: Final = 22
SET_VRING_ENDIAN: Final = 23
GET_CONFIG: Final = 24
SET_CONFIG: Final = 25
CREATE_CRYPTO_SESSION: Final = 26
CLOSE_CRYPTO_SESSION: Final = 27
POSTCOPY_ADVISE: Final = 28
POSTCOPY_LISTEN: Final = 29
POSTCOPY_END: Final = 30
GET_INFLIGHT_FD: Final = 31
SET_INFLIGHT_FD: Final = 32
GPU_SET_SOCKET: Final = 33
RESET_DEVICE: Final = 34
VRING_KICK: Final = 35
GET_MAX_MEM_SLOTS: Final = 36
ADD_MEM_REG: Final = 37
REM_MEM_REG: Final = 38
SET_STATUS: Final = 39
GET_STATUS: Final = 40
GET_SHARED_OBJECT: Final = 41
SET_DEVICE_STATE_FD: Final = 42
CHECK_DEVICE_STATE: Final = 43

REQUEST_NAMES: Final[dict[int, str]] = {
    GET_FEATURES: "GET_FEATURES",
    SET_FEATURES: "SET_FEATURES",
    SET_OWNER: "SET_OWNER",
    RESET_OWNER: "RESET_OWNER",
    SET_MEM_TABLE: "SET_MEM_TABLE",
    SET_LOG_BASE: "SET_LOG_BASE",
    SET_LOG_FD: "SET_LOG_FD",
    SET_VRING_NUM: "SET_VRING_NUM",
    SET_VRING_ADDR: "SET_VRING_ADDR",
    SET_VRING_BASE: "SET_VRING_BASE",
    GET_VRING_BASE: "GET_VRING_BASE",
    SET_VRING_KICK: "SET_VRING_KICK",
    SET_VRING_CALL: "SET_VRING_CALL",
    SET_VRING_ERR: "SET_VRING_ERR",
    GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
    SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
    GET_QUEUE_NUM: "GET_QUEUE_NUM",
    SET_VRING_ENABLE: "SET_VRING_ENABLE",
    SEND_RARP: "SEND_RARP",
    NET_SET_MTU: "NET_SET_MTU",
    SET_BACKEND_REQ_FD: "SET_BACKEND_REQ_FD",
    IOTLB_MSG: "IOTLB_MSG",
    SET_VRING_ENDIAN: "SET_VRING_ENDIAN",
    GET_CONFIG: "GET_CONFIG",
    SET_CONFIG: "SET_CONFIG",
    CREATE_CRYPTO_SESSION: "CREATE_CRYPTO_SESSION",
    CLOSE_CRYPTO_SESSION: "CLOSE_CRYPTO_SESSION",
    POSTCOPY_ADVISE: "POSTCOPY_ADVISE",
    POSTCOPY_LISTEN: "POSTCOPY_LISTEN",
    POSTCOPY_END: "POSTCOPY_END",
    GET_INFLIGHT_FD: "GET_INFLIGHT_FD",
    SET_INFLIGHT_FD: "SET_INFLIGHT_FD",
    GPU_SET_SOCKET: "GPU_SET_SOCKET",
    RESET_DEVICE: "RESET_DEVICE",
    VRING_KICK: "VRING_KICK",
    GET_MAX_MEM_SLOTS: "GET_MAX_MEM_SLOTS",
    ADD_MEM_REG: "ADD_MEM_REG",
    REM_MEM_REG: "REM_MEM_REG",
    SET_STATUS: "SET_STATUS",
    GET_STATUS: "GET_STATUS",
    GET_SHARED_OBJECT: "GET_SHARED_OBJECT",
    SET_DEVICE_STATE_FD: "SET_DEVICE_STATE_FD",
    CHECK_DEVICE_STATE: "CHECK_DEVICE_STATE",
}

# Back-end request codes, sent on the SET_BACKEND_REQ_FD channel
# (vhost-user.rst, "Back-end message types").
BACKEND_IOTLB_MSG: Final = 1
BACKEND_CONFIG_CHANGE_MSG: Final = 2
BACKEND_VRING_HOST_NOTIFIER_MSG: Final = 3
BACKEND_VRING_CALL: Final = 4
BACKEND_VRING_ERR: Final = 5
BACKEND_SHARED_OBJECT_ADD: Final = 6
BACKEND_SHARED_OBJECT_REMOVE: Final = 7
BACKEND_SHARED_OBJECT_LOOKUP: Final = 8

BACKEND_REQUEST_NAMES: Final[dict[int, str]] = {
    BACKEND_IOTLB_MSG: "BACKEND_IOTLB_MSG",
    BACKEND_CONFIG_CHANGE_MSG: "BACKEND_CONFIG_CHANGE_MSG",
    BACKEND_VRING_HOST_NOTIFIER_MSG: "BACKEND_VRING_HOST_NOTIFIER_MSG",
    BACKEND_VRING_CALL: "BACKEND_VRING_CALL",
    BACKEND_VRING_ERR: "BACKEND_VRING_ERR",
    BACKEND_SHARED_OBJECT_ADD: "BACKEND_SHARED_OBJECT_ADD",
    BACKEND_SHARED_OBJECT_REMOVE: "BACKEND_SHARED_OBJECT_REMOVE",
    BACKEND_SHARED_OBJECT_LOOKUP: "BACKEND_SHARED_OBJECT_LOOKUP",
}

# Protocol feature bit numbers (vhost-user.rst, "Protocol features").
PROTOCOL_F_MQ: Final = 0
PROTOCOL_F_LOG_SHMFD: Final = 1
PROTOCOL_F_RARP: Final = 2
PROTOCOL_F_REPLY_ACK: Final = 3
PROTOCOL_F_NET_MTU: Final = 4  # the spec's table says F_MTU, its text and QEMU F_NET_MTU
PROTOCOL_F_BACKEND_REQ: Final = 5
PROTOCOL_F_CROSS_ENDIAN: Final = 6
PROTOCOL_F_CRYPTO_SESSION: Final = 7
PROTOCOL_F_PAGEFAULT: Final = 8
PROTOCOL_F_CONFIG: Final = 9
PROTOCOL_F_BACKEND_SEND_FD: Final = 10
PROTOCOL_F_HOST_NOTIFIER: Final = 11
PROTOCOL_F_INFLIGHT_SHMFD: Final = 12
PROTOCOL_F_RESET_DEVICE: Final = 13
PROTOCOL_F_INBAND_NOTIFICATIONS: Final = 14
PROTOCOL_F_CONFIGURE_MEM_SLOTS: Final = 15
PROTOCOL_F_STATUS: Final = 16
PROTOCOL_F_XEN_MMAP: Final = 17
PROTOCOL_F_SHARED_OBJECT: Final = 18
PROTOCOL_F_DEVICE_STATE: Final = 19

PROTOCOL_FEATURE_NAMES: Final[dict[int, str]] = {
    PROTOCOL_F_MQ: "MQ",
    PROTOCOL_F_LOG_SHMFD: "LOG_SHMFD",
    PROTOCOL_F_RARP: "RARP",
    PROTOCOL_F_REPLY_ACK: "REPLY_ACK",
    PROTOCOL_F_NET_MTU: "NET_MTU",
    PROTOCOL_F_BACKEND_REQ: "BACKEND_REQ",
    PROTOCOL_F_CROSS_ENDIAN: "CROSS_ENDIAN",
    PROTOCOL_F_CRYPTO_SESSION: "CRYPTO_SESSION",
    PROTOCOL_F_PAGEFAULT: "PAGEFAULT",
    PROTOCOL_F_CONFIG: "CONFIG",
    PROTOCOL_F_BACKEND_SEND_FD: "BACKEND_SEND_FD",
    PROTOCOL_F_HOST_NOTIFIER: "HOST_NOTIFIER",
    PROTOCOL_F_INFLIGHT_SHMFD: "INFLIGHT_SHMFD",
    PROTOCOL_F_RESET_DEVICE: "RESET_DEVICE",
    PROTOCOL_F_INBAND_NOTIFICATIONS: "INBAND_NOTIFICATIONS",
    PROTOCOL_F_CONFIGURE_MEM_SLOTS: "CONFIGURE_MEM_SLOTS",
    PROTOCOL_F_STATUS: "STATUS",
    PROTOCOL_F_XEN_MMAP: "XEN_MMAP",
    PROTOCOL_F_SHARED_OBJECT: "SHARED_OBJECT",
    PROTOCOL_F_DEVICE_STATE: "DEVICE_STATE",
}

# Header flags (vhost-user.rst, "Header").
VERSION_MASK: Final = 0x3
VERSION: Final = 0x1
REPLY: Final = 0x4
NEED_REPLY: Final = 0x8

# SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 index, bit 8 "no fd".
VRING_IDX_MASK: Final = 0xFF
VRING_NOFD_MASK: Final = 1 << 8
# SET_VRING_ADDR flags: VHOST_VRING_F_LOG (bit 0) = log_guest_addr is valid.
VRING_F_LOG: Final = 1 << 0
# GET/SET_CONFIG flags.
CONFIG_FLAG_WRITABLE: Final = 0
CONFIG_FLAG_LIVE_MIGRATION: Final = 1

HEADER_SIZE: Final = 12
VHOST_MEMORY_BASELINE_NREGIONS: Final = 8
# At most this many fds in one message (SET_MEM_TABLE carries one per region;
# QEMU's VHOST_MEMORY_BASELINE_NREGIONS bounds its fd array).
MAX_FDS: Final = VHOST_MEMORY_BASELINE_NREGIONS
# QEMU's VHOST_USER_MAX_CONFIG_SIZE.
MAX_CONFIG_SIZE: Final = 256
# Largest payload a reader accepts. The largest payload defined here is a
# full SET_MEM_TABLE (8 + 8 * 32 = 264 bytes) or GET_CONFIG (12 + 256); a
# 4 KiB bound leaves room for requests this codec does not decode while
# keeping a hostile size field from making us buffer without limit.
MAX_PAYLOAD: Final = 4096

_U8_MAX: Final = 0xFF
_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# Wire layouts, machine byte order with no implicit padding ("=").
_HEADER: Final = struct.Struct("=III")
_U64: Final = struct.Struct("=Q")
_STATE: Final = struct.Struct("=II")
_ADDR: Final = struct.Struct("=IIQQQQ")
_MEM_HEAD: Final = struct.Struct("=II")
_REGION: Final = struct.Struct("=QQQQ")
_MEM_REG: Final = struct.Struct("=QQQQQ")  # padding u64 + region
_CONFIG_HEAD: Final = struct.Struct("=III")
_INFLIGHT: Final = struct.Struct("=QQHH4x")
_LOG: Final = struct.Struct("=QQ")


def request_name(request: int) -> str:
    """The spec name of a front-end request code, or ``"request N"``."""
    return REQUEST_NAMES.get(request, f"request {request}")


def _backend_request_name(request: int) -> str:
    return BACKEND_REQUEST_NAMES.get(request, f"back-end request {request}")


def protocol_feature_names(mask: int) -> list[str]:
    """Names of the protocol feature bits set in ``mask``, lowest bit first.

    Bits without a name are listed as ``"bit N"``.
    """
    names: list[str] = []
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            names.append(PROTOCOL_FEATURE_NAMES.get(bit, f"bit {bit}"))
        bit += 1
    return names


# -- typed payloads -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a 32-bit number."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr`` (SET_VRING_ADDR): user addresses of a ring."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One memory region: guest address, size, front-end address, offset in its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int = 0


@dataclass(frozen=True, slots=True)
class MemTable:
    """SET_MEM_TABLE payload; region ``i`` is backed by the message's fd ``i``."""

    regions: tuple[MemRegion, ...]


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET/SET_CONFIG payload: ``size`` bytes at ``offset`` of the device config.

    ``data`` holds at least ``size`` bytes: a request may carry more (SPDK
    sends its whole 256-byte struct), and the reply to it then as many.
    """

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR payload: the ring, and whether no fd came with it."""

    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class InflightInfo:
    """``VhostUserInflight``: the shared area tracking in-flight descriptors."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class LogInfo:
    """SET_LOG_BASE payload (``VhostUserLog``): dirty log area in the attached fd."""

    mmap_size: int
    mmap_offset: int


RequestPayload: TypeAlias = (
    None
    | int
    | bytes
    | VringState
    | VringAddr
    | MemTable
    | MemRegion
    | ConfigSpace
    | VringFile
    | InflightInfo
    | LogInfo
)
"""What :func:`decode_request` returns, by request (see the module table)."""

ReplyValue: TypeAlias = int | VringState | ConfigSpace | InflightInfo
"""What :func:`parse_reply` returns: u64 (including acks), vring state, config, inflight."""


@dataclass(frozen=True, slots=True)
class Message:
    """One framed message as received: header fields, payload and its fds."""

    request: int
    flags: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def need_reply(self) -> bool:
        """The sender asked for a REPLY_ACK (flag bit 3)."""
        return bool(self.flags & NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        """This is a reply (flag bit 2)."""
        return bool(self.flags & REPLY)

    def to_bytes(self) -> bytes:
        """Header and payload as they go on the wire (fds travel separately)."""
        return _HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message ready to send: ``data`` (header + payload) with ``fds`` attached.

    ``expects_reply`` tells the transport to wait for a reply before the next
    request; ``sent`` is the typed payload the message carries, which
    :meth:`FrontendCodec.parse_reply` uses to check the reply against the
    question (ring index of GET_VRING_BASE, offset and size of GET_CONFIG).
    """

    request: int
    data: bytes
    fds: tuple[int, ...] = ()
    expects_reply: bool = False
    sent: RequestPayload = None

    @property
    def name(self) -> str:
        return request_name(self.request)


# -- the request table ----------------------------------------------------------


class _Kind(enum.Enum):
    """Payload shapes of the spec ("Payload" section)."""

    NONE = "no payload"
    U64 = "u64"
    MAC = "u64 (MAC address)"
    STATE = "vring state"
    ADDR = "vring address"
    MEM_TABLE = "memory regions"
    MEM_REG = "single memory region"
    CONFIG = "config space"
    VRING_FILE = "u64 vring index"
    INFLIGHT = "inflight description"
    LOG = "log description"


@dataclass(frozen=True, slots=True)
class _Rule:
    payload: _Kind
    # (min, max) fds; None when the payload decides (MEM_TABLE, VRING_FILE).
    fds: tuple[int, int] | None
    # The natural reply, or None when the only reply is a REPLY_ACK u64.
    reply: _Kind | None


_NO_FD: Final = (0, 0)
_ONE_FD: Final = (1, 1)

# Request code -> rule. Codes in REQUEST_NAMES but not here are known but
# not supported by this codec.
_RULES: Final[dict[int, _Rule]] = {
    GET_FEATURES: _Rule(_Kind.NONE, _NO_FD, _Kind.U64),
    SET_FEATURES: _Rule(_Kind.U64, _NO_FD, None),
    SET_OWNER: _Rule(_Kind.NONE, _NO_FD, None),
    RESET_OWNER: _Rule(_Kind.NONE, _NO_FD, None),
    SET_MEM_TABLE: _Rule(_Kind.MEM_TABLE, None, None),
    SET_LOG_BASE: _Rule(_Kind.LOG, _ONE_FD, _Kind.U64),
    SET_LOG_FD: _Rule(_Kind.NONE, _ONE_FD, None),
    SET_VRING_NUM: _Rule(_Kind.STATE, _NO_FD, None),
    SET_VRING_ADDR: _Rule(_Kind.ADDR, _NO_FD, None),
    SET_VRING_BASE: _Rule(_Kind.STATE, _NO_FD, None),
    GET_VRING_BASE: _Rule(_Kind.STATE, _NO_FD, _Kind.STATE),
    SET_VRING_KICK: _Rule(_Kind.VRING_FILE, None, None),
    SET_VRING_CALL: _Rule(_Kind.VRING_FILE, None, None),
    SET_VRING_ERR: _Rule(_Kind.VRING_FILE, None, None),
    GET_PROTOCOL_FEATURES: _Rule(_Kind.NONE, _NO_FD, _Kind.U64),
    SET_PROTOCOL_FEATURES: _Rule(_Kind.U64, _NO_FD, None),
    GET_QUEUE_NUM: _Rule(_Kind.NONE, _NO_FD, _Kind.U64),
    SET_VRING_ENABLE: _Rule(_Kind.STATE, _NO_FD, None),
    SEND_RARP: _Rule(_Kind.MAC, _NO_FD, None),
    NET_SET_MTU: _Rule(_Kind.U64, _NO_FD, None),
    SET_BACKEND_REQ_FD: _Rule(_Kind.NONE, _ONE_FD, None),
    SET_VRING_ENDIAN: _Rule(_Kind.STATE, _NO_FD, None),
    GET_CONFIG: _Rule(_Kind.CONFIG, _NO_FD, _Kind.CONFIG),
    SET_CONFIG: _Rule(_Kind.CONFIG, _NO_FD, None),
    CLOSE_CRYPTO_SESSION: _Rule(_Kind.U64, _NO_FD, None),
    GET_INFLIGHT_FD: _Rule(_Kind.INFLIGHT, _NO_FD, _Kind.INFLIGHT),
    SET_INFLIGHT_FD: _Rule(_Kind.INFLIGHT, _ONE_FD, None),
    GPU_SET_SOCKET: _Rule(_Kind.NONE, _ONE_FD, None),
    RESET_DEVICE: _Rule(_Kind.NONE, _NO_FD, None),
    VRING_KICK: _Rule(_Kind.STATE, _NO_FD, None),
    GET_MAX_MEM_SLOTS: _Rule(_Kind.NONE, _NO_FD, _Kind.U64),
    ADD_MEM_REG: _Rule(_Kind.MEM_REG, _ONE_FD, None),
    # "No file descriptors SHOULD be passed ... the back-end MAY accept
    # messages with one file descriptor" (older QEMU and libvhost-user
    # send/expect one).
    REM_MEM_REG: _Rule(_Kind.MEM_REG, (0, 1), None),
    SET_STATUS: _Rule(_Kind.U64, _NO_FD, None),
    GET_STATUS: _Rule(_Kind.NONE, _NO_FD, _Kind.U64),
    CHECK_DEVICE_STATE: _Rule(_Kind.NONE, _NO_FD, _Kind.U64),
}

_BACKEND_RULES: Final[dict[int, _Rule]] = {
    BACKEND_CONFIG_CHANGE_MSG: _Rule(_Kind.NONE, _NO_FD, None),
    BACKEND_VRING_CALL: _Rule(_Kind.STATE, _NO_FD, None),
    BACKEND_VRING_ERR: _Rule(_Kind.STATE, _NO_FD, None),
}

_EXPECTS_REPLY: Final = frozenset(code for code, rule in _RULES.items() if rule.reply is not None)


# -- payload decoding (shared by both directions) ---------------------------------


def _exact(kind: _Kind, name: str, payload: bytes, size: int, error: type[PyvirtioError]) -> None:
    if len(payload) != size:
        raise error(f"{name}: {kind.value} payload must be {size} bytes, got {len(payload)}")


def _decode_payload(kind: _Kind, name: str, payload: bytes, error: type[PyvirtioError]) -> RequestPayload:
    """Check the size of ``payload`` against ``kind`` and return it typed."""
    if kind is _Kind.NONE:
        _exact(kind, name, payload, 0, error)
        return None
    if kind is _Kind.U64:
        _exact(kind, name, payload, _U64.size, error)
        value: int = _U64.unpack(payload)[0]
        return value
    if kind is _Kind.MAC:
        _exact(kind, name, payload, _U64.size, error)
        return bytes(payload[:6])
    if kind is _Kind.STATE:
        _exact(kind, name, payload, _STATE.size, error)
        return VringState(*_STATE.unpack(payload))
    if kind is _Kind.ADDR:
        _exact(kind, name, payload, _ADDR.size, error)
        return VringAddr(*_ADDR.unpack(payload))
    if kind is _Kind.MEM_TABLE:
        return _decode_mem_table(name, payload, error)
    if kind is _Kind.MEM_REG:
        _exact(kind, name, payload, _MEM_REG.size, error)
        _padding, gpa, size, uaddr, offset = _MEM_REG.unpack(payload)
        return MemRegion(gpa, size, uaddr, offset)
    if kind is _Kind.CONFIG:
        return _decode_config(name, payload, error)
    if kind is _Kind.VRING_FILE:
        _exact(kind, name, payload, _U64.size, error)
        raw: int = _U64.unpack(payload)[0]
        if raw & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise error(f"{name}: reserved bits set in u64 payload 0x{raw:x} (only bits 0-8 are defined)")
        return VringFile(raw & VRING_IDX_MASK, bool(raw & VRING_NOFD_MASK))
    if kind is _Kind.INFLIGHT:
        _exact(kind, name, payload, _INFLIGHT.size, error)
        return InflightInfo(*_INFLIGHT.unpack(payload))
    if kind is _Kind.LOG:
        _exact(kind, name, payload, _LOG.size, error)
        return LogInfo(*_LOG.unpack(payload))
    raise AssertionError(f"unhandled payload kind {kind}")  # pragma: no cover


def _decode_mem_table(name: str, payload: bytes, error: type[PyvirtioError]) -> MemTable:
    if len(payload) < _MEM_HEAD.size:
        raise error(f"{name}: memory regions payload must be at least 8 bytes, got {len(payload)}")
    nregions, _padding = _MEM_HEAD.unpack_from(payload, 0)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise error(f"{name}: {nregions} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} allowed")
    exact = _MEM_HEAD.size + nregions * _REGION.size
    full = _MEM_HEAD.size + VHOST_MEMORY_BASELINE_NREGIONS * _REGION.size
    # QEMU sends exactly nregions regions; SPDK sends the whole C struct.
    if len(payload) not in (exact, full):
        raise error(
            f"{name}: payload of {len(payload)} bytes for {nregions} regions (must be {exact} or {full})"
        )
    regions = tuple(
        MemRegion(*_REGION.unpack_from(payload, _MEM_HEAD.size + i * _REGION.size)) for i in range(nregions)
    )
    return MemTable(regions)


def _decode_config(name: str, payload: bytes, error: type[PyvirtioError]) -> ConfigSpace:
    if len(payload) < _CONFIG_HEAD.size:
        raise error(f"{name}: config space payload must be at least 12 bytes, got {len(payload)}")
    offset, size, flags = _CONFIG_HEAD.unpack_from(payload, 0)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
        raise error(f"{name}: config range offset {offset} size {size} exceeds {MAX_CONFIG_SIZE} bytes")
    have = len(payload) - _CONFIG_HEAD.size
    if have < size:
        # Strict: the data would end before the size field says (a read past the message).
        raise error(f"{name}: config size field {size} but {have} data bytes")
    if have > MAX_CONFIG_SIZE:
        raise error(f"{name}: {have} config data bytes, at most {MAX_CONFIG_SIZE}")
    # Tolerant: more data bytes than the size field names. SPDK's virtio-user sends its
    # whole 256-byte config struct whatever it asks for (and wants its reply in that
    # length); libvhost-user (qemu-storage-daemon) and DPDK take that. ``data`` keeps every
    # byte sent: its length is the request's room, ``size`` what it means.
    return ConfigSpace(offset, size, flags, bytes(payload[_CONFIG_HEAD.size :]))


def _check_fds(name: str, rule: _Rule, value: RequestPayload, nfds: int, error: type[PyvirtioError]) -> None:
    if rule.fds is not None:
        low, high = rule.fds
    elif isinstance(value, MemTable):
        low = high = len(value.regions)
    elif isinstance(value, VringFile):
        low = high = 0 if value.nofd else 1
    else:  # pragma: no cover - the table pairs fds=None only with the two kinds above
        raise AssertionError(f"no fd rule for {name}")
    if not low <= nfds <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise error(f"{name}: expected {want} file descriptor(s), got {nfds}")


def decode_request(msg: Message) -> RequestPayload:
    """Back end: check a front-end request and return its typed payload.

    Returns ``None`` (no payload), ``int`` (u64), ``bytes`` (SEND_RARP's
    MAC), :class:`VringState`, :class:`VringAddr`, :class:`MemTable`,
    :class:`MemRegion` (ADD/REM_MEM_REG), :class:`ConfigSpace`,
    :class:`VringFile`, :class:`InflightInfo` or :class:`LogInfo`, as in the
    module table. Raises :class:`DriverProtocolError` for an unknown or
    unsupported request, a reply flag on a request, a wrong payload size or
    a wrong number of fds; the fds of ``msg`` then remain the caller's.
    """
    name = request_name(msg.request)
    rule = _RULES.get(msg.request)
    if rule is None:
        if msg.request in REQUEST_NAMES:
            raise DriverProtocolError(f"{name} (request {msg.request}) is not supported")
        raise DriverProtocolError(f"unknown request code {msg.request}")
    if msg.flags & VERSION_MASK != VERSION:
        raise DriverProtocolError(f"{name}: protocol version {msg.flags & VERSION_MASK}, expected {VERSION}")
    if msg.flags & REPLY:
        raise DriverProtocolError(f"{name}: reply flag set on a request (flags 0x{msg.flags:x})")
    if len(msg.fds) > MAX_FDS:
        raise DriverProtocolError(f"{name}: {len(msg.fds)} file descriptors, at most {MAX_FDS} allowed")
    value = _decode_payload(rule.payload, name, msg.payload, DriverProtocolError)
    _check_fds(name, rule, value, len(msg.fds), DriverProtocolError)
    return value


def decode_backend_request(msg: Message) -> RequestPayload:
    """Front end: check a request received on the back-end channel.

    Supports BACKEND_CONFIG_CHANGE_MSG (returns ``None``) and
    BACKEND_VRING_CALL / BACKEND_VRING_ERR (return :class:`VringState`).
    Anything else, or anything malformed, raises
    :class:`DeviceProtocolError`; answer it with :func:`encode_ack` (``ok=False``)
    when ``msg.need_reply``.
    """
    name = _backend_request_name(msg.request)
    rule = _BACKEND_RULES.get(msg.request)
    if rule is None:
        what = "is not supported" if msg.request in BACKEND_REQUEST_NAMES else "is unknown"
        raise DeviceProtocolError(f"back-end request code {msg.request} ({name}) {what}")
    if msg.flags & VERSION_MASK != VERSION:
        raise DeviceProtocolError(f"{name}: protocol version {msg.flags & VERSION_MASK}, expected {VERSION}")
    if msg.flags & REPLY:
        raise DeviceProtocolError(f"{name}: reply flag set on a request (flags 0x{msg.flags:x})")
    value = _decode_payload(rule.payload, name, msg.payload, DeviceProtocolError)
    _check_fds(name, rule, value, len(msg.fds), DeviceProtocolError)
    return value


# -- reply parsing (front end) ------------------------------------------------------


def parse_reply(request: int, msg: Message, *, asked: RequestPayload = None) -> ReplyValue:
    """Front end: check the back end's reply to ``request`` and return its value.

    The reply must carry flags VERSION|REPLY (NEED_REPLY tolerated), the same
    request code, and exactly the payload the request's reply has: u64 for
    GET_FEATURES & co. and for a REPLY_ACK (returned as ``int``; pass it to
    :func:`check_ack`), :class:`VringState` for GET_VRING_BASE (index must
    match ``asked`` when given), :class:`ConfigSpace` for GET_CONFIG
    (``asked`` must be the :class:`ConfigSpace` that was sent; the reply must
    be for the same offset and size), :class:`InflightInfo` for
    GET_INFLIGHT_FD (with exactly one fd in ``msg.fds``).

    Raises :class:`DeviceProtocolError` for a malformed reply,
    :class:`DeviceError` when the back end refused (empty GET_CONFIG reply,
    empty inflight area) and :class:`InvalidArgument` when ``request`` is
    not one this codec sends. On error, ``msg.fds`` remain the caller's.
    """
    rule = _RULES.get(request)
    if rule is None:
        raise InvalidArgument(f"cannot parse a reply to {request_name(request)}: not a supported request")
    name = request_name(request)
    if msg.flags & ~NEED_REPLY != VERSION | REPLY:
        raise DeviceProtocolError(
            f"reply to {name}: flags 0x{msg.flags:x}, expected 0x{VERSION | REPLY:x} (version 1, reply)"
        )
    if msg.request != request:
        raise DeviceProtocolError(
            f"reply to {name} carries request code {msg.request} ({request_name(msg.request)})"
        )
    kind = rule.reply if rule.reply is not None else _Kind.U64
    what = f"reply to {name}"
    if kind is not _Kind.INFLIGHT and msg.fds:
        raise DeviceProtocolError(f"{what}: {len(msg.fds)} unexpected file descriptor(s)")
    if kind is _Kind.CONFIG:
        return _parse_config_reply(what, msg, asked)
    value = _decode_payload(kind, what, msg.payload, DeviceProtocolError)
    if isinstance(value, int):
        if request == GET_STATUS and value > _U8_MAX:
            raise DeviceProtocolError(f"{what}: device status 0x{value:x} does not fit in 8 bits")
        return value
    if isinstance(value, VringState):
        if isinstance(asked, VringState) and value.index != asked.index:
            raise DeviceProtocolError(f"{what}: ring index {value.index}, asked for {asked.index}")
        return value
    if isinstance(value, InflightInfo):
        if value.mmap_size == 0:
            if msg.fds:
                raise DeviceProtocolError(f"{what}: empty inflight area with {len(msg.fds)} fd(s)")
            raise DeviceError(f"back end refused {name}: empty inflight area")
        if len(msg.fds) != 1:
            raise DeviceProtocolError(f"{what}: expected 1 file descriptor, got {len(msg.fds)}")
        return value
    raise AssertionError(f"unhandled reply kind {kind}")  # pragma: no cover


def _parse_config_reply(what: str, msg: Message, asked: RequestPayload) -> ConfigSpace:
    if not isinstance(asked, ConfigSpace):
        raise InvalidArgument(f"{what}: pass the ConfigSpace that was sent as asked=")
    if not msg.payload:
        # vhost-user.rst, GET_CONFIG: "zero length of payload to indicate an error".
        raise DeviceError(f"back end refused GET_CONFIG of {asked.size} bytes at offset {asked.offset}")
    config = _decode_config(what, msg.payload, DeviceProtocolError)
    if len(config.data) != config.size:
        # Strict on this side: we send exactly the bytes we ask for, so must the reply.
        raise DeviceProtocolError(f"{what}: size field {config.size} but {len(config.data)} data bytes")
    # GET_CONFIG: "vhost-user back-end's payload size MUST match the front-end's request".
    if config.offset != asked.offset or config.size != asked.size:
        raise DeviceProtocolError(
            f"{what}: offset {config.offset} size {config.size}, "
            f"asked for offset {asked.offset} size {asked.size}"
        )
    return config


def check_ack(request: int, value: int) -> None:
    """Raise :class:`DeviceError` if a REPLY_ACK value reports failure (non-zero)."""
    if value != 0:
        raise DeviceError(f"back end refused {request_name(request)} (ack value {value})")


# -- encoding helpers --------------------------------------------------------------


def _check_int(what: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidArgument(f"{what} must be an integer in 0..{maximum:#x}, got {value!r}")
    return value


def _check_index(what: str, index: int) -> int:
    # Every ring-addressing request works for indices the u64 of
    # SET_VRING_KICK/CALL can carry (bits 0-7), so the encoders use that bound.
    return _check_int(f"{what}: ring index", index, VRING_IDX_MASK)


def _check_fd(what: str, fd: int) -> int:
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise InvalidArgument(f"{what}: file descriptor must be a non-negative integer, got {fd!r}")
    return fd


def _frame(
    request: int,
    payload: bytes,
    *,
    fds: Sequence[int] = (),
    need_reply: bool = False,
    sent: RequestPayload = None,
    reply: bool = False,
) -> Outgoing:
    name = request_name(request)
    if len(payload) > MAX_PAYLOAD:
        raise InvalidArgument(f"{name}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if len(fds) > MAX_FDS:
        raise InvalidArgument(f"{name}: {len(fds)} file descriptors, at most {MAX_FDS} allowed")
    fd_tuple = tuple(_check_fd(name, fd) for fd in fds)
    flags = VERSION
    if reply:
        flags |= REPLY
        expects_reply = False
    else:
        natural = request in _EXPECTS_REPLY
        # Requests with a reply of their own never need the NEED_REPLY flag
        # ("no behavioural change"), and QEMU-derived back ends echo it in
        # replies, which stricter front ends reject; so it is not set.
        if need_reply and not natural:
            flags |= NEED_REPLY
        expects_reply = natural or need_reply
    data = _HEADER.pack(request, flags, len(payload)) + payload
    return Outgoing(request, data, fd_tuple, expects_reply, sent)


def _encode_state(request: int, index: int, num: int, *, need_reply: bool = False) -> Outgoing:
    name = request_name(request)
    state = VringState(_check_index(name, index), _check_int(f"{name}: num", num, _U32_MAX))
    return _frame(request, _STATE.pack(state.index, state.num), need_reply=need_reply, sent=state)


def _encode_u64(request: int, value: int, *, need_reply: bool = False) -> Outgoing:
    value = _check_int(f"{request_name(request)}: value", value, _U64_MAX)
    return _frame(request, _U64.pack(value), need_reply=need_reply, sent=value)


def _encode_vring_file(request: int, index: int, fd: int | None, *, need_reply: bool) -> Outgoing:
    name = request_name(request)
    index = _check_index(name, index)
    if fd is None:
        vf = VringFile(index, True)
        return _frame(request, _U64.pack(index | VRING_NOFD_MASK), need_reply=need_reply, sent=vf)
    vf = VringFile(index, False)
    return _frame(request, _U64.pack(index), fds=(fd,), need_reply=need_reply, sent=vf)


def _check_region(what: str, region: MemRegion) -> MemRegion:
    if not isinstance(region, MemRegion):
        raise InvalidArgument(f"{what}: expected a MemRegion, got {region!r}")
    for field in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
        _check_int(f"{what}: {field}", getattr(region, field), _U64_MAX)
    return region


def _pack_region(region: MemRegion) -> bytes:
    return _REGION.pack(region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset)


def _check_config(what: str, offset: int, size: int, flags: int) -> None:
    _check_int(f"{what}: flags", flags, _U32_MAX)
    _check_int(f"{what}: offset", offset, MAX_CONFIG_SIZE)
    if not 1 <= size <= MAX_CONFIG_SIZE - offset:
        raise InvalidArgument(
            f"{what}: size {size} at offset {offset} must be 1..{MAX_CONFIG_SIZE - offset} "
            f"(config access limited to {MAX_CONFIG_SIZE} bytes)"
        )


# -- front end ---------------------------------------------------------------------


class FrontendCodec:
    """Encoders for every supported front-end request, and reply parsing.

    Stateless: every method returns an :class:`Outgoing`. Methods of
    requests without a reply of their own take ``need_reply``, which sets
    NEED_REPLY (only meaningful once ``PROTOCOL_F_REPLY_ACK`` is
    negotiated) and makes the transport wait for the u64 ack; check it with
    ``check_ack(out.request, codec.parse_reply(out, msg))``. Arguments are
    validated; violations raise :class:`InvalidArgument` and nothing is
    produced.
    """

    # --- features and ownership
    def get_features(self) -> Outgoing:
        return _frame(GET_FEATURES, b"")

    def set_features(self, features: int, *, need_reply: bool = False) -> Outgoing:
        return _encode_u64(SET_FEATURES, features, need_reply=need_reply)

    def get_protocol_features(self) -> Outgoing:
        return _frame(GET_PROTOCOL_FEATURES, b"")

    def set_protocol_features(self, features: int, *, need_reply: bool = False) -> Outgoing:
        return _encode_u64(SET_PROTOCOL_FEATURES, features, need_reply=need_reply)

    def set_owner(self, *, need_reply: bool = False) -> Outgoing:
        return _frame(SET_OWNER, b"", need_reply=need_reply)

    def reset_owner(self, *, need_reply: bool = False) -> Outgoing:
        """Deprecated by the spec; prefer :meth:`reset_device`."""
        return _frame(RESET_OWNER, b"", need_reply=need_reply)

    def reset_device(self, *, need_reply: bool = False) -> Outgoing:
        return _frame(RESET_DEVICE, b"", need_reply=need_reply)

    def get_queue_num(self) -> Outgoing:
        return _frame(GET_QUEUE_NUM, b"")

    def get_max_mem_slots(self) -> Outgoing:
        return _frame(GET_MAX_MEM_SLOTS, b"")

    def set_status(self, status: int, *, need_reply: bool = False) -> Outgoing:
        _check_int("SET_STATUS: status", status, _U8_MAX)
        return _encode_u64(SET_STATUS, status, need_reply=need_reply)

    def get_status(self) -> Outgoing:
        return _frame(GET_STATUS, b"")

    def check_device_state(self) -> Outgoing:
        return _frame(CHECK_DEVICE_STATE, b"")

    # --- memory
    def set_mem_table(
        self, regions: Sequence[MemRegion], fds: Sequence[int], *, need_reply: bool = False
    ) -> Outgoing:
        """Up to 8 regions, ``fds[i]`` backing ``regions[i]``."""
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise InvalidArgument(
                f"SET_MEM_TABLE: {len(regions)} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} "
                "(use ADD_MEM_REG with CONFIGURE_MEM_SLOTS for more)"
            )
        if len(fds) != len(regions):
            raise InvalidArgument(f"SET_MEM_TABLE: {len(regions)} regions need as many fds, got {len(fds)}")
        checked = tuple(_check_region(f"SET_MEM_TABLE: region {i}", r) for i, r in enumerate(regions))
        payload = _MEM_HEAD.pack(len(checked), 0) + b"".join(_pack_region(r) for r in checked)
        return _frame(SET_MEM_TABLE, payload, fds=fds, need_reply=need_reply, sent=MemTable(checked))

    def add_mem_reg(self, region: MemRegion, fd: int, *, need_reply: bool = False) -> Outgoing:
        region = _check_region("ADD_MEM_REG", region)
        payload = _U64.pack(0) + _pack_region(region)
        return _frame(ADD_MEM_REG, payload, fds=(fd,), need_reply=need_reply, sent=region)

    def rem_mem_reg(self, region: MemRegion, fd: int | None = None, *, need_reply: bool = False) -> Outgoing:
        """The spec says no fd SHOULD be sent; libvhost-user before QEMU 9.0 requires one."""
        region = _check_region("REM_MEM_REG", region)
        payload = _U64.pack(0) + _pack_region(region)
        fds = () if fd is None else (fd,)
        return _frame(REM_MEM_REG, payload, fds=fds, need_reply=need_reply, sent=region)

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: int) -> Outgoing:
        """Dirty log in ``fd`` (needs ``PROTOCOL_F_LOG_SHMFD``); the back end replies with a u64."""
        log = LogInfo(
            _check_int("SET_LOG_BASE: mmap_size", mmap_size, _U64_MAX),
            _check_int("SET_LOG_BASE: mmap_offset", mmap_offset, _U64_MAX),
        )
        return _frame(SET_LOG_BASE, _LOG.pack(log.mmap_size, log.mmap_offset), fds=(fd,), sent=log)

    def set_log_fd(self, fd: int, *, need_reply: bool = False) -> Outgoing:
        return _frame(SET_LOG_FD, b"", fds=(fd,), need_reply=need_reply)

    # --- rings
    def set_vring_num(self, index: int, num: int, *, need_reply: bool = False) -> Outgoing:
        return _encode_state(SET_VRING_NUM, index, num, need_reply=need_reply)

    def set_vring_base(self, index: int, base: int, *, need_reply: bool = False) -> Outgoing:
        """``base``: next avail index (split); both indices and wrap bits (packed)."""
        return _encode_state(SET_VRING_BASE, index, base, need_reply=need_reply)

    def get_vring_base(self, index: int) -> Outgoing:
        """Stops the ring; the reply carries the next avail index."""
        return _encode_state(GET_VRING_BASE, index, 0)

    def set_vring_addr(self, addr: VringAddr, *, need_reply: bool = False) -> Outgoing:
        if not isinstance(addr, VringAddr):
            raise InvalidArgument(f"SET_VRING_ADDR: expected a VringAddr, got {addr!r}")
        _check_index("SET_VRING_ADDR", addr.index)
        _check_int("SET_VRING_ADDR: flags", addr.flags, _U32_MAX)
        for field in ("desc", "used", "avail", "log"):
            _check_int(f"SET_VRING_ADDR: {field}", getattr(addr, field), _U64_MAX)
        payload = _ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)
        return _frame(SET_VRING_ADDR, payload, need_reply=need_reply, sent=addr)

    def set_vring_kick(self, index: int, fd: int | None, *, need_reply: bool = False) -> Outgoing:
        """``fd=None`` sets the NOFD bit: the back end polls instead."""
        return _encode_vring_file(SET_VRING_KICK, index, fd, need_reply=need_reply)

    def set_vring_call(self, index: int, fd: int | None, *, need_reply: bool = False) -> Outgoing:
        """``fd=None`` sets the NOFD bit: the front end polls the used ring."""
        return _encode_vring_file(SET_VRING_CALL, index, fd, need_reply=need_reply)

    def set_vring_err(self, index: int, fd: int | None, *, need_reply: bool = False) -> Outgoing:
        return _encode_vring_file(SET_VRING_ERR, index, fd, need_reply=need_reply)

    def set_vring_enable(self, index: int, enable: bool, *, need_reply: bool = False) -> Outgoing:
        return _encode_state(SET_VRING_ENABLE, index, 1 if enable else 0, need_reply=need_reply)

    def set_vring_endian(self, index: int, big_endian: bool, *, need_reply: bool = False) -> Outgoing:
        return _encode_state(SET_VRING_ENDIAN, index, 1 if big_endian else 0, need_reply=need_reply)

    def vring_kick(self, index: int, *, need_reply: bool = False) -> Outgoing:
        """In-band kick (``PROTOCOL_F_INBAND_NOTIFICATIONS``); num is reserved, 0."""
        return _encode_state(VRING_KICK, index, 0, need_reply=need_reply)

    def set_backend_req_fd(self, fd: int, *, need_reply: bool = False) -> Outgoing:
        return _frame(SET_BACKEND_REQ_FD, b"", fds=(fd,), need_reply=need_reply)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> Outgoing:
        info = InflightInfo(
            0,
            0,
            _check_int("GET_INFLIGHT_FD: num_queues", num_queues, _U16_MAX),
            _check_int("GET_INFLIGHT_FD: queue_size", queue_size, _U16_MAX),
        )
        return _frame(GET_INFLIGHT_FD, _INFLIGHT.pack(0, 0, info.num_queues, info.queue_size), sent=info)

    def set_inflight_fd(self, info: InflightInfo, fd: int, *, need_reply: bool = False) -> Outgoing:
        if not isinstance(info, InflightInfo):
            raise InvalidArgument(f"SET_INFLIGHT_FD: expected an InflightInfo, got {info!r}")
        _check_int("SET_INFLIGHT_FD: mmap_size", info.mmap_size, _U64_MAX)
        _check_int("SET_INFLIGHT_FD: mmap_offset", info.mmap_offset, _U64_MAX)
        _check_int("SET_INFLIGHT_FD: num_queues", info.num_queues, _U16_MAX)
        _check_int("SET_INFLIGHT_FD: queue_size", info.queue_size, _U16_MAX)
        payload = _INFLIGHT.pack(info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size)
        return _frame(SET_INFLIGHT_FD, payload, fds=(fd,), need_reply=need_reply, sent=info)

    # --- device config and device-specific requests
    def get_config(self, offset: int, size: int, *, flags: int = CONFIG_FLAG_WRITABLE) -> Outgoing:
        """Ask for ``size`` bytes at ``offset``; ask only for what the device has."""
        _check_config("GET_CONFIG", offset, size, flags)
        asked = ConfigSpace(offset, size, flags, bytes(size))
        return _frame(GET_CONFIG, _CONFIG_HEAD.pack(offset, size, flags) + asked.data, sent=asked)

    def set_config(
        self, offset: int, data: bytes, *, flags: int = CONFIG_FLAG_WRITABLE, need_reply: bool = False
    ) -> Outgoing:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgument(f"SET_CONFIG: data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        _check_config("SET_CONFIG", offset, len(data), flags)
        config = ConfigSpace(offset, len(data), flags, data)
        payload = _CONFIG_HEAD.pack(offset, len(data), flags) + data
        return _frame(SET_CONFIG, payload, need_reply=need_reply, sent=config)

    def send_rarp(self, mac: bytes, *, need_reply: bool = False) -> Outgoing:
        if not isinstance(mac, bytes | bytearray) or len(mac) != 6:
            raise InvalidArgument(f"SEND_RARP: MAC address must be 6 bytes, got {mac!r}")
        return _frame(SEND_RARP, bytes(mac) + bytes(2), need_reply=need_reply, sent=bytes(mac))

    def net_set_mtu(self, mtu: int, *, need_reply: bool = False) -> Outgoing:
        return _encode_u64(NET_SET_MTU, mtu, need_reply=need_reply)

    def close_crypto_session(self, session_id: int, *, need_reply: bool = False) -> Outgoing:
        return _encode_u64(CLOSE_CRYPTO_SESSION, session_id, need_reply=need_reply)

    def gpu_set_socket(self, fd: int, *, need_reply: bool = False) -> Outgoing:
        return _frame(GPU_SET_SOCKET, b"", fds=(fd,), need_reply=need_reply)

    # --- replies and the back-end channel
    def parse_reply(self, sent: Outgoing, msg: Message) -> ReplyValue:
        """:func:`parse_reply` for the reply to ``sent``."""
        return parse_reply(sent.request, msg, asked=sent.sent)

    def encode_ack(self, request: int, ok: bool) -> Outgoing:
        """Reply to a back-end-channel request that had NEED_REPLY set."""
        return encode_ack(request, ok)


# -- back end ----------------------------------------------------------------------


def encode_reply(request: int, value: ReplyValue | None, *, fds: Sequence[int] = ()) -> Outgoing:
    """A reply (flags VERSION|REPLY) carrying ``value`` for ``request``.

    ``value`` must match the request's reply (module table): ``int`` for a
    u64 reply or an ack, :class:`VringState` for GET_VRING_BASE,
    :class:`ConfigSpace` for GET_CONFIG, or ``None`` there to refuse (empty
    payload), :class:`InflightInfo` plus one fd for GET_INFLIGHT_FD.
    """
    rule = _RULES.get(request)
    name = request_name(request)
    if rule is None:
        raise InvalidArgument(f"cannot encode a reply to {name}: not a supported request")
    kind = rule.reply if rule.reply is not None else _Kind.U64
    if kind is not _Kind.INFLIGHT and fds:
        raise InvalidArgument(f"reply to {name} carries no file descriptors")
    if kind is _Kind.U64:
        if not isinstance(value, int):
            raise InvalidArgument(f"reply to {name} is a u64, got {value!r}")
        payload = _U64.pack(_check_int(f"reply to {name}", value, _U64_MAX))
    elif kind is _Kind.STATE:
        if not isinstance(value, VringState):
            raise InvalidArgument(f"reply to {name} is a VringState, got {value!r}")
        payload = _STATE.pack(
            _check_int(f"reply to {name}: index", value.index, _U32_MAX),
            _check_int(f"reply to {name}: num", value.num, _U32_MAX),
        )
    elif kind is _Kind.CONFIG:
        if value is None:
            payload = b""
        elif isinstance(value, ConfigSpace):
            if not value.size <= len(value.data) <= MAX_CONFIG_SIZE:
                # Longer than size only to answer a request that was (SPDK's whole struct).
                raise InvalidArgument(f"reply to {name}: size {value.size} but {len(value.data)} data bytes")
            _check_config(f"reply to {name}", value.offset, value.size, value.flags)
            payload = _CONFIG_HEAD.pack(value.offset, value.size, value.flags) + bytes(value.data)
        else:
            raise InvalidArgument(f"reply to {name} is a ConfigSpace or None, got {value!r}")
    elif kind is _Kind.INFLIGHT:
        if not isinstance(value, InflightInfo):
            raise InvalidArgument(f"reply to {name} is an InflightInfo, got {value!r}")
        want = 0 if value.mmap_size == 0 else 1
        if len(fds) != want:
            raise InvalidArgument(f"reply to {name}: needs {want} file descriptor(s), got {len(fds)}")
        payload = _INFLIGHT.pack(
            _check_int(f"reply to {name}: mmap_size", value.mmap_size, _U64_MAX),
            _check_int(f"reply to {name}: mmap_offset", value.mmap_offset, _U64_MAX),
            _check_int(f"reply to {name}: num_queues", value.num_queues, _U16_MAX),
            _check_int(f"reply to {name}: queue_size", value.queue_size, _U16_MAX),
        )
    else:  # pragma: no cover - the table only uses the kinds above for replies
        raise AssertionError(f"unhandled reply kind {kind}")
    return _frame(request, payload, fds=fds, reply=True)


def encode_ack(request: int, ok: bool) -> Outgoing:
    """A REPLY_ACK: u64 0 for success, 1 for failure (either direction)."""
    payload = _U64.pack(0 if ok else 1)
    return _frame(request, payload, reply=True)


class BackendCodec:
    """The back end's side: decode requests, encode replies and back-end requests."""

    @staticmethod
    def decode_request(msg: Message) -> RequestPayload:
        """:func:`decode_request`."""
        return decode_request(msg)

    def encode_reply(self, request: int, value: ReplyValue | None, *, fds: Sequence[int] = ()) -> Outgoing:
        """:func:`encode_reply`."""
        return encode_reply(request, value, fds=fds)

    def encode_ack(self, request: int, ok: bool) -> Outgoing:
        """:func:`encode_ack`."""
        return encode_ack(request, ok)

    # Requests on the back-end channel (need PROTOCOL_F_BACKEND_REQ).
    def config_change(self, *, need_reply: bool = False) -> Outgoing:
        """BACKEND_CONFIG_CHANGE_MSG: the device config changed (needs PROTOCOL_F_CONFIG)."""
        return self._backend_request(BACKEND_CONFIG_CHANGE_MSG, b"", need_reply, None)

    def vring_call(self, index: int, *, need_reply: bool = False) -> Outgoing:
        """BACKEND_VRING_CALL: in-band used-buffer notification."""
        state = VringState(_check_index("BACKEND_VRING_CALL", index), 0)
        return self._backend_request(BACKEND_VRING_CALL, _STATE.pack(index, 0), need_reply, state)

    def vring_err(self, index: int, *, need_reply: bool = False) -> Outgoing:
        """BACKEND_VRING_ERR: in-band error notification."""
        state = VringState(_check_index("BACKEND_VRING_ERR", index), 0)
        return self._backend_request(BACKEND_VRING_ERR, _STATE.pack(index, 0), need_reply, state)

    @staticmethod
    def _backend_request(request: int, payload: bytes, need_reply: bool, sent: RequestPayload) -> Outgoing:
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        data = _HEADER.pack(request, flags, len(payload)) + payload
        return Outgoing(request, data, (), need_reply, sent)

    @staticmethod
    def parse_ack(request: int, msg: Message) -> int:
        """The front end's u64 ack to a back-end request; malformed → DriverProtocolError."""
        name = _backend_request_name(request)
        if msg.flags & ~NEED_REPLY != VERSION | REPLY:
            raise DriverProtocolError(
                f"reply to {name}: flags 0x{msg.flags:x}, expected 0x{VERSION | REPLY:x}"
            )
        if msg.request != request:
            raise DriverProtocolError(f"reply to {name} carries request code {msg.request}")
        if msg.fds:
            raise DriverProtocolError(f"reply to {name}: {len(msg.fds)} unexpected file descriptor(s)")
        _exact(_Kind.U64, f"reply to {name}", msg.payload, _U64.size, DriverProtocolError)
        value: int = _U64.unpack(msg.payload)[0]
        return value


# -- stream framing ----------------------------------------------------------------


class MessageReader:
    """Cut a byte stream (plus SCM_RIGHTS fds) into :class:`Message` records.

    ``feed(data, fds)`` once per recvmsg; then ``next_message()`` until it
    returns ``None``. Each fd group is attached to the message that contains
    the *last* byte of the chunk it arrived with: Linux hands out SCM_RIGHTS
    fds with a read that includes the first byte of the sendmsg that carried
    them and ends that read inside the same sendmsg, but the read may begin
    with leftover bytes of the previous message (seen with small reads on a
    socketpair). With one message per sendmsg, the last byte of the chunk is
    therefore always in the message the fds were sent with. The header is
    checked as soon as it is complete: version bits must be 1 and
    size at most ``max_payload``; a message may carry at most
    :data:`MAX_FDS` fds. A violation raises ``error`` (the class given at
    construction: :class:`DeviceProtocolError` on the front end,
    :class:`DriverProtocolError` in a back end) from ``next_message``, after
    the messages complete before it have been returned; the reader then
    stays broken. Fds it still holds (:meth:`pending_fds`) are the reader's
    until returned in a message; :meth:`close_pending_fds` closes them when
    the connection is dropped. ``names`` only labels error messages (pass
    :data:`BACKEND_REQUEST_NAMES` for the back-end channel).
    """

    def __init__(
        self,
        error: type[PyvirtioError] = DeviceProtocolError,
        *,
        max_payload: int = MAX_PAYLOAD,
        names: Mapping[int, str] = REQUEST_NAMES,
    ) -> None:
        self._error = error
        self._names = names
        self._max_payload = max_payload
        self._buf = bytearray()
        self._start = 0  # stream offset of _buf[0]
        self._end = 0  # stream offset just past the last byte fed
        self._fd_groups: deque[tuple[int, tuple[int, ...]]] = deque()
        self._ready: deque[Message] = deque()
        self._failure: str | None = None

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add bytes received from the peer, with the fds received alongside them."""
        if fds:
            # Stream offset of the chunk's last byte (of the next byte if the
            # chunk is empty): the fds belong to the message containing it.
            owner = self._end + len(data) - 1 if data else self._end
            self._fd_groups.append((owner, tuple(fds)))
        if self._failure is not None:
            return  # keep the fds so close_pending_fds() can close them
        self._buf += data
        self._end += len(data)
        self._parse()

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        if self._ready:
            return self._ready.popleft()
        if self._failure is not None:
            raise self._error(self._failure)
        return None

    def __iter__(self) -> MessageReader:
        return self

    def __next__(self) -> Message:
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg

    @property
    def buffered(self) -> int:
        """Bytes of a message not yet complete (non-zero at EOF means a truncated message)."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        return self._failure is not None

    def pending_fds(self) -> tuple[int, ...]:
        """Fds received but not yet handed out in a returned message."""
        held = [fd for msg in self._ready for fd in msg.fds]
        held.extend(fd for _, group in self._fd_groups for fd in group)
        return tuple(held)

    def close_pending_fds(self) -> None:
        """Close every fd the reader holds and drop all buffered input.

        For connection teardown: messages not yet returned are discarded with
        their fds, so nothing received leaks.
        """
        fds = self.pending_fds()
        self._ready.clear()
        self._fd_groups.clear()
        self._buf.clear()
        self._start = self._end
        _close_fds(fds)

    def _fail(self, reason: str) -> None:
        self._failure = reason

    def _parse(self) -> None:
        while self._failure is None and len(self._buf) >= HEADER_SIZE:
            request, flags, size = _HEADER.unpack_from(self._buf, 0)
            name = self._names.get(request, f"request {request}")
            if flags & VERSION_MASK != VERSION:
                self._fail(
                    f"{name}: header version {flags & VERSION_MASK} (flags 0x{flags:x}), expected {VERSION}"
                )
                return
            if size > self._max_payload:
                self._fail(f"{name}: payload size {size} exceeds the limit of {self._max_payload} bytes")
                return
            total = HEADER_SIZE + size
            if len(self._buf) < total:
                break
            end = self._start + total
            fds: list[int] = []
            while self._fd_groups and self._fd_groups[0][0] < end:
                fds.extend(self._fd_groups[0][1])
                self._fd_groups.popleft()
            if len(fds) > MAX_FDS:
                # Put them back so close_pending_fds() finds them.
                self._fd_groups.appendleft((self._start, tuple(fds)))
                self._fail(f"{name}: {len(fds)} file descriptors, at most {MAX_FDS} allowed")
                return
            payload = bytes(self._buf[HEADER_SIZE:total])
            del self._buf[:total]
            self._start = end
            self._ready.append(Message(request, flags, payload, tuple(fds)))
        held = sum(len(group) for _, group in self._fd_groups)
        if self._failure is None and held > MAX_FDS:
            self._fail(
                f"{held} file descriptors received for an incomplete message, at most {MAX_FDS} allowed"
            )


def _close_fds(fds: Iterable[int]) -> None:
    """The one place this module closes fds: on connection teardown."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- SCM_RIGHTS ancillary data (pure data: the transport and the server do the sendmsg/recvmsg) ----


def fds_from_ancillary(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors in recvmsg() ancillary data (SCM_RIGHTS records only)."""
    import array
    import socket

    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """sendmsg() ancillary data passing ``fds`` (empty when there are none)."""
    import array
    import socket

    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
