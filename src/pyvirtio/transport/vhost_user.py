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
offered) at FEATURES_OK; SET_MEM_TABLE when the device starts; per queue
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
SET_VRING_CALL, SET_VRING_ENABLE(1). With REPLY_ACK every setup message asks
for an ack, so a refusal is reported where it happens.

Failures: a reply that does not come within ``timeout`` raises
:class:`~pyvirtio.errors.TransportTimeout`; a peer that closes the socket
(or a send that fails) raises :class:`~pyvirtio.errors.ConnectionLost`,
from then on for every call, including :meth:`check_alive` and
:meth:`wait_queue`, which the data path uses so that no request waits
forever on a dead peer.
"""

from __future__ import annotations

import array
import functools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.errors import (
    ConnectionLost,
    DeviceError,
    DeviceProtocolError,
    InvalidArgument,
    QueueStateError,
    TransportError,
    TransportTimeout,
)
from pyvirtio.memory import MemoryPool
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import (
    DEVICE_ID_BLOCK,
    STATUS_FEATURES_OK,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
from pyvirtio.transport.base import QueueSetup

#: Protocol features the frontend uses when the back end offers them.
WANTED_PROTOCOL_FEATURES = (
    (1 << vu.PROTOCOL_F_MQ)
    | (1 << vu.PROTOCOL_F_REPLY_ACK)
    | (1 << vu.PROTOCOL_F_CONFIG)
    | (1 << vu.PROTOCOL_F_STATUS)
    | (1 << vu.PROTOCOL_F_RESET_DEVICE)
)

_RECV_CHUNK = 4096
_CMSG_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)


class _Queue:
    __slots__ = ("setup", "kick", "call", "running")

    def __init__(self, setup: QueueSetup, kick: int, call: int) -> None:
        self.setup = setup
        self.kick = kick
        self.call = call
        self.running = True


class VhostUserTransport:
    """A vhost-user frontend connection (see the module docstring).

    ``device_type`` is the virtio device ID of the back end (vhost-user does
    not say it; blk by default). ``queue_size`` is the ring size offered to
    the driver for every queue (vhost-user has no per-queue maximum).
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
    ) -> None:
        self.path = path
        self._device_type = device_type
        self.queue_size = queue_size
        self.timeout = timeout
        self._codec = vu.FrontendCodec()
        self._reader = vu.MessageReader(DeviceProtocolError)
        self._lock = threading.RLock()
        self._queues: dict[int, _Queue] = {}
        self._lost: str | None = None
        self._status = 0
        self._features_sent = False
        self.driver_features = 0
        self._sock = self._connect(path, connect_timeout)
        try:
            self._handshake(protocol_features)
        except BaseException:
            self.close()
            raise

    # -- connection -----------------------------------------------------------

    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline:
                    sock.close()
                    raise ConnectionLost(f"cannot connect to vhost-user socket {path}: {exc.strerror}") from None
                time.sleep(0.05)
            except OSError as exc:
                sock.close()
                raise ConnectionLost(f"cannot connect to vhost-user socket {path}: {exc.strerror or exc}") from None

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
            if self._lost is not None:
                raise self._lose(self._lost)
            try:
                if out.fds:
                    self._sock.sendmsg([out.data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(out.fds))])
                else:
                    self._sock.sendall(out.data)
            except OSError as exc:
                raise self._lose(f"send of {out.name} failed: {exc.strerror or exc}") from None
            if not out.expects_reply:
                return None
            msg = self._receive(out.name)
            value = self._codec.parse_reply(out, msg)
            if out.request not in _REPLY_CARRIERS:
                # A REPLY_ACK: non-zero means the back end refused the request.
                assert isinstance(value, int)
                if value:
                    raise DeviceError(f"vhost-user back end refused {out.name} (ack {value})")
                return None
            return value

    def _receive(self, what: str) -> vu.Message:
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._reader.next_message()
            if msg is not None:
                for fd in msg.fds:  # no reply we ask for carries fds (GET_INFLIGHT_FD is not used)
                    os.close(fd)
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
            fds = _fds_from_ancillary(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise self._lose(f"connection closed while waiting for {what}")
            self._reader.feed(data, fds)

    def check_alive(self) -> None:
        """Raise ConnectionLost if the peer has closed the socket (non-blocking peek)."""
        if self._lost is not None:
            raise self._lose(self._lost)
        try:
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._lose(f"socket error: {exc.strerror or exc}") from None
        if not data:
            raise self._lose("connection closed by the back end")

    @property
    def connected(self) -> bool:
        return self._lost is None

    # -- Transport protocol ---------------------------------------------------

    def device_type(self) -> int:
        return self._device_type

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

    def set_memory(self, pool: MemoryPool) -> None:
        regions = pool.regions
        if len(regions) > vu.MAX_FDS:
            raise InvalidArgument(f"{len(regions)} memory regions; vhost-user takes at most {vu.MAX_FDS}")
        table = [vu.MemRegion(r.guest_addr, r.size, r.user_addr, r.fd_offset) for r in regions]
        self._call(self._codec.set_mem_table(table, [r.fd for r in regions], need_reply=self._ack))

    def setup_queue(self, setup: QueueSetup) -> None:
        if setup.index in self._queues:
            raise QueueStateError(f"queue {setup.index} is already set up")
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        q = _Queue(setup, kick, call)
        self._queues[setup.index] = q
        ack = self._ack
        c = self._codec
        i = setup.index
        self._call(c.set_vring_num(i, setup.size, need_reply=ack))
        self._call(c.set_vring_base(i, setup.last_avail, need_reply=ack))
        addr = vu.VringAddr(i, 0, setup.desc_addr, setup.used_addr, setup.avail_addr, 0)
        self._call(c.set_vring_addr(addr, need_reply=ack))
        self._call(c.set_vring_kick(i, kick, need_reply=ack))
        self._call(c.set_vring_call(i, call, need_reply=ack))
        if self._has_protocol_features_bit():
            self._call(c.set_vring_enable(i, True, need_reply=ack))

    def _has_protocol_features_bit(self) -> bool:
        return bool(self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def _stop_queue(self, index: int) -> int | None:
        """GET_VRING_BASE: the back end stops the ring and says where it stopped."""
        q = self._queues.get(index)
        if q is None or not q.running or self._lost is not None:
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
        sock_fd = self._sock.fileno()
        ready, _, _ = select.select([q.call, sock_fd], [], [], timeout)
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

    def close(self) -> None:
        for q in self._queues.values():
            os.close(q.kick)
            os.close(q.call)
        self._queues.clear()
        self._reader.close_pending_fds()
        if self._sock.fileno() >= 0:
            self._sock.close()
        if self._lost is None:
            self._lost = "transport closed"

    def info(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "socket": self.path,
            "protocol_features": vu.protocol_feature_names(self.protocol_features),
            "offered_protocol_features": vu.protocol_feature_names(self.offered_protocol_features),
            "backend_queues": self.num_queues,
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


def _fd_array(fds: tuple[int, ...]) -> bytes:
    return array.array("i", fds).tobytes()


def _fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


__all__ = ["VhostUserTransport", "WANTED_PROTOCOL_FEATURES"]
