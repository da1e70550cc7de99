"""A vhost-user back end with faults to order: proof that each conformance rule can fail.

Theory of operation
-------------------
One process holds pyvirtio's embedded virtio-blk back end (a RAM disk,
healthy: it passes every rule that applies) on an inner socket, and in front
of it a relay on the public socket. The relay cuts the frontend's byte
stream into messages (header: request, flags, size; the fds of a recvmsg go
with the last message completed in it, as the sender sends one message per
sendmsg), forwards each with its fds, and forwards the replies back. With no
fault switched on it changes nothing, so the healthy configuration must pass
every rule the plain back end passes. Each fault (:data:`FAULTS`) makes the
relay break one rule of the protocol the way real back ends have been seen
to, on the wire, where the checker sees it:

* ``ignore-need-reply``: SET_OWNER with NEED_REPLY is taken but never acked;
* ``ack-unknown``: an unknown request code with NEED_REPLY is acked as a success;
* ``wrong-vring-base``: GET_VRING_BASE of a ring that served requests answers one more;
* ``accept-outside-addr``: SET_VRING_ADDR with a descriptor table outside the
  memory table is acked (and not passed on);
* ``signal-always``: the call eventfds are written every 5 ms whatever the
  driver suppressed (NO_INTERRUPT, used_event);
* ``crash-on-loop``: kicks are relayed; on each, the new avail entries are
  read (memory mapped read-only); a head descriptor whose next is itself makes
  the process exit (status 70), as a back end that follows chains blindly would;
* ``leak-fds``: every fd a frontend sends is kept open for ever.

A stream the relay cannot frame (a size field above 64 KiB) is passed on
verbatim from there on. Run as a script (``python tests/faulty_backend.py
--socket PATH --fault NAME``) so that ``pyvirtio check --restart-cmd`` can
start it again after a crash, and ``--pid`` counts its fds.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import socket
import struct
import sys
import threading
import traceback
from dataclasses import dataclass, field

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.ring import DESC_F_NEXT

FAULTS: dict[str, str] = {
    "ignore-need-reply": "SET_OWNER with NEED_REPLY is taken but never acked",
    "ack-unknown": "an unknown request code with NEED_REPLY is acked as a success",
    "wrong-vring-base": "GET_VRING_BASE of a ring that served requests answers one more than the index reached",
    "accept-outside-addr": "SET_VRING_ADDR with a descriptor table outside the memory table is acked",
    "signal-always": "call eventfds written every 5 ms, whatever the driver suppressed",
    "crash-on-loop": "a head descriptor whose next is itself makes the process exit",
    "leak-fds": "every fd a frontend sends is kept open",
}

CRASH_STATUS = 70
_HEADER = struct.Struct("<III")
_MAX_FRAMED = 65536
_CMSG = socket.CMSG_SPACE(vu.MAX_FDS * 4)
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


@dataclass
class _Mapped:
    """A frontend region mapped read-only (crash-on-loop reads rings through it)."""

    start: int  # userspace address
    size: int
    map: mmap.mmap

    def read(self, addr: int, n: int) -> bytes | None:
        off = addr - self.start
        if off < 0 or off + n > min(self.size, len(self.map)):
            return None
        return self.map[off : off + n]


@dataclass
class _Ring:
    num: int = 0
    base: int = 0  # the last SET_VRING_BASE
    desc: int = 0
    avail: int = 0
    seen: int = 0  # avail entries looked at (crash-on-loop)


@dataclass
class _Session:
    front: socket.socket
    back: socket.socket
    faults: frozenset[str]
    buf: bytearray = field(default_factory=bytearray)
    pending_fds: list[int] = field(default_factory=list)
    raw: bool = False
    regions: list[tuple[int, int]] = field(default_factory=list)  # (userspace addr, size)
    mapped: list[_Mapped] = field(default_factory=list)
    rings: dict[int, _Ring] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)  # ring -> the frontend's call fd (signal-always)
    kicks: dict[int, tuple[int, int]] = field(default_factory=dict)  # frontend's fd -> (ring, relayed fd)
    base_asked: list[int] = field(default_factory=list)  # rings of GET_VRING_BASE awaiting a reply

    def ring(self, index: int) -> _Ring:
        return self.rings.setdefault(index, _Ring())

    def read(self, addr: int, n: int) -> bytes | None:
        for m in self.mapped:
            data = m.read(addr, n)
            if data is not None:
                return data
        return None

    def close(self) -> None:
        for fd in self.calls.values():
            _close(fd)
        for theirs, (_ring, mine) in self.kicks.items():
            _close(theirs)
            _close(mine)
        for m in self.mapped:
            m.map.close()
        for fd in self.pending_fds:
            _close(fd)
        self.front.close()
        self.back.close()


class FaultyBackend:
    """The relay on ``path`` in front of a healthy blk back end on ``path + '.inner'`` (module docstring)."""

    def __init__(self, path: str, faults: set[str] | frozenset[str] = frozenset(), size: int = 16 << 20) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(FAULTS)}")
        self.path = path
        self.faults = frozenset(faults)
        self.storage = Storage(size=size)
        self.inner = VhostUserServer(path + ".inner", BlockBackend(self.storage, num_queues=2))
        self.leaked: list[int] = []
        self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.inner.listen()
        self.inner.start()
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(self.path)
        listener.listen(4)
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True, name="faulty-relay")
        self._thread.start()

    def stop(self) -> None:
        os.eventfd_write(self._stop, 1)
        if self._thread is not None:
            self._thread.join(10)
        self.inner.stop()
        self.inner.wait(10)
        self.storage.close()
        for fd in self.leaked:
            _close(fd)
        _close(self._stop)

    def __enter__(self) -> FaultyBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the relay -----------------------------------------------------------------

    def _serve(self, listener: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([listener.fileno(), self._stop], [], [])
                if self._stop in ready:
                    return
                front, _ = listener.accept()
                back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    back.connect(self.inner.path)
                except OSError:
                    front.close()
                    back.close()
                    continue
                session = _Session(front, back, self.faults)
                try:
                    if self._relay(session):
                        return
                except Exception:  # a bug of the relay: said, and the next frontend served
                    traceback.print_exc()
                finally:
                    session.close()
        finally:
            listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _relay(self, s: _Session) -> bool:
        """Forward one session; True when asked to stop."""
        timeout = 0.005 if "signal-always" in s.faults else None
        while True:
            watched = [s.front.fileno(), s.back.fileno(), self._stop, *s.kicks]
            ready, _, _ = select.select(watched, [], [], timeout)
            if self._stop in ready:
                return True
            for fd in s.calls.values():
                try:
                    os.eventfd_write(fd, 1)
                except OSError:
                    pass
            for r in ready:
                if r == s.front.fileno():
                    if not self._from_front(s):
                        return False
                elif r == s.back.fileno():
                    if not self._from_back(s):
                        return False
                elif r in s.kicks:
                    self._kick(s, r)

    # frontend -> back end

    def _from_front(self, s: _Session) -> bool:
        got = _recv(s.front)
        if got is None:
            return False
        data, fds = got
        if "leak-fds" in s.faults:
            self.leaked.extend(os.dup(fd) for fd in fds)
        if not data and not fds:
            return False
        if s.raw:
            return self._send(s.back, data, fds)
        s.buf += data
        s.pending_fds += fds
        while len(s.buf) >= _HEADER.size:
            request, flags, size = _HEADER.unpack_from(s.buf)
            if size > _MAX_FRAMED:  # cannot frame it: verbatim from here on
                s.raw = True
                data, s.buf = bytes(s.buf), bytearray()
                fds, s.pending_fds = s.pending_fds, []
                return self._send(s.back, data, fds)
            if len(s.buf) < _HEADER.size + size:
                break
            payload = bytes(s.buf[_HEADER.size : _HEADER.size + size])
            del s.buf[: _HEADER.size + size]
            msg_fds: list[int] = []
            if len(s.buf) < _HEADER.size:  # the last message of this chunk gets its fds
                msg_fds, s.pending_fds = s.pending_fds, []
            if not self._front_message(s, request, flags, payload, msg_fds):
                return False
        return True

    def _front_message(self, s: _Session, request: int, flags: int, payload: bytes, fds: list[int]) -> bool:
        faults = s.faults
        need_reply = bool(flags & vu.NEED_REPLY)
        value: object = None
        try:
            value = vu.decode_request(vu.Message(request, flags, payload, tuple(fds)))
        except Exception:  # malformed on purpose (hostile rules): passed on as it came
            value = None
        if request == vu.SET_MEM_TABLE and isinstance(value, vu.MemTable):
            s.regions = [(r.userspace_addr, r.memory_size) for r in value.regions]
            if "crash-on-loop" in faults:
                self._map(s, list(zip(value.regions, fds, strict=False)), replace=True)
        elif request == vu.ADD_MEM_REG and isinstance(value, vu.MemRegion):
            s.regions.append((value.userspace_addr, value.memory_size))
            if "crash-on-loop" in faults:
                self._map(s, list(zip([value], fds, strict=False)), replace=False)
        elif request == vu.SET_VRING_NUM and isinstance(value, vu.VringState):
            s.ring(value.index).num = value.num
        elif request == vu.SET_VRING_BASE and isinstance(value, vu.VringState):
            ring = s.ring(value.index)
            ring.base = ring.seen = value.num
        elif request == vu.GET_VRING_BASE and isinstance(value, vu.VringState) and "wrong-vring-base" in faults:
            s.base_asked.append(value.index)
        elif request == vu.SET_VRING_ADDR and isinstance(value, vu.VringAddr):
            ring = s.ring(value.index)
            ring.desc, ring.avail = value.desc, value.avail
            inside = any(a <= value.desc < a + n for a, n in s.regions)
            if "accept-outside-addr" in faults and not inside:
                _close_all(fds)
                return not need_reply or self._send(s.front, vu.encode_ack(request, True).data, [])
        elif request == vu.SET_VRING_CALL and isinstance(value, vu.VringFile) and "signal-always" in faults:
            old = s.calls.pop(value.index, None)
            if old is not None:
                _close(old)
            if fds:
                s.calls[value.index] = os.dup(fds[0])
        elif request == vu.SET_VRING_KICK and isinstance(value, vu.VringFile) and "crash-on-loop" in faults:
            for fd, (index, relayed) in list(s.kicks.items()):
                if index == value.index:  # replaced: the old relay would steal the new fd's kicks
                    del s.kicks[fd]
                    _close(fd)
                    _close(relayed)
            if fds and _is_eventfd(fds[0]):
                mine = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                theirs = os.dup(fds[0])
                os.set_blocking(theirs, False)
                s.kicks[theirs] = (value.index, os.dup(mine))
                _close(fds[0])
                fds = [mine]
        elif request == vu.SET_OWNER and need_reply and "ignore-need-reply" in faults:
            flags &= ~vu.NEED_REPLY
        elif request not in vu.REQUEST_NAMES and need_reply and "ack-unknown" in faults:
            _close_all(fds)
            return self._send(s.front, _HEADER.pack(request, vu.VERSION | vu.REPLY, 8) + bytes(8), [])
        return self._send(s.back, _HEADER.pack(request, flags, len(payload)) + payload, fds)

    def _map(self, s: _Session, pairs: list[tuple[vu.MemRegion, int]], *, replace: bool) -> None:
        if replace:
            for m in s.mapped:
                m.map.close()
            s.mapped = []
        for region, fd in pairs:
            try:
                length = min(os.fstat(fd).st_size - region.mmap_offset, region.memory_size)
                if length <= 0:
                    continue
                view = mmap.mmap(fd, length + region.mmap_offset, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError):
                continue
            s.mapped.append(_Mapped(region.userspace_addr - region.mmap_offset, region.mmap_offset + length, view))

    def _kick(self, s: _Session, theirs: int) -> None:
        index, mine = s.kicks[theirs]
        try:
            count = os.eventfd_read(theirs)
        except OSError:
            return
        ring = s.rings.get(index)
        if ring is not None and ring.num:
            head_idx = s.read(ring.avail + 2, 2)
            if head_idx is not None:
                avail_idx = _U16.unpack(head_idx)[0]
                while ring.seen != avail_idx and (avail_idx - ring.seen) & 0xFFFF <= ring.num:
                    entry = s.read(ring.avail + 4 + 2 * (ring.seen % ring.num), 2)
                    ring.seen = (ring.seen + 1) & 0xFFFF
                    if entry is None:
                        continue
                    head = _U16.unpack(entry)[0]
                    desc = s.read(ring.desc + 16 * head, 16) if head < ring.num else None
                    if desc is not None:
                        _addr, _len, flags, nxt = _DESC.unpack(desc)
                        if flags & DESC_F_NEXT and nxt == head:
                            os._exit(CRASH_STATUS)  # the fault: follows the chain for ever, and dies
        try:
            os.eventfd_write(mine, count)
        except OSError:
            pass

    # back end -> frontend

    def _from_back(self, s: _Session) -> bool:
        got = _recv(s.back)
        if got is None:
            return False
        data, fds = got
        if not data and not fds:
            return False
        if "wrong-vring-base" in s.faults and s.base_asked and len(data) == _HEADER.size + 8:
            request, flags, size = _HEADER.unpack_from(data)
            if request == vu.GET_VRING_BASE:
                index, num = struct.unpack_from("<II", data, _HEADER.size)
                asked = s.base_asked.pop(0)
                ring = s.rings.get(asked)
                if ring is not None and num != ring.base:
                    data = _HEADER.pack(request, flags, size) + struct.pack("<II", index, (num + 1) & 0xFFFF)
        return self._send(s.front, data, fds)

    @staticmethod
    def _send(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
        try:
            if fds:
                sent = sock.sendmsg([data], vu.scm_rights(fds))
                if sent < len(data):
                    sock.sendall(data[sent:])
            elif data:
                sock.sendall(data)
            return True
        except OSError:
            return False
        finally:
            _close_all(fds)


def _recv(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One recvmsg: the bytes and the fds that came with them; None when the connection broke."""
    try:
        data, anc, _flags, _addr = sock.recvmsg(65536, _CMSG, socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None
    return data, vu.fds_from_ancillary(anc)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--fault", action="append", default=[], choices=sorted(FAULTS))
    args = parser.parse_args()
    backend = FaultyBackend(args.socket, set(args.fault))
    backend.start()
    try:
        threading.Event().wait()
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
