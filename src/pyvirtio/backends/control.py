"""The vhost-user control plane of the embedded back ends, as a sans-I/O state machine.

Theory of operation
-------------------
:class:`ControlPlane` holds what a frontend negotiated on one connection
(features, protocol features, owner, status, the memory table, each ring's
configuration, the inflight area) and decides what each request means. It
takes decoded :class:`~pyvirtio.protocol.vhost_user.Message` records (with
their fds) from :meth:`ControlPlane.receive` and returns *actions* for the
connection to carry out, in order:

* :class:`Send` a reply (the ack, the value asked for, an fd to pass);
* :class:`StartRing`: a ring's queue was built; watch its kick fd (or poll
  the ring) and look for work at once (work may be queued before the kick);
* :class:`StopRing`: a ring's queue was released; stop watching its kick fd
  and forget it;
* :class:`Notify`: write a ring's new call eventfd once (see "Ring life
  cycle").

It never touches the socket, never polls, never writes an eventfd: the
connection (:mod:`pyvirtio.backends.listener`) and the data path
(:mod:`pyvirtio.backends.datapath`) do. What it does itself is what the
decisions need at once: it maps the frontend's memory through
:mod:`pyvirtio.memory` (the only module that creates mmaps; ring addresses
are checked against the table when they arrive), builds and releases
:class:`~pyvirtio.ring.device_side.DeviceQueue` objects, and owns (and
closes) every fd a message brought. A frontend that broke the rules makes
:meth:`~ControlPlane.receive` raise :class:`~pyvirtio.errors.ProtocolViolation`;
the connection then drops, and :meth:`~ControlPlane.close` releases
everything and returns the last actions.

Distrust (docs/architecture.md, "distrust of the device"; here the frontend
is the one not trusted). The codec checks each message's syntax; this module
checks its meaning:

* a request not allowed now (a ring index >= ``num_queues``, ring requests
  before SET_OWNER, a ring size not a power of two (split rings, virtio 1.2
  §2.7) or outside 1..32768 (§2.8), ring addresses outside the memory table
  or misaligned (§2.7: 16, 2 and 4 bytes; §2.8.10.1, §2.8.13: 16, 4 and 4
  for packed rings), a ring base beyond 16 bits (split) or pointing outside
  the ring (packed), a memory region that is not a regular file large
  enough for it, ADD/REM_MEM_REG or the inflight requests without their
  protocol feature, transport or ring feature bits acked that were not
  offered): a protocol violation, the connection is dropped;
* an unknown or unsupported request: a failure ack when it has NEED_REPLY,
  otherwise a violation (the frontend would wait for an answer that cannot
  come);
* a well-formed request the device declines (SET_CONFIG on a read-only
  config, an inflight area of an impossible size):
  :class:`~pyvirtio.errors.RequestRefused`, a failure ack with NEED_REPLY,
  else a log line.

Tolerance, where it costs nothing and real frontends need it:

* device-type feature bits (virtio 1.2 §2.2: bits 0-23 and 50-63 of the
  vhost-user u64) acked without being offered are masked off (the device
  and the model see only what was offered) and logged once per connection:
  QEMU 7.2's vhost-user-scsi-pci acks the guest's view of the device, e.g.
  VIRTIO_SCSI_F_CHANGE whether it was offered or not, and libvhost-user and
  DPDK accept that. Transport and ring bits (24 to 49) not offered stay a
  violation: they change how the rings work;
* GET_CONFIG past the end of the device's config answers the config
  followed by zeros up to the size asked (vhost-user.rst: the reply's size
  MUST match the request's; the codec bounds offset + size at 256 bytes,
  QEMU's VHOST_USER_MAX_CONFIG_SIZE, and refuses a size field larger than
  the message's data). SPDK's virtio-user initiator asks 256 bytes at
  offset 0 whatever the device; the bytes past the config hold nothing to
  hide. A request whose data is longer than its size field (SPDK sends its
  whole 256-byte struct; a build patched to ask the exact size still does)
  is answered in the request's length, the asked bytes first, as
  libvhost-user answers it (SPDK refuses a reply of another length). A
  GET_CONFIG of size 0, or to a device whose config the frontend keeps
  (:class:`~pyvirtio.backends.model.OptionalConfigSpace`: CONFIG is then
  not offered, as by SPDK's vhost-user-scsi targets), gets an empty
  payload: vhost-user.rst's way of saying it failed;
* SET_FEATURES repeated, with the features in force, while rings run: QEMU
  drives a multi-queue net device as one ``vhost_dev`` per queue pair over
  one connection, and each sends SET_FEATURES when it starts, the first
  pair's rings already running. Nothing changes, so the model is not told
  again (net would drop the frames waiting for the running pairs, and a
  frame half written into their receive buffers). A new driver stops the
  rings first (GET_VRING_BASE), so its SET_FEATURES always reaches the model;
* requests in any order the spec allows: GET_CONFIG and GET_QUEUE_NUM before
  SET_FEATURES or without protocol features (SPDK v18.04), SET_VRING_CALL
  and SET_VRING_ENABLE before SET_MEM_TABLE (SPDK, DPDK's virtio-user),
  NEED_REPLY acked even without REPLY_ACK (a frontend that asks waits, as
  libvhost-user and DPDK answer it).

Ring formats. The ring format is the negotiated one (VIRTIO_F_RING_PACKED,
with VIRTIO_F_IN_ORDER or not): checks that depend on it (size, alignment,
base) are made when the message comes if the features are known, and again
when the ring starts. For a packed ring SET_VRING_ADDR's descriptor /
available / used fields are the descriptor ring and the driver / device
event suppression structures, and SET/GET_VRING_BASE carry both positions
with their wrap counters (vhost-user.rst, "Vring descriptor indices for
packed virtqueues"). A packed ring with an inflight area resumes where the
area says (:mod:`pyvirtio.backends.inflight`).

Ring life cycle (vhost-user.rst, "Ring states"): a ring starts when it has a
size, addresses and a kick fd (or NOFD: the ring is polled), and, once
VHOST_USER_F_PROTOCOL_FEATURES was negotiated, SET_VRING_ENABLE(1); it stops
at GET_VRING_BASE (its eventfds are dropped too, as libvhost-user and DPDK
do), SET_VRING_ENABLE(0), RESET_OWNER and RESET_DEVICE, and stops and
restarts around anything that changes what its queue translated
(SET_MEM_TABLE, REM_MEM_REG, a new SET_VRING_ADDR or kick, SET_INFLIGHT_FD).

A ring may run without a call fd: QEMU 7.2 restarting a device (driver
rebind, reset) sends SET_VRING_CALL only after SET_VRING_ENABLE (the vhost
notifiers are unmasked last: "guest_notifier_mask/pending not used yet, so
just unmask everything here", hw/block/vhost-user-blk.c; vhost-user-scsi-pci
does the same, as the guest tests' logs show), and the fd from before was
dropped at GET_VRING_BASE or RESET_DEVICE. The connection may run the ring
in between (a unix socket read stops at each message carrying fds, so the
rings run between two such messages), and a request the guest had already
queued is completed with nobody to tell: the guest waits for that interrupt
for ever (seen: the guest's SCSI scan after a driver rebind hung, twice in
six runs of the scsi guest test). The data path marks such a ring
(``call_missed``), and the SET_VRING_CALL that gives it a call fd then has
that fd signalled once (:class:`Notify`); libvhost-user signals every new
call fd for the same reason ("in case of I/O hang after reconnecting"). A
spurious notification costs the driver one look at the used ring.

Memory: the regions a frontend hands over are checked and mapped by
:mod:`pyvirtio.backends.regions` (its docstring says what is refused, and why
an ADD_MEM_REG identical to a mapped region shares that mapping); here,
running rings are stopped before a change of memory takes their view away
and restarted in the new table. The checks on a ring's layout and the
building of its queue are :mod:`pyvirtio.backends.ringsetup`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from pyvirtio.backends.inflight import InflightArea
from pyvirtio.backends.model import ModelHooks
from pyvirtio.backends.regions import MAX_MEM_SLOTS, add_region, map_table
from pyvirtio.backends.ringsetup import check_addr, check_num, is_eventfd, make_queue, ring_format, start_queue
from pyvirtio.backends.ringstate import RingState, close_fd
from pyvirtio.errors import DriverProtocolError, ProtocolViolation, PyvirtioError, RequestRefused
from pyvirtio.memory import MemoryTable
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import F_RING_PACKED, VHOST_USER_F_PROTOCOL_FEATURES
from pyvirtio.spec.ring import MAX_QUEUE_SIZE, parse_packed_base

log = logging.getLogger("pyvirtio.backends")

__all__ = [
    "DEVICE_FEATURE_BITS",
    "MAX_MEM_SLOTS",
    "OFFERED_PROTOCOL_FEATURES",
    "Action",
    "ControlPlane",
    "Notify",
    "Send",
    "StartRing",
    "StopRing",
]

#: Protocol features the back ends offer (CONFIG only to a model that keeps its config).
OFFERED_PROTOCOL_FEATURES = (
    (1 << vu.PROTOCOL_F_MQ)
    | (1 << vu.PROTOCOL_F_REPLY_ACK)
    | (1 << vu.PROTOCOL_F_CONFIG)
    | (1 << vu.PROTOCOL_F_RESET_DEVICE)
    | (1 << vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS)
    | (1 << vu.PROTOCOL_F_STATUS)
)
#: virtio 1.2 §2.2: bits 0-23 and 50-127 belong to the device type (24-40: queue and
#: negotiation mechanisms, 41-49: reserved). The vhost-user u64 carries bits 0-63.
DEVICE_FEATURE_BITS = ((1 << 24) - 1) | (((1 << 64) - 1) & ~((1 << 50) - 1))
_MAX_STATUS = 0xFF


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``out`` (a reply, with the fds it carries) to the frontend."""

    out: vu.Outgoing


@dataclass(frozen=True, slots=True)
class StartRing:
    """``ring``'s queue exists now: watch ``kick`` (-1: poll the ring) and look for work at once."""

    ring: RingState
    kick: int


@dataclass(frozen=True, slots=True)
class StopRing:
    """``ring``'s queue was released: stop watching ``kick`` (as given to StartRing) and forget the ring."""

    ring: RingState
    kick: int


@dataclass(frozen=True, slots=True)
class Notify:
    """Write 1 to ``fd``, ``ring``'s new call eventfd: a notification was due while it had none."""

    ring: RingState
    fd: int


Action: TypeAlias = Send | StartRing | StopRing | Notify
_Handler: TypeAlias = Callable[[Any, list[int]], vu.Outgoing | None]


class ControlPlane:
    """The vhost-user state of one connection (see the module docstring). One object per connection."""

    def __init__(self, hooks: ModelHooks, *, inflight: bool = False) -> None:
        self.hooks = hooks
        offered = OFFERED_PROTOCOL_FEATURES
        if inflight:  # INFLIGHT_SHMFD (backends/inflight.py): offered only when asked for
            offered |= 1 << vu.PROTOCOL_F_INFLIGHT_SHMFD
        if not hooks.config_space:  # the frontend keeps the config (SPDK's vhost-user-scsi targets)
            offered &= ~(1 << vu.PROTOCOL_F_CONFIG)
        self.offered_protocol_features = offered
        self.num_queues = hooks.num_queues
        self.offered_features = int(hooks.features()) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.acked_features = 0
        #: Device-type bits acked without being offered, masked off (see the module docstring).
        self.ignored_features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.memory = MemoryTable(ProtocolViolation)
        self.rings = [RingState(i) for i in range(self.num_queues)]
        self._inflight: InflightArea | None = None  # the area of SET_INFLIGHT_FD
        self._offered: InflightArea | None = None  # the last one created for GET_INFLIGHT_FD
        self._actions: list[Action] = []
        self._closed = False
        self._handlers: dict[int, _Handler] = {
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

    # -- the interface --------------------------------------------------------------

    def receive(self, msg: vu.Message) -> list[Action]:
        """Act on one request; returns what the connection must do, in order.

        Takes ownership of ``msg.fds``: the ones kept are closed by :meth:`close`,
        the others now. Raises :class:`ProtocolViolation` when the frontend broke
        the rules (the connection must then be dropped, and :meth:`close` called).
        """
        fds = list(msg.fds)  # handlers pop the fds they keep; the rest are closed
        name = vu.request_name(msg.request)
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:
                if msg.need_reply and not msg.is_reply:
                    log.warning("%s is not supported: failure ack", name)
                    self._send(vu.encode_ack(msg.request, False))
                    return self._take()
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
                return self._take()
            if reply is not None:
                self._send(reply)
            elif msg.need_reply:
                # Acked whenever asked, as libvhost-user and DPDK do, even if
                # REPLY_ACK was not negotiated: a frontend that asks waits.
                self._send(vu.encode_ack(msg.request, True))
            return self._take()
        finally:
            for fd in fds:
                close_fd(fd)

    def close(self) -> list[Action]:
        """Stop every ring, release fds and mappings; returns the last actions (idempotent)."""
        if not self._closed:
            self._closed = True
            for ring in self.rings:
                self._stop_ring(ring)
                ring.close_fds()
            self._drop_inflight()
            self.memory.close()
        return self._take()

    def running(self) -> list[RingState]:
        """The rings whose queue exists."""
        return [r for r in self.rings if r.queue is not None]

    def info(self) -> dict[str, Any]:
        return {
            "offered_features": self.offered_features,
            "acked_features": self.acked_features,
            "ignored_features": self.ignored_features,
            "protocol_features": vu.protocol_feature_names(self.protocol_features),
            "offered_protocol_features": vu.protocol_feature_names(self.offered_protocol_features),
            "owner": self.owner,
            "status": self.status,
            "regions": len(self.memory),
            "running_queues": [r.index for r in self.rings if r.queue is not None],
            "rings": [r.describe() for r in self.rings if r.num or r.addr is not None or r.queue is not None],
        }

    def _send(self, out: vu.Outgoing) -> None:
        self._actions.append(Send(out))

    def _take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

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
        if extra & ~DEVICE_FEATURE_BITS:
            raise ProtocolViolation(
                f"SET_FEATURES acks features 0x{extra & ~DEVICE_FEATURE_BITS:x} that were not offered"
            )
        if extra:
            if not self.ignored_features:
                log.warning(
                    "SET_FEATURES acks device feature bits 0x%x that were not offered: ignored "
                    "(logged once per connection)",
                    extra,
                )
            self.ignored_features |= extra
            value &= ~extra
        # The same features again while rings run: another vhost_dev of the same frontend
        # starting (see "Tolerance" in the module docstring), not a new driver.
        repeat = value == self.acked_features and bool(self.running())
        self.acked_features = value
        negotiated = self.hooks.negotiated
        if negotiated is not None and not repeat:
            negotiated(value)  # models whose work depends on features (net: MRG_RXBUF)

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
        # Net models answer queue *pairs* (QEMU's and DPDK's convention): ModelHooks.queue_num.
        return vu.encode_reply(vu.GET_QUEUE_NUM, self.hooks.queue_num)

    def _need_owner(self, what: str) -> None:
        if not self.owner:
            raise ProtocolViolation(f"{what} before SET_OWNER")

    # -- device status, config, reset -------------------------------------------

    def _get_config(self, value: vu.ConfigSpace, _fds: list[int]) -> vu.Outgoing:
        if not self.hooks.config_space:
            log.warning("GET_CONFIG: the frontend keeps this device's config (no PROTOCOL_F_CONFIG): empty reply")
            return vu.encode_reply(vu.GET_CONFIG, None)
        if value.size == 0:
            # vhost-user.rst, GET_CONFIG: an empty payload tells the frontend it failed.
            log.warning("GET_CONFIG of 0 bytes at %d: empty reply", value.offset)
            return vu.encode_reply(vu.GET_CONFIG, None)
        config = self.hooks.config()
        data = bytes(config[value.offset : value.offset + value.size])
        if len(data) < value.size:
            log.debug(
                "GET_CONFIG of %d bytes at %d: the config has %d bytes, the rest reads as zeros",
                value.size, value.offset, len(config),
            )
        # The reply's size MUST match the request's (vhost-user.rst): what lies past the
        # config reads as zeros (SPDK asks 256 bytes whatever the device), and a request
        # with more data bytes than its size field (SPDK's whole struct; the codec
        # guarantees at least ``size``) is answered in its length, as libvhost-user
        # echoes it: SPDK checks that.
        data += bytes(len(value.data) - len(data))
        return vu.encode_reply(vu.GET_CONFIG, vu.ConfigSpace(value.offset, value.size, value.flags, data))

    def _set_config(self, value: vu.ConfigSpace, _fds: list[int]) -> None:
        if not self.hooks.config_space:
            raise RequestRefused("the frontend keeps this device's config (no PROTOCOL_F_CONFIG)")
        setter = self.hooks.set_config
        if setter is None:
            raise RequestRefused("the device config is read-only")
        if value.offset + value.size > len(self.hooks.config()):
            raise RequestRefused(f"{value.size} bytes at {value.offset} are beyond the device config")
        try:
            setter(value.offset, value.data[: value.size])
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
        self.rings = [RingState(i) for i in range(self.num_queues)]
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
        # Laid out for the negotiated format; before SET_FEATURES (QEMU asks first) for the larger,
        # packed, whenever it is offered: a ring started later finds room for its region.
        packed = self._ring_format == "packed" or (
            not self.acked_features and self.offered_features >> F_RING_PACKED & 1
        )
        area = InflightArea.create(value.num_queues, value.queue_size, "packed" if packed else "split")
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
        running = self.running()
        for ring in running:
            self._stop_ring(ring)
        self._drop_inflight()
        self._inflight = area
        for ring in running:
            self._try_start(ring)

    def _drop_inflight(self) -> None:
        for ring in self.rings:
            if ring.inflight is not None:
                ring.inflight.detach()
                ring.inflight = None
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None
        self._drop_offered()

    # -- memory -----------------------------------------------------------------

    def _set_mem_table(self, value: vu.MemTable, fds: list[int]) -> None:
        self._need_owner("SET_MEM_TABLE")
        table = map_table(value.regions, fds)
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
        add_region(self.memory, value, fds.pop())

    def _rem_mem_reg(self, value: vu.MemRegion, _fds: list[int]) -> None:
        self._need_owner("REM_MEM_REG")
        if not self._has_protocol(vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS):
            raise ProtocolViolation("REM_MEM_REG without PROTOCOL_F_CONFIGURE_MEM_SLOTS")
        # vhost-user.rst: "identified by its guest address, user address and size. The
        # mmap offset is ignored." (An fd it may carry is closed unused, as it MUST be.)
        mapping = self.memory.remove(value.guest_phys_addr, value.memory_size, value.userspace_addr)
        if mapping is None:
            log.debug("REM_MEM_REG at gpa 0x%x: other references keep it mapped", value.guest_phys_addr)
            return
        # The last reference: rings are stopped before the region is unmapped, so that
        # none keeps a view into it, and restarted in what is left.
        running = self.running()
        for ring in running:
            self._stop_ring(ring)
        if mapping.owned:
            mapping.region.close()
        for ring in running:
            self._try_start(ring)

    def _remap_rings(self, table: MemoryTable) -> None:
        """Install a new memory table; running rings are re-translated into it."""
        running = self.running()
        for ring in running:
            self._stop_ring(ring)
        self.memory = table
        for ring in running:
            self._try_start(ring)

    # -- ring configuration -----------------------------------------------------

    def _ring(self, index: int, what: str) -> RingState:
        self._need_owner(what)
        if not 0 <= index < self.num_queues:
            raise ProtocolViolation(f"{what} for ring {index}: the device has {self.num_queues}")
        return self.rings[index]

    def _set_vring_num(self, value: vu.VringState, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_NUM")
        num = value.num
        check_num(self._ring_format, ring.index, num)
        if ring.queue is not None:
            raise ProtocolViolation(f"SET_VRING_NUM on running ring {ring.index}")
        ring.num = num

    def _set_vring_addr(self, value: vu.VringAddr, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_ADDR")
        if not len(self.memory):
            raise ProtocolViolation("SET_VRING_ADDR before SET_MEM_TABLE")
        check_addr(self._ring_format, ring.index, value)
        running = ring.queue is not None
        if running:
            self._stop_ring(ring)
        ring.addr = value
        if ring.num:
            # Check the addresses now, not at first kick.
            make_queue(ring, self.memory, self.acked_features, None).release()
        if running:
            self._try_start(ring)

    def _set_vring_base(self, value: vu.VringState, _fds: list[int]) -> None:
        ring = self._ring(value.index, "SET_VRING_BASE")
        if value.num > 0xFFFF and self._ring_format == "split":
            # vhost-user.rst: a split ring's base is a 16-bit avail index (a packed one's 32 bits).
            raise ProtocolViolation(
                f"SET_VRING_BASE {value.num} for ring {ring.index}: a split ring index is 16 bits"
            )
        if ring.queue is not None:
            raise ProtocolViolation(f"SET_VRING_BASE on running ring {ring.index}")
        if self._ring_format == "packed" and ring.num:
            avail, _aw, used, _uw = parse_packed_base(value.num)
            if max(avail, used) >= ring.num:
                raise ProtocolViolation(
                    f"SET_VRING_BASE for ring {ring.index}: ring base 0x{value.num:08x} points outside "
                    f"{ring.num} descriptors"
                )
        ring.base = value.num

    def _get_vring_base(self, value: vu.VringState, _fds: list[int]) -> vu.Outgoing:
        ring = self._ring(value.index, "GET_VRING_BASE")
        # vhost-user.rst: stop the ring; like libvhost-user and DPDK, its
        # eventfds are dropped too (the frontend sends new ones to restart).
        self._stop_ring(ring)
        ring.close_fds()
        return vu.encode_reply(vu.GET_VRING_BASE, vu.VringState(ring.index, ring.base))

    def _vring_fd(self, value: vu.VringFile, fds: list[int], what: str) -> tuple[RingState, int]:
        ring = self._ring(value.index, what)
        if value.nofd:
            return ring, -1
        fd = fds.pop()
        if not is_eventfd(fd):
            close_fd(fd)
            raise ProtocolViolation(f"{what} for ring {ring.index}: the fd is not an eventfd")
        os.set_blocking(fd, False)  # a full counter must never block the back end
        return ring, fd

    def _set_vring_kick(self, value: vu.VringFile, fds: list[int]) -> None:
        ring, fd = self._vring_fd(value, fds, "SET_VRING_KICK")
        self._stop_ring(ring)
        if ring.kick >= 0:
            close_fd(ring.kick)
        ring.kick = fd
        ring.kick_polled = fd < 0
        self._try_start(ring)

    def _set_vring_call(self, value: vu.VringFile, fds: list[int]) -> None:
        ring, fd = self._vring_fd(value, fds, "SET_VRING_CALL")
        if ring.call >= 0:
            close_fd(ring.call)
        ring.call = fd
        if fd >= 0 and ring.call_missed:
            # Completed while the ring had no call fd: tell the driver now ("Ring life cycle").
            ring.call_missed = False
            self._actions.append(Notify(ring, fd))

    def _set_vring_err(self, value: vu.VringFile, fds: list[int]) -> None:
        ring, fd = self._vring_fd(value, fds, "SET_VRING_ERR")
        if ring.err >= 0:
            close_fd(ring.err)
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

    @property
    def _ring_format(self) -> str:
        return ring_format(self.acked_features)

    def _try_start(self, ring: RingState) -> None:
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
        ring.queue = start_queue(ring, self.memory, self.acked_features, self._inflight)
        log.debug("ring %d started: size %d, base 0x%x", ring.index, ring.num, ring.queue.base)
        self._actions.append(StartRing(ring, ring.kick))  # work may have been queued before the kick fd

    def _stop_ring(self, ring: RingState) -> None:
        queue = ring.queue
        if queue is None:
            return
        ring.base = queue.base  # GET_VRING_BASE's answer (packed: with the wrap counters)
        if ring.inflight is not None:
            ring.inflight.detach()  # what is still flagged is found again at the next start
            ring.inflight = None
        queue.release()
        ring.queue = None
        self._actions.append(StopRing(ring, ring.kick))
        log.debug("ring %d stopped at 0x%x", ring.index, ring.base)
