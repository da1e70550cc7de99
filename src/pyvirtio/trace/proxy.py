"""The I/O side of ``pyvirtio trace``: a proxy between a vhost-user frontend and a back end.

Theory of operation
-------------------
:class:`TraceProxy` listens on one Unix socket (where the frontend, QEMU or
pyvirtio, connects) and, for each frontend, connects to the back end's
socket. One thread polls both sockets: what one side sends is handed to the
sans-I/O :class:`~pyvirtio.trace.decoder.Decoder`, which cuts it into whole
messages; each message is forwarded to the other side with one ``sendmsg``
carrying exactly the bytes and fds that came with it (the kernel gives the
receiver its own copies of the fds; the proxy then closes its own), and its
decoded :class:`~pyvirtio.trace.decoder.Event` goes to the ``emit`` callback.
Forwarding message by message keeps each message's fds with its first byte,
as back ends that read the header with ``recvmsg`` and the payload with
``read`` (libvhost-user, DPDK) require. Nothing is changed, reordered or
answered by the proxy: both peers see the conversation they would have had
without it, one proxy hop later.

``rings=True`` (``--rings``) is the exception, and says so: to count kicks
and calls, the proxy relays each ring's kick and call eventfds. It keeps the
frontend's eventfd, passes a fresh one of its own to the back end, and
copies each signal across (kicks frontend -> back end, calls back end ->
frontend), counting them; the memory regions are mapped a second time, read
only (:class:`~pyvirtio.trace.rings.RingWatcher`), and every ``interval``
seconds, when the back end answers GET_VRING_BASE (the ring stopped: its
final indices) and when the frontend leaves, each ring is sampled. A relayed
notification costs one more wake-up; the payloads are still unchanged.

Limits: the back-end channel (SET_BACKEND_REQ_FD) is a socket of its own
that the proxy forwards untouched, so back-end-initiated messages are not
decoded; a frontend that reconnects gets a new back-end connection and a new
decoder. A frontend is served after the previous one left (as the back ends
themselves do).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtio.errors import TransportError
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.trace.decoder import Decoder, Event, Frame, Source
from pyvirtio.trace.rings import RingSample, RingWatcher

__all__ = ["TraceItem", "TraceProxy"]

#: What the proxy reports: decoded messages, ring samples, and one-line notes.
TraceItem = Event | RingSample | str

_CHUNK = 65536
_CMSG = socket.CMSG_SPACE(vu.MAX_FDS * 4)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@dataclass(slots=True)
class _Relay:
    """One relayed eventfd: signals read from ``source`` are written to ``sink`` (``--rings``)."""

    ring: int
    kind: str  # "kick" or "call"
    source: int
    sink: int


@dataclass(slots=True)
class _Session:
    front: socket.socket
    back: socket.socket
    decoder: Decoder
    watcher: RingWatcher | None = None
    relays: dict[int, _Relay] = field(default_factory=dict)  # by the fd polled

    def close(self) -> None:
        for relay in self.relays.values():
            _close(relay.source)
            _close(relay.sink)
        self.relays.clear()
        if self.watcher is not None:
            self.watcher.close()
        self.front.close()
        self.back.close()


class TraceProxy:
    """Listen on ``listen``, forward each frontend to the back end at ``connect``, report to ``emit``."""

    def __init__(
        self,
        listen: str,
        connect: str,
        emit: Callable[[TraceItem], None],
        *,
        rings: bool = False,
        interval: float = 1.0,
        once: bool = False,
        connect_timeout: float = 5.0,
        device_type: int = 0,
    ) -> None:
        self.listen_path = listen
        self.connect_path = connect
        self.emit = emit
        self.rings = rings
        self.interval = interval
        self.once = once
        self.connect_timeout = connect_timeout
        self.device_type = device_type
        self.sessions = 0
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._listener: socket.socket | None = None
        self._ready = threading.Event()

    # -- life cycle -------------------------------------------------------------------

    def listen(self) -> None:
        """Create the listening socket (a stale socket file is replaced)."""
        if self._listener is not None:
            return
        if os.path.exists(self.listen_path):
            os.unlink(self.listen_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(self.listen_path)
        sock.listen(1)
        self._listener = sock
        self._ready.set()

    def wait_listening(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        """Ask :meth:`serve` to return (thread- and signal-safe)."""
        try:
            os.eventfd_write(self._stop_fd, 1)
        except OSError:
            pass

    def serve(self) -> None:
        """Accept frontends one after another until :meth:`stop` (or the first one left, with ``once``)."""
        self.listen()
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_fd in ready:
                    return
                front, _ = self._listener.accept()
                stopped = self._serve_one(front)
                if stopped or self.once:
                    return
        finally:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.listen_path)
            except FileNotFoundError:
                pass
            _close(self._stop_fd)
            self._stop_fd = -1

    # -- one frontend -------------------------------------------------------------------

    def _connect_back(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.connect_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise TransportError(f"cannot connect to the back end at {self.connect_path}: {exc}") from None
                time.sleep(0.02)

    def _serve_one(self, front: socket.socket) -> bool:
        """Forward one frontend's session; True if the proxy was asked to stop meanwhile."""
        self.sessions += 1
        number = self.sessions
        try:
            back = self._connect_back()
        except TransportError as exc:
            self.emit(f"frontend {number}: {exc}; closing it")
            front.close()
            return False
        self.emit(f"frontend {number} connected; forwarding to {self.connect_path}")
        session = _Session(front, back, Decoder(device_type=self.device_type),
                           watcher=RingWatcher() if self.rings else None)
        try:
            why, stopped = self._loop(session)
        finally:
            for event in session.decoder.close():
                self.emit(event)
            self._sample(session)
            session.close()
        self.emit(f"frontend {number} session ended: {why}")
        return stopped

    def _loop(self, session: _Session) -> tuple[str, bool]:
        poller = select.poll()
        front_fd, back_fd = session.front.fileno(), session.back.fileno()
        poller.register(front_fd, select.POLLIN)
        poller.register(back_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        next_sample = time.monotonic() + self.interval
        while True:
            timeout = None
            if session.watcher is not None:
                timeout = max(0, int((next_sample - time.monotonic()) * 1000))
            for fd, _ev in poller.poll(timeout):
                if fd == self._stop_fd:
                    return "proxy stopping", True
                if fd in (front_fd, back_fd):
                    source = Source.FRONTEND if fd == front_fd else Source.BACKEND
                    ended = self._pump(session, source, poller)
                    if ended is not None:
                        return ended, False
                else:
                    self._relay(session, fd)
            if session.watcher is not None and time.monotonic() >= next_sample:
                self._sample(session)
                next_sample = time.monotonic() + self.interval

    def _pump(self, session: _Session, source: Source, poller: select.poll) -> str | None:
        """Read what ``source`` sent, decode and forward it; a reason when the session ends."""
        sock, peer = (session.front, session.back) if source is Source.FRONTEND else (session.back, session.front)
        try:
            data, anc, _flags, _addr = sock.recvmsg(_CHUNK, _CMSG, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return f"{source.value} connection error: {exc}"
        fds = vu.fds_from_ancillary(anc)
        if not data and not fds:
            return f"{source.value} closed the connection"
        for frame in session.decoder.feed(source, data, fds):
            if frame.event is not None:
                self.emit(frame.event)
            try:
                self._forward(session, frame, peer, poller)
            except OSError as exc:
                return f"cannot forward to the {'back end' if source is Source.FRONTEND else 'frontend'}: {exc}"
            event = frame.event
            if event is not None and event.is_reply and event.request == vu.GET_VRING_BASE and event.error is None:
                self._sample(session, event.fields.get("index"))  # the ring stopped: its final indices
        return None

    def _forward(self, session: _Session, frame: Frame, peer: socket.socket, poller: select.poll) -> None:
        fds = list(frame.fds)
        keep: set[int] = set()
        event = frame.event
        if session.watcher is not None and event is not None and event.error is None:
            keep = self._observe(session, event, fds, poller)
        try:
            if fds:
                sent = peer.sendmsg([frame.data], vu.scm_rights(fds))
                if sent < len(frame.data):
                    peer.sendall(frame.data[sent:])
            elif frame.data:
                peer.sendall(frame.data)
        finally:
            for fd in frame.fds:
                if fd not in keep:
                    _close(fd)
            for fd in fds:
                if fd not in frame.fds and fd not in keep:
                    _close(fd)

    # -- --rings: mappings and relayed eventfds -------------------------------------------

    def _observe(self, session: _Session, event: Event, fds: list[int], poller: select.poll) -> set[int]:
        """Map memory and substitute relayed eventfds in ``fds``; returns the fds the proxy keeps."""
        watcher = session.watcher
        assert watcher is not None
        state = session.decoder.state
        request = event.request
        if event.source is not Source.FRONTEND:
            return set()
        if request == vu.SET_MEM_TABLE:
            watcher.set_table(tuple(r for r, _fd in state.regions), tuple(fds))
        elif request == vu.ADD_MEM_REG and fds:
            watcher.add(state.regions[-1][0], fds[0])
        elif request == vu.REM_MEM_REG:
            fields = event.fields
            region = vu.MemRegion(
                int(fields["guest_phys_addr"], 16), int(fields["memory_size"], 16), int(fields["userspace_addr"], 16)
            )
            watcher.remove(region)
        elif request in (vu.SET_VRING_KICK, vu.SET_VRING_CALL) and fds:
            index = int(event.fields["index"])
            kind = "kick" if request == vu.SET_VRING_KICK else "call"
            for fd, relay in list(session.relays.items()):
                if relay.ring == index and relay.kind == kind:
                    poller.unregister(fd)
                    del session.relays[fd]
                    _close(relay.source)
                    _close(relay.sink)
            theirs = fds[0]
            mine = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fds[0] = mine  # the back end gets the proxy's eventfd
            if kind == "kick":  # frontend writes theirs -> proxy writes mine
                relay = _Relay(index, kind, theirs, os.dup(mine))
            else:  # back end writes mine -> proxy writes theirs
                relay = _Relay(index, kind, os.dup(mine), theirs)
            os.set_blocking(relay.source, False)
            session.relays[relay.source] = relay
            poller.register(relay.source, select.POLLIN)
            return {theirs}
        return set()

    def _relay(self, session: _Session, fd: int) -> None:
        relay = session.relays.get(fd)
        if relay is None or session.watcher is None:
            return
        try:
            count = os.eventfd_read(fd)
        except (BlockingIOError, InterruptedError):
            return
        try:
            os.eventfd_write(relay.sink, count)
        except OSError:
            pass
        if relay.kind == "kick":
            session.watcher.count_kick(relay.ring)
        else:
            session.watcher.count_call(relay.ring)

    def _sample(self, session: _Session, only: object = None) -> None:
        """Emit a sample of every ring (of ring ``only`` when given)."""
        if session.watcher is None:
            return
        for sample in session.watcher.sample(session.decoder.state, session.decoder.elapsed()):
            if only is None or sample.index == only:
                self.emit(sample)
