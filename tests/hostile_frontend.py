"""A vhost-user frontend that sends exactly what it is told, good or bad.

:class:`HostileFrontend` talks to a back end over a raw Unix socket with
hand-packed messages (``struct``), so it can send what no real frontend
would: wrong version bits, truncated payloads, oversized headers, requests
out of order, unknown codes, fds that are not eventfds. Its memory is a
:class:`~pyvirtio.memory.MemoryPool` (memfd regions; guest address = its own
virtual address) and its rings are :class:`~pyvirtio.testing.hostile.RawDriver`
objects (packed: :class:`~pyvirtio.testing.hostile.RawPackedDriver`), which
write descriptors and avail entries verbatim: loops, bad addresses, nested
tables. :class:`BlkBuilder` lays out virtio-blk requests
(header, data, status) in that memory, with any header size or flags;
:class:`Chains` posts requests on a ring in turn, and :func:`blk_io`,
:func:`scsi_io` and :func:`net_io` do one real exchange with a blk, scsi or
(loopback) net back end and check what comes back.

Nothing here validates anything; the tests assert what the back end does.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Sequence

from pyvirtio.memory import Buffer, MemoryPool
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
from pyvirtio.spec.ring import DESC_F_NEXT, DESC_F_WRITE, PACKED_INITIAL_BASE
from pyvirtio.testing.hostile import RawDriver, RawPackedDriver

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")
ADDR = struct.Struct("=IIQQQQ")
REGION = struct.Struct("=QQQQ")
CONFIG = struct.Struct("=III")

#: Protocol features a well-behaved test frontend asks for (when offered).
PROTOCOL = (
    (1 << vu.PROTOCOL_F_MQ)
    | (1 << vu.PROTOCOL_F_REPLY_ACK)
    | (1 << vu.PROTOCOL_F_CONFIG)
    | (1 << vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS)
)
#: Device features it acks (when offered): VERSION_1 and INDIRECT_DESC, no EVENT_IDX.
FEATURES = (1 << F_VERSION_1) | (1 << F_RING_INDIRECT_DESC)
#: The same with packed rings.
PACKED_FEATURES = FEATURES | (1 << F_RING_PACKED)


class Closed(Exception):
    """The back end closed the connection."""


class HostileFrontend:
    """One connection to a vhost-user back end at ``path``."""

    def __init__(self, path: str, *, timeout: float = 5.0, pool_size: int = 4 << 20) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.pool = MemoryPool(pool_size, name="hostile")
        self.rings: dict[int, RawDriver] = {}
        self.packed_rings: dict[int, RawPackedDriver] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.protocol = 0
        self.features = 0
        self._buf = b""

    # -- raw messages ------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send(
        self,
        request: int,
        payload: bytes = b"",
        *,
        fds: Sequence[int] = (),
        flags: int = vu.VERSION,
        need_reply: bool = False,
        size: int | None = None,
    ) -> None:
        """One message; ``size`` overrides the header's size field (a lie)."""
        if need_reply:
            flags |= vu.NEED_REPLY
        head = HEADER.pack(request, flags, len(payload) if size is None else size)
        self.send_raw(head + payload, fds)

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(f"connection closed by the back end ({len(self._buf)} bytes pending)")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self) -> tuple[int, int, bytes]:
        """The next message from the back end: (request, flags, payload)."""
        request, flags, size = HEADER.unpack(self._read_exact(HEADER.size))
        return request, flags, self._read_exact(size)

    def call(self, request: int, payload: bytes = b"", **kw: object) -> bytes:
        """Send and return the reply payload (request code and reply flag checked)."""
        self.send(request, payload, **kw)  # type: ignore[arg-type]
        code, flags, reply = self.recv()
        assert code == request, f"reply to {request} carries code {code}"
        assert flags & vu.REPLY, f"reply flags 0x{flags:x}"
        return reply

    def u64(self, request: int, payload: bytes = b"", **kw: object) -> int:
        reply = self.call(request, payload, **kw)
        assert len(reply) == 8, reply
        return int(U64.unpack(reply)[0])

    def ack(self, request: int, payload: bytes = b"", *, fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; return the ack value (0 = success)."""
        return self.u64(request, payload, fds=fds, need_reply=True)

    def expect_closed(self, timeout: float | None = None) -> bool:
        """Read (and drop) until the back end closes; False if it is still open after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return False
            try:
                if not self.sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True

    def is_open(self, wait: float = 0.2) -> bool:
        """True if the back end still answers a GET_FEATURES."""
        try:
            self.u64(vu.GET_FEATURES)
            return True
        except (Closed, OSError):
            return False

    # -- a normal set-up, step by step -----------------------------------------------

    def handshake(self, *, protocol: int = PROTOCOL, features: int = FEATURES, owner: bool = True) -> int:
        """GET_FEATURES, protocol features, SET_OWNER, SET_FEATURES; returns what was offered."""
        offered = self.u64(vu.GET_FEATURES)
        if offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1 and protocol is not None:
            offered_p = self.u64(vu.GET_PROTOCOL_FEATURES)
            self.protocol = offered_p & protocol
            self.send(vu.SET_PROTOCOL_FEATURES, U64.pack(self.protocol))
        if owner:
            self.set(vu.SET_OWNER)
        self.features = offered & features
        if self.protocol:
            self.features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.set(vu.SET_FEATURES, U64.pack(self.features))
        return offered

    @property
    def acks(self) -> bool:
        return bool(self.protocol >> vu.PROTOCOL_F_REPLY_ACK & 1)

    def set(self, request: int, payload: bytes = b"", *, fds: Sequence[int] = ()) -> None:
        """A set-up message, acked (and the ack checked) when REPLY_ACK was negotiated."""
        if self.acks:
            value = self.ack(request, payload, fds=fds)
            assert value == 0, f"{vu.request_name(request)} refused"
        else:
            self.send(request, payload, fds=fds)

    def mem_table_payload(self) -> tuple[bytes, list[int]]:
        regions = self.pool.regions
        body = STATE.pack(len(regions), 0)
        for r in regions:
            body += REGION.pack(r.guest_addr, r.size, r.user_addr, r.fd_offset)
        return body, [r.fd for r in regions]

    def set_mem_table(self) -> None:
        payload, fds = self.mem_table_payload()
        self.set(vu.SET_MEM_TABLE, payload, fds=fds)

    def add_ring(self, index: int, size: int = 64) -> RawDriver:
        rd = RawDriver(self.pool, size)
        self.rings[index] = rd
        return rd

    def setup_ring(self, index: int, size: int = 64, *, enable: bool = True) -> RawDriver:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL (+ ENABLE with protocol features) for a new ring."""
        rd = self.add_ring(index, size)
        self.set(vu.SET_VRING_NUM, STATE.pack(index, size))
        self.set(vu.SET_VRING_BASE, STATE.pack(index, 0))
        self.set(vu.SET_VRING_ADDR, ADDR.pack(index, 0, rd.desc_addr, rd.used_addr, rd.avail_addr, 0))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks[index] = kick
        self.calls[index] = call
        self.set(vu.SET_VRING_KICK, U64.pack(index), fds=[kick])
        self.set(vu.SET_VRING_CALL, U64.pack(index), fds=[call])
        if enable and self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.set(vu.SET_VRING_ENABLE, STATE.pack(index, 1))
        return rd

    def setup_packed_ring(self, index: int, size: int = 64, *, base: int = PACKED_INITIAL_BASE) -> RawPackedDriver:
        """A packed ring (handshake with PACKED_FEATURES first): NUM/BASE/ADDR/KICK/CALL/ENABLE."""
        rd = RawPackedDriver(self.pool, size)
        self.packed_rings[index] = rd
        self.set(vu.SET_VRING_NUM, STATE.pack(index, size))
        self.set(vu.SET_VRING_BASE, STATE.pack(index, base))
        # vhost-user's descriptor / used / available fields: descriptor ring, device and driver areas.
        self.set(vu.SET_VRING_ADDR, ADDR.pack(index, 0, rd.desc_addr, rd.device_addr, rd.driver_addr, 0))
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks[index] = kick
        self.calls[index] = call
        self.set(vu.SET_VRING_KICK, U64.pack(index), fds=[kick])
        self.set(vu.SET_VRING_CALL, U64.pack(index), fds=[call])
        if self.features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.set(vu.SET_VRING_ENABLE, STATE.pack(index, 1))
        return rd

    def start_packed(self, size: int = 64) -> RawPackedDriver:
        """Handshake with packed rings, memory table and packed ring 0: ready for requests."""
        self.handshake(features=PACKED_FEATURES)
        self.set_mem_table()
        return self.setup_packed_ring(0, size)

    def wait_packed_used(self, index: int, pos: int, wrap: int = 1, timeout: float | None = None) -> bool:
        """Wait until slot ``pos`` of packed ring ``index`` holds a used descriptor of wrap counter ``wrap``."""
        rd = self.packed_rings[index]
        want = 0x8080 if wrap else 0
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while rd.read(pos)[3] & 0x8080 != want:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    # -- the same steps one at a time (for frontends that order them differently) ---------

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; returns the reply's payload (head + data, or b"" for a refusal)."""
        return self.call(vu.GET_CONFIG, CONFIG.pack(offset, size, 0) + bytes(size))

    def send_call(self, index: int) -> int:
        """SET_VRING_CALL with a new eventfd (kept until close); returns it."""
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        old = self.calls.pop(index, None)
        self.calls[index] = call
        self.set(vu.SET_VRING_CALL, U64.pack(index), fds=[call])
        if old is not None:
            os.close(old)
        return call

    def send_layout(self, index: int, size: int = 64) -> RawDriver:
        """A new ring's SET_VRING_NUM, SET_VRING_BASE (0) and SET_VRING_ADDR."""
        rd = self.add_ring(index, size)
        self.set(vu.SET_VRING_NUM, STATE.pack(index, size))
        self.set(vu.SET_VRING_BASE, STATE.pack(index, 0))
        self.set(vu.SET_VRING_ADDR, ADDR.pack(index, 0, rd.desc_addr, rd.used_addr, rd.avail_addr, 0))
        return rd

    def send_kick(self, index: int) -> None:
        """SET_VRING_KICK with a new eventfd (kept until close)."""
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicks[index] = kick
        self.set(vu.SET_VRING_KICK, U64.pack(index), fds=[kick])

    def enable(self, index: int, on: bool = True) -> None:
        self.set(vu.SET_VRING_ENABLE, STATE.pack(index, int(on)))

    def start(self, size: int = 64) -> RawDriver:
        """Handshake, memory table and ring 0: ready for requests."""
        self.handshake()
        self.set_mem_table()
        return self.setup_ring(0, size)

    def kick(self, index: int = 0) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def wait_used(self, index: int = 0, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until the used index of ring ``index`` reaches ``count``."""
        rd = self.rings[index]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while rd.used_idx != count & 0xFFFF:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            for fd in [*self.kicks.values(), *self.calls.values()]:
                os.close(fd)
            self.kicks.clear()
            self.calls.clear()
            for rd in self.rings.values():
                rd.close()
            self.rings.clear()
            for prd in self.packed_rings.values():
                prd.close()
            self.packed_rings.clear()
            self.pool.close()

    def __enter__(self) -> HostileFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlkBuilder:
    """virtio-blk requests laid out in a frontend's memory, written into a RawDriver."""

    def __init__(self, fe: HostileFrontend, rd: RawDriver) -> None:
        self.fe = fe
        self.rd = rd
        self.bufs: list[Buffer] = []

    def buffer(self, data: bytes | int) -> Buffer:
        size = data if isinstance(data, int) else len(data)
        buf = self.fe.pool.allocate(max(size, 1), align=16)
        if isinstance(data, int):
            buf.view[:] = bytes(len(buf.view))
        else:
            buf.view[: len(data)] = data
        self.bufs.append(buf)
        return buf

    def header(self, rtype: int, sector: int = 0, *, size: int = B.OUTHDR_SIZE) -> Buffer:
        raw = B.OUTHDR.pack(rtype, 0, sector)
        return self.buffer((raw + bytes(max(0, size - len(raw))))[:size])

    def request(
        self,
        first: int,
        rtype: int,
        sector: int = 0,
        *,
        data: bytes | int | None = None,
        hdr_size: int = B.OUTHDR_SIZE,
        status_writable: bool = True,
    ) -> tuple[Buffer, Buffer | None]:
        """Descriptors first, first+1, ...: header, optional data, status. Returns (status, data)."""
        hdr = self.header(rtype, sector, size=hdr_size)
        status = self.buffer(b"\xee")  # a byte the device must overwrite (or leave alone)
        descs: list[tuple[int, int, int]] = [(hdr.addr, hdr_size, 0)]
        data_buf = None
        if data is not None:
            data_buf = self.buffer(data)
            readable = rtype in (B.T_OUT, B.T_DISCARD, B.T_WRITE_ZEROES)
            descs.append((data_buf.addr, len(data_buf.view), 0 if readable else DESC_F_WRITE))
        descs.append((status.addr, 1, DESC_F_WRITE if status_writable else 0))
        for k, (addr, length, flags) in enumerate(descs):
            last = k == len(descs) - 1
            self.rd.desc(
                first + k, addr, length, flags | (0 if last else DESC_F_NEXT), 0 if last else first + k + 1
            )
        return status, data_buf


class Chains:
    """Requests on one ring of a :class:`HostileFrontend`: laid out, published, kicked, awaited in turn."""

    def __init__(self, fe: HostileFrontend, index: int) -> None:
        self.fe = fe
        self.index = index
        self.rd = fe.rings[index]
        self.next_desc = 0
        self.done = 0

    def buffer(self, data: bytes | int) -> Buffer:
        size = data if isinstance(data, int) else len(data)
        buf = self.fe.pool.allocate(max(size, 1), align=16)
        buf.view[:] = bytes(len(buf.view)) if isinstance(data, int) else data.ljust(len(buf.view), b"\0")
        return buf

    def post(self, parts: Sequence[tuple[Buffer, int, bool]]) -> None:
        """Chain (buffer, length, device-writable) parts, publish and kick; no wait."""
        rd = self.rd
        first = self.next_desc
        rd.chain(first, [(b.addr, n, DESC_F_WRITE if w else 0) for b, n, w in parts])
        self.next_desc = (first + len(parts)) % rd.size
        rd.publish(first)
        self.fe.kick(self.index)

    def wait(self, count: int = 1) -> list[int]:
        """Wait for the next ``count`` used entries; their used lengths."""
        self.done += count
        assert self.fe.wait_used(self.index, self.done), f"ring {self.index}: request not completed"
        return [self.rd.used_entry(i)[1] for i in range(self.done - count, self.done)]

    def send(self, parts: Sequence[tuple[Buffer, int, bool]]) -> int:
        """:meth:`post` one chain and wait for it; its used length."""
        self.post(parts)
        return self.wait()[0]


# -- real I/O on each device type: a request that must come back right -----------------------


def blk_io(fe: HostileFrontend) -> None:
    rq = Chains(fe, 0)
    data = os.urandom(4096)
    status = rq.buffer(b"\xee")
    rq.send([(rq.buffer(B.OUTHDR.pack(B.T_OUT, 0, 8)), 16, False), (rq.buffer(data), 4096, False), (status, 1, True)])
    assert bytes(status.view) == bytes([B.S_OK])
    back = rq.buffer(4096)
    used = rq.send([(rq.buffer(B.OUTHDR.pack(B.T_IN, 0, 8)), 16, False), (back, 4096, True), (status, 1, True)])
    assert used == 4097 and bytes(status.view) == bytes([B.S_OK])
    assert bytes(back.view) == data


def scsi_command(rq: Chains, cdb: bytes, *, data_out: bytes | None = None, data_in: int = 0) -> tuple[int, bytes]:
    """One command on LUN 0:0, retried once after a UNIT ATTENTION; (SCSI status, data-in)."""
    for _attempt in range(2):
        parts = [(rq.buffer(S.CMD_REQ_HDR.pack(S.lun_address(0, 0), 1, 0, 0, 0) + cdb.ljust(S.CDB_SIZE, b"\0")),
                  19 + S.CDB_SIZE, False)]
        if data_out is not None:
            parts.append((rq.buffer(data_out), len(data_out), False))
        resp = rq.buffer(12 + S.SENSE_SIZE)
        parts.append((resp, 12 + S.SENSE_SIZE, True))
        din = rq.buffer(data_in) if data_in else None
        if din is not None:
            parts.append((din, data_in, True))
        rq.send(parts)
        sense_len, _resid, _q, status, response = S.CMD_RESP_HDR.unpack_from(resp.view)
        assert response == S.S_OK, response
        sense = T.parse_sense(bytes(resp.view[12 : 12 + sense_len]))
        if status == T.CHECK_CONDITION and sense is not None and sense.key == T.UNIT_ATTENTION:
            continue  # a fresh LUN's POWER ON, RESET: initiators retry
        return status, bytes(din.view) if din is not None else b""
    raise AssertionError("UNIT ATTENTION twice")


def scsi_io(fe: HostileFrontend) -> None:
    rq = Chains(fe, S.FIRST_REQUEST_QUEUE)
    data = os.urandom(4096)
    status, _ = scsi_command(rq, bytes([T.WRITE_10, 0]) + T.BE32.pack(16) + b"\0" + T.BE16.pack(8), data_out=data)
    assert status == T.GOOD
    status, back = scsi_command(rq, bytes([T.READ_10, 0]) + T.BE32.pack(16) + b"\0" + T.BE16.pack(8), data_in=4096)
    assert status == T.GOOD and back == data


def net_io(fe: HostileFrontend) -> None:
    rx, tx = Chains(fe, 0), Chains(fe, 1)
    inbox = rx.buffer(2048)
    rx.post([(inbox, 2048, True)])  # waits: nothing to receive yet
    frame = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + os.urandom(64)
    tx.send([(tx.buffer(bytes(12) + frame), 12 + len(frame), False)])
    (got,) = rx.wait()
    assert got == 12 + len(frame)
    assert bytes(inbox.view[12:got]) == frame  # loopback: what went out comes back
