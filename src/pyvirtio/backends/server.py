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

import errno
import fcntl
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

from pyvirtio.backends.inflight import InflightArea, QueueInflight
from pyvirtio.backends.model import DeviceModel, ModelHooks
from pyvirtio.errors import DriverProtocolError, ProtocolViolation, PyvirtioError, RequestRefused, TransportError
from pyvirtio.memory import PAGE_SIZE, MemoryTable, Region
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.device_side import ChainError, DeviceQueue
from pyvirtio.spec.common import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
from pyvirtio.spec.ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    is_power_of_two,
)

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

#: Protocol features this back end offers.
OFFERED_PROTOCOL_FEATURES = (
    (1 << vu.PROTOCOL_F_MQ)
    | (1 << vu.PROTOCOL_F_REPLY_ACK)
    | (1 << vu.PROTOCOL_F_CONFIG)
    | (1 << vu.PROTOCOL_F_RESET_DEVICE)
    | (1 << vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS)
    | (1 << vu.PROTOCOL_F_STATUS)
)
#: GET_MAX_MEM_SLOTS answer (qemu-storage-daemon's value).
MAX_MEM_SLOTS = 32
#: How long a drained ring is polled before sleeping on its kick fd.
DEFAULT_POLL_US = 50
#: A reply that cannot be sent within this many seconds drops the connection.
SEND_TIMEOUT = 5.0

_RECV_CHUNK = 8192
_CMSG_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)
_POLLIN = select.POLLIN
_MAX_STATUS = 0xFF


class _Ring:
    """Per-ring state as the frontend configured it, and the running queue."""

    __slots__ = (
        "index", "num", "addr", "base", "kick", "kick_polled", "call", "err", "enabled", "queue", "inflight", "resubmit"
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: vu.VringAddr | None = None
        self.base = 0
        self.kick = -1
        self.kick_polled = False  # SET_VRING_KICK with NOFD: no kicks, poll the ring
        self.call = -1
        self.err = -1
        self.enabled = False
        self.queue: DeviceQueue | None = None
        self.inflight: QueueInflight | None = None  # INFLIGHT_SHMFD tracking while the ring runs
        self.resubmit: list[int] = []  # heads a previous back end left in flight, to run first

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd >= 0:
                _close(fd)
                setattr(self, name, -1)
        self.kick_polled = False


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return True  # no /proc: cannot tell, accept


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
        # INFLIGHT_SHMFD (backends/inflight.py): offered only when asked for.
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES | (
            1 << vu.PROTOCOL_F_INFLIGHT_SHMFD if inflight else 0
        )
        self._inflight: InflightArea | None = None  # the area of SET_INFLIGHT_FD
        self._offered: InflightArea | None = None  # the last one created for GET_INFLIGHT_FD
        self.poll_s = max(0.0, poll_us) / 1e6
        self.num_queues = hooks.num_queues
        self.offered_features = int(hooks.features()) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.acked_features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.memory = MemoryTable(ProtocolViolation)
        self.rings = [_Ring(i) for i in range(self.num_queues)]
        self._reader = vu.MessageReader(DriverProtocolError)
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        self._by_kick: dict[int, _Ring] = {}
        self._busy: dict[_Ring, None] = {}  # insertion-ordered set
        self._polled: list[_Ring] = []  # rings started with a NOFD kick
        # Device-initiated buffers (see the module docstring): optional model hooks.
        self._gated = hooks.gated
        self._wake_fd = hooks.wake_fd
        self._pending: Callable[[int], int] = hooks.pending or _nothing_pending
        self._handlers: dict[int, Callable[[Any, list[int]], vu.Outgoing | None]] = {
            vu.GET_FEATURES: self._get_features,
            vu.SET_FEATURES: self._set_features,
            vu.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            vu.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            vu.SET_OWNER: self._set_owner,
            vu.RESET_OWNER: self._reset_owner,
            vu.GET_QUEUE_NUM: self._get_queue_num,
            vu.SET_MEM_TABLE: self._set_mem_table,
            vu.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            vu.ADD_MEM_REG: self._add_mem_reg,
            vu.REM_MEM_REG: self._rem_mem_reg,
            vu.SET_VRING_NUM: self._set_vring_num,
            vu.SET_VRING_ADDR: self._set_vring_addr,
            vu.SET_VRING_BASE: self._set_vring_base,
            vu.GET_VRING_BASE: self._get_vring_base,
            vu.SET_VRING_KICK: self._set_vring_kick,
            vu.SET_VRING_CALL: self._set_vring_call,
            vu.SET_VRING_ERR: self._set_vring_err,
            vu.SET_VRING_ENABLE: self._set_vring_enable,
            vu.GET_CONFIG: self._get_config,
            vu.SET_CONFIG: self._set_config,
            vu.SET_STATUS: self._set_status,
            vu.GET_STATUS: self._get_status,
            vu.RESET_DEVICE: self._reset_device,
            vu.GET_INFLIGHT_FD: self._get_inflight_fd,
            vu.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
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
                        for gated in self.rings:
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
        for ring in self.rings:
            self._stop_ring(ring)
            ring.close_fds()
        self._drop_inflight()
        self.memory.close()
        self._reader.close_pending_fds()
        sock = self._sock
        if sock is not None:
            try:
                self._poller.unregister(sock.fileno())
            except (KeyError, ValueError, OSError):
                pass
            self._sock = None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "acked_features": self.acked_features,
            "protocol_features": vu.protocol_feature_names(self.protocol_features),
            "status": self.status,
            "regions": len(self.memory),
            "running_queues": [r.index for r in self.rings if r.queue is not None],
            "chains": self.chains,
            "calls": self.calls,
        }
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
                _close(fd)
            raise ProtocolViolation(f"more than {vu.MAX_FDS} file descriptors in one message")
        if not data:
            for fd in fds:
                _close(fd)
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
            self._dispatch(msg)

    def _send(self, out: vu.Outgoing) -> None:
        assert self._sock is not None
        try:
            if out.fds:  # GET_INFLIGHT_FD's reply
                self._sock.sendmsg([out.data], vu.scm_rights(out.fds))
            else:
                self._sock.sendall(out.data)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot send the reply to {out.name}: {exc}") from None

    def _dispatch(self, msg: vu.Message) -> None:
        fds = list(msg.fds)  # handlers pop the fds they keep; the rest are closed
        name = vu.request_name(msg.request)
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:
                if msg.need_reply and not msg.is_reply:
                    log.warning("%s is not supported: failure ack", name)
                    self._send(vu.encode_ack(msg.request, False))
                    return
                raise ProtocolViolation(f"{name} is not supported (and no NEED_REPLY to refuse it)")
            try:
                value = vu.decode_request(msg)
            except DriverProtocolError as exc:
                raise ProtocolViolation(str(exc)) from None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("<- %s %r fds=%s", name, value, msg.fds)
            try:
                reply = handler(value, fds)
            except RequestRefused as exc:
                log.warning("%s refused: %s", name, exc)
                if msg.need_reply:
                    self._send(vu.encode_ack(msg.request, False))
                return
            if reply is not None:
                self._send(reply)
            elif msg.need_reply:
                # Acked whenever asked, as libvhost-user and DPDK do, even if
                # REPLY_ACK was not negotiated: a frontend that asks waits.
                self._send(vu.encode_ack(msg.request, True))
        finally:
            for fd in fds:
                _close(fd)

    # -- feature negotiation ----------------------------------------------------

    def _has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    @property
    def _protocol_features_negotiated(self) -> bool:
        return bool(self.acked_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def _get_features(self, _value: None, _fds: list[int]) -> vu.Outgoing:
        return vu.encode_reply(vu.GET_FEATURES, self.offered_features)

    def _set_features(self, value: int, _fds: list[int]) -> None:
        extra = value & ~self.offered_features
        if extra:
            raise ProtocolViolation(f"SET_FEATURES acks features 0x{extra:x} that were not offered")
        self.acked_features = value
        negotiated = self.hooks.negotiated
        if negotiated is not None:
            negotiated(value)  # optional hook: models whose work depends on features (net: MRG_RXBUF)

    def _get_protocol_features(self, _value: None, _fds: list[int]) -> vu.Outgoing:
        return vu.encode_reply(vu.GET_PROTOCOL_FEATURES, self.offered_protocol_features)

    def _set_protocol_features(self, value: int, _fds: list[int]) -> None:
        extra = value & ~self.offered_protocol_features
        if extra:
            raise ProtocolViolation(
                f"SET_PROTOCOL_FEATURES acks {vu.protocol_feature_names(extra)}, which were not offered"
            )
        self.protocol_features = value

    def _set_owner(self, _value: None, _fds: list[int]) -> None:
        self.owner = True

    def _reset_owner(self, _value: None, _fds: list[int]) -> None:
        self._reset(drop_memory=True)
        self.owner = False

    def _get_queue_num(self, _value: None, _fds: list[int]) -> vu.Outgoing:
        # Optional model hook: net back ends answer queue *pairs* (QEMU's and DPDK's convention).
        return vu.encode_reply(vu.GET_QUEUE_NUM, self.hooks.queue_num)

    def _need_owner(self, what: str) -> None:
        if not self.owner:
            raise ProtocolViolation(f"{what} before SET_OWNER")

    # -- device status, config, reset -------------------------------------------

    def _get_config(self, value: vu.ConfigSpace, _fds: list[int]) -> vu.Outgoing:
        config = self.hooks.config()
        end = value.offset + value.size
        if value.size == 0 or end > len(config):
            # vhost-user.rst, GET_CONFIG: an empty payload tells the frontend it failed.
            log.warning(
                "GET_CONFIG of %d bytes at %d: the config has %d bytes", value.size, value.offset, len(config)
            )
            return vu.encode_reply(vu.GET_CONFIG, None)
        space = vu.ConfigSpace(value.offset, value.size, value.flags, bytes(config[value.offset : end]))
        return vu.encode_reply(vu.GET_CONFIG, space)

    def _set_config(self, value: vu.ConfigSpace, _fds: list[int]) -> None:
        setter = self.hooks.set_config
        if setter is None:
            raise RequestRefused("the device config is read-only")
        if value.offset + value.size > len(self.hooks.config()):
            raise RequestRefused(f"{value.size} bytes at {value.offset} are beyond the device config")
        try:
            setter(value.offset, value.data)
        except (ValueError, PyvirtioError) as exc:
            raise RequestRefused(str(exc)) from None

    def _set_status(self, value: int, _fds: list[int]) -> None:
        if value > _MAX_STATUS:
            raise ProtocolViolation(f"SET_STATUS 0x{value:x} does not fit in 8 bits")
        self.status = value

    def _get_status(self, _value: None, _fds: list[int]) -> vu.Outgoing:
        return vu.encode_reply(vu.GET_STATUS, self.status)

    def _reset_device(self, _value: None, _fds: list[int]) -> None:
        self._reset(drop_memory=False)

    def _reset(self, *, drop_memory: bool) -> None:
        """Back to the state after connect (vhost-user.rst, RESET_DEVICE); the owner stays."""
        for ring in self.rings:
            self._stop_ring(ring)
            ring.close_fds()
        self.rings = [_Ring(i) for i in range(self.num_queues)]
        self.acked_features = 0
        self.status = 0
        self._drop_inflight()  # what was in flight is abandoned by a reset
        if drop_memory:
            self.memory.close()
        reset = self.hooks.reset
        if reset is not None:
            reset()

    # -- inflight tracking (INFLIGHT_SHMFD, backends/inflight.py) ----------------

    def _get_inflight_fd(self, value: vu.InflightInfo, _fds: list[int]) -> vu.Outgoing:
        self._need_owner("GET_INFLIGHT_FD")
        if not self._has_protocol(vu.PROTOCOL_F_INFLIGHT_SHMFD):
            raise ProtocolViolation("GET_INFLIGHT_FD without PROTOCOL_F_INFLIGHT_SHMFD")
        if not 1 <= value.num_queues <= 0xFFFF or not 1 <= value.queue_size <= MAX_QUEUE_SIZE:
            raise RequestRefused(f"an inflight area for {value.num_queues} queues of {value.queue_size}")
        # A new zeroed area; the frontend keeps it and sends it back with SET_INFLIGHT_FD
        # (our mapping of it is dropped then: the one attached is the frontend's).
        self._drop_offered()
        area = InflightArea.create(value.num_queues, value.queue_size)
        self._offered = area
        return vu.encode_reply(vu.GET_INFLIGHT_FD, area.info, fds=(area.fd,))

    def _drop_offered(self) -> None:
        if self._offered is not None:
            self._offered.close()
            self._offered = None

    def _set_inflight_fd(self, value: vu.InflightInfo, fds: list[int]) -> None:
        self._need_owner("SET_INFLIGHT_FD")
        if not self._has_protocol(vu.PROTOCOL_F_INFLIGHT_SHMFD):
            raise ProtocolViolation("SET_INFLIGHT_FD without PROTOCOL_F_INFLIGHT_SHMFD")
        area = InflightArea.attach(fds.pop(), value, ProtocolViolation)
        self._drop_offered()
        running = [r for r in self.rings if r.queue is not None]
        for ring in running:
            self._stop_ring(ring)
        self._drop_inflight()
        self._inflight = area
        for ring in running:
            self._try_start(ring)

    def _drop_inflight(self) -> None:
        for ring in self.rings:
            ring.inflight = None
            ring.resubmit = []
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None
        self._drop_offered()

    def _track(self, ring: _Ring, queue: DeviceQueue) -> None:
        """A ring starts with an inflight area: recover what a previous back end left in flight."""
        area = self._inflight
        tracker = None if area is None else area.queue(ring.index)
        if tracker is None:
            return
        if tracker.desc_num < ring.num:
            raise ProtocolViolation(
                f"ring {ring.index} of {ring.num} descriptors: the inflight area tracks {tracker.desc_num}"
            )
        heads = tracker.recover(queue)
        ring.inflight = tracker
        ring.resubmit = heads
        if heads:
            # vhost-user.rst: the ring resumes after what was popped (completed + in flight).
            queue.last_avail = (queue.used_idx + len(heads)) & 0xFFFF
            log.info("ring %d: resubmitting %d request(s) left in flight", ring.index, len(heads))

    # -- memory -----------------------------------------------------------------

    def _map_region(self, region: vu.MemRegion, fd: int) -> Region:
        """Check and map one region; takes ownership of ``fd`` (closed on failure)."""
        try:
            size = region.memory_size
            offset = region.mmap_offset
            if size == 0:
                raise ProtocolViolation("memory region of size 0")
            for what, start in (("guest", region.guest_phys_addr), ("frontend", region.userspace_addr)):
                if start + size > 1 << 64:
                    raise ProtocolViolation(f"memory region at {what} address 0x{start:x}+{size} wraps")
            if offset % PAGE_SIZE:
                raise ProtocolViolation(f"memory region mmap_offset 0x{offset:x} is not page aligned")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolViolation("memory region fd is not a regular file (memfd, tmpfs, hugetlbfs)")
            if st.st_size < offset + size:
                raise ProtocolViolation(
                    f"memory region of {size} bytes at offset {offset} exceeds its file ({st.st_size} bytes)"
                )
            _seal_shrink(fd)
            try:
                mapped = Region(fd, size, fd_offset=offset, guest_addr=region.guest_phys_addr, owns_fd=True)
            except (OSError, ValueError, OverflowError) as exc:
                raise ProtocolViolation(f"cannot map memory region: {exc}") from None
        except BaseException:
            _close(fd)
            raise
        return mapped

    def _add_mapping(self, table: MemoryTable, region: vu.MemRegion, fd: int) -> None:
        mapped = self._map_region(region, fd)
        try:
            table.add(mapped, region.guest_phys_addr, region.userspace_addr)
        except BaseException:
            mapped.close()
            raise

    def _set_mem_table(self, value: vu.MemTable, fds: list[int]) -> None:
        self._need_owner("SET_MEM_TABLE")
        table = MemoryTable(ProtocolViolation)
        try:
            taken = fds[:]
            fds.clear()
            for i, region in enumerate(value.regions):
                fd = taken[i]
                taken[i] = -1
                self._add_mapping(table, region, fd)
        except BaseException:
            for fd in taken:
                if fd >= 0:
                    _close(fd)
            table.close()
            raise
        old = self.memory
        try:
            self._remap_rings(table)
        except BaseException:
            if self.memory is not table:
                table.close()  # never installed
            raise
        finally:
            if self.memory is not old:
                old.close()  # replaced, whether or not the rings could restart in the new table

    def _get_max_mem_slots(self, _value: None, _fds: list[int]) -> vu.Outgoing:
        return vu.encode_reply(vu.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS)

    def _add_mem_reg(self, value: vu.MemRegion, fds: list[int]) -> None:
        self._need_owner("ADD_MEM_REG")
        if not self._has_protocol(vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS):
            raise ProtocolViolation("ADD_MEM_REG without PROTOCOL_F_CONFIGURE_MEM_SLOTS")
        fd = fds.pop()
        if len(self.memory) >= MAX_MEM_SLOTS:
            _close(fd)
            raise ProtocolViolation(f"ADD_MEM_REG beyond {MAX_MEM_SLOTS} memory slots")
        self._add_mapping(self.memory, value, fd)

    def _rem_mem_reg(self, value: vu.MemRegion, _fds: list[int]) -> None:
        self._need_owner("REM_MEM_REG")
        if not self._has_protocol(vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS):
            raise ProtocolViolation("REM_MEM_REG without PROTOCOL_F_CONFIGURE_MEM_SLOTS")
        # Rings are stopped first so that none keeps a view into the region.
        running = [r for r in self.rings if r.queue is not None]
        for ring in running:
            self._stop_ring(ring)
        mapping = self.memory.remove(value.guest_phys_addr, value.memory_size)
        if mapping.owned:
            mapping.region.close()
        for ring in running:
            self._try_start(ring)

    def _remap_rings(self, table: MemoryTable) -> None:
        """Install a new memory table; running rings are re-translated into it."""
        running = [r for r in self.rings if r.queue is not None]
        for ring in running:
            self._stop_ring(ring)
        self.memory = table
        for ring in running:
            self._try_start(ring)

    # -- ring configuration -----------------------------------------------------

    def _ring(self, index: int, what: str) -> _Ring:
        self._need_owner(what)
        if not 0 <= index < self.num_queues:
            raise ProtocolViolation(f"{what} for ring {index}: the device has {self.num_queues}")
        return self.rings[index]

    def _set_vring_num(self, value: vu.VringState, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_NUM")
        num = value.num
        if not is_power_of_two(num) or num > MAX_QUEUE_SIZE:
            # virtio 1.2 §2.7: a split queue's size is a power of 2, at most 32768.
            raise ProtocolViolation(
                f"SET_VRING_NUM {num} for ring {ring.index}: not a power of 2 up to 32768"
            )
        if ring.queue is not None:
            raise ProtocolViolation(f"SET_VRING_NUM on running ring {ring.index}")
        ring.num = num

    def _set_vring_addr(self, value: vu.VringAddr, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_ADDR")
        if not len(self.memory):
            raise ProtocolViolation("SET_VRING_ADDR before SET_MEM_TABLE")
        # virtio 1.2 §2.7: descriptor table 16-, avail 2-, used ring 4-byte aligned.
        for what, addr, align in (
            ("descriptor table", value.desc, DESC_ALIGN),
            ("avail ring", value.avail, AVAIL_ALIGN),
            ("used ring", value.used, USED_ALIGN),
        ):
            if addr % align:
                raise ProtocolViolation(
                    f"ring {ring.index}: {what} address 0x{addr:x} not {align}-byte aligned"
                )
        running = ring.queue is not None
        if running:
            self._stop_ring(ring)
        ring.addr = value
        if ring.num:
            self._make_queue(ring).release()  # check the addresses now, not at first kick
        if running:
            self._try_start(ring)

    def _set_vring_base(self, value: vu.VringState, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_BASE")
        if value.num > 0xFFFF:
            raise ProtocolViolation(
                f"SET_VRING_BASE {value.num} for ring {ring.index}: a split ring index is 16 bits"
            )
        if ring.queue is not None:
            raise ProtocolViolation(f"SET_VRING_BASE on running ring {ring.index}")
        ring.base = value.num

    def _get_vring_base(self, value: vu.VringState, _fds: list[int]) -> vu.Outgoing:
        ring = self._ring(value.index, "GET_VRING_BASE")
        # vhost-user.rst: stop the ring; like libvhost-user and DPDK, its
        # eventfds are dropped too (the frontend sends new ones to restart).
        self._stop_ring(ring)
        ring.close_fds()
        return vu.encode_reply(vu.GET_VRING_BASE, vu.VringState(ring.index, ring.base))

    def _vring_fd(self, value: vu.VringFile, fds: list[int], what: str) -> tuple[_Ring, int]:
        ring = self._ring(value.index, what)
        if value.nofd:
            return ring, -1
        fd = fds.pop()
        if not _is_eventfd(fd):
            _close(fd)
            raise ProtocolViolation(f"{what} for ring {ring.index}: the fd is not an eventfd")
        os.set_blocking(fd, False)  # a full counter must never block the back end
        return ring, fd

    def _set_vring_kick(self, value: vu.VringFile, fds: list[int]) -> None:
        ring, fd = self._vring_fd(value, fds, "SET_VRING_KICK")
        self._stop_ring(ring)
        if ring.kick >= 0:
            _close(ring.kick)
        ring.kick = fd
        ring.kick_polled = fd < 0
        self._try_start(ring)

    def _set_vring_call(self, value: vu.VringFile, fds: list[int]) -> None:
        ring, fd = self._vring_fd(value, fds, "SET_VRING_CALL")
        if ring.call >= 0:
            _close(ring.call)
        ring.call = fd

    def _set_vring_err(self, value: vu.VringFile, fds: list[int]) -> None:
        ring, fd = self._vring_fd(value, fds, "SET_VRING_ERR")
        if ring.err >= 0:
            _close(ring.err)
        ring.err = fd

    def _set_vring_enable(self, value: vu.VringState, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_ENABLE")
        if value.num > 1:
            raise ProtocolViolation(f"SET_VRING_ENABLE {value.num} for ring {ring.index}: must be 0 or 1")
        ring.enabled = bool(value.num)
        if ring.enabled:
            self._try_start(ring)
        else:
            self._stop_ring(ring)

    # -- ring start / stop -------------------------------------------------------

    def _make_queue(self, ring: _Ring) -> DeviceQueue:
        addr = ring.addr
        assert addr is not None
        features = self.acked_features
        try:
            return DeviceQueue.from_addresses(
                self.memory,
                ring.num,
                addr.desc,
                addr.avail,
                addr.used,
                user_addresses=True,
                index=ring.index,
                event_idx=bool(features >> F_RING_EVENT_IDX & 1),
                indirect=bool(features >> F_RING_INDIRECT_DESC & 1),
                last_avail=ring.base,
                max_chain=ring.num,  # virtio 1.2 §2.7.5.3.1, indirect chains included
            )
        except DriverProtocolError as exc:
            raise ProtocolViolation(f"ring {ring.index}: {exc}") from None

    def _try_start(self, ring: _Ring) -> None:
        """Start the ring if it has everything it needs (vhost-user.rst, "Starting and stopping rings")."""
        if ring.queue is not None or not ring.num or ring.addr is None:
            return
        if ring.kick < 0 and not ring.kick_polled:
            return
        # Without VHOST_USER_F_PROTOCOL_FEATURES a ring starts enabled; with it,
        # it starts disabled and waits for SET_VRING_ENABLE(1).
        if self._protocol_features_negotiated and not ring.enabled:
            return
        if not len(self.memory):
            raise ProtocolViolation(f"ring {ring.index} started without a memory table")
        ring.queue = self._make_queue(ring)
        if self._inflight is not None:
            self._track(ring, ring.queue)
        if ring.kick >= 0:
            self._by_kick[ring.kick] = ring
            self._poller.register(ring.kick, _POLLIN)
        else:
            self._polled.append(ring)
        log.debug("ring %d started: size %d, base %d", ring.index, ring.num, ring.base)
        self._wake(ring)  # work may have been queued before the kick fd

    def _stop_ring(self, ring: _Ring) -> None:
        queue = ring.queue
        if queue is None:
            return
        ring.base = queue.last_avail
        queue.release()
        ring.queue = None
        ring.inflight = None  # heads still flagged are found again at the next start
        ring.resubmit = []
        self._busy.pop(ring, None)
        if ring in self._polled:
            self._polled.remove(ring)
        if self._by_kick.get(ring.kick) is ring:
            del self._by_kick[ring.kick]
            try:
                self._poller.unregister(ring.kick)
            except (KeyError, ValueError):
                pass
        log.debug("ring %d stopped at %d", ring.index, ring.base)

    # -- data path ----------------------------------------------------------------

    def _wake(self, ring: _Ring) -> None:
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
        drained: list[_Ring] = []
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

    def _batch(self, ring: _Ring) -> bool:
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

    def _batch_tracked(self, ring: _Ring, tracker: QueueInflight) -> bool:
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

    def _has_work(self, ring: _Ring, queue: DeviceQueue) -> bool:
        """Chains are pending that the model takes now (a gated ring: only while it wants them)."""
        if not queue.avail_pending():
            return False
        return ring.index not in self._gated or self._pending(ring.index) > 0

    def _publish(self, ring: _Ring, n: int) -> None:
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


def _seal_shrink(fd: int) -> None:
    """Forbid shrinking a memfd that allows sealing, so the mapping cannot fault later."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            raise




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
