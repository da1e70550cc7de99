"""vhost-user transport: a frontend driving a back end over a Unix socket.

Theory of operation. The back end (qemu-storage-daemon, SPDK or DPDK vhost,
our own ``pyvirtio serve``) runs in another process. Everything the device
needs travels over the socket as vhost-user messages built by the sans-I/O
codec in :mod:`pyvirtio.protocol.vhost_user`: features, the memory table
(our memfd regions, passed as fds; a descriptor address is our own virtual
address, as SPDK's virtio-user does), and per queue the ring addresses and
two eventfds: *kick* (driver → device) and *call* (device → driver).

vhost-user has no status register unless PROTOCOL_F_STATUS is negotiated,
so the status byte is emulated here (like SPDK's): status 0 stops the rings
(GET_VRING_BASE) and, when offered, sends RESET_DEVICE; with STATUS the
byte is also sent to and read back from the back end.

Message order (vhost-user.rst; checked against qemu-storage-daemon):
connect → GET_FEATURES → [GET/SET_PROTOCOL_FEATURES] → SET_OWNER →
[GET_QUEUE_NUM]; config reads use GET_CONFIG asking for exactly the bytes
needed (SPDK's fixed 256 is refused by QEMU); SET_FEATURES (bit 30 kept when
offered) at FEATURES_OK; when the device starts, [GET_INFLIGHT_FD,
SET_INFLIGHT_FD] and SET_MEM_TABLE; per queue SET_VRING_NUM, SET_VRING_BASE,
SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE(1). With
REPLY_ACK every setup message asks for an ack, so a refusal is reported
where it happens.

Client or server. By default the frontend connects to the back end's
socket (client mode). With ``server=True`` it listens on ``path`` and a back
end connects to it (DPDK's vhost PMD with ``client=1``, ``pyvirtio serve
... --client``); the socket file is created (a stale one replaced) and
removed on :meth:`close`.

Failures: a reply that does not come within ``timeout`` raises
:class:`~pyvirtio.errors.TransportTimeout`; a peer that closes the socket
(or a send that fails) raises :class:`~pyvirtio.errors.ConnectionLost`,
from then on for every call, including :meth:`check_alive` and
:meth:`wait_queue`, which the data path uses so that no request waits
forever on a dead peer.

Reconnect. With a ``reconnect`` policy (:class:`ReconnectPolicy`) a lost
back end is waited for instead: :meth:`reconnect` connects again (client
mode) or accepts the back end's new connection (server mode), retrying with
exponential backoff until the policy's limit, and negotiates again: the new
back end must offer every feature the driver negotiated and enough queues
(else :class:`ReconnectFailed` says which are missing); the features,
status, inflight area and memory table (the same memfds) are sent again.
Each successful reconnect starts a new *generation*; a queue keeps its ring
memory and its two eventfds, and is restarted on the new connection by
:meth:`restart_queue` with the base its owner computed from the driver's
shadow state (:meth:`~pyvirtio.ring.base.RingQueue.restart_base`).

Packed rings (VIRTIO_F_RING_PACKED): SET_VRING_ADDR carries the descriptor
ring and the driver / device event suppression structures in its
descriptor / available / used fields; SET_VRING_BASE carries 32 bits
(vhost-user.rst, "Vring descriptor indices for packed virtqueues": bits 0-14
the next avail position, 15 the avail wrap counter, 16-30 the next used
position, 31 the used wrap counter), and GET_VRING_BASE answers the same. Until
then the queue is *stale*: :meth:`wait_queue` and :meth:`check_queue` raise
ConnectionLost for it, which sends its owner into
:meth:`~pyvirtio.device.VirtioDevice.recover`. The driver layers decide
what happens to requests in flight (held and resubmitted once).

Inflight tracking (vhost-user.rst, "Inflight I/O tracking"). When the back
end offers PROTOCOL_F_INFLIGHT_SHMFD the frontend asks it for a shared area
(GET_INFLIGHT_FD) when the device starts, keeps the fd (it never maps it)
and hands it back with SET_INFLIGHT_FD to every later connection. A new
back end that takes it finds what its predecessor had in flight and
resubmits that itself (:attr:`device_resubmits`); the frontend then leaves
the avail ring alone and only sends the used index as the ring base. With
:attr:`hand_over_inflight` False (packed rings kept in lap 0, whose lap
changes at a restart: :mod:`pyvirtio.ring.packed`) each new back end gets a
fresh area instead and the frontend resubmits.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import (
    ConnectionLost,
    DeviceError,
    DeviceProtocolError,
    InvalidArgument,
    QueueStateError,
    ReconnectFailed,
    TransportError,
    TransportTimeout,
)
from pyvirtio.memory import MemoryPool, Region
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import (
    DEVICE_ID_BLOCK,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
from pyvirtio.spec.features import device_feature_names
from pyvirtio.transport.base import QueueSetup, ReconnectingTransport, ReconnectPolicy

#: Protocol features the frontend uses when the back end offers them.
WANTED_PROTOCOL_FEATURES = (
    (1 << vu.PROTOCOL_F_MQ)
    | (1 << vu.PROTOCOL_F_REPLY_ACK)
    | (1 << vu.PROTOCOL_F_CONFIG)
    | (1 << vu.PROTOCOL_F_STATUS)
    | (1 << vu.PROTOCOL_F_RESET_DEVICE)
    | (1 << vu.PROTOCOL_F_INFLIGHT_SHMFD)
)

_RECV_CHUNK = 4096
_CMSG_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)


class _Queue:
    __slots__ = ("setup", "kick", "call", "running", "generation")

    def __init__(self, setup: QueueSetup, kick: int, call: int, generation: int) -> None:
        self.setup = setup
        self.kick = kick
        self.call = call
        self.running = True
        self.generation = generation


class VhostUserTransport:
    """A vhost-user frontend connection (see the module docstring).

    ``device_type`` is the virtio device ID of the back end (vhost-user does
    not say it; blk by default). ``queue_size`` is the ring size offered to
    the driver for every queue (vhost-user has no per-queue maximum).
    ``server``: listen on ``path`` and wait up to ``connect_timeout`` for a
    back end to connect. ``reconnect``: a :class:`ReconnectPolicy` (or True
    for the defaults, or a timeout in seconds); None: a lost back end is
    final.
    """

    kind = "user"

    def __init__(
        self,
        path: str,
        *,
        device_type: int = DEVICE_ID_BLOCK,
        queue_size: int = 256,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        server: bool = False,
        reconnect: ReconnectPolicy | bool | float | None = None,
    ) -> None:
        self.path = path
        self._device_type = device_type
        self.queue_size = queue_size
        self.timeout = timeout
        self.server = server
        self.reconnect_policy: ReconnectPolicy | None = ReconnectPolicy.from_arg(reconnect)
        self._wanted = protocol_features
        self._codec = vu.FrontendCodec()
        self._reader = vu.MessageReader(DeviceProtocolError)
        self._lock = threading.RLock()
        self._queues: dict[int, _Queue] = {}
        self._lost: str | None = None
        self._closed = False
        self._status = 0
        self._features_sent = False
        self.driver_features = 0
        self._regions: list[Region] = []  # the memory table last sent, for reconnects
        self._inflight: tuple[vu.InflightInfo, int] | None = None
        self._planned_queues = 0  # how many queues the driver will start (plan_queues), 0: unknown
        #: The back end of this connection took the previous one's inflight area and resubmits itself.
        self.device_resubmits: bool = False
        #: False: every new back end gets a fresh inflight area, the frontend resubmits (see ReconnectingTransport).
        self.hand_over_inflight: bool = True
        #: Successful reconnects so far; queues set up on an older one are stale.
        self.generation: int = 0
        self.reconnects = 0
        self._listener: socket.socket | None = None
        self._listener_inode: tuple[int, int] | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.close()  # a placeholder until connected: fileno() is -1
        try:
            if server:
                self._listener = self._listen(path)
                self._sock = self._accept(connect_timeout)
            else:
                self._sock = self._connect(path, connect_timeout)
            self._handshake(protocol_features)
        except BaseException:
            self.close()
            raise

    # -- connection -----------------------------------------------------------

    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return VhostUserTransport._connect_once(path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionLost(f"cannot connect to vhost-user socket {path}: {exc.strerror}") from None
                time.sleep(0.05)

    @staticmethod
    def _connect_once(path: str) -> socket.socket:
        """One connect; FileNotFoundError / ConnectionRefusedError mean "not there (yet)"."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ConnectionLost(f"cannot connect to vhost-user socket {path}: {exc.strerror or exc}") from None

    def _listen(self, path: str) -> socket.socket:
        """Server mode: create the listening socket (a stale socket file is replaced)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise TransportError(f"{path} exists and is not a socket; not replacing it")
            try:
                self._connect_once(path).close()
            except (FileNotFoundError, ConnectionRefusedError):
                try:
                    os.unlink(path)  # stale: nobody listens
                except FileNotFoundError:
                    pass
            else:
                raise TransportError(f"another process is listening on {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            st = os.stat(path)
            self._listener_inode = (st.st_dev, st.st_ino)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        return sock

    def _accept(self, timeout: float) -> socket.socket:
        """Server mode: wait up to ``timeout`` for a back end to connect."""
        listener = self._listener
        assert listener is not None
        ready, _, _ = select.select([listener], [], [], max(0.0, timeout))
        if not ready:
            raise ConnectionLost(f"no vhost-user back end connected to {self.path} within {timeout:.1f} s")
        try:
            sock, _addr = listener.accept()
        except OSError as exc:
            raise ConnectionLost(f"accepting a back end on {self.path} failed: {exc.strerror or exc}") from None
        sock.setblocking(True)
        return sock

    def _handshake(self, wanted: int) -> None:
        self.offered_features: int = self._call(self._codec.get_features())
        self.protocol_features = 0
        self.offered_protocol_features = 0
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.offered_protocol_features = self._call(self._codec.get_protocol_features())
            self.protocol_features = self.offered_protocol_features & wanted
            self._call(self._codec.set_protocol_features(self.protocol_features))
        self._call(self._codec.set_owner(need_reply=self._ack))
        self.num_queues = 1
        if self._has(vu.PROTOCOL_F_MQ):
            n = self._call(self._codec.get_queue_num())
            if not 1 <= n <= 0xFFFF:
                raise DeviceProtocolError(f"back end reports {n} queues")
            self.num_queues = n

    def _has(self, pbit: int) -> bool:
        return bool(self.protocol_features >> pbit & 1)

    @property
    def _ack(self) -> bool:
        return self._has(vu.PROTOCOL_F_REPLY_ACK)

    def _lose(self, why: str) -> ConnectionLost:
        if self._lost is None:
            self._lost = why
        return ConnectionLost(f"vhost-user back end at {self.path}: {self._lost}")

    def _call(self, out: vu.Outgoing) -> Any:
        """Send one message; wait for and return its reply if it has one."""
        with self._lock:
            msg = self._exchange(out)
            if msg is None:
                return None
            try:
                value = self._codec.parse_reply(out, msg)
            finally:
                for fd in msg.fds:  # only GET_INFLIGHT_FD's reply carries one: see _get_inflight
                    os.close(fd)
            if out.request not in _REPLY_CARRIERS:
                # A REPLY_ACK: non-zero means the back end refused the request.
                assert isinstance(value, int)
                if value:
                    raise DeviceError(f"vhost-user back end refused {out.name} (ack {value})")
                return None
            return value

    def _exchange(self, out: vu.Outgoing) -> vu.Message | None:
        """Send ``out``; return the reply message (fds included) if one is expected."""
        if self._lost is not None:
            raise self._lose(self._lost)
        try:
            if out.fds:
                self._sock.sendmsg([out.data], vu.scm_rights(out.fds))
            else:
                self._sock.sendall(out.data)
        except OSError as exc:
            raise self._lose(f"send of {out.name} failed: {exc.strerror or exc}") from None
        if not out.expects_reply:
            return None
        return self._receive(out.name)

    def _receive(self, what: str) -> vu.Message:
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._reader.next_message()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(f"vhost-user back end at {self.path} did not answer {what} in {self.timeout} s")
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                continue
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(_RECV_CHUNK, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
            except OSError as exc:
                raise self._lose(f"receive failed while waiting for {what}: {exc.strerror or exc}") from None
            fds = vu.fds_from_ancillary(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise self._lose(f"connection closed while waiting for {what}")
            self._reader.feed(data, fds)

    def check_alive(self) -> None:
        """Raise ConnectionLost if the peer has closed the socket (non-blocking peek)."""
        if self._lost is not None:
            raise self._lose(self._lost)
        sock = self._sock  # a reconnect in another thread may replace it meanwhile
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            if sock is not self._sock:
                raise ConnectionLost(f"the connection to {self.path} was replaced") from None
            raise self._lose(f"socket error: {exc.strerror or exc}") from None
        if not data:
            if sock is not self._sock:
                raise ConnectionLost(f"the connection to {self.path} was replaced")
            raise self._lose("connection closed by the back end")

    def check_queue(self, index: int) -> None:
        """check_alive, and raise ConnectionLost if queue ``index`` is stale (not restarted since a reconnect)."""
        self.check_alive()
        q = self._queues.get(index)
        if q is not None and q.generation != self.generation:
            raise ConnectionLost(f"queue {index} is not running on the current connection to {self.path}")

    @property
    def connected(self) -> bool:
        return self._lost is None

    # -- reconnect ------------------------------------------------------------

    def reconnect(self, deadline: float | None = None) -> bool:
        """Make sure a working connection is up; True if this call had to make a new one.

        Returns False at once when the connection is up (it never went away,
        or another thread already reconnected: compare :attr:`generation`).
        Raises :class:`ReconnectFailed` when reconnecting is off, the
        policy's limit (or ``deadline``, a ``time.monotonic()`` value) is
        reached, or the new back end cannot resume the device.
        """
        with self._lock:
            if self._closed:
                raise ReconnectFailed(f"vhost-user transport for {self.path} is closed")
            if self._lost is None and self._alive_now():
                return False
            policy = self.reconnect_policy
            why = self._lost or "connection lost"
            if policy is None:
                raise ReconnectFailed(f"vhost-user back end at {self.path}: {why} (reconnect is off)")
            start = time.monotonic()
            if deadline is None:
                deadline = start + policy.timeout
            delay = policy.delay
            attempts = 0
            last = why
            while True:
                self._drop_connection()
                try:
                    if self.server:
                        self._sock = self._accept(deadline - time.monotonic())
                    else:
                        self._sock = self._connect_once(self.path)
                    self._lost = None
                    self._resume_connection()
                    break
                except ReconnectFailed as exc:
                    self._lost = str(exc)
                    self._drop_connection()
                    raise
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    last = f"cannot connect: {exc.strerror}"
                except (TransportError, DeviceError) as exc:
                    last = str(exc)
                except OSError as exc:
                    last = f"{exc.strerror or exc}"
                attempts += 1
                now = time.monotonic()
                if (policy.attempts is not None and attempts >= policy.attempts) or now >= deadline:
                    self._lost = self._lost or last
                    raise ReconnectFailed(
                        f"vhost-user back end at {self.path} lost ({why}) and not back after "
                        f"{now - start:.1f} s and {attempts} attempt(s); last: {last}"
                    )
                time.sleep(max(0.0, min(delay, deadline - now)))
                delay = min(delay * 2, policy.max_delay)
            self.generation += 1
            self.reconnects += 1
            return True

    def _alive_now(self) -> bool:
        try:
            self.check_alive()
        except ConnectionLost:
            return False
        return True

    def _drop_connection(self) -> None:
        """Close the socket of a lost connection (the queues' eventfds stay)."""
        if self._sock.fileno() >= 0:
            self._sock.close()
        self._reader.close_pending_fds()
        self._reader = vu.MessageReader(DeviceProtocolError)
        if self._lost is None:
            self._lost = "connection dropped"

    def _resume_connection(self) -> None:
        """Negotiate with a new back end as the old one was: features, status, inflight area, memory."""
        needed_queues = max(self._queues, default=-1) + 1
        self._handshake(self._wanted)
        missing = self.driver_features & ~self.offered_features
        if missing:
            raise ReconnectFailed(
                f"the vhost-user back end at {self.path} came back without features the driver negotiated: "
                f"{', '.join(device_feature_names(self._device_type, missing))} (0x{missing:x}); "
                "cannot resume"
            )
        if self.num_queues < needed_queues:
            raise ReconnectFailed(
                f"the vhost-user back end at {self.path} came back with {self.num_queues} queue(s); "
                f"{needed_queues} are in use; cannot resume"
            )
        if self._features_sent:
            self._send_features()
        if self._status and self._has(vu.PROTOCOL_F_STATUS):
            self._call(self._codec.set_status(self._status & ~STATUS_DRIVER_OK, need_reply=self._ack))
        self.device_resubmits = False
        if self._regions:
            old = self._inflight
            if old is not None and self._has(vu.PROTOCOL_F_INFLIGHT_SHMFD) and self.hand_over_inflight:
                info, fd = old
                self._call(self._codec.set_inflight_fd(info, fd, need_reply=self._ack))
                self.device_resubmits = True
            else:
                self._drop_inflight()
                self._setup_inflight()
            self._send_mem_table()
        for q in self._queues.values():
            q.running = False  # nothing runs on the new connection until restart_queue

    def restart_queue(self, index: int, base: int) -> None:
        """Start an existing queue on the current connection at ring ``base`` (same memory and eventfds)."""
        with self._lock:
            q = self._queues.get(index)
            if q is None:
                raise QueueStateError(f"queue {index} is not set up")
            # vhost-user.rst: a split ring's base is a 16-bit avail index; a packed ring's
            # carries both positions and wrap counters in 32 bits.
            limit = 0xFFFF_FFFF if q.setup.format == "packed" else 0xFFFF
            if not 0 <= base <= limit:
                raise InvalidArgument(f"ring base 0x{base:x} does not fit a {q.setup.format} ring's base")
            self._send_ring(q, base)
            q.generation = self.generation
            q.running = True
        # Work was published while nobody watched the ring: make sure the device looks.
        os.eventfd_write(q.kick, 1)

    def resume(self) -> None:
        """After a reconnect: send the full device status (DRIVER_OK) once queues are restarted."""
        with self._lock:
            if self._status and self._has(vu.PROTOCOL_F_STATUS):
                self._call(self._codec.set_status(self._status, need_reply=self._ack))

    # -- Transport protocol ---------------------------------------------------

    def device_type(self) -> int:
        return self._device_type

    def has_config(self) -> bool:
        """PROTOCOL_F_CONFIG negotiated: GET_CONFIG / SET_CONFIG reach the back end's config space."""
        return self._has(vu.PROTOCOL_F_CONFIG)

    def read_config(self, offset: int, length: int) -> bytes:
        if not self._has(vu.PROTOCOL_F_CONFIG):
            raise TransportError(f"vhost-user back end at {self.path} does not offer PROTOCOL_F_CONFIG")
        if not 0 < length <= vu.MAX_CONFIG_SIZE or offset < 0:
            raise InvalidArgument(f"config read {offset}+{length} out of range")
        cfg = self._call(self._codec.get_config(offset, length))
        if len(cfg.data) != length:
            raise DeviceProtocolError(f"GET_CONFIG answered {len(cfg.data)} bytes for {length}")
        return bytes(cfg.data)

    def write_config(self, offset: int, data: bytes) -> None:
        if not self._has(vu.PROTOCOL_F_CONFIG):
            raise TransportError(f"vhost-user back end at {self.path} does not offer PROTOCOL_F_CONFIG")
        self._call(self._codec.set_config(offset, data, need_reply=self._ack))

    def get_status(self) -> int:
        if self._lost is not None:
            raise self._lose(self._lost)
        if self._has(vu.PROTOCOL_F_STATUS):
            status: int = self._call(self._codec.get_status())
            return status
        return self._status

    def set_status(self, status: int) -> None:
        if status == 0:
            self._stop_device()
            self._status = 0
            self._features_sent = False
            self._drop_inflight()  # a reset abandons what was in flight: a new area next start
            return
        if self._lost is not None:
            # The emulated status byte must not look written on a dead connection.
            raise self._lose(self._lost)
        if status & STATUS_FEATURES_OK and not self._features_sent:
            self._send_features()
        if self._has(vu.PROTOCOL_F_STATUS):
            self._call(self._codec.set_status(status, need_reply=self._ack))
        self._status = status

    def _send_features(self) -> None:
        features = self.driver_features
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self._call(self._codec.set_features(features, need_reply=self._ack))
        self._features_sent = True

    def _stop_device(self) -> None:
        if self._lost is not None:
            return
        for index in list(self._queues):
            self._stop_queue(index)
        if self._status and self._has(vu.PROTOCOL_F_RESET_DEVICE):
            self._call(self._codec.reset_device(need_reply=self._ack))
        elif self._status and self._has(vu.PROTOCOL_F_STATUS):
            self._call(self._codec.set_status(0, need_reply=self._ack))

    def get_features(self) -> int:
        return self.offered_features

    def set_features(self, features: int) -> None:
        if features & ~self.offered_features:
            raise InvalidArgument(f"features 0x{features & ~self.offered_features:x} were not offered")
        self.driver_features = features
        self._features_sent = False

    def get_queue_size(self, index: int) -> int:
        return self.queue_size if 0 <= index < self.num_queues else 0

    def max_queues(self) -> int:
        return self.num_queues

    def plan_queues(self, count: int) -> None:
        """The driver will start ``count`` queues (called before :meth:`set_memory`).

        GET/SET_INFLIGHT_FD name the queues in use, as QEMU does: DPDK's vhost
        library allocates that many rings on SET_INFLIGHT_FD and waits for all
        of them to be started before it serves any.
        """
        self._planned_queues = max(0, min(count, self.num_queues))

    def set_memory(self, pool: MemoryPool) -> None:
        regions = list(pool.regions)
        if len(regions) > vu.MAX_FDS:
            raise InvalidArgument(f"{len(regions)} memory regions; vhost-user takes at most {vu.MAX_FDS}")
        with self._lock:
            if self._inflight is None:
                self._setup_inflight()
            self._regions = regions
            self._send_mem_table()

    def _send_mem_table(self) -> None:
        regions = self._regions
        table = [vu.MemRegion(r.guest_addr, r.size, r.user_addr, r.fd_offset) for r in regions]
        self._call(self._codec.set_mem_table(table, [r.fd for r in regions], need_reply=self._ack))

    def _setup_inflight(self) -> None:
        """GET_INFLIGHT_FD then SET_INFLIGHT_FD, when the back end offers INFLIGHT_SHMFD."""
        if not self._has(vu.PROTOCOL_F_INFLIGHT_SHMFD):
            return
        with self._lock:
            out = self._codec.get_inflight_fd(self._planned_queues or self.num_queues, self.queue_size)
            msg = self._exchange(out)
            assert msg is not None
            try:
                info = self._codec.parse_reply(out, msg)
            except BaseException:
                for fd in msg.fds:
                    os.close(fd)
                raise
            assert isinstance(info, vu.InflightInfo)
            fd = msg.fds[0]
            try:
                if os.fstat(fd).st_size < info.mmap_offset + info.mmap_size:
                    raise DeviceProtocolError(
                        f"GET_INFLIGHT_FD: the area ({info.mmap_size} bytes at {info.mmap_offset}) "
                        "exceeds its file"
                    )
                self._call(self._codec.set_inflight_fd(info, fd, need_reply=self._ack))
            except BaseException:
                os.close(fd)
                raise
            self._inflight = (info, fd)

    def _drop_inflight(self) -> None:
        if self._inflight is not None:
            os.close(self._inflight[1])
            self._inflight = None
        self.device_resubmits = False

    @property
    def inflight_info(self) -> vu.InflightInfo | None:
        """The inflight area in use (INFLIGHT_SHMFD), if any."""
        return None if self._inflight is None else self._inflight[0]

    def setup_queue(self, setup: QueueSetup) -> None:
        if setup.index in self._queues:
            raise QueueStateError(f"queue {setup.index} is already set up")
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        q = _Queue(setup, kick, call, self.generation)
        self._queues[setup.index] = q
        self._send_ring(q, setup.base)

    def _send_ring(self, q: _Queue, base: int) -> None:
        ack = self._ack
        c = self._codec
        setup = q.setup
        i = setup.index
        self._call(c.set_vring_num(i, setup.size, need_reply=ack))
        self._call(c.set_vring_base(i, base, need_reply=ack))
        # The message's descriptor / used / available fields carry the Descriptor, Device and
        # Driver Areas for both formats (packed: the device and driver event suppression
        # structures in the used / available fields, as QEMU and DPDK read them).
        addr = vu.VringAddr(i, 0, setup.desc_addr, setup.used_addr, setup.avail_addr, 0)
        self._call(c.set_vring_addr(addr, need_reply=ack))
        self._call(c.set_vring_kick(i, q.kick, need_reply=ack))
        self._call(c.set_vring_call(i, q.call, need_reply=ack))
        if self._has_protocol_features_bit():
            self._call(c.set_vring_enable(i, True, need_reply=ack))

    def _has_protocol_features_bit(self) -> bool:
        return bool(self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def _stop_queue(self, index: int) -> int | None:
        """GET_VRING_BASE: the back end stops the ring and says where it stopped."""
        q = self._queues.get(index)
        if q is None or not q.running or self._lost is not None or q.generation != self.generation:
            return None
        q.running = False
        state = self._call(self._codec.get_vring_base(index))
        last_avail: int = state.num
        return last_avail

    def del_queue(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None:
            return
        try:
            self._stop_queue(index)
        finally:
            del self._queues[index]
            os.close(q.kick)
            os.close(q.call)

    def notify_queue(self, index: int) -> None:
        try:
            os.eventfd_write(self._queues[index].kick, 1)
        except KeyError:
            raise QueueStateError(f"queue {index} is not set up") from None

    def notifier(self, index: int) -> Callable[[], None]:
        q = self._queues.get(index)
        if q is None:
            raise QueueStateError(f"queue {index} is not set up")
        return functools.partial(os.eventfd_write, q.kick, 1)

    def wait_queue(self, index: int, timeout: float | None) -> bool:
        q = self._queues.get(index)
        if q is None:
            raise QueueStateError(f"queue {index} is not set up")
        if self._lost is not None:
            raise self._lose(self._lost)
        if q.generation != self.generation:
            raise ConnectionLost(f"queue {index} is not running on the current connection to {self.path}")
        sock_fd = self._sock.fileno()
        try:
            ready, _, _ = select.select([q.call, sock_fd], [], [], timeout)
        except (OSError, ValueError):
            # The socket was replaced under us by a reconnect in another thread.
            raise ConnectionLost(f"the connection to {self.path} changed while waiting on queue {index}") from None
        if sock_fd in ready:
            self.check_alive()
        if q.call in ready:
            try:
                os.eventfd_read(q.call)
            except BlockingIOError:
                return False
            return True
        return False

    def queue_fd(self, index: int) -> int | None:
        q = self._queues.get(index)
        return None if q is None else q.call

    def ack_queue(self, index: int) -> None:
        """Consume queue ``index``'s call eventfd (its counter back to 0: not readable until the next signal)."""
        q = self._queues.get(index)
        if q is None:
            return
        try:
            os.eventfd_read(q.call)
        except BlockingIOError:
            pass

    def enable_queue(self, index: int, enabled: bool) -> bool:
        """SET_VRING_ENABLE for a set-up queue; False (nothing sent) when rings cannot be disabled.

        Without VHOST_USER_F_PROTOCOL_FEATURES every ring runs from its start
        (vhost-user.rst, "Ring states"): there is no message to send.
        """
        if not self._has_protocol_features_bit():
            return False
        if index not in self._queues:
            raise QueueStateError(f"queue {index} is not set up")
        self._call(self._codec.set_vring_enable(index, enabled, need_reply=self._ack))
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for q in self._queues.values():
                os.close(q.kick)
                os.close(q.call)
            self._queues.clear()
            self._reader.close_pending_fds()
            if self._sock.fileno() >= 0:
                self._sock.close()
            self._drop_inflight()
            self._regions = []
            if self._listener is not None:
                self._listener.close()
                self._listener = None
                try:
                    st = os.stat(self.path)
                    if (st.st_dev, st.st_ino) == self._listener_inode:
                        os.unlink(self.path)
                except FileNotFoundError:
                    pass
            if self._lost is None:
                self._lost = "transport closed"

    def info(self) -> dict[str, Any]:
        policy = self.reconnect_policy
        return {
            "type": self.kind,
            "socket": self.path,
            "mode": "server" if self.server else "client",
            "protocol_features": vu.protocol_feature_names(self.protocol_features),
            "offered_protocol_features": vu.protocol_feature_names(self.offered_protocol_features),
            "backend_queues": self.num_queues,
            "inflight_fd": self._inflight is not None,
            "reconnect": None if policy is None else {"timeout": policy.timeout, "attempts": policy.attempts},
            "reconnects": self.reconnects,
        }


_REPLY_CARRIERS = frozenset(
    {
        vu.GET_FEATURES,
        vu.GET_PROTOCOL_FEATURES,
        vu.GET_QUEUE_NUM,
        vu.GET_VRING_BASE,
        vu.GET_CONFIG,
        vu.GET_MAX_MEM_SLOTS,
        vu.GET_STATUS,
        vu.GET_INFLIGHT_FD,
        vu.SET_LOG_BASE,
        vu.CHECK_DEVICE_STATE,
    }
)




if TYPE_CHECKING:

    def _declares_reconnecting(t: VhostUserTransport) -> ReconnectingTransport:
        return t  # mypy checks that VhostUserTransport is a ReconnectingTransport


__all__ = ["ReconnectFailed", "ReconnectPolicy", "VhostUserTransport", "WANTED_PROTOCOL_FEATURES"]
