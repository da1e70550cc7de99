"""The I/O side of the embedded vhost-user back ends: the connection loop and the listeners.

Theory of operation
-------------------
:class:`VhostUserServer` listens on a Unix socket and serves one frontend at
a time; after a disconnect it accepts the next. :class:`VhostUserClient` is
its mirror for a frontend that listens (DPDK's vhost ``client=1``): it
connects, serves, and connects again. Each connection gets a fresh
:class:`VhostUserBackend`, which carries out what its two halves decide:

* the control plane (:class:`~pyvirtio.backends.control.ControlPlane`, sans
  I/O) gets every message the codec (:mod:`pyvirtio.protocol.vhost_user`)
  cuts from the socket and answers with actions; the connection sends the
  replies and starts and stops watching the rings' kick fds;
* the data path (:class:`~pyvirtio.backends.datapath.DataPath`) runs the
  rings that were kicked (or are polled, or that the model wants to fill).

When a connection ends everything it brought is released: rings, received
fds, mappings. The model (the disk) survives, for the next connection.

Threading model: one thread per connection does everything, with ``poll``
over the socket, every started ring's kick eventfd, the model's wake fd and
a stop eventfd. Control messages and ring work are therefore serialised: a
message never races a ring walk, a ring is never stopped or remapped under a
running batch, and no lock is needed. A thread-per-queue prototype measured
the same (raw stick, 1 queue: 41 vs 42 kIOPS median; ``pyvirtio bench``, 2
queues from 2 threads: 141 vs 146 kIOPS median of 5, interleaved; the GIL
serialises the queues either way), so the simpler design was kept. A
handler that blocks (``fsync`` of a file) delays the other queues and
control replies meanwhile.

Whose fault: a malformed message or one not allowed now
(:class:`~pyvirtio.errors.ProtocolViolation`, from the codec or the control
plane), a bad descriptor chain (from the data path), more fds than a message
may carry: the frontend's; it is logged (logger ``pyvirtio.backends``) and
the connection is dropped, the frontend sees the socket close. A reply that
cannot be sent within :data:`SEND_TIMEOUT` seconds drops the connection too.
Any other exception is a bug: logged with its traceback, the connection
dropped, the server goes on. The server never dies because of a frontend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
import traceback
from typing import Any

from pyvirtio.backends.control import Action, ControlPlane, Notify, Send, StartRing
from pyvirtio.backends.datapath import DEFAULT_POLL_US, DataPath
from pyvirtio.backends.model import DeviceModel, ModelHooks
from pyvirtio.backends.ringstate import close_fd
from pyvirtio.errors import DriverProtocolError, ProtocolViolation, PyvirtioError, TransportError
from pyvirtio.protocol import vhost_user as vu

log = logging.getLogger("pyvirtio.backends")

__all__ = ["SEND_TIMEOUT", "VhostUserBackend", "VhostUserClient", "VhostUserServer"]

#: A reply that cannot be sent within this many seconds drops the connection.
SEND_TIMEOUT = 5.0

_RECV_CHUNK = 8192
_CMSG_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)
_POLLIN = select.POLLIN
_SUN_PATH_MAX = 108  # sockaddr_un's sun_path, its NUL included (unix(7))


def _ring_summary(ring_chains: list[int]) -> str:
    """``chains per ring: 0=N 1=N ...``: what each ring carried on a connection (its log line at the end)."""
    return "chains per ring: " + " ".join(f"{i}={n}" for i, n in enumerate(ring_chains))


def _drain(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass


class VhostUserBackend:
    """One frontend connection: the control plane and the data path over a socket.

    Device agnostic: the ``model`` (or its :class:`~pyvirtio.backends.model.ModelHooks`,
    checked once) does the device's work on each chain. Use :meth:`run` on a
    connected socket; it returns (with everything released) when the frontend
    disconnects, breaks the rules, or ``stop_fd`` becomes readable. One object
    per connection.
    """

    def __init__(
        self, model: DeviceModel | ModelHooks, *, poll_us: float = DEFAULT_POLL_US, inflight: bool = False
    ) -> None:
        hooks = model if isinstance(model, ModelHooks) else ModelHooks.of(model)
        self.hooks = hooks
        self.model = hooks.model
        self.control = ControlPlane(hooks, inflight=inflight)
        self.datapath = DataPath(hooks, poll_us=poll_us)
        self._wake_fd = hooks.wake_fd
        self._reader = vu.MessageReader(DriverProtocolError)
        self._sock: socket.socket | None = None
        self._poller = select.poll()

    @property
    def chains(self) -> int:
        """Chains completed on this connection."""
        return self.datapath.chains

    @property
    def calls(self) -> int:
        """Call eventfd writes on this connection."""
        return self.datapath.calls

    # -- connection loop --------------------------------------------------------

    def run(self, sock: socket.socket, stop_fd: int = -1) -> str:
        """Serve ``sock`` until it ends; returns why (and has released everything)."""
        self._sock = sock
        sock.settimeout(SEND_TIMEOUT)  # recv only after poll says readable; bounds sendall
        sock_fd = sock.fileno()
        poller = self._poller
        poller.register(sock_fd, _POLLIN)
        if stop_fd >= 0:
            poller.register(stop_fd, _POLLIN)
        wake_fd = self._wake_fd
        if wake_fd >= 0:
            poller.register(wake_fd, _POLLIN)
        datapath = self.datapath
        by_kick = datapath.by_kick
        busy = datapath.busy
        polled = datapath.polled
        wake = datapath.wake
        run_rings = datapath.run
        try:
            while True:
                if busy:
                    timeout = 0
                elif polled:
                    timeout = 1
                else:
                    timeout = None
                for fd, _ev in poller.poll(timeout):
                    if fd == sock_fd:
                        ended = self._on_socket()
                        if ended is not None:
                            return ended
                    elif fd == stop_fd:
                        return "server stopping"
                    elif fd == wake_fd:
                        _drain(fd)
                        datapath.wake_gated(self.control.rings)
                    else:
                        ring = by_kick.get(fd)
                        if ring is not None:
                            _drain(fd)
                            if ring not in busy:
                                wake(ring)
                if busy or polled:
                    run_rings()
        # Only strings are logged and kept: an exception's traceback holds the
        # ring's frames, whose views would keep the frontend's memory mapped.
        except ProtocolViolation as exc:
            why = f"protocol violation: {exc}"
            log.warning("frontend %s; dropping the connection", why)
        except PyvirtioError as exc:
            why = f"error: {exc}"
            log.warning("dropping the connection: %s", why)
        except OSError as exc:
            why = f"connection error: {exc}"
            log.warning("%s", why)
        except Exception as exc:  # a bug, not the frontend's fault: keep serving others
            why = f"internal error: {exc!r}"
            log.error("unexpected error, dropping the connection:\n%s", traceback.format_exc())
        finally:
            self.close()
        return why

    def close(self) -> None:
        """Stop every ring and release fds, mappings and buffered input."""
        self._apply(self.control.close())
        self.datapath.clear()
        self._reader.close_pending_fds()
        sock = self._sock
        if sock is not None:
            try:
                self._poller.unregister(sock.fileno())
            except (KeyError, ValueError, OSError):
                pass
            self._sock = None

    def info(self) -> dict[str, Any]:
        out = self.control.info()
        out["chains"] = self.chains
        out["ring_chains"] = list(self.datapath.ring_chains)
        out["calls"] = self.calls
        return out

    # -- socket side --------------------------------------------------------------

    def _on_socket(self) -> str | None:
        """Read what the frontend sent and act on every complete message."""
        assert self._sock is not None
        try:
            data, anc, flags, _addr = self._sock.recvmsg(_RECV_CHUNK, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return None
        except ConnectionResetError:
            return "connection reset by the frontend"
        fds = vu.fds_from_ancillary(anc)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                close_fd(fd)
            raise ProtocolViolation(f"more than {vu.MAX_FDS} file descriptors in one message")
        if not data:
            for fd in fds:
                close_fd(fd)
            if self._reader.buffered:
                log.warning(
                    "frontend closed the connection inside a message (%d bytes)", self._reader.buffered
                )
                return f"truncated message ({self._reader.buffered} bytes) at disconnect"
            return "frontend disconnected"
        self._reader.feed(data, fds)
        while True:
            try:
                msg = self._reader.next_message()
            except DriverProtocolError as exc:
                raise ProtocolViolation(str(exc)) from None
            if msg is None:
                return None
            self._apply(self.control.receive(msg))

    def _send(self, out: vu.Outgoing) -> None:
        assert self._sock is not None
        try:
            if out.fds:  # GET_INFLIGHT_FD's reply
                self._sock.sendmsg([out.data], vu.scm_rights(out.fds))
            else:
                self._sock.sendall(out.data)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot send the reply to {out.name}: {exc}") from None

    def _apply(self, actions: list[Action]) -> None:
        """Carry out what the control plane decided, in order."""
        for action in actions:
            if isinstance(action, Send):
                self._send(action.out)
            elif isinstance(action, StartRing):
                if action.kick >= 0:
                    self._poller.register(action.kick, _POLLIN)
                self.datapath.start(action.ring, action.kick)
            elif isinstance(action, Notify):
                log.info("ring %d: used buffers were published while it had no call fd: notified now",
                         action.ring.index)
                try:
                    os.eventfd_write(action.fd, 1)
                except BlockingIOError:
                    pass  # counter saturated: the frontend will see it anyway
                self.datapath.calls += 1
            elif self.datapath.stop(action.ring, action.kick):
                try:
                    self._poller.unregister(action.kick)
                except (KeyError, ValueError):
                    pass


class VhostUserServer:
    """Listen on ``path`` and serve one frontend at a time with ``model``.

    ``listen()`` creates the socket (removing a stale one; a socket another
    server still answers on is an error); ``serve()`` accepts and serves
    frontends until :meth:`stop` (thread-safe, also from a signal handler),
    then removes the socket. ``start()`` runs ``serve()`` in a daemon thread.
    The model's state (the disk) persists across connections; everything
    else starts afresh for each. ``inflight``: offer INFLIGHT_SHMFD, so that
    a restarted back end resubmits what its predecessor left in flight
    (:mod:`pyvirtio.backends.inflight`).
    """

    def __init__(
        self, path: str, model: DeviceModel, *, poll_us: float = DEFAULT_POLL_US, inflight: bool = False
    ) -> None:
        self.path = path
        self.model = model
        self.hooks = ModelHooks.of(model)  # the model's protocols, checked once
        self.poll_us = poll_us
        self.inflight = inflight
        self.connections = 0
        #: Connections that have ended, and why the last 100 of them did (oldest first).
        self.finished = 0
        self.disconnects: list[str] = []
        self.backend: VhostUserBackend | None = None
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Re-entrant: stop() may run in a signal handler while the main thread holds it.
        self._lock = threading.RLock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    # -- life cycle ---------------------------------------------------------------

    def listen(self) -> None:
        """Create the listening socket (idempotent)."""
        if self._listener is not None:
            return
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bound under a temporary name and renamed into place once listening: a frontend (or a
        # fixture) that waits for the socket file to appear and then connects is never refused in
        # the moment between bind() and listen(). A path too long for the temporary name is bound
        # in place, as before.
        tmp = os.path.join(os.path.dirname(self.path), f".{os.getpid()}.{threading.get_ident() % 10**6}.tmp")
        staged = len(os.fsencode(tmp)) < _SUN_PATH_MAX
        placed = not staged
        try:
            if staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)  # ours: left by a process of this pid that died here
                sock.bind(tmp)
                sock.listen(1)
                os.rename(tmp, self.path)
                placed = True
            else:
                sock.bind(self.path)
                sock.listen(1)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            if placed:
                self._unlink()
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        self._listener = sock
        log.info("listening on %s", self.path)

    def serve(self) -> None:
        """Serve frontends until :meth:`stop`; removes the socket on return."""
        try:
            self.listen()
            assert self._listener is not None
            poller = select.poll()
            poller.register(self._listener.fileno(), _POLLIN)
            poller.register(self._stop_fd, _POLLIN)
            while not self._stopping:
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_fd in ready or self._stopping:
                    break
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                self._serve_one(conn)
        finally:
            self.close()
            self._done.set()

    def _serve_one(self, conn: socket.socket) -> None:
        self.connections += 1
        number = self.connections
        log.info("frontend %d connected", number)
        backend = VhostUserBackend(self.hooks, poll_us=self.poll_us, inflight=self.inflight)
        self.backend = backend
        try:
            why = backend.run(conn, self._stop_fd)
        finally:
            conn.close()
            self.backend = None
        log.info("frontend %d gone: %s; %s", number, why, _ring_summary(backend.datapath.ring_chains))
        with self._lock:
            self.disconnects.append(why)
            del self.disconnects[:-100]
            self.finished += 1

    def start(self) -> threading.Thread:
        """``listen()`` now (the socket exists on return), ``serve()`` in a daemon thread."""
        self.listen()
        thread = threading.Thread(target=self.serve, name=f"vhost-user {self.path}", daemon=True)
        self._thread = thread
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask ``serve()`` to return (thread- and signal-safe; idempotent)."""
        self._stopping = True
        with self._lock:
            if self._stop_fd >= 0:
                os.eventfd_write(self._stop_fd, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ``serve()`` has returned."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Close the listening socket, remove the socket file if it is still ours.

        Called by ``serve()`` when it returns; a server is not reusable after it.
        """
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink()
            log.info("stopped serving %s", self.path)
        with self._lock:
            fd, self._stop_fd = self._stop_fd, -1
            self._stopping = True
            if fd >= 0:
                os.close(fd)

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if self._inode is None or (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    def __enter__(self) -> VhostUserServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(10)
        if self._thread is None or not self._thread.is_alive():
            self.close()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"socket": self.path, "connections": self.connections, "finished": self.finished}
        model_info = self.hooks.info
        if model_info is not None:
            out["device"] = model_info()
        backend = self.backend
        if backend is not None:
            out["connection"] = backend.info()
        return out


class VhostUserClient(VhostUserServer):
    """The back end connects to a frontend that listens (vhost-user client mode), and reconnects.

    The mirror of DPDK's vhost ``client=1``: the frontend (``VirtioBlk.open(...,
    server=True)``, ``pyvirtio bench --server``) owns the socket at ``path``.
    ``serve()`` connects (retrying every ``retry`` seconds until the socket
    answers), serves the connection, and after it ends connects again, until
    :meth:`stop`. Nothing is created on the file system. Same ``start`` /
    ``stop`` / ``wait`` / ``info`` as the server.
    """

    def __init__(
        self,
        path: str,
        model: DeviceModel,
        *,
        poll_us: float = DEFAULT_POLL_US,
        inflight: bool = False,
        retry: float = 0.05,
    ) -> None:
        super().__init__(path, model, poll_us=poll_us, inflight=inflight)
        self.retry = retry

    def listen(self) -> None:
        """Nothing to create: the frontend listens."""

    def serve(self) -> None:
        """Connect, serve, reconnect, until :meth:`stop`."""
        try:
            while not self._stopping:
                conn = self._connect()
                if conn is None:
                    break
                self._serve_one(conn)
        finally:
            self.close()
            self._done.set()

    def _connect(self) -> socket.socket | None:
        """A connection to the frontend, or None once stopping."""
        poller = select.poll()
        with self._lock:
            if self._stop_fd < 0:
                return None
            poller.register(self._stop_fd, _POLLIN)
        logged = False
        while not self._stopping:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
                log.info("connected to the frontend at %s", self.path)
                return sock
            except OSError as exc:
                sock.close()
                if not logged:
                    log.info("waiting for a frontend to listen on %s (%s)", self.path, exc.strerror or exc)
                    logged = True
            if poller.poll(int(self.retry * 1000)):
                break
        return None


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        log.info("removed stale socket %s", path)
        return
    except OSError:
        pass  # e.g. a timeout: somebody owns it, but is busy
    finally:
        probe.close()
    raise TransportError(f"another server is listening on {path}")
