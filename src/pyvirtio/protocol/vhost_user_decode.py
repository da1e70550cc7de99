"""The vhost-user request table, and the checks of every message received.

Theory of operation
-------------------
:data:`RULES` gives each front-end request this codec supports its payload
kind, the number of fds it carries and its reply. This module applies the
table to a :class:`~pyvirtio.protocol.vhost_user_messages.Message` that has
arrived: :func:`decode_request` (a back end checking a front-end request),
:func:`decode_backend_request` (a front end checking a request on the
back-end channel), :func:`parse_reply` and :func:`check_ack` (a front end
checking the back end's answer). The encoders
(:mod:`pyvirtio.protocol.vhost_user_encode`) read the same table for what a
reply carries and which requests expect one (:data:`EXPECTS_REPLY`).

Only message *syntax* is checked here (sizes, version, fd counts, value ranges
of the wire format); whether a request is allowed *now* (after which
negotiation, in which ring state) is the caller's business. Whose fault a
malformed message is depends on the direction: a bad reply is the back end's
(:class:`~pyvirtio.errors.DeviceProtocolError`), a bad request is the
frontend's (:class:`~pyvirtio.errors.DriverProtocolError`). When a decoder
raises, the fds of the offending message still belong to the caller, who must
close them.

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
GET_SHARED_OBJECT (41) and SET_DEVICE_STATE_FD (42) have names and codes
(:mod:`pyvirtio.protocol.vhost_user_messages`) but no rule, encoder or
decoder: decoding one raises DriverProtocolError ("not supported"), and a
back end answers it with a NACK or drops the connection. The payload layouts
are in that module's docstring. GET_CONFIG's request carries ``size`` zero
bytes after its 12-byte head, and its reply must have exactly the size asked;
a reply with an empty payload is the back end's way to refuse.

Back-end requests (sent by the back end on the SET_BACKEND_REQ_FD channel;
vhost-user.rst, "Back-end message types"): CONFIG_CHANGE_MSG (no payload),
VRING_CALL and VRING_ERR (vring state) are decoded by
:func:`decode_backend_request`; the others are named but not supported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from pyvirtio.errors import (
    DeviceError,
    DeviceProtocolError,
    DriverProtocolError,
    InvalidArgument,
    PyvirtioError,
)
from pyvirtio.protocol.vhost_user_messages import (
    ADD_MEM_REG,
    ADDR,
    BACKEND_CONFIG_CHANGE_MSG,
    BACKEND_REQUEST_NAMES,
    BACKEND_VRING_CALL,
    BACKEND_VRING_ERR,
    CHECK_DEVICE_STATE,
    CLOSE_CRYPTO_SESSION,
    CONFIG_HEAD,
    GET_CONFIG,
    GET_FEATURES,
    GET_INFLIGHT_FD,
    GET_MAX_MEM_SLOTS,
    GET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    GET_STATUS,
    GET_VRING_BASE,
    GPU_SET_SOCKET,
    INFLIGHT,
    LOG,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MEM_HEAD,
    MEM_REG,
    NEED_REPLY,
    NET_SET_MTU,
    REGION,
    REM_MEM_REG,
    REPLY,
    REQUEST_NAMES,
    RESET_DEVICE,
    RESET_OWNER,
    SEND_RARP,
    SET_BACKEND_REQ_FD,
    SET_CONFIG,
    SET_FEATURES,
    SET_INFLIGHT_FD,
    SET_LOG_BASE,
    SET_LOG_FD,
    SET_MEM_TABLE,
    SET_OWNER,
    SET_PROTOCOL_FEATURES,
    SET_STATUS,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
    SET_VRING_ENDIAN,
    SET_VRING_ERR,
    SET_VRING_KICK,
    SET_VRING_NUM,
    STATE,
    U8_MAX,
    U64,
    VERSION,
    VERSION_MASK,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VRING_IDX_MASK,
    VRING_KICK,
    VRING_NOFD_MASK,
    ConfigSpace,
    InflightInfo,
    LogInfo,
    MemRegion,
    MemTable,
    Message,
    ReplyValue,
    RequestPayload,
    VringAddr,
    VringFile,
    VringState,
    backend_request_name,
    request_name,
)

# -- the request table ----------------------------------------------------------


class Kind(enum.Enum):
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
class Rule:
    """One row of the request table: payload kind, fd count, reply kind."""

    payload: Kind
    # (min, max) fds; None when the payload decides (MEM_TABLE, VRING_FILE).
    fds: tuple[int, int] | None
    # The natural reply, or None when the only reply is a REPLY_ACK u64.
    reply: Kind | None


_NO_FD: Final = (0, 0)
_ONE_FD: Final = (1, 1)

# Request code -> rule. Codes in REQUEST_NAMES but not here are known but
# not supported by this codec.
RULES: Final[dict[int, Rule]] = {
    GET_FEATURES: Rule(Kind.NONE, _NO_FD, Kind.U64),
    SET_FEATURES: Rule(Kind.U64, _NO_FD, None),
    SET_OWNER: Rule(Kind.NONE, _NO_FD, None),
    RESET_OWNER: Rule(Kind.NONE, _NO_FD, None),
    SET_MEM_TABLE: Rule(Kind.MEM_TABLE, None, None),
    SET_LOG_BASE: Rule(Kind.LOG, _ONE_FD, Kind.U64),
    SET_LOG_FD: Rule(Kind.NONE, _ONE_FD, None),
    SET_VRING_NUM: Rule(Kind.STATE, _NO_FD, None),
    SET_VRING_ADDR: Rule(Kind.ADDR, _NO_FD, None),
    SET_VRING_BASE: Rule(Kind.STATE, _NO_FD, None),
    GET_VRING_BASE: Rule(Kind.STATE, _NO_FD, Kind.STATE),
    SET_VRING_KICK: Rule(Kind.VRING_FILE, None, None),
    SET_VRING_CALL: Rule(Kind.VRING_FILE, None, None),
    SET_VRING_ERR: Rule(Kind.VRING_FILE, None, None),
    GET_PROTOCOL_FEATURES: Rule(Kind.NONE, _NO_FD, Kind.U64),
    SET_PROTOCOL_FEATURES: Rule(Kind.U64, _NO_FD, None),
    GET_QUEUE_NUM: Rule(Kind.NONE, _NO_FD, Kind.U64),
    SET_VRING_ENABLE: Rule(Kind.STATE, _NO_FD, None),
    SEND_RARP: Rule(Kind.MAC, _NO_FD, None),
    NET_SET_MTU: Rule(Kind.U64, _NO_FD, None),
    SET_BACKEND_REQ_FD: Rule(Kind.NONE, _ONE_FD, None),
    SET_VRING_ENDIAN: Rule(Kind.STATE, _NO_FD, None),
    GET_CONFIG: Rule(Kind.CONFIG, _NO_FD, Kind.CONFIG),
    SET_CONFIG: Rule(Kind.CONFIG, _NO_FD, None),
    CLOSE_CRYPTO_SESSION: Rule(Kind.U64, _NO_FD, None),
    GET_INFLIGHT_FD: Rule(Kind.INFLIGHT, _NO_FD, Kind.INFLIGHT),
    SET_INFLIGHT_FD: Rule(Kind.INFLIGHT, _ONE_FD, None),
    GPU_SET_SOCKET: Rule(Kind.NONE, _ONE_FD, None),
    RESET_DEVICE: Rule(Kind.NONE, _NO_FD, None),
    VRING_KICK: Rule(Kind.STATE, _NO_FD, None),
    GET_MAX_MEM_SLOTS: Rule(Kind.NONE, _NO_FD, Kind.U64),
    ADD_MEM_REG: Rule(Kind.MEM_REG, _ONE_FD, None),
    # "No file descriptors SHOULD be passed ... the back-end MAY accept
    # messages with one file descriptor" (older QEMU and libvhost-user
    # send/expect one).
    REM_MEM_REG: Rule(Kind.MEM_REG, (0, 1), None),
    SET_STATUS: Rule(Kind.U64, _NO_FD, None),
    GET_STATUS: Rule(Kind.NONE, _NO_FD, Kind.U64),
    CHECK_DEVICE_STATE: Rule(Kind.NONE, _NO_FD, Kind.U64),
}

_BACKEND_RULES: Final[dict[int, Rule]] = {
    BACKEND_CONFIG_CHANGE_MSG: Rule(Kind.NONE, _NO_FD, None),
    BACKEND_VRING_CALL: Rule(Kind.STATE, _NO_FD, None),
    BACKEND_VRING_ERR: Rule(Kind.STATE, _NO_FD, None),
}

EXPECTS_REPLY: Final = frozenset(code for code, rule in RULES.items() if rule.reply is not None)


# -- payload decoding (shared by both directions) ---------------------------------


def check_payload_size(kind: Kind, name: str, payload: bytes, size: int, error: type[PyvirtioError]) -> None:
    """Raise ``error`` unless ``payload`` is exactly ``size`` bytes (``name`` labels the message)."""
    if len(payload) != size:
        raise error(f"{name}: {kind.value} payload must be {size} bytes, got {len(payload)}")


def _decode_payload(kind: Kind, name: str, payload: bytes, error: type[PyvirtioError]) -> RequestPayload:
    """Check the size of ``payload`` against ``kind`` and return it typed."""
    if kind is Kind.NONE:
        check_payload_size(kind, name, payload, 0, error)
        return None
    if kind is Kind.U64:
        check_payload_size(kind, name, payload, U64.size, error)
        value: int = U64.unpack(payload)[0]
        return value
    if kind is Kind.MAC:
        check_payload_size(kind, name, payload, U64.size, error)
        return bytes(payload[:6])
    if kind is Kind.STATE:
        check_payload_size(kind, name, payload, STATE.size, error)
        return VringState(*STATE.unpack(payload))
    if kind is Kind.ADDR:
        check_payload_size(kind, name, payload, ADDR.size, error)
        return VringAddr(*ADDR.unpack(payload))
    if kind is Kind.MEM_TABLE:
        return _decode_mem_table(name, payload, error)
    if kind is Kind.MEM_REG:
        check_payload_size(kind, name, payload, MEM_REG.size, error)
        _padding, gpa, size, uaddr, offset = MEM_REG.unpack(payload)
        return MemRegion(gpa, size, uaddr, offset)
    if kind is Kind.CONFIG:
        return _decode_config(name, payload, error)
    if kind is Kind.VRING_FILE:
        check_payload_size(kind, name, payload, U64.size, error)
        raw: int = U64.unpack(payload)[0]
        if raw & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise error(f"{name}: reserved bits set in u64 payload 0x{raw:x} (only bits 0-8 are defined)")
        return VringFile(raw & VRING_IDX_MASK, bool(raw & VRING_NOFD_MASK))
    if kind is Kind.INFLIGHT:
        check_payload_size(kind, name, payload, INFLIGHT.size, error)
        return InflightInfo(*INFLIGHT.unpack(payload))
    if kind is Kind.LOG:
        check_payload_size(kind, name, payload, LOG.size, error)
        return LogInfo(*LOG.unpack(payload))
    raise AssertionError(f"unhandled payload kind {kind}")  # pragma: no cover


def _decode_mem_table(name: str, payload: bytes, error: type[PyvirtioError]) -> MemTable:
    if len(payload) < MEM_HEAD.size:
        raise error(f"{name}: memory regions payload must be at least 8 bytes, got {len(payload)}")
    nregions, _padding = MEM_HEAD.unpack_from(payload, 0)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise error(f"{name}: {nregions} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} allowed")
    exact = MEM_HEAD.size + nregions * REGION.size
    full = MEM_HEAD.size + VHOST_MEMORY_BASELINE_NREGIONS * REGION.size
    # QEMU sends exactly nregions regions; SPDK sends the whole C struct.
    if len(payload) not in (exact, full):
        raise error(
            f"{name}: payload of {len(payload)} bytes for {nregions} regions (must be {exact} or {full})"
        )
    regions = tuple(
        MemRegion(*REGION.unpack_from(payload, MEM_HEAD.size + i * REGION.size)) for i in range(nregions)
    )
    return MemTable(regions)


def _decode_config(name: str, payload: bytes, error: type[PyvirtioError]) -> ConfigSpace:
    if len(payload) < CONFIG_HEAD.size:
        raise error(f"{name}: config space payload must be at least 12 bytes, got {len(payload)}")
    offset, size, flags = CONFIG_HEAD.unpack_from(payload, 0)
    if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
        raise error(f"{name}: config range offset {offset} size {size} exceeds {MAX_CONFIG_SIZE} bytes")
    have = len(payload) - CONFIG_HEAD.size
    if have < size:
        # Strict: the data would end before the size field says (a read past the message).
        raise error(f"{name}: config size field {size} but {have} data bytes")
    if have > MAX_CONFIG_SIZE:
        raise error(f"{name}: {have} config data bytes, at most {MAX_CONFIG_SIZE}")
    # Tolerant: more data bytes than the size field names. SPDK's virtio-user sends its
    # whole 256-byte config struct whatever it asks for (and wants its reply in that
    # length); libvhost-user (qemu-storage-daemon) and DPDK take that. ``data`` keeps every
    # byte sent: its length is the request's room, ``size`` what it means.
    return ConfigSpace(offset, size, flags, bytes(payload[CONFIG_HEAD.size :]))


def _check_fds(name: str, rule: Rule, value: RequestPayload, nfds: int, error: type[PyvirtioError]) -> None:
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
    rule = RULES.get(msg.request)
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
    name = backend_request_name(msg.request)
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
    rule = RULES.get(request)
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
    kind = rule.reply if rule.reply is not None else Kind.U64
    what = f"reply to {name}"
    if kind is not Kind.INFLIGHT and msg.fds:
        raise DeviceProtocolError(f"{what}: {len(msg.fds)} unexpected file descriptor(s)")
    if kind is Kind.CONFIG:
        return _parse_config_reply(what, msg, asked)
    value = _decode_payload(kind, what, msg.payload, DeviceProtocolError)
    if isinstance(value, int):
        if request == GET_STATUS and value > U8_MAX:
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
