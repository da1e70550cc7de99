"""The checker's frontend: one connection to the back end under test, driven by a rule.

Theory of operation
-------------------
A :class:`Probe` is a vhost-user frontend that does exactly what a rule
tells it, good or bad, and writes down everything it did. Well-formed
messages are built by the codec (:class:`~pyvirtio.protocol.vhost_user.FrontendCodec`),
malformed ones by hand (:meth:`Probe.send_raw`); replies are framed by
:class:`~pyvirtio.protocol.vhost_user.MessageReader` and checked by
:func:`~pyvirtio.protocol.vhost_user.parse_reply`, so a malformed reply is a
failed rule, not a crash of the checker. Its memory is one or more
:class:`~pyvirtio.memory.MemoryPool` objects (memfd regions, guest address =
the checker's virtual address, as pyvirtio's own transport does), and its
rings are :class:`~pyvirtio.testing.hostile.RawDriver` /
:class:`~pyvirtio.testing.hostile.RawPackedDriver` objects wrapped in
:class:`SplitRing` / :class:`PackedRing`, which write descriptors verbatim
(loops and bad addresses included) and read what the device wrote.

Every message sent and received, every chain posted and every completion
seen goes into the probe's transcript (:attr:`Probe.transcript`), described
by the tracer's decoder (:func:`~pyvirtio.trace.decoder.describe_payload`: one
description of a message for both tools). A rule that fails raises
:class:`~pyvirtio.errors.RuleFailed` through :meth:`Probe.fail`, which takes
the tail of the transcript as "what was sent".

Timing: a reply or a completion must come within ``settings.timeout``
seconds. No reply means the back end stopped answering:
:class:`~pyvirtio.errors.TransportTimeout`, which the runner reports as
WEDGED. A completion that does not come while the back end still answers
GET_FEATURES is a failed rule. Something that must *not* happen (a second
reply, a notification that was suppressed) is watched for
``settings.quiet`` seconds.

Setup messages are sent without ``need_reply`` (vhost-user allows it; the
REPLY_ACK rules ask for acks on purpose), and :meth:`Probe.sync` (a
GET_FEATURES round trip) proves the back end took them: a back end that
drops the connection over one of them is seen there, with the transcript
showing which.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvirtio.errors import (
    ConnectionLost,
    DeviceError,
    DeviceProtocolError,
    PyvirtioError,
    RuleFailed,
    RuleSkipped,
    TransportTimeout,
)
from pyvirtio.memory import Buffer, MemoryPool
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import (
    F_RING_PACKED,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
from pyvirtio.spec.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_INITIAL_BASE,
)
from pyvirtio.testing.hostile import RawDriver, RawPackedDriver
from pyvirtio.trace.decoder import describe_payload, flag_names, format_fields

__all__ = [
    "BackendInfo",
    "PackedRing",
    "Part",
    "Probe",
    "Settings",
    "SplitRing",
    "WANTED_PROTOCOL",
    "connect",
]

_HEADER = struct.Struct("=III")

#: Protocol features the checker takes when offered (the others stay off unless a rule asks).
WANTED_PROTOCOL = (
    (1 << vu.PROTOCOL_F_MQ)
    | (1 << vu.PROTOCOL_F_REPLY_ACK)
    | (1 << vu.PROTOCOL_F_CONFIG)
    | (1 << vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS)
    | (1 << vu.PROTOCOL_F_RESET_DEVICE)
    | (1 << vu.PROTOCOL_F_STATUS)
)
_TRANSCRIPT_TAIL = 8
_DRIVER_OK = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


@dataclass(frozen=True, slots=True)
class Settings:
    """How the checker waits, and what it knows of the back end beyond its socket."""

    timeout: float = 2.0  # a reply or a completion must come within this
    quiet: float = 0.2  # how long to watch for something that must not happen
    pid: int | None = None  # the back end's process (fd and mapping counts)
    connections: int = 100  # how many connections the fd-growth rule makes


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What the back end offered on a first connection (the runner asks once, rules read it)."""

    features: int
    protocol_features: int
    queue_num: int | None
    max_mem_slots: int | None
    config: bytes | None

    def offers(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def offers_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)


#: One segment of a chain: (buffer, length, device-writable).
Part = tuple[Buffer, int, bool]


def connect(path: str, timeout: float) -> socket.socket:
    """A connected socket to ``path``; a full listen backlog (EAGAIN) is waited out up to ``timeout``.

    ConnectionLost when nothing accepts in time (refused, no socket, backlog still full).
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError as exc:  # the back end is busy with the previous frontend
            sock.close()
            if time.monotonic() > deadline:
                raise ConnectionLost(f"cannot connect to {path}: {exc}") from None
            time.sleep(0.005)
        except OSError as exc:
            sock.close()
            raise ConnectionLost(f"cannot connect to {path}: {exc}") from None


def describe_message(data: bytes, nfds: int) -> str:
    """One line for a frontend message as it went on the wire (well formed or not)."""
    if len(data) < _HEADER.size:
        return f"{len(data)} bytes (shorter than a header)"
    request, flags, size = _HEADER.unpack_from(data)
    name = vu.request_name(request)
    flags_text = ",".join(f for f in flag_names(flags) if f != "v1")
    head = name + (f" [{flags_text}]" if flags_text else "")
    payload = data[_HEADER.size :]
    try:
        value = vu.decode_request(vu.Message(request, flags, payload, tuple(range(nfds))))
        body = format_fields(describe_payload(request, value))
    except PyvirtioError:
        body = f"size={size} payload={payload[:64].hex()}{'...' if len(payload) > 64 else ''} (malformed)"
    return " ".join(part for part in (head, body, f"fds={nfds}" if nfds else "") if part)


def describe_reply(msg: vu.Message, asked: vu.RequestPayload = None) -> str:
    name = vu.request_name(msg.request)
    try:
        value = vu.parse_reply(msg.request, msg, asked=asked)
        body = format_fields(describe_payload(msg.request, value, reply=True))
    except PyvirtioError:
        body = f"flags=0x{msg.flags:x} payload={msg.payload.hex()}"
    return f"{name} reply {body}".rstrip()


class Probe:
    """One connection to the back end at ``path`` (see the module docstring)."""

    def __init__(self, path: str, settings: Settings, info: BackendInfo | None = None) -> None:
        self.path = path
        self.settings = settings
        self.info = info
        self.codec = vu.FrontendCodec()
        self.transcript: list[str] = []
        self.pools: list[MemoryPool] = []
        self.rings: dict[int, SplitRing | PackedRing] = {}
        self.features = 0
        self.protocol = 0
        #: The writable buffer of the last request a device helper posted (its reply).
        self.last_out: Buffer | None = None
        self._reader = vu.MessageReader(DeviceProtocolError, max_payload=1 << 20)
        self._fds: list[int] = []
        self.sock = connect(path, settings.timeout)
        self.closed = False
        self.pool = self.add_pool(4 << 20)

    # -- verdicts ---------------------------------------------------------------------

    def note(self, line: str) -> None:
        self.transcript.append(line)

    def fail(self, expected: str, got: str) -> RuleFailed:
        """The exception that fails the rule (raise it): the transcript's tail is what was sent."""
        return RuleFailed(expected, got, tuple(self.transcript[-_TRANSCRIPT_TAIL:]))

    def expect(self, ok: bool, expected: str, got: str) -> None:
        if not ok:
            raise self.fail(expected, got)

    @staticmethod
    def skip(reason: str) -> RuleSkipped:
        return RuleSkipped(reason)

    # -- messages ---------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as they are, with ``fds`` attached (the caller keeps its copies)."""
        self.note("-> " + describe_message(data, len(fds)))
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.closed = True
            raise ConnectionLost(f"the back end closed the connection ({exc.strerror})") from None
        except TimeoutError:
            raise TransportTimeout(
                f"the back end takes no more data (send blocked {self.settings.timeout} s)"
            ) from None

    def send(self, out: vu.Outgoing) -> None:
        self.send_raw(out.data, out.fds)

    def recv(self, timeout: float | None = None) -> vu.Message:
        """The next message from the back end; ConnectionLost at EOF, TransportTimeout after ``timeout``."""
        wait = self.settings.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            try:
                msg = self._reader.next_message()
            except DeviceProtocolError as exc:
                raise self.fail("a well-formed message from the back end", str(exc)) from None
            if msg is not None:
                self._fds.extend(msg.fds)  # closed with the probe
                return msg
            if self.closed:
                raise ConnectionLost("the back end closed the connection")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(f"no answer from the back end within {wait:g} s")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, vu.MAX_FDS)
            except (ConnectionResetError, TimeoutError):
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self.closed = True
                self.note("<- (connection closed by the back end)")
                raise ConnectionLost("the back end closed the connection")
            self._reader.feed(data, fds)

    def reply(self, out: vu.Outgoing, timeout: float | None = None) -> vu.Message:
        """The back end's reply to ``out`` (sent already); its code and reply flag are checked."""
        msg = self.recv(timeout)
        self.note("<- " + describe_reply(msg, out.sent))
        self.expect(
            msg.request == out.request and msg.is_reply,
            f"a reply to {out.name} (request {out.request}, reply flag)",
            f"request {msg.request} ({vu.request_name(msg.request)}) flags 0x{msg.flags:x}",
        )
        return msg

    def call(self, out: vu.Outgoing) -> vu.ReplyValue:
        """Send ``out`` and return its checked reply value (a malformed reply fails the rule)."""
        self.send(out)
        msg = self.reply(out)
        try:
            return self.codec.parse_reply(out, msg)
        except DeviceError as exc:
            if isinstance(exc, DeviceProtocolError):
                raise self.fail(f"a well-formed reply to {out.name}", str(exc)) from None
            raise
        except PyvirtioError as exc:
            raise self.fail(f"a well-formed reply to {out.name}", str(exc)) from None

    def u64(self, out: vu.Outgoing) -> int:
        value = self.call(out)
        assert isinstance(value, int)
        return value

    def ack(self, out: vu.Outgoing) -> int:
        """Send ``out`` (built with need_reply) and return the ack value (0: success)."""
        return self.u64(out)

    def outcome(self, out: vu.Outgoing) -> str:
        """How the back end took ``out``: "ack", "nack", "closed" (it dropped the connection) or "silent".

        With need_reply set on ``out`` the answer is the ack; without it, a
        GET_FEATURES round trip tells "closed" from "silent" (taken, or
        ignored: the two cannot be told apart without REPLY_ACK).
        """
        try:
            self.send(out)
            if out.expects_reply:
                msg = self.reply(out)
                value = self.codec.parse_reply(out, msg)
                return "ack" if value == 0 else "nack"
            self.sync()
            return "silent"
        except ConnectionLost:
            return "closed"
        except DeviceError:
            return "nack"

    def sync(self) -> int:
        """A GET_FEATURES round trip: the back end took everything before it; returns the features."""
        return self.u64(self.codec.get_features())

    def nothing_more(self, what: str) -> None:
        """No further message may arrive within ``settings.quiet`` (e.g. a second reply)."""
        try:
            extra = self.recv(self.settings.quiet)
        except (TransportTimeout, ConnectionLost):
            return
        self.note("<- " + describe_reply(extra))
        raise self.fail(what, f"another message: {vu.request_name(extra.request)} flags 0x{extra.flags:x}")

    def alive(self) -> bool:
        """The back end still answers on this connection (it may have closed it: False)."""
        try:
            self.sync()
            return True
        except (ConnectionLost, TransportTimeout, RuleFailed):
            return False

    # -- negotiation ------------------------------------------------------------------

    @property
    def acks(self) -> bool:
        """REPLY_ACK was negotiated on this connection."""
        return bool(self.protocol >> vu.PROTOCOL_F_REPLY_ACK & 1)

    def hello(self, features: int = 0, *, protocol: int = WANTED_PROTOCOL, owner: bool = True,
              protocol_features: bool = True) -> int:
        """GET_FEATURES, the protocol features, SET_OWNER, SET_FEATURES; returns what was offered.

        Acked: VERSION_1 and ``features`` where offered, and PROTOCOL_FEATURES
        when offered and ``protocol_features``.
        """
        offered = self.u64(self.codec.get_features())
        if offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1 and protocol_features:
            offered_p = self.u64(self.codec.get_protocol_features())
            self.protocol = offered_p & protocol
            self.send(self.codec.set_protocol_features(self.protocol))
        if owner:
            self.send(self.codec.set_owner())
        self.features = offered & (features | 1 << F_VERSION_1)
        if protocol_features and offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.send(self.codec.set_features(self.features))
        if self.protocol >> vu.PROTOCOL_F_STATUS & 1:  # the virtio status steps, as QEMU sends them
            self.send(self.codec.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK))
        return offered

    def go(self) -> None:
        """The rings are set up: DRIVER_OK when STATUS was negotiated (DPDK serves nothing before it), sync."""
        if self.protocol >> vu.PROTOCOL_F_STATUS & 1:
            self.send(self.codec.set_status(_DRIVER_OK))
        self.sync()

    def negotiated(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # -- memory -----------------------------------------------------------------------

    def add_pool(self, size: int) -> MemoryPool:
        pool = MemoryPool(size, max_regions=1, name=f"pyvirtio-check-{len(self.pools)}")
        self.pools.append(pool)
        return pool

    def regions(self, pools: Sequence[MemoryPool] | None = None) -> tuple[list[vu.MemRegion], list[int]]:
        regions, fds = [], []
        for pool in self.pools if pools is None else pools:
            for r in pool.regions:
                regions.append(vu.MemRegion(r.guest_addr, r.size, r.user_addr, r.fd_offset))
                fds.append(r.fd)
        return regions, fds

    def mem_table(self, pools: Sequence[MemoryPool] | None = None) -> None:
        """SET_MEM_TABLE with the regions of ``pools`` (default: all of this probe's pools)."""
        regions, fds = self.regions(pools)
        self.send(self.codec.set_mem_table(regions, fds))

    def buf(self, data: bytes | int, *, pool: int = 0, align: int = 16) -> Buffer:
        """A buffer in pool ``pool``: ``data`` copied in, or ``data`` zeroed bytes."""
        size = data if isinstance(data, int) else len(data)
        b = self.pools[pool].allocate(max(size, 1), align=align)
        if isinstance(data, int):
            b.view[:] = bytes(len(b.view))
        else:
            b.view[: len(data)] = data
        return b

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    # -- rings ------------------------------------------------------------------------

    def ring(
        self,
        index: int,
        size: int = 64,
        *,
        packed: bool | None = None,
        base: int | None = None,
        kick: bool = True,
        call: bool = True,
        enable: bool = True,
    ) -> SplitRing | PackedRing:
        """Lay out a ring and set it up: NUM, BASE, ADDR, KICK, CALL, then ENABLE (with protocol features)."""
        if packed is None:
            packed = self.negotiated(F_RING_PACKED)
        ring: SplitRing | PackedRing = PackedRing(self, index, size) if packed else SplitRing(self, index, size)
        self.rings[index] = ring
        self.send(self.codec.set_vring_num(index, size))
        self.send(self.codec.set_vring_base(index, ring.initial_base if base is None else base))
        self.send(self.codec.set_vring_addr(ring.addr()))
        if kick:
            self.send(self.codec.set_vring_kick(index, ring.kick_fd))
        if call:
            self.send(self.codec.set_vring_call(index, ring.call_fd))
        if enable and self.negotiated(VHOST_USER_F_PROTOCOL_FEATURES):
            self.send(self.codec.set_vring_enable(index, True))
        return ring

    def start(self, features: int = 0, *, queues: Sequence[int] = (0,), size: int = 64) -> None:
        """hello + memory + the given rings + sync: a device ready for requests."""
        self.hello(features)
        self.mem_table()
        for q in queues:
            self.ring(q, size)
        self.go()

    def get_vring_base(self, index: int) -> int:
        value = self.call(self.codec.get_vring_base(index))
        assert isinstance(value, vu.VringState)
        return value.num

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        self._reader.close_pending_fds()
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        for pool in self.pools:
            pool.close()
        self.pools.clear()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Used:
    id: int
    length: int


class _RingBase:
    """What both ring formats share: eventfds, the wait for completions, notification checks."""

    index: int
    size: int
    initial_base: int

    def __init__(self, probe: Probe, index: int, size: int) -> None:
        self.probe = probe
        self.index = index
        self.size = size
        self.kick_fd = probe.eventfd()
        self.call_fd = probe.eventfd()
        self.completed = 0  # used entries seen so far
        self.posted = 0

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)
        self.probe.note(f"kick ring {self.index}")

    def drain_calls(self) -> None:
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass

    def signalled(self, wait: float) -> bool:
        """Was the call eventfd written (within ``wait`` seconds)? Drains it."""
        ready, _, _ = select.select([self.call_fd], [], [], wait)
        if not ready:
            return False
        self.drain_calls()
        return True

    def _poll_used(self) -> list[_Used]:
        raise NotImplementedError

    def wait(self, count: int = 1, timeout: float | None = None) -> list[_Used]:
        """The next ``count`` completions; a request not completed in time fails the rule (or WEDGED)."""
        probe = self.probe
        wait = probe.settings.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        got: list[_Used] = []
        while True:
            got.extend(self._poll_used())
            if len(got) >= count:
                for u in got:
                    probe.note(f"used ring {self.index}: id {u.id} len {u.length}")
                return got
            if time.monotonic() > deadline:
                break
            time.sleep(0.0005)
        try:
            probe.sync()  # ConnectionLost: it dropped us; TransportTimeout: it hangs
        except TransportTimeout:
            raise TransportTimeout(f"ring {self.index}: no completion and no answer within {wait:g} s") from None
        raise probe.fail(f"{count} completion(s) on ring {self.index} within {wait:g} s", f"{len(got)}")

    def quiet(self, wait: float | None = None) -> list[_Used]:
        """Completions that arrive within ``wait`` (default ``settings.quiet``): for "must not complete" checks."""
        time.sleep(self.probe.settings.quiet if wait is None else wait)
        return self._poll_used()

    def close(self) -> None:
        pass


class SplitRing(_RingBase):
    """A split ring (virtio 1.2 §2.7) in the probe's first pool."""

    def __init__(self, probe: Probe, index: int, size: int) -> None:
        super().__init__(probe, index, size)
        self.raw = RawDriver(probe.pool, size)
        self.next_desc = 0
        self.initial_base = 0

    def addr(self) -> vu.VringAddr:
        r = self.raw
        return vu.VringAddr(self.index, 0, r.desc_addr, r.used_addr, r.avail_addr)

    def _take(self, n: int) -> int:
        if self.next_desc + n > self.size:
            self.next_desc = 0
        first = self.next_desc
        self.next_desc += n
        return first

    def post(self, parts: Sequence[Part], *, indirect: bool = False, kick: bool = True) -> int:
        """Chain ``parts`` (or one indirect table holding them), publish, kick; returns the head."""
        raw = self.raw
        descs = [(b.addr, n, DESC_F_WRITE if w else 0) for b, n, w in parts]
        if indirect:
            table = [(a, n, f | (DESC_F_NEXT if k + 1 < len(descs) else 0), k + 1 if k + 1 < len(descs) else 0)
                     for k, (a, n, f) in enumerate(descs)]
            head = self._take(1)
            addr, length = raw.table(table)
            raw.desc(head, addr, length, DESC_F_INDIRECT)
        else:
            head = self._take(len(descs))
            raw.chain(head, descs)
        raw.publish(head)
        self.posted += 1
        shape = " + ".join(f"{n}{'w' if w else 'r'}" for _b, n, w in parts)
        self.probe.note(f"ring {self.index}: chain at {head}{' (indirect)' if indirect else ''}: {shape} bytes")
        if kick:
            self.kick()
        return head

    def _poll_used(self) -> list[_Used]:
        out: list[_Used] = []
        idx = self.raw.used_idx
        while self.completed & 0xFFFF != idx:
            out.append(_Used(*self.raw.used_entry(self.completed)))
            self.completed += 1
        return out

    def close(self) -> None:
        self.raw.close()


class PackedRing(_RingBase):
    """A packed ring (virtio 1.2 §2.8) in the probe's first pool."""

    def __init__(self, probe: Probe, index: int, size: int) -> None:
        super().__init__(probe, index, size)
        self.raw = RawPackedDriver(probe.pool, size)
        self.initial_base = PACKED_INITIAL_BASE
        self.used_pos, self.used_wrap = 0, 1
        self.next_id = 0
        self.chain_len: dict[int, int] = {}

    def addr(self) -> vu.VringAddr:
        r = self.raw
        # SET_VRING_ADDR for packed rings: desc, used = device area, avail = driver area.
        return vu.VringAddr(self.index, 0, r.desc_addr, r.device_addr, r.driver_addr)

    def post(self, parts: Sequence[Part], *, indirect: bool = False, kick: bool = True) -> int:
        raw = self.raw
        descs = [(b.addr, n, DESC_F_WRITE if w else 0) for b, n, w in parts]
        buf_id = self.next_id
        self.next_id = (self.next_id + 1) % self.size
        if indirect:
            addr, length = raw.table(descs)
            raw.publish(buf_id, [(addr, length, DESC_F_INDIRECT)])
            self.chain_len[buf_id] = 1
        else:
            raw.publish(buf_id, descs)
            self.chain_len[buf_id] = len(descs)
        self.posted += 1
        shape = " + ".join(f"{n}{'w' if w else 'r'}" for _b, n, w in parts)
        self.probe.note(f"packed ring {self.index}: id {buf_id}{' (indirect)' if indirect else ''}: {shape} bytes")
        if kick:
            self.kick()
        return buf_id

    def _poll_used(self) -> list[_Used]:
        out: list[_Used] = []
        while True:
            _addr, length, id_, flags = self.raw.read(self.used_pos)
            w = self.used_wrap
            if bool(flags & PACKED_DESC_F_AVAIL) != bool(w) or bool(flags & PACKED_DESC_F_USED) != bool(w):
                return out
            out.append(_Used(id_, length))
            self.completed += 1
            self.used_pos += self.chain_len.pop(id_, 1)
            while self.used_pos >= self.size:
                self.used_pos -= self.size
                self.used_wrap ^= 1

    def close(self) -> None:
        self.raw.close()


@dataclass(slots=True)
class Completion:
    """A request's outcome: the used length and what the device wrote in each writable part."""

    length: int
    written: list[bytes] = field(default_factory=list)
