"""The virtio-scsi device model of the embedded back end: virtio-scsi framing (virtio 1.2 §5.6).

:class:`ScsiBackend` is a virtio-scsi host adapter with one or more logical
units (:class:`~pyvirtio.backends.scsi_target.ScsiLun`), addressed as
(target, LUN). It takes requests from descriptor chains, like the blk
model, and knows nothing of sockets: the vhost-user server
(:mod:`pyvirtio.backends.server`) or :func:`loopback_scsi` feeds it. This
module is the virtio side: request and response layouts, LUN addresses, the
control queue (task management, asynchronous notification) and the event
queue. What a command *does* (INQUIRY, READ CAPACITY, READ / WRITE, UNMAP,
MODE SENSE, unit attentions, sense data...) is the SCSI target emulation's:
:mod:`pyvirtio.backends.scsi_target`.

Queues: 0 control, 1 event, 2.. requests. A request is
``virtio_scsi_cmd_req`` (19 + cdb_size bytes, device-readable) and data-out,
then ``virtio_scsi_cmd_resp`` (12 + sense_size bytes, device-writable) and
data-in; header and response may be split over any number of descriptors.
The response carries the virtio response code, the SCSI status, the sense
data (cut to sense_size) and the residual (virtio 1.2 §5.6.6.1).

Addressing: ``lun[0]`` must be 1 and ``lun[1]`` a target that has a LUN,
otherwise the response is BAD_TARGET; a LUN field that is not single-level
(bytes 4..7 non-zero, a bus number, an unknown method) is INCORRECT_LUN
(virtio 1.2 §5.6.6.1: "first byte set to 1, second byte set to target,
third and fourth byte representing a single level LUN structure, followed
by four zero bytes"). A LUN missing on a present target is the target
emulation's to answer.

Hot plug: :meth:`ScsiBackend.add_lun` / :meth:`~ScsiBackend.remove_lun`
(thread-safe) queue a TRANSPORT_RESET event (reason RESCAN / REMOVED) for a
driver that negotiated VIRTIO_SCSI_F_HOTPLUG, and for no other (virtio 1.2
§5.6.6.3: "The device MUST NOT send VIRTIO_SCSI_T_TRANSPORT_RESET messages
with reason set to VIRTIO_SCSI_EVT_RESET_REMOVED or
VIRTIO_SCSI_EVT_RESET_RESCAN unless VIRTIO_SCSI_F_HOTPLUG was negotiated");
the other LUNs of the target report REPORTED LUNS DATA HAS CHANGED either
way, the spec's sense-code path. A driver negotiating without the feature
also drops such events still queued for its predecessor. An event is
written into an event-queue buffer only when there is one to send: the
model tells the server so through ``gated_queues`` / :meth:`pending`, and
wakes it through ``wake_fd`` (an eventfd), so the frontend's posted
buffers stay posted until then. Events that find the queue too long are
dropped and the next event carries VIRTIO_SCSI_T_EVENTS_MISSED.

Config space: the back end serves ``virtio_scsi_config`` (GET/SET_CONFIG,
PROTOCOL_F_CONFIG) unless built with ``config_space=False``: then, as SPDK's
vhost-user-scsi targets do, CONFIG is not offered and the frontend builds
the config itself (num_queues from GET_QUEUE_NUM minus 2, cdb_size 32,
sense_size 96...); requests use the default sizes.

Parameter changes (VIRTIO_SCSI_F_CHANGE, offered): :meth:`ScsiBackend.resize_lun`
changes a LUN's capacity; the LUN holds CAPACITY DATA HAS CHANGED for its
next command, and a driver that negotiated the feature (only such a
driver, as for hot plug) gets a VIRTIO_SCSI_T_PARAM_CHANGE event (reason:
ASC 2Ah | ASCQ 09h << 8) at once (virtio 1.2 §5.6.6.3: "the same event
SHOULD also be reported as a unit attention condition").

Distrust, as in the blk model: every header length, LUN address and buffer
length is checked here, every CDB field by the target emulation; a bad
request ends with a virtio response code (BAD_TARGET, INCORRECT_LUN,
OVERRUN, FAILURE) or CHECK CONDITION with sense, a log line and an error
count, and the device goes on. A chain without room for the response is
completed with length 0.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

from pyvirtio.backends.blk import Storage
from pyvirtio.backends.model import RING_FEATURES
from pyvirtio.backends.scsi_target import ScsiCommand, ScsiLun, ScsiTarget
from pyvirtio.backends.sglist import gather, scatter, skip
from pyvirtio.errors import ScsiCheckCondition, ScsiOverrun
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import DEVICE_ID_SCSI
from pyvirtio.transport.loopback import LoopbackTransport

log = logging.getLogger("pyvirtio.backends.scsi")

__all__ = [
    "FUNCTION_COMPLETE",
    "MAX_PENDING_EVENTS",
    "ScsiBackend",
    "ScsiLoopback",
    "ScsiLun",
    "loopback_scsi",
    "ram_lun",
]

#: Most events held for a frontend that has posted no event buffer; more are dropped (EVENTS_MISSED).
MAX_PENDING_EVENTS = 64
#: virtio 1.2 §5.6.6.2: a TMF response of 0 (VIRTIO_SCSI_S_OK) reads "function complete".
FUNCTION_COMPLETE = S.S_OK


class ScsiBackend:
    """A virtio-scsi host adapter over LUNs (see the module docstring)."""

    #: Queues whose chains the model takes only when :meth:`pending` says so (the event queue).
    gated_queues = (S.EVENT_QUEUE,)

    def __init__(
        self,
        luns: dict[tuple[int, int], ScsiLun] | None = None,
        *,
        request_queues: int = 1,
        max_target: int = 255,
        max_lun: int = 16383,
        seg_max: int = 126,
        max_sectors: int = 0xFFFF,
        cmd_per_lun: int = 128,
        sense_format: str = "fixed",
        config_space: bool = True,
    ) -> None:
        if request_queues < 1:
            raise ValueError("a virtio-scsi device needs at least one request queue")
        #: The SCSI target emulation: what each command does (backends/scsi_target.py).
        self.emulation = ScsiTarget(self._lun_ids, sense_format=sense_format)
        if not 0 <= max_target <= 255 or not 0 <= max_lun <= 16383:
            raise ValueError("max_target must be 0..255 and max_lun 0..16383")
        self.request_queues = request_queues
        self.num_queues = S.FIRST_REQUEST_QUEUE + request_queues
        self.max_target = max_target
        self.max_lun = max_lun
        self.seg_max = seg_max
        self.max_sectors = max_sectors
        self.cmd_per_lun = cmd_per_lun
        #: False: the frontend keeps the virtio-scsi config (no PROTOCOL_F_CONFIG offered), as
        #: SPDK's vhost-user-scsi targets and QEMU's vhost-user-scsi frontend expect.
        self.config_space = config_space
        self.cdb_size = S.CDB_SIZE
        self.sense_size = S.SENSE_SIZE
        self._lock = threading.Lock()
        # Replaced, never mutated, so the data path reads it without the lock.
        self._luns: dict[tuple[int, int], ScsiLun] = {}
        self._retired: list[ScsiLun] = []
        self._events: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self._events_missed = False
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: Called (outside the lock) after an event is queued; loopback_scsi delivers with it.
        self.on_event: Callable[[], None] | None = None
        #: Malformed requests (logged as warnings) and CHECK CONDITION answers (logged at debug).
        self.errors = 0
        self.check_conditions = 0
        self.tmfs: list[tuple[int, int, int, int]] = []  # (subtype, target, lun, tag)
        self.events_sent = 0
        #: The driver negotiated VIRTIO_SCSI_F_CHANGE: parameter changes are sent as events.
        self.change_events = False
        #: The driver negotiated VIRTIO_SCSI_F_HOTPLUG: LUNs added / removed are sent as events.
        self.hotplug_events = False
        for (t, lun), unit in (luns or {}).items():
            self._check_address(t, lun)
            self._luns[(t, lun)] = unit

    # -- device model interface ------------------------------------------------------

    def features(self) -> int:
        return (
            RING_FEATURES
            | (1 << S.F_HOTPLUG)
            | (1 << S.F_CHANGE)
        )

    def negotiated(self, features: int) -> None:
        """The driver's features: PARAM_CHANGE events only with VIRTIO_SCSI_F_CHANGE, hot-plug
        events only with VIRTIO_SCSI_F_HOTPLUG; events of a kind it did not take, still queued, go."""
        with self._lock:
            self.change_events = bool(features >> S.F_CHANGE & 1)
            self.hotplug_events = bool(features >> S.F_HOTPLUG & 1)
            kept = [e for e in self._events if self._allowed(e[0], e[2])]
            if len(kept) < len(self._events):
                log.debug("%d queued event(s) of features the driver did not take dropped",
                          len(self._events) - len(kept))
                self._events = collections.deque(kept)

    def _allowed(self, event: int, reason: int) -> bool:
        """Whether the driver's features allow sending this event (virtio 1.2 §5.6.6.3)."""
        if event == S.T_TRANSPORT_RESET and reason in (S.EVT_RESET_RESCAN, S.EVT_RESET_REMOVED):
            return self.hotplug_events
        if event == S.T_PARAM_CHANGE:
            return self.change_events
        return True

    def config(self) -> bytes:
        cfg = bytearray(S.CONFIG_SIZE)
        struct.pack_into(
            "<IIIIIII",
            cfg,
            0,
            self.request_queues,
            self.seg_max,
            self.max_sectors,
            self.cmd_per_lun,
            S.EVENT.size,
            self.sense_size,
            self.cdb_size,
        )
        struct.pack_into("<HHI", cfg, 28, 0, self.max_target, self.max_lun)
        return bytes(cfg)

    def set_config(self, offset: int, data: bytes) -> None:
        """virtio 1.2 §5.6.4: the driver may write sense_size and cdb_size, nothing else."""
        fields = {20: "sense_size", 24: "cdb_size"}
        if offset not in fields or len(data) != 4:
            raise ValueError(f"config bytes {offset}+{len(data)} are read-only (only sense_size, cdb_size)")
        value = struct.unpack("<I", data)[0]
        name = fields[offset]
        low, high = (16, 256) if name == "cdb_size" else (0, 256)
        if not low <= value <= high:
            raise ValueError(f"{name} {value} out of range {low}..{high}")
        setattr(self, name, value)

    def reset(self) -> None:
        """Device reset: default sizes, no pending events (virtio 1.2 §5.6.4)."""
        self.cdb_size = S.CDB_SIZE
        self.sense_size = S.SENSE_SIZE
        self.change_events = False  # features are negotiated again after a reset
        self.hotplug_events = False
        with self._lock:
            self._events.clear()
            self._events_missed = False

    def info(self) -> dict[str, Any]:
        return {
            "request_queues": self.request_queues,
            "config_space": self.config_space,
            "max_target": self.max_target,
            "max_lun": self.max_lun,
            "luns": {f"{t}:{lun}": unit.info() for (t, lun), unit in sorted(self._luns.items())},
            "events_sent": self.events_sent,
            "change_events": self.change_events,
            "hotplug_events": self.hotplug_events,
            "errors": self.errors,
        }

    def close(self) -> None:
        """Close every LUN's storage (also removed ones) and the wake fd."""
        with self._lock:
            units = [*self._luns.values(), *self._retired]
            self._luns = {}
            self._retired = []
        for unit in units:
            unit.storage.close()
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1

    # -- LUNs and hot plug -------------------------------------------------------------

    @property
    def luns(self) -> dict[tuple[int, int], ScsiLun]:
        return dict(self._luns)

    @property
    def sense_format(self) -> str:
        return self.emulation.sense_format

    def _lun_ids(self, target: int) -> list[int]:
        """The LUNs present on ``target``, sorted (REPORT LUNS)."""
        return sorted(lun for t, lun in self._luns if t == target)

    def _check_address(self, target: int, lun: int) -> None:
        if not 0 <= target <= self.max_target or not 0 <= lun <= self.max_lun:
            raise ValueError(f"{target}:{lun} is outside targets 0..{self.max_target}, LUNs 0..{self.max_lun}")

    def add_lun(self, target: int, lun: int, unit: ScsiLun) -> ScsiLun:
        """Attach ``unit`` at target:lun and tell the frontend (TRANSPORT_RESET, RESCAN; with HOTPLUG)."""
        self._check_address(target, lun)
        with self._lock:
            if (target, lun) in self._luns:
                raise ValueError(f"LUN {target}:{lun} already exists")
            for (t, _l), other in self._luns.items():
                if t == target:
                    other.pending_ua.append(T.ASC_REPORTED_LUNS_CHANGED)
            self._luns = {**self._luns, (target, lun): unit}
        self._push_event(S.T_TRANSPORT_RESET, target, lun, S.EVT_RESET_RESCAN, gated=True)
        return unit

    def remove_lun(self, target: int, lun: int) -> ScsiLun:
        """Detach target:lun and tell the frontend (TRANSPORT_RESET, REMOVED; with HOTPLUG).

        The storage stays open until :meth:`close`: a command may still be using it.
        """
        with self._lock:
            unit = self._luns.get((target, lun))
            if unit is None:
                raise ValueError(f"no LUN {target}:{lun}")
            self._luns = {k: v for k, v in self._luns.items() if k != (target, lun)}
            self._retired.append(unit)
            for (t, _l), other in self._luns.items():
                if t == target:
                    other.pending_ua.append(T.ASC_REPORTED_LUNS_CHANGED)
        self._push_event(S.T_TRANSPORT_RESET, target, lun, S.EVT_RESET_REMOVED, gated=True)
        return unit

    def resize_lun(self, target: int, lun: int, size: int) -> int:
        """Give LUN target:lun ``size`` bytes (thread-safe); returns its new number of blocks.

        The LUN reports CAPACITY DATA HAS CHANGED (2Ah/09h) as a unit attention
        on its next command, as a real target does; if the driver negotiated
        VIRTIO_SCSI_F_CHANGE, a VIRTIO_SCSI_T_PARAM_CHANGE event with that ASC /
        ASCQ in ``reason`` tells it at once (virtio 1.2 §5.6.6.3).
        """
        with self._lock:
            unit = self._luns.get((target, lun))
            if unit is None:
                raise ValueError(f"no LUN {target}:{lun}")
            blocks = unit.resize(size)
        asc, ascq = T.ASC_CAPACITY_CHANGED
        self._push_event(S.T_PARAM_CHANGE, target, lun, asc | ascq << 8, gated=True)
        return blocks

    def push_event(self, event: int, target: int, lun: int, reason: int) -> None:
        """Queue any event for the frontend, whatever it negotiated (tests: ASYNC_NOTIFY, PARAM_CHANGE...)."""
        self._push_event(event, target, lun, reason, gated=False)

    def _push_event(self, event: int, target: int, lun: int, reason: int, *, gated: bool) -> None:
        """Queue an event; ``gated``: only if the driver's features allow it (checked under the lock,
        so that a driver negotiating meanwhile never gets one it did not take)."""
        with self._lock:
            if gated and not self._allowed(event, reason):
                return
            if len(self._events) >= MAX_PENDING_EVENTS:
                self._events_missed = True
                log.warning("event queue full: event %d for %d:%d dropped (EVENTS_MISSED)", event, target, lun)
            else:
                self._events.append((event, S.lun_address(target, lun), reason))
        if self.wake_fd >= 0:
            try:
                os.eventfd_write(self.wake_fd, 1)
            except (BlockingIOError, OSError):
                pass
        hook = self.on_event
        if hook is not None:
            hook()

    def pending(self, queue: int) -> int:
        """How many chains the model wants from ``queue`` now (the server asks for gated queues)."""
        if queue != S.EVENT_QUEUE:
            return 1 << 16
        with self._lock:
            return len(self._events) + (1 if self._events_missed and not self._events else 0)

    # -- requests --------------------------------------------------------------------------

    def handle(self, queue: int, chain: Chain) -> int:
        """Execute one request; returns the number of bytes written into the chain."""
        if queue >= S.FIRST_REQUEST_QUEUE:
            return self._command(queue, chain)
        if queue == S.CONTROL_QUEUE:
            return self._control(chain)
        return self._event(chain)

    def _bad(self, queue: int, head: int, why: str) -> None:
        self.errors += 1
        log.warning("queue %d request %d: %s", queue, head, why)

    # -- event queue

    def _event(self, chain: Chain) -> int:
        if chain.readable or chain.writable_len < S.EVENT.size:
            # virtio 1.2 §5.6.6.3: an event buffer is device-writable, at least 16 bytes.
            self._bad(S.EVENT_QUEUE, chain.head, f"event buffer of {chain.writable_len} writable bytes "
                      f"({chain.readable_len} readable): returned unused")
            return 0
        with self._lock:
            missed = S.T_EVENTS_MISSED if self._events_missed else 0
            if self._events:
                event, lun, reason = self._events.popleft()
            else:
                event, lun, reason = S.T_NO_EVENT, bytes(8), 0
            self._events_missed = False
        self.events_sent += 1
        return chain.write(S.EVENT.pack(event | missed, lun, reason))

    # -- control queue

    def _control(self, chain: Chain) -> int:
        raw = chain.read_all()
        writable = list(chain.writable)
        if len(raw) < 4:
            self._bad(S.CONTROL_QUEUE, chain.head, f"control request of {len(raw)} bytes")
            return 0
        ctype = struct.unpack_from("<I", raw)[0]
        if ctype == S.T_TMF:
            if len(raw) < S.CTRL_TMF_REQ.size or chain.writable_len < S.CTRL_TMF_RESP_SIZE:
                self._bad(S.CONTROL_QUEUE, chain.head, "TMF request or response too short")
                return 0
            _t, subtype, lun8, tag = S.CTRL_TMF_REQ.unpack_from(raw)
            return scatter(writable, bytes([self._tmf(subtype, lun8, tag)]))
        if ctype in (S.T_AN_QUERY, S.T_AN_SUBSCRIBE):
            if len(raw) < S.CTRL_AN_REQ.size or chain.writable_len < S.CTRL_AN_RESP.size:
                self._bad(S.CONTROL_QUEUE, chain.head, "AN request or response too short")
                return 0
            _t, lun8, _wanted = S.CTRL_AN_REQ.unpack_from(raw)
            response = S.S_OK if isinstance(self._resolve(lun8), tuple) else self._resolve(lun8)
            # No asynchronous notification is supported: event_actual 0.
            return scatter(writable, S.CTRL_AN_RESP.pack(0, response))
        self._bad(S.CONTROL_QUEUE, chain.head, f"unknown control request type {ctype}")
        return 0

    def _tmf(self, subtype: int, lun8: bytes, tag: int) -> int:
        where = self._resolve(lun8)
        if not isinstance(where, tuple):
            return where
        target, lun_id = where
        unit = self._luns.get((target, lun_id))
        self.tmfs.append((subtype, target, lun_id, tag))
        del self.tmfs[:-100]
        if subtype == S.T_TMF_I_T_NEXUS_RESET:
            for (t, _l), other in self._luns.items():
                if t == target:
                    other.pending_ua.append(T.ASC_I_T_NEXUS_LOSS)
            return FUNCTION_COMPLETE
        if unit is None:
            return S.S_INCORRECT_LUN
        if subtype == S.T_TMF_LOGICAL_UNIT_RESET:
            unit.resets += 1
            unit.pending_ua.append(T.ASC_BUS_DEVICE_RESET)
            return FUNCTION_COMPLETE
        if subtype in (S.T_TMF_ABORT_TASK, S.T_TMF_ABORT_TASK_SET, S.T_TMF_CLEAR_TASK_SET, S.T_TMF_CLEAR_ACA):
            # Commands run to completion inside handle(): nothing is ever in flight to abort,
            # and "task not found" is FUNCTION COMPLETE (SAM-5 §7.2).
            return FUNCTION_COMPLETE
        if subtype in (S.T_TMF_QUERY_TASK, S.T_TMF_QUERY_TASK_SET):
            return FUNCTION_COMPLETE  # no such task
        return S.S_FUNCTION_REJECTED

    # -- request queues

    def _resolve(self, lun8: bytes | memoryview) -> tuple[int, int] | int:
        """(target, LUN) of a virtio-scsi LUN field, or the response code that refuses it."""
        if lun8[0] != 1:
            return S.S_BAD_TARGET
        target = lun8[1]
        if target > self.max_target or not any(t == target for t, _l in self._luns):
            return S.S_BAD_TARGET
        if any(lun8[4:8]):
            return S.S_INCORRECT_LUN
        method = lun8[2] >> 6
        if method == 0 and not lun8[2] & 0x3F:
            lun = int(lun8[3])
        elif method == 1:
            lun = (lun8[2] & 0x3F) << 8 | lun8[3]
        else:
            return S.S_INCORRECT_LUN
        if lun > self.max_lun:
            return S.S_INCORRECT_LUN
        return target, lun

    def _command(self, queue: int, chain: Chain) -> int:
        req_size = 19 + self.cdb_size
        resp_size = 12 + self.sense_size
        writable = list(chain.writable)
        if chain.writable_len < resp_size:
            self._bad(queue, chain.head, f"{chain.writable_len} writable bytes, the response needs {resp_size}")
            return 0
        readable = list(chain.readable)
        data_in = skip(writable, resp_size)
        din_len = chain.writable_len - resp_size
        if chain.readable_len < req_size:
            self._bad(queue, chain.head, f"request header of {chain.readable_len} bytes, need {req_size}")
            return self._respond(writable, S.S_FAILURE, T.GOOD, b"", din_len)
        header = gather(readable, req_size)
        lun8 = header[:8]
        cdb = header[19:req_size]
        where = self._resolve(lun8)
        if not isinstance(where, tuple):
            if where == S.S_BAD_TARGET and lun8[0] == 1:
                # An absent target: every scan asks about them; not the frontend's fault.
                log.debug("queue %d: no target %d", queue, lun8[1])
            else:
                self._bad(queue, chain.head, f"LUN field {lun8.hex()}: {S.RESPONSE_NAMES[where]}")
            return self._respond(writable, where, T.GOOD, b"", din_len)
        target, lun_id = where
        data_out = skip(readable, req_size)
        cmd = ScsiCommand(
            target, lun_id, self._luns.get(where), cdb, data_out, chain.readable_len - req_size, data_in, din_len
        )
        emulation = self.emulation
        try:
            emulation.execute(cmd)
        except ScsiCheckCondition as rej:
            # CHECK CONDITION is an ordinary SCSI answer (initiators probe what is supported).
            self.check_conditions += 1
            log.debug(
                "queue %d: %s on %d:%d: CHECK CONDITION %s, %s %s",
                queue, T.opcode_name(cdb), target, lun_id, T.SENSE_KEY_NAMES[rej.key],
                T.asc_name(rej.asc, rej.ascq), rej,
            )
            return self._respond(writable, S.S_OK, T.CHECK_CONDITION, emulation.sense(rej.key, (rej.asc, rej.ascq)),
                                 din_len)
        except ScsiOverrun as exc:
            self._bad(queue, chain.head, f"{T.opcode_name(cdb)} on {target}:{lun_id}: overrun: {exc}")
            return self._respond(writable, S.S_OVERRUN, T.GOOD, b"", din_len)
        except OSError as exc:
            # The storage failed (EIO, ENOSPC...): the command fails, the device goes on.
            self._bad(queue, chain.head, f"{T.opcode_name(cdb)} on {target}:{lun_id}: {exc}")
            key = T.MEDIUM_ERROR
            code = T.ASC_WRITE_ERROR if cmd.dout_used else T.ASC_UNRECOVERED_READ_ERROR
            return self._respond(writable, S.S_OK, T.CHECK_CONDITION, emulation.sense(key, code), din_len)
        resid = (din_len - cmd.din_written) if cmd.din_len else max(0, cmd.dout_len - cmd.dout_used)
        return self._respond(writable, S.S_OK, T.GOOD, b"", resid, cmd.din_written)

    def _respond(
        self, writable: list[memoryview], response: int, status: int, sense: bytes, resid: int, data: int = 0
    ) -> int:
        sense = sense[: self.sense_size]
        head = S.CMD_RESP_HDR.pack(len(sense), resid & 0xFFFFFFFF, 0, status, response)
        resp = head + sense.ljust(self.sense_size, b"\0")
        scatter(writable, resp)
        return len(resp) + data


class ScsiLoopback(LoopbackTransport):
    """An in-process virtio-scsi device: a LoopbackTransport that honours the event-queue gate.

    Events queued by the backend are delivered at once (``backend.on_event``)
    into buffers the driver has posted; without a buffer they wait for the
    next kick of the event queue.
    """

    def __init__(self, backend: ScsiBackend, *, queue_size: int = 256, auto: bool = True) -> None:
        super().__init__(
            device_id=DEVICE_ID_SCSI,
            features=backend.features(),
            config=backend.config(),
            num_queues=backend.num_queues,
            queue_size=queue_size,
            default_handler=backend.handle,
            auto=auto,
        )
        self.backend = backend
        backend.on_event = self._deliver

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.backend.negotiated(features)

    def read_config(self, offset: int, length: int) -> bytes:
        self.config = bytearray(self.backend.config())
        return super().read_config(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self.backend.set_config(offset, data)
        self.config = bytearray(self.backend.config())

    def _reset_device(self) -> None:
        super()._reset_device()
        self.backend.reset()

    def _deliver(self) -> None:
        if S.EVENT_QUEUE in self.queues and self.auto:
            self.process(S.EVENT_QUEUE)

    def process(self, index: int, limit: int | None = None) -> int:
        if index in self.backend.gated_queues:
            allowed = self.backend.pending(index)
            limit = allowed if limit is None else min(limit, allowed)
            if limit == 0:
                return 0
        return super().process(index, limit)

    def close(self) -> None:
        self.backend.on_event = None
        super().close()


def loopback_scsi(backend: ScsiBackend, *, queue_size: int = 256, auto: bool = True) -> ScsiLoopback:
    """An in-process virtio-scsi device over ``backend`` (tests, examples)."""
    return ScsiLoopback(backend, queue_size=queue_size, auto=auto)


def ram_lun(size: int, **kw: Any) -> ScsiLun:
    """A LUN over a RAM disk of ``size`` bytes."""
    return ScsiLun(Storage(size=size), **kw)
