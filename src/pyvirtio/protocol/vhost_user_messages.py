"""The vhost-user vocabulary: request codes, names, flags, limits, wire layouts, typed payloads.

Theory of operation
-------------------
Everything the vhost-user codec modules agree on, and nothing that decides:
the numbers of the spec (QEMU docs/interop/vhost-user.rst), the
:class:`struct.Struct` layouts that put them on the wire, the frozen
dataclasses a decoded payload becomes, and the two message records:
:class:`Message` (one framed message as received, with its fds) and
:class:`Outgoing` (one message ready to send, with the fds to attach and
whether a reply must be awaited). Which request carries which payload, which
fds and which reply is the request table of
:mod:`pyvirtio.protocol.vhost_user_decode`; this module only names things.

A message is a 12-byte header (``request`` u32, ``flags`` u32, ``size`` u32,
machine byte order; vhost-user.rst, "Header": version in bits 0-1, REPLY in
bit 2, NEED_REPLY in bit 3) followed by ``size`` bytes of payload.

Layouts (vhost-user.rst, "Payload"), machine byte order with no implicit
padding: u64 ``Q``; vring state ``II`` (index, num); vring address
``IIQQQQ`` (index, flags, desc, used, avail, log); memory regions ``II``
(nregions, padding) + nregions x ``QQQQ`` (guest_phys_addr, memory_size,
userspace_addr, mmap_offset); single region ``Q`` padding + ``QQQQ``; config
space ``III`` (offset, size, flags) + size bytes; inflight ``QQHH`` + 4 bytes
padding (24, as QEMU's C struct); log ``QQ`` (mmap_size, mmap_offset, what
QEMU sends, although the request table of the spec says u64). The structs
(:data:`HEADER`, :data:`U64`, :data:`STATE`, ...) and the integer bounds
(:data:`U8_MAX` to :data:`U64_MAX`) are public for the decoder, the encoders
and the stream reader; the facade :mod:`pyvirtio.protocol.vhost_user` does not
re-export them.

Limits: at most :data:`MAX_FDS` fds in one message (QEMU's
VHOST_MEMORY_BASELINE_NREGIONS), config access of at most
:data:`MAX_CONFIG_SIZE` bytes (QEMU's VHOST_USER_MAX_CONFIG_SIZE), and a
payload of at most :data:`MAX_PAYLOAD` bytes, a bound of this codec's own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

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

U8_MAX: Final = 0xFF
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# Wire layouts, machine byte order with no implicit padding ("=").
HEADER: Final = struct.Struct("=III")
U64: Final = struct.Struct("=Q")
STATE: Final = struct.Struct("=II")
ADDR: Final = struct.Struct("=IIQQQQ")
MEM_HEAD: Final = struct.Struct("=II")
REGION: Final = struct.Struct("=QQQQ")
MEM_REG: Final = struct.Struct("=QQQQQ")  # padding u64 + region
CONFIG_HEAD: Final = struct.Struct("=III")
INFLIGHT: Final = struct.Struct("=QQHH4x")
LOG: Final = struct.Struct("=QQ")


def request_name(request: int) -> str:
    """The spec name of a front-end request code, or ``"request N"``."""
    return REQUEST_NAMES.get(request, f"request {request}")


def backend_request_name(request: int) -> str:
    """The spec name of a back-end request code, or ``"back-end request N"``."""
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
"""What :func:`~pyvirtio.protocol.vhost_user_decode.decode_request` returns, by request.

See the request table in :mod:`pyvirtio.protocol.vhost_user_decode`.
"""

ReplyValue: TypeAlias = int | VringState | ConfigSpace | InflightInfo
"""What :func:`~pyvirtio.protocol.vhost_user_decode.parse_reply` returns.

u64 (including acks), vring state, config, inflight.
"""


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
        return HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message ready to send: ``data`` (header + payload) with ``fds`` attached.

    ``expects_reply`` tells the transport to wait for a reply before the next
    request; ``sent`` is the typed payload the message carries, which
    :meth:`~pyvirtio.protocol.vhost_user_encode.FrontendCodec.parse_reply`
    uses to check the reply against the question (ring index of
    GET_VRING_BASE, offset and size of GET_CONFIG).
    """

    request: int
    data: bytes
    fds: tuple[int, ...] = ()
    expects_reply: bool = False
    sent: RequestPayload = None

    @property
    def name(self) -> str:
        return request_name(self.request)
