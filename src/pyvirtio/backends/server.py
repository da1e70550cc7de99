"""A vhost-user back end (server mode) for any device model.

Theory of operation
-------------------
:class:`VhostUserServer` listens on a Unix socket and serves one frontend at
a time; after a disconnect it accepts the next. Each connection gets a fresh
:class:`VhostUserBackend`, the device-agnostic protocol and ring engine: it
decodes requests with the sans-I/O codec (:mod:`pyvirtio.protocol.vhost_user`),
keeps the negotiated state (features, memory table, rings), and runs the data
path by handing each available chain to the *device model*, an object with
``features()``, ``config()``, ``num_queues`` and ``handle(queue, chain) -> int``
(bytes written into the chain) and optionally ``info()``, ``set_config(offset,
data)``, ``reset()``, ``negotiated(features)`` (called at SET_FEATURES) and
``vhost_queue_num`` (the GET_QUEUE_NUM answer, default ``num_queues``; net
models answer queue pairs). :class:`~pyvirtio.backends.blk.BlockBackend` is one.
A model that sends device-initiated buffers (virtio-scsi events) also has
``gated_queues`` (chains of those rings are taken only while
``pending(queue)`` says so; the rest stay posted) and ``wake_fd`` (an
eventfd it writes when ``pending`` may have grown; the server then runs
those rings).
When a connection ends everything it brought is released: rings, received
fds, mappings. The model (the disk) survives.

Threading model: one thread per connection does everything, with ``poll``
over the socket, every started ring's kick eventfd and a stop eventfd.
Control messages and ring work are therefore serialised: a message never
races a ring walk, a ring is never stopped or remapped under a running
batch, and no lock is needed. A thread-per-queue prototype measured the
same (raw stick, 1 queue: 41 vs 42 kIOPS median; ``pyvirtio bench``, 2
queues from 2 threads: 141 vs 146 kIOPS median of 5, interleaved; the GIL
serialises the queues either way), so the simpler design was kept. A
handler that blocks (``fsync`` of a file) delays the other queues and
control replies meanwhile.

Data path, per kicked ring (virtio 1.2 §2.7.7, §2.7.10): suppress kicks, pop
at most ``size`` chains, ``model.handle`` each, ``add_used`` each, one
``flush_used`` per batch and at most one call-eventfd write if it says so.
While work keeps arriving the ring stays "busy" (kicks suppressed, the loop
polls with timeout 0, other rings and the socket get their turn between
batches). When a ring runs dry it is polled for up to ``poll_us``
microseconds (kicks still suppressed), then notifications are re-enabled and
the ring re-checked before sleeping, so no kick is lost. Polling pays on
this class of machine, where waking a sleeping process costs hundreds of
microseconds: with the raw stick at QD 32, 50 µs gave 175/187 kIOPS
(randread/randwrite, median of 3) against 109/112 without polling; 200 µs
did worse (105/170) when the two vCPUs were contended.

Distrust (ARCHITECTURE.md): every request is checked twice, for syntax by
the codec and for meaning here. The answers:

* malformed message (bad header, wrong payload size, wrong fd count, a reply
  flag on a request), or a request not allowed now (out of order, a ring
  index >= ``num_queues``, a ring size not a power of two or > 32768, ring
  addresses outside the memory table or misaligned, features not offered,
  a memory region that is not a regular file large enough for it): a
  protocol violation. It is logged (logger ``pyvirtio.backends``) and the
  connection is dropped. The frontend sees the socket close.
* an unknown or unsupported request: a failure ack (u64 1) when it has
  NEED_REPLY, otherwise a violation (the frontend would wait for an answer
  that cannot come).
* a well-formed request the device declines (SET_CONFIG on a model without
  ``set_config``): a failure ack with NEED_REPLY, else a log line.
* GET_CONFIG beyond the model's config: an empty payload (vhost-user.rst).
* a bad descriptor chain (loop, index or address out of range, nested or
  misplaced indirect, a chain longer than the ring, avail index jumping by
  more than the ring size): a violation. The ring's err eventfd is signalled
  if one was given, the chains completed before it in the batch are
  published, and the connection is dropped (libvhost-user's choice too; a
  device cannot trust a ring the driver corrupted).
* a request the *model* rejects (bad virtio-blk header, unknown type,
  sectors out of range): the model's business; the blk model completes it
  with an error status and the device carries on.
* any other exception: logged with its traceback, connection dropped. The
  server never dies because of a frontend.

Memory: each region is mapped with :class:`~pyvirtio.memory.Region` after
checking that its fd is a regular file (memfd, hugetlbfs, tmpfs) at least
``mmap_offset + memory_size`` long, and sealed against shrinking when the
memfd allows sealing. A frontend that truncates an *unsealed* file after
handing it over can still make an access fault (SIGBUS); pure Python cannot
catch that, so it is a documented limit, as for every mmap-based back end.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from pyvirtio.backends.control import (
    MAX_MEM_SLOTS,
    OFFERED_PROTOCOL_FEATURES,
    Action,
    ControlPlane,
    Send,
    StartRing,
)
from pyvirtio.backends.inflight import QueueInflight
from pyvirtio.backends.model import DeviceModel, ModelHooks
from pyvirtio.backends.ringstate import RingState, close_fd
from pyvirtio.errors import DriverProtocolError, ProtocolViolation, PyvirtioError, TransportError
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.device_side import ChainError, DeviceQueue

log = logging.getLogger("pyvirtio.backends")

__all__ = [
    "DEFAULT_POLL_US",
    "MAX_MEM_SLOTS",
    "OFFERED_PROTOCOL_FEATURES",
    "DeviceModel",
    "ProtocolViolation",
    "VhostUserBackend",
    "VhostUserClient",
    "VhostUserServer",
]

#: How long a drained ring is polled before sleeping on its kick fd.
DEFAULT_POLL_US = 50
#: A reply that cannot be sent within this many seconds drops the connection.
SEND_TIMEOUT = 5.0

_RECV_CHUNK = 8192
_CMSG_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)
_POLLIN = select.POLLIN


class VhostUserBackend:
    """The vhost-user protocol and ring engine for one frontend connection.

    Device agnostic: the ``model`` does the device's work on each chain. Use
    :meth:`run` on a connected socket; it returns (with everything released)
    when the frontend disconnects, breaks the rules, or ``stop_fd`` becomes
    readable. One object per connection.
    """

    def __init__(
        self, model: DeviceModel | ModelHooks, *, poll_us: float = DEFAULT_POLL_US, inflight: bool = False
    ) -> None:
        hooks = model if isinstance(model, ModelHooks) else ModelHooks.of(model)
        self.hooks = hooks
        self.model = hooks.model
        self.control = ControlPlane(hooks, inflight=inflight)
        self.poll_s = max(0.0, poll_us) / 1e6
        self._reader = vu.MessageReader(DriverProtocolError)
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        self._by_kick: dict[int, RingState] = {}
        self._busy: dict[RingState, None] = {}  # insertion-ordered set
        self._polled: list[RingState] = []  # rings started with a NOFD kick
        # Device-initiated buffers (see the module docstring): optional model hooks.
        self._gated = hooks.gated
        self._wake_fd = hooks.wake_fd
        self._pending: Callable[[int], int] = hooks.pending or _nothing_pending
        #: Counters for tests and ``info()``.
        self.chains = 0
        self.calls = 0

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
        by_kick = self._by_kick
        busy = self._busy
        try:
            while True:
                if busy:
                    timeout = 0
                elif self._polled:
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
                        for gated in self.control.rings:
                            if gated.index in self._gated and gated not in busy:
                                self._wake(gated)
                    else:
                        ring = by_kick.get(fd)
                        if ring is not None:
                            _drain(fd)
                            if ring not in busy:
                                self._wake(ring)
                if busy or self._polled:
                    self._run_rings()
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
        self._busy.clear()
        self._polled.clear()
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
                ring = action.ring
                if action.kick >= 0:
                    self._by_kick[action.kick] = ring
                    self._poller.register(action.kick, _POLLIN)
                else:
                    self._polled.append(ring)
                self._wake(ring)  # work may have been queued before the kick fd
            else:
                ring = action.ring
                self._busy.pop(ring, None)
                if ring in self._polled:
                    self._polled.remove(ring)
                if self._by_kick.get(action.kick) is ring:
                    del self._by_kick[action.kick]
                    try:
                        self._poller.unregister(action.kick)
                    except (KeyError, ValueError):
                        pass

    # -- data path ----------------------------------------------------------------

    def _wake(self, ring: RingState) -> None:
        """The ring has (or may have) work: suppress kicks and mark it busy."""
        queue = ring.queue
        if queue is not None:
            queue.disable_notifications()
            self._busy[ring] = None

    def _run_rings(self) -> None:
        busy = self._busy
        for ring in self._polled:
            queue = ring.queue
            if queue is not None and self._has_work(ring, queue):
                busy[ring] = None
        drained: list[RingState] = []
        for ring in list(busy):
            if not self._batch(ring):
                drained.append(ring)
        if not drained or len(drained) < len(busy):
            return  # other rings still busy: the drained ones are polled next round
        # Poll the drained rings briefly, kicks still off, before sleeping.
        if self.poll_s:
            deadline = time.perf_counter() + self.poll_s
            while True:
                for ring in drained:
                    queue = ring.queue
                    if queue is not None and self._has_work(ring, queue):
                        return  # still busy: next loop round runs it
                if time.perf_counter() >= deadline:
                    break
        for ring in drained:
            queue = ring.queue
            if queue is None:
                continue
            if ring.kick_polled:
                del busy[ring]
                continue
            # Re-arm, then re-check: work published meanwhile is not lost.
            if not queue.enable_notifications() or not self._has_work(ring, queue):
                del busy[ring]
            else:
                queue.disable_notifications()

    def _batch(self, ring: RingState) -> bool:
        """Run one batch (at most a ring's worth) of chains; True if more is pending."""
        if ring.inflight is not None:
            return self._batch_tracked(ring, ring.inflight)
        queue = ring.queue
        assert queue is not None
        handle = self.hooks.handle
        index = ring.index
        pop = queue.pop
        add_used = queue.add_used
        n = 0
        limit = queue.size
        if index in self._gated:
            limit = min(limit, self._pending(index))
        try:
            while n < limit:
                chain = pop()
                if chain is None:
                    break
                add_used(chain.head, handle(index, chain))
                n += 1
        except ChainError as exc:
            self._publish(ring, n)
            if ring.err >= 0:
                try:
                    os.eventfd_write(ring.err, 1)
                except OSError:
                    pass
            raise ProtocolViolation(str(exc)) from None
        self._publish(ring, n)
        return self._has_work(ring, queue)

    def _batch_tracked(self, ring: RingState, tracker: QueueInflight) -> bool:
        """:meth:`_batch` with inflight tracking: resubmissions first, every head marked from pop to used."""
        queue = ring.queue
        assert queue is not None
        handle = self.hooks.handle
        index = ring.index
        heads: list[int] = []
        limit = queue.size
        if index in self._gated:
            limit = min(limit, self._pending(index))
        try:
            if ring.resubmit:
                pending, ring.resubmit = ring.resubmit, []
                for head in pending:  # still marked in flight, with their old counters
                    queue.add_used(head, handle(index, queue._walk(head)))
                    heads.append(head)
            while len(heads) < limit:
                chain = queue.pop()
                if chain is None:
                    break
                tracker.begin(chain.head)
                queue.add_used(chain.head, handle(index, chain))
                heads.append(chain.head)
        except ChainError as exc:
            self._publish(ring, len(heads))
            tracker.end(heads, queue.used_idx)
            if ring.err >= 0:
                try:
                    os.eventfd_write(ring.err, 1)
                except OSError:
                    pass
            raise ProtocolViolation(str(exc)) from None
        self._publish(ring, len(heads))
        tracker.end(heads, queue.used_idx)  # after the used index is published (crash-safe order)
        return self._has_work(ring, queue)

    def _has_work(self, ring: RingState, queue: DeviceQueue) -> bool:
        """Chains are pending that the model takes now (a gated ring: only while it wants them)."""
        if not queue.avail_pending():
            return False
        return ring.index not in self._gated or self._pending(ring.index) > 0

    def _publish(self, ring: RingState, n: int) -> None:
        queue = ring.queue
        if not n or queue is None:
            return
        self.chains += n
        if queue.flush_used() and ring.call >= 0:
            try:
                os.eventfd_write(ring.call, 1)
            except BlockingIOError:
                pass  # counter saturated: the frontend will see it anyway
            self.calls += 1


def _nothing_pending(_queue: int) -> int:
    return 0


def _drain(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
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
        try:
            sock.bind(self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(1)
        except BaseException:
            sock.close()
            self._unlink()
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
        log.info("frontend %d gone: %s", number, why)
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
        out: dict[str, Any] = {"socket": self.path, "connections": self.connections}
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
