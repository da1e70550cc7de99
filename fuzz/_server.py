"""Server target: the embedded vhost-user back end fed a hostile frontend's messages and rings.

:func:`target_server` runs :class:`~pyvirtio.backends.server.VhostUserBackend`
(the per-connection protocol and ring engine of ``pyvirtio serve``) in a
thread on one end of a socketpair and plays the frontend on the other end
from the input: raw messages with any header and fds (eventfds, memfds,
pipes, /dev/null), a normal handshake with fuzzed feature bits, memory
tables and regions with fuzzed addresses over a real memfd, ring set-up
with fuzzed sizes and addresses, descriptors and avail entries written into
the shared memory, well-formed virtio-blk / virtio-scsi requests, kicks.

Checks, per input:

* the connection ends for a declared reason: the frontend left, a
  protocol violation, or a :class:`~pyvirtio.errors.PyvirtioError`; never
  ``internal error`` (an unexpected exception, which ``run`` logs with a
  traceback) nor ``connection error`` (the socket is never broken here);
* no hang: ``run`` returns within :data:`JOIN_TIMEOUT` of the frontend
  closing, and a GET_FEATURES is answered within :data:`REPLY_TIMEOUT`
  while the stream is in sync;
* every message the back end sends is a well-formed reply with no fds;
* every fd and mapping the connection received is released (the process's
  fd count is back where it started);
* the same device model then serves a normal frontend: handshake, memory
  table, one ring, one request completed with status OK.
"""

from __future__ import annotations

import gc
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from fuzz._input import FuzzInput
from fuzz.targets import InvariantBroken, expect
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.net import NetBackend
from pyvirtio.backends.scsi import ScsiBackend, ScsiLun
from pyvirtio.backends.server import VhostUserBackend
from pyvirtio.errors import DeviceProtocolError
from pyvirtio.memory import Region
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
from pyvirtio.spec.ring import (
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_INITIAL_BASE,
    split_layout,
)

#: The frontend's memory: one memfd region, rings in the first half, data in the second.
REGION_SIZE = 64 << 10
RING_SLOT = 8 << 10  # ring i lives at i * RING_SLOT (honest layouts)
DATA_OFF = 32 << 10
GPA_BASE = 0x100000
UVA_BASE = 0x7F0000000000
#: Seconds the back end gets to answer GET_FEATURES, and to return after the frontend left.
REPLY_TIMEOUT = 5.0
JOIN_TIMEOUT = 10.0
MAX_OPS = 48

_HEADER = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")

_BOTH = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED

_region: Region | None = None


def frontend_region() -> Region:
    global _region
    if _region is None:
        _region = Region.create(REGION_SIZE, "fuzz-frontend")
    return _region


_inflight: Region | None = None
INFLIGHT_SIZE = 64 << 10


def inflight_region() -> Region:
    """The harness's own inflight area (SET_INFLIGHT_FD with contents written by the input)."""
    global _inflight
    if _inflight is None:
        _inflight = Region.create(INFLIGHT_SIZE, "fuzz-inflight")
    return _inflight


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


class Hang(InvariantBroken):
    """The back end did not answer or did not stop in time."""


@dataclass
class RingSpec:
    num: int
    desc: int  # offsets in the region (may lie outside it for fuzzed layouts)
    avail: int
    used: int
    avail_idx: int = 0
    kick: int = -1
    # Packed rings (fuzz._server_packed): avail = the driver area, used = the device area.
    pos: int = 0  # the next descriptor the frontend writes
    wrap: int = 1  # its wrap counter
    next_id: int = 0  # the next buffer id


class _Frontend:
    """The test's end of the socket: sends bytes and fds, collects and checks replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = vu.MessageReader(DeviceProtocolError)
        self.closed = False
        self.replies: list[vu.Message] = []
        self.received_fds: list[int] = []  # GET_INFLIGHT_FD areas (the harness closes them)

    def send(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        if self.closed:
            return
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError:
            self.closed = True

    def send_out(self, out: vu.Outgoing) -> None:
        self.send(out.data, out.fds)

    def drain(self, timeout: float = 0.0) -> None:
        """Read whatever the back end sent (waiting up to ``timeout`` for the first bytes)."""
        wait = timeout
        while not self.closed:
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return
            wait = 0.0
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * vu.MAX_FDS))
            except (ConnectionResetError, BrokenPipeError):
                self.closed = True
                return
            fds = [fd for level, kind, raw in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4])]
            self.received_fds.extend(fds)
            if not data:
                self.closed = True
                return
            self.reader.feed(data, fds)
            while True:
                try:
                    msg = self.reader.next_message()
                except DeviceProtocolError as exc:
                    raise InvariantBroken(f"the back end sent a malformed message: {exc}") from None
                if msg is None:
                    break
                expect(msg.flags & ~vu.NEED_REPLY == vu.VERSION | vu.REPLY, f"back end message flags {msg.flags:#x}")
                expect(not msg.fds or msg.request == vu.GET_INFLIGHT_FD, f"fds with {vu.request_name(msg.request)}")
                self.replies.append(msg)

    def wait_reply(self, request: int, timeout: float = REPLY_TIMEOUT) -> vu.Message | None:
        """The next reply to ``request`` (earlier replies are dropped); None if the back end left."""
        deadline = time.monotonic() + timeout
        while True:
            while self.replies:
                msg = self.replies.pop(0)
                if msg.request == request:
                    return msg
            if self.closed:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"no reply to {vu.request_name(request)} within {timeout} s")
            self.drain(min(left, 0.05))


class Connection:
    """One VhostUserBackend.run in a thread, on one end of a socketpair."""

    def __init__(self, model: object, poll_us: float, inflight: bool = False) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.theirs = theirs
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.backend = VhostUserBackend(model, poll_us=poll_us, inflight=inflight)  # type: ignore[arg-type]
        self.why: str | None = None
        self.raised: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-vhost-user", daemon=True)
        self.thread.start()
        self.fe = _Frontend(self.ours)

    def _run(self) -> None:
        try:
            self.why = self.backend.run(self.theirs, self.stop_fd)
        except BaseException as exc:  # run() must not raise at all
            self.raised = exc
        finally:
            self.theirs.close()  # as VhostUserServer does: the frontend sees the connection end

    def finish(self) -> str:
        """Close the frontend's end and wait for the back end to return; its reason."""
        self.ours.close()
        self.thread.join(JOIN_TIMEOUT)
        hung = self.thread.is_alive()
        if hung:
            os.eventfd_write(self.stop_fd, 1)
            self.thread.join(JOIN_TIMEOUT)
        self.theirs.close()
        if not self.thread.is_alive():
            os.close(self.stop_fd)
        if hung:
            raise Hang(f"the back end did not return within {JOIN_TIMEOUT} s of the frontend closing")
        for fd in self.fe.received_fds:
            os.close(fd)
        self.fe.received_fds.clear()
        if self.raised is not None:
            raise InvariantBroken(f"VhostUserBackend.run raised {self.raised!r}") from self.raised
        assert self.why is not None
        return self.why


# -- models -----------------------------------------------------------------------


Model = BlockBackend | ScsiBackend | NetBackend


def make_model(kind: int) -> Model:
    if kind == 0:
        return BlockBackend(Storage(size=1 << 20), num_queues=2)
    if kind == 1:
        return ScsiBackend({(0, 0): ScsiLun(Storage(size=1 << 20))})
    return NetBackend("loopback", pairs=2)


def close_model(model: Model) -> None:
    if isinstance(model, BlockBackend):
        model.storage.close()
    else:
        model.close()


# -- the hostile session ---------------------------------------------------------------


class Session:
    """The hostile frontend over split rings (fuzz._server_packed.PackedSession: packed rings)."""

    #: Feature bits an honest handshake always asks for when offered (a subclass's ring format).
    ring_features = 0

    def __init__(self, fi: FuzzInput, conn: Connection, region: Region, model: object) -> None:
        self.fi = fi
        self.conn = conn
        self.fe = conn.fe
        self.region = region
        self.model = model
        self.owned: list[int] = []  # fds the harness opened (closed at the end)
        self.rings: dict[int, RingSpec] = {}
        self.in_sync = True  # False once a raw message may have desynchronised the stream
        self.offered: tuple[vu.InflightInfo, int] | None = None  # the last GET_INFLIGHT_FD answer
        self.codec = vu.FrontendCodec()

    # fds of the kinds a frontend may (or may not) send
    def fd(self, kind: int) -> int:
        """0 eventfd, 1 the frontend memory's memfd, 2 a pipe, 3 /dev/null, 4 the inflight area."""
        if kind == 4:
            fd = os.dup(inflight_region().fd)
        elif kind == 0:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        elif kind == 1:
            fd = os.dup(self.region.fd)
        elif kind == 2:
            r, w = os.pipe()
            self.owned.append(w)
            fd = r
        else:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.owned.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.owned.clear()

    def send(self, request: int, payload: bytes, fds: tuple[int, ...] = (), *, need_reply: bool = False) -> None:
        flags = vu.VERSION | (vu.NEED_REPLY if need_reply else 0)
        self.fe.send(_HEADER.pack(request, flags, len(payload)) + payload, fds)

    def run(self) -> int:
        fi = self.fi
        ops = (
            self.op_raw,
            self.op_handshake,
            self.op_mem_table,
            self.op_mem_reg,
            self.op_ring,
            self.op_write_mem,
            self.op_desc,
            self.op_publish,
            self.op_kick,
            self.op_sync,
            self.op_request,
            self.op_misc,
            self.op_inflight,
        )
        done = 0
        for _ in range(MAX_OPS):
            if fi.exhausted or self.fe.closed:
                break
            ops[fi.below(len(ops))]()
            self.fe.drain()
            done += 1
        return done

    # -- operations

    def op_raw(self) -> None:
        """Any header, payload and fds."""
        fi = self.fi
        request = fi.u8()
        flags = fi.choose((vu.VERSION, vu.VERSION | vu.NEED_REPLY), fi.u32)
        payload = fi.blob(300)
        size = fi.u32() if fi.below(8) == 0 else len(payload)
        fds = tuple(self.fd(fi.below(4)) for _ in range(fi.below(4)))
        if size != len(payload):
            self.in_sync = False
        self.fe.send(_HEADER.pack(request, flags, size) + payload, fds)

    def op_handshake(self) -> None:
        """GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES with fuzzed bits."""
        fi = self.fi
        honest = fi.flag()
        mask = fi.u64()
        pmask = fi.u64()
        self.fe.send_out(self.codec.get_features())
        offered = self._u64_reply(vu.GET_FEATURES)
        if offered is None:
            return
        features = offered & (mask | self.ring_features) if honest else mask
        if offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.fe.send_out(self.codec.get_protocol_features())
            poffered = self._u64_reply(vu.GET_PROTOCOL_FEATURES)
            if poffered is None:
                return
            self.fe.send_out(self.codec.set_protocol_features(poffered & pmask if honest else pmask))
        self.fe.send_out(self.codec.set_owner(need_reply=fi.flag()))
        self.fe.send_out(self.codec.set_features(features, need_reply=fi.flag()))

    def _u64_reply(self, request: int) -> int | None:
        if not self.in_sync:
            return None
        msg = self.fe.wait_reply(request)
        if msg is None or len(msg.payload) != 8:
            return None
        value: int = _U64.unpack(msg.payload)[0]
        return value

    def _region_fields(self) -> tuple[int, int, int, int]:
        fi = self.fi
        if fi.flag():
            return GPA_BASE, REGION_SIZE, UVA_BASE, 0
        gpa = fi.choose((GPA_BASE, GPA_BASE + REGION_SIZE), fi.u64)
        size = fi.choose((REGION_SIZE, REGION_SIZE // 2, REGION_SIZE * 2), fi.u64)
        uva = fi.choose((UVA_BASE, 0), fi.u64)
        offset = fi.choose((0, 4096), fi.u64)
        return gpa, size, uva, offset

    def op_mem_table(self) -> None:
        fi = self.fi
        n = fi.pick((1, 1, 2, 0, 9))
        regions = [self._region_fields() for _ in range(min(n, 9))]
        fds = tuple(self.fd(1 if fi.below(4) else fi.below(4)) for _ in range(min(len(regions), vu.MAX_FDS)))
        payload = _STATE.pack(len(regions), 0) + b"".join(_REGION.pack(*r) for r in regions)
        self.send(vu.SET_MEM_TABLE, payload, fds, need_reply=fi.flag())

    def op_mem_reg(self) -> None:
        fi = self.fi
        add = fi.flag()
        region = self._region_fields()
        payload = _U64.pack(0) + _REGION.pack(*region)
        fds = (self.fd(1 if fi.below(4) else fi.below(4)),) if add or fi.flag() else ()
        self.send(vu.ADD_MEM_REG if add else vu.REM_MEM_REG, payload, fds, need_reply=fi.flag())

    def op_ring(self) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL(/ERR)(/ENABLE) for one ring, honest or not."""
        fi = self.fi
        index = fi.below(4)
        honest = fi.flag()
        if honest:
            num = 1 << fi.below(7)
            avail_off, used_off, _total = split_layout(num)
            desc = index * RING_SLOT
            ring = RingSpec(num, desc, desc + avail_off, desc + used_off)
        else:
            num = 1 << fi.below(16) if fi.flag() else fi.u32()
            ring = RingSpec(num, fi.u16() & ~15, fi.u16() & ~1, fi.u16() & ~3)
        base = fi.u16() if fi.below(4) == 0 else 0
        ring.avail_idx = base
        self.ring_setup(index, ring, base)

    def ring_setup(self, index: int, ring: RingSpec, base: int) -> None:
        """SET_VRING_NUM/BASE/ADDR, then the fds and the enable, honest or not; ``ring`` is remembered."""
        fi = self.fi
        need = fi.flag()
        self.send(vu.SET_VRING_NUM, _STATE.pack(index, ring.num), need_reply=need)
        self.send(vu.SET_VRING_BASE, _STATE.pack(index, base), need_reply=need)
        self.send(
            vu.SET_VRING_ADDR,
            _ADDR.pack(index, 0, UVA_BASE + ring.desc, UVA_BASE + ring.used, UVA_BASE + ring.avail, 0),
            need_reply=need,
        )
        kick = fi.below(4)
        if kick == 0:
            self.send(vu.SET_VRING_KICK, _U64.pack(index | vu.VRING_NOFD_MASK), need_reply=need)
        else:
            ring.kick = self.fd(0 if kick < 3 else fi.below(4))
            self.send(vu.SET_VRING_KICK, _U64.pack(index), (ring.kick,), need_reply=need)
        if fi.flag():
            self.send(vu.SET_VRING_CALL, _U64.pack(index), (self.fd(0),), need_reply=need)
        else:
            self.send(vu.SET_VRING_CALL, _U64.pack(index | vu.VRING_NOFD_MASK), need_reply=need)
        if fi.below(4) == 0:
            self.send(vu.SET_VRING_ERR, _U64.pack(index), (self.fd(fi.below(4)),), need_reply=need)
        if fi.flag():
            self.send(vu.SET_VRING_ENABLE, _STATE.pack(index, fi.choose((1, 0), fi.u32)), need_reply=need)
        self.rings[index] = ring

    def op_write_mem(self) -> None:
        """Bytes into the frontend's memory or (flag) into the harness's inflight area."""
        fi = self.fi
        view = inflight_region().view if fi.flag() else self.region.view
        off = fi.u16() % len(view)
        data = fi.blob(256)
        data = data[: len(view) - off]
        view[off : off + len(data)] = data

    def op_inflight(self) -> None:
        """GET_INFLIGHT_FD, or SET_INFLIGHT_FD with the area received or the harness's own."""
        fi = self.fi
        which = fi.below(3)
        if which == 0:
            self.fe.send_out(self.codec.get_inflight_fd(1 + fi.below(4), 1 << fi.below(9)))
            if self.in_sync:
                msg = self.fe.wait_reply(vu.GET_INFLIGHT_FD)
                if msg is not None and len(msg.payload) == 24 and len(msg.fds) == 1:
                    self.offered = (vu.InflightInfo(*struct.unpack("=QQHH4x", msg.payload)), msg.fds[0])
            return
        if which == 1 and self.offered is not None:
            info, fd = self.offered
            fds = (os.dup(fd),)
            self.owned.extend(fds)
        else:
            info = vu.InflightInfo(
                fi.choose((INFLIGHT_SIZE, 4096), fi.u64),
                fi.choose((0,), fi.u64),
                fi.choose((1, 2, 3), fi.u16),
                fi.choose((8, 64, 256), fi.u16),
            )
            fds = (self.fd(fi.choose((4,), lambda: fi.below(4))),)
        self.fe.send_out(self.codec.set_inflight_fd(info, fds[0], need_reply=fi.flag()))

    def pick_ring(self) -> RingSpec | None:
        if not self.rings:
            return None
        keys = sorted(self.rings)
        return self.rings[self.fi.pick(keys)]

    def region_write(self, off: int, data: bytes) -> None:
        if 0 <= off and off + len(data) <= REGION_SIZE:
            self.region.view[off : off + len(data)] = data

    def op_desc(self) -> None:
        """One descriptor with fuzzed fields written into a ring's table."""
        fi = self.fi
        ring = self.pick_ring()
        if ring is None or ring.num == 0:
            return
        i = fi.u16() % ring.num
        addr, length = self.desc_buffer()
        flags = fi.u16() if fi.below(4) == 0 else fi.u8() & 7
        nxt = fi.u16() if fi.below(4) == 0 else fi.u16() % ring.num
        self.region_write(ring.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def desc_buffer(self) -> tuple[int, int]:
        """A descriptor's (address, length): in the data area, in the region, or anything."""
        fi = self.fi
        mode = fi.below(3)
        if mode == 0:
            addr = GPA_BASE + DATA_OFF + fi.u16()
        elif mode == 1:
            addr = GPA_BASE + fi.u16()
        else:
            addr = fi.u64()
        return addr, fi.u32() if fi.below(4) == 0 else fi.u16()

    def _publish(self, ring: RingSpec, head: int) -> None:
        if ring.num and ring.num & (ring.num - 1) == 0:
            self.region_write(ring.avail + 4 + 2 * (ring.avail_idx & (ring.num - 1)), struct.pack("<H", head))
        ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        self.region_write(ring.avail + 2, struct.pack("<H", ring.avail_idx))

    def op_publish(self) -> None:
        fi = self.fi
        ring = self.pick_ring()
        if ring is None:
            return
        if fi.below(4) == 0:
            ring.avail_idx = fi.u16()
            self.region_write(ring.avail + 2, struct.pack("<H", ring.avail_idx))
        else:
            self._publish(ring, fi.u16() % max(ring.num, 1) if fi.flag() else fi.u16())

    def op_kick(self) -> None:
        """Kick a ring and give the back end a moment to complete what it can."""
        ring = self.pick_ring()
        if ring is None or ring.kick < 0:
            return
        try:
            os.write(ring.kick, (1).to_bytes(8, "little"))  # any fd kind: the kick fd may be a pipe
        except OSError:
            pass
        deadline = time.monotonic() + 0.02
        while time.monotonic() < deadline and not self.fe.closed:
            if self.drained(ring):
                break
            self.fe.drain(0.002)

    def drained(self, ring: RingSpec) -> bool:
        """Has the back end used everything published on ``ring`` (split: used.idx caught up)?"""
        used = self.region.view[ring.used + 2 : ring.used + 4] if 0 <= ring.used <= REGION_SIZE - 4 else b""
        return bool(used) and int.from_bytes(used, "little") == ring.avail_idx

    def op_sync(self) -> None:
        """GET_FEATURES and wait for the answer (only while the stream is in sync)."""
        self.fe.send_out(self.codec.get_features())
        if self.in_sync:
            self.fe.wait_reply(vu.GET_FEATURES)

    def op_request(self) -> None:
        """A well-formed virtio-blk or virtio-scsi request in the data area, published on a ring."""
        fi = self.fi
        ring = self.pick_ring()
        if ring is None or not self.can_chain(ring):
            return
        slot = fi.below(8)
        base = DATA_OFF + slot * 4096
        first = fi.u16() % ring.num
        if isinstance(self.model, NetBackend):
            self._net_request(ring, base, first)
            return
        if isinstance(self.model, BlockBackend):
            rtype = fi.choose((B.T_IN, B.T_OUT, B.T_FLUSH, B.T_GET_ID, B.T_DISCARD, B.T_WRITE_ZEROES), fi.u32)
            header = B.OUTHDR.pack(rtype, 0, fi.u16())
            dlen = 512 * fi.below(5)
            if rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
                dlen = 16
                self.region_write(base + 64, B.DISCARD_WZ.pack(fi.u16(), fi.u8(), fi.u8() & 1))
            writable = rtype not in (B.T_OUT, B.T_DISCARD, B.T_WRITE_ZEROES)
            parts = [(base, 16, False)]
        else:
            opcode = fi.choose((T.INQUIRY, T.TEST_UNIT_READY, T.READ_10, T.WRITE_10, T.REPORT_LUNS), fi.u8)
            cdb = bytes([opcode]) + fi.take(15)
            header = S.CMD_REQ_HDR.pack(S.lun_address(0, fi.below(2)), fi.u64(), 0, 0, 0) + cdb.ljust(32, b"\0")
            dlen = 512 * fi.below(3)
            writable = fi.flag()
            parts = [(base, len(header), False)]
        self.region_write(base, header)
        resp_len = 1 if isinstance(self.model, BlockBackend) else 12 + 96
        if dlen and not writable:
            parts.append((base + 64, dlen, False))
        if isinstance(self.model, BlockBackend):
            if dlen and writable:
                parts.append((base + 64, dlen, True))
            parts.append((base + 4000, resp_len, True))
        else:
            parts.append((base + 2048, resp_len, True))
            if dlen and writable:
                parts.append((base + 64, dlen, True))
        self.chain(ring, first, parts)

    def can_chain(self, ring: RingSpec) -> bool:
        """Can :meth:`chain` publish on ``ring`` (a split ring's avail ring needs a power-of-two size)?"""
        return bool(ring.num) and not ring.num & (ring.num - 1)

    def chain(self, ring: RingSpec, first: int, parts: list[tuple[int, int, bool]]) -> None:
        """Descriptors first, first+1, ... (mod the ring size) for ``parts``, then publish ``first``."""
        n = len(parts)
        idx = [(first + k) % ring.num for k in range(n)]
        if len(set(idx)) < n:
            return  # the ring is too small for this chain
        for k, (off, length, w) in enumerate(parts):
            flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k + 1 < n else 0)
            self.region_write(ring.desc + 16 * idx[k], DESC.pack(GPA_BASE + off, length, flags, idx[(k + 1) % n]))
        self._publish(ring, first)

    def _net_request(self, ring: RingSpec, base: int, first: int) -> None:
        """A frame to transmit (header + frame, maybe NEEDS_CSUM), or a receive buffer (flag)."""
        fi = self.fi
        if fi.flag():
            self.chain(ring, first, [(base, fi.choose((2048, 12, 64), fi.u16), True)])
            return
        flags = fi.choose((0, N.HDR_F_NEEDS_CSUM), fi.u8)
        hdr = N.HDR.pack(flags, 0, 0, 0, fi.u16() % 128, fi.u16() % 128, 0)
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(46) if fi.flag() else fi.blob(1600)
        self.region_write(base, hdr + frame)
        split = fi.flag() and len(frame) > 2  # header and frame in two descriptors
        if split:
            self.chain(ring, first, [(base, 12, False), (base + 12, len(frame), False)])
        else:
            self.chain(ring, first, [(base, 12 + len(frame), False)])

    def op_misc(self) -> None:
        fi = self.fi
        c = self.codec
        which = fi.below(7)
        if which == 0:
            offset = fi.below(vu.MAX_CONFIG_SIZE)
            self.fe.send_out(c.get_config(offset, 1 + fi.below(vu.MAX_CONFIG_SIZE - offset)))
        elif which == 1:
            self.fe.send_out(c.set_config(fi.below(240), fi.blob(16) or b"\0", need_reply=fi.flag()))
        elif which == 2:
            self.fe.send_out(c.get_vring_base(fi.below(4)))
        elif which == 3:
            self.fe.send_out(c.set_status(fi.u8(), need_reply=fi.flag()))
        elif which == 4:
            self.fe.send_out(c.get_status())
        elif which == 5:
            self.fe.send_out(c.reset_device(need_reply=fi.flag()))
        else:
            self.fe.send_out(c.get_max_mem_slots())


# -- the honest session afterwards --------------------------------------------------------


def serves_normally(model: Model, region: Region, packed: bool = False) -> None:
    """A well-behaved frontend gets one request served on a fresh connection to ``model``.

    blk: GET_ID on ring 0; scsi: INQUIRY on ring 2; net: a frame sent on
    ring 1 (tx) comes back on ring 0 (rx, loopback). ``packed``: on packed
    rings (VIRTIO_F_RING_PACKED, the fresh ring base 0x8000_8000).
    """
    region.view[:] = bytes(REGION_SIZE)
    conn = Connection(model, poll_us=0)
    fe = conn.fe
    codec = vu.FrontendCodec()
    ok = False
    fds: list[int] = []
    try:

        def ask(out: vu.Outgoing) -> int:
            fe.send_out(out)
            msg = fe.wait_reply(out.request)
            if msg is None:
                raise InvariantBroken(f"the back end closed the connection at {out.name} ({conn.backend.info()})")
            value = codec.parse_reply(out, msg)
            assert isinstance(value, int)
            return value

        offered = ask(codec.get_features())
        poffered = ask(codec.get_protocol_features())
        expect(poffered >> vu.PROTOCOL_F_REPLY_ACK & 1, "REPLY_ACK not offered")
        fe.send_out(codec.set_protocol_features(1 << vu.PROTOCOL_F_REPLY_ACK))
        for out in (
            codec.set_owner(need_reply=True),
            codec.set_features(
                offered
                & ((1 << F_VERSION_1) | (1 << F_RING_INDIRECT_DESC) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
                   | (packed << F_RING_PACKED)),
                need_reply=True,
            ),
            codec.set_mem_table([vu.MemRegion(GPA_BASE, REGION_SIZE, UVA_BASE)], [region.fd], need_reply=True),
        ):
            expect(ask(out) == 0, f"{out.name} refused")
        if isinstance(model, BlockBackend):
            rings = [0]
        elif isinstance(model, ScsiBackend):
            rings = [S.FIRST_REQUEST_QUEUE]
        else:
            rings = [0, 1]  # rx, tx
        num = 8
        if packed:  # descriptors, then the driver and device event suppression areas (§2.8.10)
            avail_off, used_off, ring_base = 16 * num, 16 * num + 4, PACKED_INITIAL_BASE
        else:
            avail_off, used_off, _ = split_layout(num)
            ring_base = 0
        for k, index in enumerate(rings):
            base = k * RING_SLOT
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds += [kick, call]
            addr = vu.VringAddr(index, 0, UVA_BASE + base, UVA_BASE + base + used_off, UVA_BASE + base + avail_off)
            for out in (
                codec.set_vring_num(index, num, need_reply=True),
                codec.set_vring_base(index, ring_base, need_reply=True),
                codec.set_vring_addr(addr, need_reply=True),
                codec.set_vring_kick(index, kick, need_reply=True),
                codec.set_vring_call(index, call, need_reply=True),
                codec.set_vring_enable(index, True, need_reply=True),
            ):
                expect(ask(out) == 0, f"{out.name} refused")
        data = DATA_OFF
        view = region.view
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(range(46))
        if isinstance(model, BlockBackend):
            B.OUTHDR.pack_into(view, data, B.T_GET_ID, 0, 0)
            chains = [[(data, 16, 0), (data + 64, B.ID_BYTES, DESC_F_WRITE), (data + 128, 1, DESC_F_WRITE)]]
            status_off = data + 128
        elif isinstance(model, ScsiBackend):
            cdb = bytes([T.INQUIRY, 0, 0, 0, 36, 0]).ljust(32, b"\0")
            S.CMD_REQ_HDR.pack_into(view, data, S.lun_address(0, 0), 1, 0, 0, 0)
            view[data + 19 : data + 51] = cdb
            chains = [[(data, 51, 0), (data + 128, 12 + 96, DESC_F_WRITE), (data + 256, 36, DESC_F_WRITE)]]
            status_off = data + 128 + 11  # virtio-scsi response byte
        else:
            view[data : data + 12 + len(frame)] = bytes(12) + frame
            chains = [[(data + 1024, 2048, DESC_F_WRITE)], [(data, 12 + len(frame), 0)]]  # rx buffer, tx frame
            status_off = -1
        if status_off >= 0:
            view[status_off] = 0xEE
        for k, chain in enumerate(chains):
            base = k * RING_SLOT
            for i, (off, length, flags) in reversed(list(enumerate(chain))):  # the head last
                more = DESC_F_NEXT if i + 1 < len(chain) else 0
                if packed:  # buffer id 0, available in the first lap (AVAIL = wrap counter 1)
                    PACKED_DESC.pack_into(view, base + 16 * i, GPA_BASE + off, length, 0,
                                          flags | more | PACKED_DESC_F_AVAIL)
                else:
                    DESC.pack_into(view, base + 16 * i, GPA_BASE + off, length, flags | more, i + 1)
            if not packed:
                struct.pack_into("<HH", view, base + avail_off + 2, 1, 0)  # avail.idx = 1, ring[0] = head 0
        for k in range(len(rings)):
            os.eventfd_write(fds[2 * k], 1)
        deadline = time.monotonic() + REPLY_TIMEOUT
        for k in range(len(rings)):
            while not (
                struct.unpack_from("<H", view, k * RING_SLOT + 14)[0] & _BOTH == _BOTH  # used in lap 1
                if packed
                else struct.unpack_from("<H", view, k * RING_SLOT + used_off + 2)[0] == 1
            ):
                if time.monotonic() > deadline:
                    raise Hang(f"a normal frontend's request on ring {rings[k]} was not completed")
                time.sleep(0.0005)
        if status_off >= 0:
            expect(view[status_off] == 0, f"a normal request completed with status {view[status_off]:#x}")
        else:
            # rx: used.ring[0].len, or the length of the used descriptor in slot 0
            length = struct.unpack_from("<I", view, 8 if packed else used_off + 8)[0]
            got = bytes(view[data + 1024 + 12 : data + 1024 + length])
            expect(length == 12 + len(frame) and got == frame, f"loopback returned {length} bytes: {got[:16]!r}")
        ok = True
    finally:
        why = conn.finish()
        for fd in fds:
            os.close(fd)
    if ok:
        expect(why == "frontend disconnected", f"the normal connection ended with: {why}")


# -- the target --------------------------------------------------------------------------

DECLARED = ("protocol violation: ", "error: ", "frontend disconnected", "connection reset by the frontend",
             "truncated message")


def target_server(data: bytes) -> int:
    """VhostUserBackend fed a hostile frontend's messages and rings, then a normal one; returns chains served.

    Input: ``u8`` model (blk, scsi, net), ``u8`` poll choice, ``u8``
    INFLIGHT_SHMFD offered or not, then up to :data:`MAX_OPS` operations
    (``u8`` opcode, see :class:`Session`: raw message, handshake, memory
    table, memory region, ring set-up, memory write, descriptor, avail
    entry, kick, sync, blk/scsi/net request, misc, inflight area).
    """
    return serve_fuzzed(data, Session, packed=False)


def serve_fuzzed(data: bytes, session_class: type[Session], packed: bool) -> int:
    """:func:`target_server`'s run with ``session_class`` as the frontend; the normal one on ``packed`` rings."""
    fi = FuzzInput(data)
    region = frontend_region()
    inflight_region()  # both harness memfds exist before the fds are counted
    fds_before = open_fds()
    region.view[:] = bytes(REGION_SIZE)
    model = make_model(fi.below(3))
    try:
        conn = Connection(model, poll_us=fi.pick((0, 50)), inflight=fi.flag())
        session = session_class(fi, conn, region, model)
        try:
            session.run()
        finally:
            why = conn.finish()
            session.close()
        expect(why.startswith(DECLARED), f"the connection ended with an undeclared reason: {why}")
        done = conn.backend.chains
        serves_normally(model, region, packed)
    finally:
        close_model(model)
    leaked = open_fds() - fds_before
    if leaked:
        gc.collect()  # an mmap caught in a reference cycle keeps its fd until collected
        leaked = open_fds() - fds_before
    if leaked:
        what = ", ".join(f"{fd} -> {fd_target(fd)}" for fd in sorted(leaked))
        for fd in leaked:  # so that the next input starts clean (Hypothesis engine, replays)
            os.close(fd)
        raise InvariantBroken(f"{len(leaked)} fds leaked by a connection that ended with {why!r}: {what}")
    return done
