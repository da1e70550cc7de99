"""Building vhost-user messages: the front end's and the back end's encoders.

Theory of operation
-------------------
Every encoder checks its arguments before it packs them, so a message goes
out well formed or not at all: a bad argument is the caller's fault
(:class:`~pyvirtio.errors.InvalidArgument`) and nothing is produced. The
result is an :class:`~pyvirtio.protocol.vhost_user_messages.Outgoing`: header
and payload bytes, the fds to attach, whether the transport must wait for a
reply, and the typed payload sent, against which
:meth:`FrontendCodec.parse_reply` checks the reply (ring index of
GET_VRING_BASE, offset and size of GET_CONFIG). Nothing is sent from here:
the transport (``transport/vhost_user.py``) or the back end (``backends/``)
performs the sendmsg.

:class:`FrontendCodec` encodes every front-end request of the request table
in :mod:`pyvirtio.protocol.vhost_user_decode` (vhost-user.rst, "Front-end
message types"; the payload layouts are in
:mod:`pyvirtio.protocol.vhost_user_messages`). NEED_REPLY is set only on
requests without a reply of their own ("VHOST_USER_PROTOCOL_F_REPLY_ACK"; see
the comment in ``_frame``). GET_CONFIG's request carries ``size`` zero bytes
after its 12-byte head. Ring indices are bounded by what the u64 of
SET_VRING_KICK/CALL can carry (bits 0-7), for every ring-addressing request.

:func:`encode_reply` and :func:`encode_ack` build replies (flags
VERSION|REPLY) in the shape the request table gives each request's reply.
:class:`BackendCodec` gathers the back end's side: request decoding, replies,
and the requests a back end may send on the back-end channel (vhost-user.rst,
"Back-end message types"; needs ``PROTOCOL_F_BACKEND_REQ``):
CONFIG_CHANGE_MSG (no payload), VRING_CALL and VRING_ERR (vring state), with
the check of the front end's ack to them (:meth:`BackendCodec.parse_ack`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvirtio.errors import DriverProtocolError, InvalidArgument
from pyvirtio.protocol.vhost_user_decode import (
    EXPECTS_REPLY,
    RULES,
    Kind,
    check_payload_size,
    decode_request,
    parse_reply,
)
from pyvirtio.protocol.vhost_user_messages import (
    ADD_MEM_REG,
    ADDR,
    BACKEND_CONFIG_CHANGE_MSG,
    BACKEND_VRING_CALL,
    BACKEND_VRING_ERR,
    CHECK_DEVICE_STATE,
    CLOSE_CRYPTO_SESSION,
    CONFIG_FLAG_WRITABLE,
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
    HEADER,
    INFLIGHT,
    LOG,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    MEM_HEAD,
    NEED_REPLY,
    NET_SET_MTU,
    REGION,
    REM_MEM_REG,
    REPLY,
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
    U16_MAX,
    U32_MAX,
    U64,
    U64_MAX,
    VERSION,
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
    Outgoing,
    ReplyValue,
    RequestPayload,
    VringAddr,
    VringFile,
    VringState,
    backend_request_name,
    request_name,
)

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
        natural = request in EXPECTS_REPLY
        # Requests with a reply of their own never need the NEED_REPLY flag
        # ("no behavioural change"), and QEMU-derived back ends echo it in
        # replies, which stricter front ends reject; so it is not set.
        if need_reply and not natural:
            flags |= NEED_REPLY
        expects_reply = natural or need_reply
    data = HEADER.pack(request, flags, len(payload)) + payload
    return Outgoing(request, data, fd_tuple, expects_reply, sent)


def _encode_state(request: int, index: int, num: int, *, need_reply: bool = False) -> Outgoing:
    name = request_name(request)
    state = VringState(_check_index(name, index), _check_int(f"{name}: num", num, U32_MAX))
    return _frame(request, STATE.pack(state.index, state.num), need_reply=need_reply, sent=state)


def _encode_u64(request: int, value: int, *, need_reply: bool = False) -> Outgoing:
    value = _check_int(f"{request_name(request)}: value", value, U64_MAX)
    return _frame(request, U64.pack(value), need_reply=need_reply, sent=value)


def _encode_vring_file(request: int, index: int, fd: int | None, *, need_reply: bool) -> Outgoing:
    name = request_name(request)
    index = _check_index(name, index)
    if fd is None:
        vf = VringFile(index, True)
        return _frame(request, U64.pack(index | VRING_NOFD_MASK), need_reply=need_reply, sent=vf)
    vf = VringFile(index, False)
    return _frame(request, U64.pack(index), fds=(fd,), need_reply=need_reply, sent=vf)


def _check_region(what: str, region: MemRegion) -> MemRegion:
    if not isinstance(region, MemRegion):
        raise InvalidArgument(f"{what}: expected a MemRegion, got {region!r}")
    for field in ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"):
        _check_int(f"{what}: {field}", getattr(region, field), U64_MAX)
    return region


def _pack_region(region: MemRegion) -> bytes:
    return REGION.pack(region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset)


def _check_config(what: str, offset: int, size: int, flags: int) -> None:
    _check_int(f"{what}: flags", flags, U32_MAX)
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
        _check_int("SET_STATUS: status", status, U8_MAX)
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
        payload = MEM_HEAD.pack(len(checked), 0) + b"".join(_pack_region(r) for r in checked)
        return _frame(SET_MEM_TABLE, payload, fds=fds, need_reply=need_reply, sent=MemTable(checked))

    def add_mem_reg(self, region: MemRegion, fd: int, *, need_reply: bool = False) -> Outgoing:
        region = _check_region("ADD_MEM_REG", region)
        payload = U64.pack(0) + _pack_region(region)
        return _frame(ADD_MEM_REG, payload, fds=(fd,), need_reply=need_reply, sent=region)

    def rem_mem_reg(self, region: MemRegion, fd: int | None = None, *, need_reply: bool = False) -> Outgoing:
        """The spec says no fd SHOULD be sent; libvhost-user before QEMU 9.0 requires one."""
        region = _check_region("REM_MEM_REG", region)
        payload = U64.pack(0) + _pack_region(region)
        fds = () if fd is None else (fd,)
        return _frame(REM_MEM_REG, payload, fds=fds, need_reply=need_reply, sent=region)

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: int) -> Outgoing:
        """Dirty log in ``fd`` (needs ``PROTOCOL_F_LOG_SHMFD``); the back end replies with a u64."""
        log = LogInfo(
            _check_int("SET_LOG_BASE: mmap_size", mmap_size, U64_MAX),
            _check_int("SET_LOG_BASE: mmap_offset", mmap_offset, U64_MAX),
        )
        return _frame(SET_LOG_BASE, LOG.pack(log.mmap_size, log.mmap_offset), fds=(fd,), sent=log)

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
        _check_int("SET_VRING_ADDR: flags", addr.flags, U32_MAX)
        for field in ("desc", "used", "avail", "log"):
            _check_int(f"SET_VRING_ADDR: {field}", getattr(addr, field), U64_MAX)
        payload = ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)
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
            _check_int("GET_INFLIGHT_FD: num_queues", num_queues, U16_MAX),
            _check_int("GET_INFLIGHT_FD: queue_size", queue_size, U16_MAX),
        )
        return _frame(GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, info.num_queues, info.queue_size), sent=info)

    def set_inflight_fd(self, info: InflightInfo, fd: int, *, need_reply: bool = False) -> Outgoing:
        if not isinstance(info, InflightInfo):
            raise InvalidArgument(f"SET_INFLIGHT_FD: expected an InflightInfo, got {info!r}")
        _check_int("SET_INFLIGHT_FD: mmap_size", info.mmap_size, U64_MAX)
        _check_int("SET_INFLIGHT_FD: mmap_offset", info.mmap_offset, U64_MAX)
        _check_int("SET_INFLIGHT_FD: num_queues", info.num_queues, U16_MAX)
        _check_int("SET_INFLIGHT_FD: queue_size", info.queue_size, U16_MAX)
        payload = INFLIGHT.pack(info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size)
        return _frame(SET_INFLIGHT_FD, payload, fds=(fd,), need_reply=need_reply, sent=info)

    # --- device config and device-specific requests
    def get_config(self, offset: int, size: int, *, flags: int = CONFIG_FLAG_WRITABLE) -> Outgoing:
        """Ask for ``size`` bytes at ``offset``; ask only for what the device has."""
        _check_config("GET_CONFIG", offset, size, flags)
        asked = ConfigSpace(offset, size, flags, bytes(size))
        return _frame(GET_CONFIG, CONFIG_HEAD.pack(offset, size, flags) + asked.data, sent=asked)

    def set_config(
        self, offset: int, data: bytes, *, flags: int = CONFIG_FLAG_WRITABLE, need_reply: bool = False
    ) -> Outgoing:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgument(f"SET_CONFIG: data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        _check_config("SET_CONFIG", offset, len(data), flags)
        config = ConfigSpace(offset, len(data), flags, data)
        payload = CONFIG_HEAD.pack(offset, len(data), flags) + data
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

    ``value`` must match the request's reply (the request table of
    :mod:`pyvirtio.protocol.vhost_user_decode`): ``int`` for a
    u64 reply or an ack, :class:`VringState` for GET_VRING_BASE,
    :class:`ConfigSpace` for GET_CONFIG, or ``None`` there to refuse (empty
    payload), :class:`InflightInfo` plus one fd for GET_INFLIGHT_FD.
    """
    rule = RULES.get(request)
    name = request_name(request)
    if rule is None:
        raise InvalidArgument(f"cannot encode a reply to {name}: not a supported request")
    kind = rule.reply if rule.reply is not None else Kind.U64
    if kind is not Kind.INFLIGHT and fds:
        raise InvalidArgument(f"reply to {name} carries no file descriptors")
    if kind is Kind.U64:
        if not isinstance(value, int):
            raise InvalidArgument(f"reply to {name} is a u64, got {value!r}")
        payload = U64.pack(_check_int(f"reply to {name}", value, U64_MAX))
    elif kind is Kind.STATE:
        if not isinstance(value, VringState):
            raise InvalidArgument(f"reply to {name} is a VringState, got {value!r}")
        payload = STATE.pack(
            _check_int(f"reply to {name}: index", value.index, U32_MAX),
            _check_int(f"reply to {name}: num", value.num, U32_MAX),
        )
    elif kind is Kind.CONFIG:
        if value is None:
            payload = b""
        elif isinstance(value, ConfigSpace):
            if not value.size <= len(value.data) <= MAX_CONFIG_SIZE:
                # Longer than size only to answer a request that was (SPDK's whole struct).
                raise InvalidArgument(f"reply to {name}: size {value.size} but {len(value.data)} data bytes")
            _check_config(f"reply to {name}", value.offset, value.size, value.flags)
            payload = CONFIG_HEAD.pack(value.offset, value.size, value.flags) + bytes(value.data)
        else:
            raise InvalidArgument(f"reply to {name} is a ConfigSpace or None, got {value!r}")
    elif kind is Kind.INFLIGHT:
        if not isinstance(value, InflightInfo):
            raise InvalidArgument(f"reply to {name} is an InflightInfo, got {value!r}")
        want = 0 if value.mmap_size == 0 else 1
        if len(fds) != want:
            raise InvalidArgument(f"reply to {name}: needs {want} file descriptor(s), got {len(fds)}")
        payload = INFLIGHT.pack(
            _check_int(f"reply to {name}: mmap_size", value.mmap_size, U64_MAX),
            _check_int(f"reply to {name}: mmap_offset", value.mmap_offset, U64_MAX),
            _check_int(f"reply to {name}: num_queues", value.num_queues, U16_MAX),
            _check_int(f"reply to {name}: queue_size", value.queue_size, U16_MAX),
        )
    else:  # pragma: no cover - the table only uses the kinds above for replies
        raise AssertionError(f"unhandled reply kind {kind}")
    return _frame(request, payload, fds=fds, reply=True)


def encode_ack(request: int, ok: bool) -> Outgoing:
    """A REPLY_ACK: u64 0 for success, 1 for failure (either direction)."""
    payload = U64.pack(0 if ok else 1)
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
        return self._backend_request(BACKEND_VRING_CALL, STATE.pack(index, 0), need_reply, state)

    def vring_err(self, index: int, *, need_reply: bool = False) -> Outgoing:
        """BACKEND_VRING_ERR: in-band error notification."""
        state = VringState(_check_index("BACKEND_VRING_ERR", index), 0)
        return self._backend_request(BACKEND_VRING_ERR, STATE.pack(index, 0), need_reply, state)

    @staticmethod
    def _backend_request(request: int, payload: bytes, need_reply: bool, sent: RequestPayload) -> Outgoing:
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload)) + payload
        return Outgoing(request, data, (), need_reply, sent)

    @staticmethod
    def parse_ack(request: int, msg: Message) -> int:
        """The front end's u64 ack to a back-end request; malformed → DriverProtocolError."""
        name = backend_request_name(request)
        if msg.flags & ~NEED_REPLY != VERSION | REPLY:
            raise DriverProtocolError(
                f"reply to {name}: flags 0x{msg.flags:x}, expected 0x{VERSION | REPLY:x}"
            )
        if msg.request != request:
            raise DriverProtocolError(f"reply to {name} carries request code {msg.request}")
        if msg.fds:
            raise DriverProtocolError(f"reply to {name}: {len(msg.fds)} unexpected file descriptor(s)")
        check_payload_size(Kind.U64, f"reply to {name}", msg.payload, U64.size, DriverProtocolError)
        value: int = U64.unpack(msg.payload)[0]
        return value
