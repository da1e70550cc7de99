"""Sans-I/O decoder of a vhost-user conversation: bytes and fds in, framed messages and events out.

Theory of operation
-------------------
:class:`Decoder` watches both directions of one vhost-user connection. The
tracer's proxy (:mod:`pyvirtio.trace.proxy`) feeds it what each side sent,
chunk by chunk, with the fds that came with the chunk
(:meth:`Decoder.feed`); it gets back :class:`Frame` records, each one whole
message (header and payload bytes exactly as received, and the fds it
carried) to forward unchanged, together with the :class:`Event` that
describes it. Framing is :class:`~pyvirtio.protocol.vhost_user.MessageReader`'s
(the codec's one framer, so the fds go with the message the kernel delivered
them with); decoding is the codec's :func:`~pyvirtio.protocol.vhost_user.decode_request`
and :func:`~pyvirtio.protocol.vhost_user.parse_reply`. This module adds names
and reply matching; it never touches a socket.

An event names the request and every field of its payload (feature bits by
name, ring addresses, memory regions, config bytes), the header flags, the
fds, the time since the session began and, for a reply, the request it
answers and how long that took. Replies are matched to the oldest pending
request with the same code that expects one (its own reply per the
vhost-user request table, or ``need_reply`` set: "REPLY_ACK", vhost-user.rst).

Tolerant by design: the decoder describes what it sees, it judges nothing
(that is ``pyvirtio check``'s job). A payload the codec rejects is reported
in the event's ``error`` and forwarded all the same. Only a stream that
cannot be framed (header version bits not 1, or a size beyond
:data:`MAX_TRACE_PAYLOAD`) stops decoding for that direction: what follows is
forwarded as raw :class:`Frame` chunks with ``event=None`` and one event says
why. :meth:`Decoder.feed` never raises on any input (it is fuzzed by
tests/test_trace_decoder.py).

:class:`SessionState` is what the decoder learned about the device from the
requests it saw: memory regions (with the fd each came with), ring sizes,
addresses and bases, enable state, acked features. The proxy's ``--rings``
mode maps the regions read-only from it and samples the rings
(:mod:`pyvirtio.trace.rings`).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.errors import DeviceError, DeviceProtocolError, DriverProtocolError, PyvirtioError
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import F_RING_PACKED, status_names
from pyvirtio.spec.features import device_feature_names

__all__ = [
    "MAX_TRACE_PAYLOAD",
    "Decoder",
    "Event",
    "Frame",
    "RingInfo",
    "SessionState",
    "Source",
    "describe_payload",
    "flag_names",
    "format_fields",
]

#: The tracer frames messages up to this size (the codec's own limit is 4 KiB;
#: the proxy must pass on what a peer sends even where pyvirtio would refuse it).
MAX_TRACE_PAYLOAD = 1 << 20

_FEATURE_REQUESTS = frozenset({vu.GET_FEATURES, vu.SET_FEATURES})
_PROTOCOL_REQUESTS = frozenset({vu.GET_PROTOCOL_FEATURES, vu.SET_PROTOCOL_FEATURES})
_STATUS_REQUESTS = frozenset({vu.GET_STATUS, vu.SET_STATUS})
_BASE_REQUESTS = frozenset({vu.GET_VRING_BASE, vu.SET_VRING_BASE})
# Requests whose natural reply is more than an ack (vhost-user.rst, "Communication").
_NATURAL_REPLY = frozenset(
    {
        vu.GET_FEATURES,
        vu.GET_PROTOCOL_FEATURES,
        vu.GET_VRING_BASE,
        vu.GET_QUEUE_NUM,
        vu.GET_CONFIG,
        vu.GET_INFLIGHT_FD,
        vu.GET_MAX_MEM_SLOTS,
        vu.GET_STATUS,
        vu.SET_LOG_BASE,
        vu.CHECK_DEVICE_STATE,
    }
)


class Source(enum.Enum):
    """Who sent a message: the frontend (requests) or the back end (replies)."""

    FRONTEND = "frontend"
    BACKEND = "backend"

    @property
    def arrow(self) -> str:
        return "->" if self is Source.FRONTEND else "<-"


def flag_names(flags: int) -> list[str]:
    """The header flags by name (vhost-user.rst, "Header"): version, reply, need_reply."""
    names = [f"v{flags & vu.VERSION_MASK}"]
    if flags & vu.REPLY:
        names.append("reply")
    if flags & vu.NEED_REPLY:
        names.append("need_reply")
    rest = flags & ~(vu.VERSION_MASK | vu.REPLY | vu.NEED_REPLY)
    if rest:
        names.append(f"0x{rest:x}")
    return names


def _hex(value: int) -> str:
    return f"0x{value:x}"


def describe_payload(request: int, value: object, *, reply: bool = False, device_type: int = 0) -> dict[str, Any]:
    """The fields of a decoded payload by name (JSON-friendly: ints, strings, lists, dicts).

    ``device_type`` (a virtio device ID, 0 if unknown) names the device-specific feature bits.
    """
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"value": value}
    if isinstance(value, int):
        if reply and request not in _NATURAL_REPLY:
            return {"ack": value}
        if request in _FEATURE_REQUESTS:
            return {"features": _hex(value), "names": device_feature_names(device_type, value)}
        if request in _PROTOCOL_REQUESTS:
            return {"features": _hex(value), "names": vu.protocol_feature_names(value)}
        if request in _STATUS_REQUESTS:
            return {"status": _hex(value), "names": status_names(value)}
        return {"value": value}
    if isinstance(value, vu.VringState):
        name = "base" if request in _BASE_REQUESTS else "enable" if request == vu.SET_VRING_ENABLE else "num"
        return {"index": value.index, name: value.num}
    if isinstance(value, vu.VringAddr):
        return {
            "index": value.index,
            "flags": _hex(value.flags),
            "desc": _hex(value.desc),
            "used": _hex(value.used),
            "avail": _hex(value.avail),
            "log": _hex(value.log),
        }
    if isinstance(value, vu.MemTable):
        return {"regions": [_region(r) for r in value.regions]}
    if isinstance(value, vu.MemRegion):
        return _region(value)
    if isinstance(value, vu.ConfigSpace):
        return {"offset": value.offset, "size": value.size, "flags": value.flags, "data": value.data.hex()}
    if isinstance(value, vu.VringFile):
        return {"index": value.index, "nofd": value.nofd}
    if isinstance(value, vu.InflightInfo):
        return {
            "mmap_size": value.mmap_size,
            "mmap_offset": value.mmap_offset,
            "num_queues": value.num_queues,
            "queue_size": value.queue_size,
        }
    if isinstance(value, vu.LogInfo):
        return {"mmap_size": value.mmap_size, "mmap_offset": value.mmap_offset}
    if isinstance(value, bytes):
        return {"mac": ":".join(f"{b:02x}" for b in value)}
    return {"value": repr(value)}


def _region(r: vu.MemRegion) -> dict[str, Any]:
    return {
        "guest_phys_addr": _hex(r.guest_phys_addr),
        "memory_size": _hex(r.memory_size),
        "userspace_addr": _hex(r.userspace_addr),
        "mmap_offset": _hex(r.mmap_offset),
    }


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded message (or a note about the stream, ``request`` -1)."""

    seq: int
    time: float
    source: Source
    request: int
    name: str
    flags: int
    size: int
    fields: dict[str, Any]
    fds: tuple[int, ...] = ()
    reply_to: int | None = None
    latency: float | None = None
    error: str | None = None

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & vu.REPLY)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "time": round(self.time, 6),
            "source": self.source.value,
            "request": self.request,
            "name": self.name,
            "flags": flag_names(self.flags),
            "size": self.size,
            "fields": self.fields,
            "fds": len(self.fds),
        }
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        if self.latency is not None:
            out["latency_us"] = round(self.latency * 1e6, 1)
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_text(self) -> str:
        head = f"{self.time:10.6f} {self.source.arrow} #{self.seq} {self.name}"
        flags = [f for f in flag_names(self.flags) if f != "v1"]
        parts = [head]
        if flags:
            parts.append("[" + ",".join(flags) + "]")
        if self.reply_to is not None:
            lat = "" if self.latency is None else f", {self.latency * 1e6:.0f} us"
            parts.append(f"(reply to #{self.reply_to}{lat})")
        if self.fields:
            parts.append(format_fields(self.fields))
        if self.fds:
            parts.append(f"fds={len(self.fds)}")
        if self.error is not None:
            parts.append(f"!! {self.error}")
        return " ".join(parts)


def format_fields(fields: dict[str, Any]) -> str:
    """``name=value`` pairs on one line (lists joined by ``|``, regions as ``regions[i]={...}``)."""
    out = []
    for key, value in fields.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                out.append(f"{key}[{i}]={{" + " ".join(f"{k}={v}" for k, v in item.items()) + "}")
        elif isinstance(value, list):
            out.append(f"{key}=" + "|".join(str(v) for v in value) if value else f"{key}=-")
        else:
            out.append(f"{key}={value}")
    return " ".join(out)


@dataclass(frozen=True, slots=True)
class Frame:
    """Bytes to forward exactly as received, with their fds; ``event`` describes them (None for raw data)."""

    source: Source
    data: bytes
    fds: tuple[int, ...]
    event: Event | None


@dataclass(slots=True)
class RingInfo:
    """What the requests said about one ring."""

    index: int
    num: int = 0
    base: int = 0
    addr: vu.VringAddr | None = None
    enabled: bool = False
    kick: bool = False
    call: bool = False
    stopped: bool = False


@dataclass(slots=True)
class SessionState:
    """The device as the frontend set it up, learned from its requests.

    ``regions`` pairs each memory region with the fd (the proxy's number for
    it) it came with; ``rings`` holds each ring's configuration.
    """

    features: int = 0
    protocol_features: int = 0
    regions: list[tuple[vu.MemRegion, int]] = field(default_factory=list)
    rings: dict[int, RingInfo] = field(default_factory=dict)
    memory_generation: int = 0

    @property
    def packed(self) -> bool:
        return bool(self.features >> F_RING_PACKED & 1)

    def ring(self, index: int) -> RingInfo:
        info = self.rings.get(index)
        if info is None:
            info = self.rings[index] = RingInfo(index)
        return info

    def learn(self, request: int, value: object, fds: tuple[int, ...]) -> None:
        """Update from one well-formed frontend request."""
        if request == vu.SET_FEATURES and isinstance(value, int):
            self.features = value
        elif request == vu.SET_PROTOCOL_FEATURES and isinstance(value, int):
            self.protocol_features = value
        elif request == vu.SET_MEM_TABLE and isinstance(value, vu.MemTable):
            self.regions = list(zip(value.regions, fds, strict=False))
            self.memory_generation += 1
        elif request == vu.ADD_MEM_REG and isinstance(value, vu.MemRegion) and fds:
            self.regions.append((value, fds[0]))
            self.memory_generation += 1
        elif request == vu.REM_MEM_REG and isinstance(value, vu.MemRegion):
            self.regions = [
                (r, fd)
                for r, fd in self.regions
                if (r.guest_phys_addr, r.memory_size, r.userspace_addr)
                != (value.guest_phys_addr, value.memory_size, value.userspace_addr)
            ]
            self.memory_generation += 1
        elif isinstance(value, vu.VringState):
            self._learn_state(request, value)
        elif request == vu.SET_VRING_ADDR and isinstance(value, vu.VringAddr):
            self.ring(value.index).addr = value
        elif request == vu.SET_VRING_KICK and isinstance(value, vu.VringFile):
            ring = self.ring(value.index)
            ring.kick = not value.nofd
            ring.stopped = False
        elif request == vu.SET_VRING_CALL and isinstance(value, vu.VringFile):
            self.ring(value.index).call = not value.nofd
        elif request in (vu.RESET_DEVICE, vu.RESET_OWNER):
            self.rings.clear()

    def _learn_state(self, request: int, value: vu.VringState) -> None:
        ring = self.ring(value.index)
        if request == vu.SET_VRING_NUM:
            ring.num = value.num
        elif request == vu.SET_VRING_BASE:
            ring.base = value.num
        elif request == vu.SET_VRING_ENABLE:
            ring.enabled = bool(value.num)
        elif request == vu.GET_VRING_BASE:
            ring.stopped = True


@dataclass(slots=True)
class _Pending:
    seq: int
    request: int
    sent: vu.RequestPayload
    time: float


@dataclass(slots=True)
class _Side:
    """Framing state of one direction."""

    reader: vu.MessageReader
    raw: bytearray = field(default_factory=bytearray)  # bytes fed and not yet framed
    broken: bool = False


class Decoder:
    """Both directions of one connection (see the module docstring). One object per connection."""

    def __init__(self, *, device_type: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.device_type = device_type
        self._clock = clock
        self._t0: float | None = None
        self._seq = 0
        self._sides = {
            Source.FRONTEND: _Side(vu.MessageReader(DriverProtocolError, max_payload=MAX_TRACE_PAYLOAD)),
            Source.BACKEND: _Side(vu.MessageReader(DeviceProtocolError, max_payload=MAX_TRACE_PAYLOAD)),
        }
        self._pending: deque[_Pending] = deque()
        self.state = SessionState()
        #: Every event so far, in order (for the tests and the summary at the end).
        self.events: list[Event] = []

    def _now(self, now: float | None) -> float:
        t = self._clock() if now is None else now
        if self._t0 is None:
            self._t0 = t
        return t - self._t0

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the session's first message: the time base of every event."""
        return self._now(now)

    def feed(self, source: Source, data: bytes, fds: Sequence[int] = (), now: float | None = None) -> list[Frame]:
        """What ``source`` sent (one recvmsg: bytes and the fds that came with them) -> frames to forward."""
        t = self._now(now)
        side = self._sides[source]
        if side.broken:
            return [Frame(source, bytes(data), tuple(fds), None)] if data or fds else []
        side.raw += data
        side.reader.feed(data, fds)
        frames: list[Frame] = []
        while True:
            try:
                msg = side.reader.next_message()
            except PyvirtioError as exc:
                frames.extend(self._break(source, side, str(exc), t))
                return frames
            if msg is None:
                return frames
            wire = msg.to_bytes()
            del side.raw[: len(wire)]
            frames.append(Frame(source, wire, msg.fds, self._decode(source, msg, t)))

    def _break(self, source: Source, side: _Side, why: str, t: float) -> list[Frame]:
        side.broken = True
        event = self._event(t, source, -1, "undecodable stream", 0, 0, {}, error=f"{why}; forwarding raw bytes")
        rest = bytes(side.raw)
        side.raw.clear()
        return [Frame(source, rest, side.reader.pending_fds(), event)]

    def close(self, now: float | None = None) -> list[Event]:
        """The connection ended: one event per request still waiting for its reply."""
        t = self._now(now)
        out = []
        while self._pending:
            p = self._pending.popleft()
            out.append(
                self._event(t, Source.BACKEND, p.request, vu.request_name(p.request), 0, 0, {},
                            reply_to=p.seq, error="no reply before the connection ended")
            )
        return out

    def _event(
        self,
        t: float,
        source: Source,
        request: int,
        name: str,
        flags: int,
        size: int,
        fields: dict[str, Any],
        fds: tuple[int, ...] = (),
        *,
        reply_to: int | None = None,
        latency: float | None = None,
        error: str | None = None,
    ) -> Event:
        self._seq += 1
        event = Event(self._seq, t, source, request, name, flags, size, fields, fds, reply_to, latency, error)
        self.events.append(event)
        return event

    def _decode(self, source: Source, msg: vu.Message, t: float) -> Event:
        if source is Source.FRONTEND:
            return self._request(msg, t)
        return self._reply(msg, t)

    def _request(self, msg: vu.Message, t: float) -> Event:
        name = vu.request_name(msg.request)
        error = None
        value: vu.RequestPayload = None
        try:
            value = vu.decode_request(msg)
        except PyvirtioError as exc:
            error = str(exc)
        if error is None:
            fields = describe_payload(msg.request, value, device_type=self.device_type)
        else:
            fields = {"payload": msg.payload.hex()}
        event = self._event(t, Source.FRONTEND, msg.request, name, msg.flags, msg.size, fields, msg.fds, error=error)
        if error is None:
            self.state.learn(msg.request, value, msg.fds)
        if msg.request in _NATURAL_REPLY or msg.need_reply:
            self._pending.append(_Pending(event.seq, msg.request, value, t))
        return event

    def _reply(self, msg: vu.Message, t: float) -> Event:
        name = vu.request_name(msg.request)
        if not msg.is_reply:
            return self._event(t, Source.BACKEND, msg.request, name, msg.flags, msg.size,
                               {"payload": msg.payload.hex()}, msg.fds,
                               error="a message without the reply flag from the back end on the front-end channel")
        pending = next((p for p in self._pending if p.request == msg.request), None)
        if pending is None:
            return self._event(t, Source.BACKEND, msg.request, name, msg.flags, msg.size,
                               {"payload": msg.payload.hex()}, msg.fds, error="a reply to no pending request")
        self._pending.remove(pending)
        error = None
        fields: dict[str, Any]
        try:
            value = vu.parse_reply(msg.request, msg, asked=pending.sent)
            fields = describe_payload(msg.request, value, reply=True, device_type=self.device_type)
        except DeviceError as exc:
            if isinstance(exc, DeviceProtocolError):
                error = str(exc)
                fields = {"payload": msg.payload.hex()}
            else:  # a refusal the codec recognises (empty GET_CONFIG, empty inflight area)
                fields = {"refused": str(exc)}
        except PyvirtioError as exc:
            error = str(exc)
            fields = {"payload": msg.payload.hex()}
        return self._event(t, Source.BACKEND, msg.request, name, msg.flags, msg.size, fields, msg.fds,
                           reply_to=pending.seq, latency=t - pending.time, error=error)
