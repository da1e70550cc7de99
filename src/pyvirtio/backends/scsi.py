"""The virtio-scsi device model of the embedded back end (virtio 1.2 §5.6).

:class:`ScsiBackend` is a virtio-scsi host adapter with one or more logical
units (:class:`ScsiLun`), each a :class:`~pyvirtio.backends.blk.Storage`
(RAM or a file) addressed as (target, LUN). It executes requests taken from
descriptor chains, like the blk model, and knows nothing of sockets: the
vhost-user server (:mod:`pyvirtio.backends.server`) or
:func:`loopback_scsi` feeds it.

Queues: 0 control (task management, asynchronous notification), 1 event,
2.. requests. A request is ``virtio_scsi_cmd_req`` (19 + cdb_size bytes,
device-readable) and data-out, then ``virtio_scsi_cmd_resp`` (12 +
sense_size bytes, device-writable) and data-in; header and response may be
split over any number of descriptors.

Commands (SPC-4 / SBC-3): INQUIRY (standard; VPD 0x00, 0x80, 0x83, 0xB0,
0xB1, 0xB2), TEST UNIT READY, REQUEST SENSE, START STOP UNIT, READ CAPACITY
(10) and (16), READ / WRITE (6, 10, 12, 16), UNMAP, WRITE SAME(16),
SYNCHRONIZE CACHE (10, 16), MODE SENSE (6, 10), REPORT LUNS. Anything else
ends in CHECK CONDITION, ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
A new LUN (and a LUN after LOGICAL UNIT RESET) holds a UNIT ATTENTION that
the first command other than INQUIRY / REPORT LUNS / REQUEST SENSE receives,
as real targets do.

Addressing: ``lun[0]`` must be 1 and ``lun[1]`` a target that has a LUN,
otherwise the response is BAD_TARGET; a LUN field that is not single-level
(bytes 4..7 non-zero, a bus number, an unknown method) is INCORRECT_LUN. On
a present target, a missing LUN answers INQUIRY with peripheral qualifier
3, REPORT LUNS with the target's list, and anything else with CHECK
CONDITION / LOGICAL UNIT NOT SUPPORTED (SPC-4 §4.6.4).

Hot plug: :meth:`ScsiBackend.add_lun` / :meth:`~ScsiBackend.remove_lun`
(thread-safe) queue a TRANSPORT_RESET event (reason RESCAN / REMOVED). An
event is written into an event-queue buffer only when there is one to send:
the model tells the server so through ``gated_queues`` / :meth:`pending`,
and wakes it through ``wake_fd`` (an eventfd), so the frontend's posted
buffers stay posted until then. Events that find the queue too long are
dropped and the next event carries VIRTIO_SCSI_T_EVENTS_MISSED.

Distrust, as in the blk model: every header length, LUN address, CDB field,
LBA range, parameter list and buffer length is checked; a bad request ends
with a virtio response code (BAD_TARGET, INCORRECT_LUN, OVERRUN, FAILURE) or
CHECK CONDITION with sense, a log line and an error count, and the device
goes on. A chain without room for the response is completed with length 0.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtio.backends.blk import Storage
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import DEVICE_ID_SCSI, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from pyvirtio.transport.loopback import LoopbackTransport

log = logging.getLogger("pyvirtio.backends.scsi")

BE16, BE32, BE64 = T.BE16, T.BE32, T.BE64

#: Most events held for a frontend that has posted no event buffer; more are dropped (EVENTS_MISSED).
MAX_PENDING_EVENTS = 64
#: virtio 1.2 §5.6.6.2: a TMF response of 0 (VIRTIO_SCSI_S_OK) reads "function complete".
FUNCTION_COMPLETE = S.S_OK
_RW_CHUNK = 1 << 20


class _Reject(Exception):
    """A command ends in CHECK CONDITION with this sense key / ASC / ASCQ."""

    def __init__(self, key: int, code: tuple[int, int], why: str = "") -> None:
        super().__init__(why)
        self.key = key
        self.asc, self.ascq = code


class _Overrun(Exception):
    """The CDB asks for more data than the buffers hold: response VIRTIO_SCSI_S_OVERRUN."""


def _illegal(code: tuple[int, int] = T.ASC_INVALID_FIELD_IN_CDB, why: str = "") -> _Reject:
    return _Reject(T.ILLEGAL_REQUEST, code, why)


class ScsiLun:
    """One logical unit: a Storage seen as ``num_blocks`` blocks of ``block_size`` bytes."""

    def __init__(
        self,
        storage: Storage,
        *,
        block_size: int = 512,
        vendor: str = "PYVIRTIO",
        product: str | None = None,
        revision: str = "0001",
        serial: str | None = None,
        readonly: bool | None = None,
        started: bool = True,
        unmap: bool = True,
        write_cache: bool | None = None,
        max_transfer_blocks: int | None = None,
        optimal_transfer_blocks: int = 0,
        max_unmap_blocks: int = 1 << 22,
        max_unmap_descriptors: int = 16,
        unmap_granularity: int = 1,
        max_write_same_blocks: int = 1 << 22,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1) or block_size > 1 << 16:
            raise ValueError(f"block size must be a power of two in 512..65536, got {block_size}")
        self.storage = storage
        self.block_size = block_size
        self.num_blocks = storage.size // block_size
        if self.num_blocks == 0:
            raise ValueError(f"storage of {storage.size} bytes holds no {block_size}-byte block")
        self.vendor = vendor
        self.product = product or ("FILE DISK" if storage.path else "RAM DISK")
        self.revision = revision
        self.serial = serial
        self.readonly = storage.readonly if readonly is None else readonly
        self.started = started
        self.unmap = unmap
        self.write_cache = storage.path is not None if write_cache is None else write_cache
        self.max_transfer_blocks = (4 << 20) // block_size if max_transfer_blocks is None else max_transfer_blocks
        self.optimal_transfer_blocks = optimal_transfer_blocks
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        self.unmap_granularity = unmap_granularity
        self.max_write_same_blocks = max_write_same_blocks
        #: Unit attention conditions not yet reported (oldest first).
        self.pending_ua: list[tuple[int, int]] = [T.ASC_POWER_ON_RESET]
        self.resets = 0
        self.commands = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    def info(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity,
            "block_size": self.block_size,
            "file": self.storage.path,
            "readonly": self.readonly,
            "vendor": self.vendor,
            "product": self.product,
            "unmap": self.unmap,
        }


@dataclass
class _Cmd:
    """One command being executed."""

    target: int
    lun_id: int
    lun: ScsiLun | None
    cdb: bytes
    data_out: list[memoryview]
    dout_len: int
    data_in: list[memoryview]
    din_len: int
    din_written: int = 0
    dout_used: int = 0


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def _take(bufs: list[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for b in bufs:
        if n <= 0:
            break
        piece = b[:n]
        out.append(piece)
        n -= len(piece)
    return out


def _gather(bufs: list[memoryview], n: int) -> bytes:
    return b"".join(bytes(b) for b in _take(bufs, n))


def _scatter(bufs: list[memoryview], data: bytes | memoryview) -> int:
    pos = 0
    for b in bufs:
        if pos >= len(data):
            break
        take = min(len(b), len(data) - pos)
        b[:take] = data[pos : pos + take]
        pos += take
    return pos


def _ascii(text: str | None, width: int) -> bytes:
    raw = (text or "").encode("ascii", "replace")[:width]
    return raw.ljust(width, b" ")


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
    ) -> None:
        if request_queues < 1:
            raise ValueError("a virtio-scsi device needs at least one request queue")
        if sense_format not in ("fixed", "descriptor"):
            raise ValueError("sense_format must be 'fixed' or 'descriptor'")
        if not 0 <= max_target <= 255 or not 0 <= max_lun <= 16383:
            raise ValueError("max_target must be 0..255 and max_lun 0..16383")
        self.request_queues = request_queues
        self.num_queues = S.FIRST_REQUEST_QUEUE + request_queues
        self.max_target = max_target
        self.max_lun = max_lun
        self.seg_max = seg_max
        self.max_sectors = max_sectors
        self.cmd_per_lun = cmd_per_lun
        self.sense_format = sense_format
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
        for (t, lun), unit in (luns or {}).items():
            self._check_address(t, lun)
            self._luns[(t, lun)] = unit

    # -- device model interface ------------------------------------------------------

    def features(self) -> int:
        return (1 << F_VERSION_1) | (1 << F_RING_EVENT_IDX) | (1 << F_RING_INDIRECT_DESC) | (1 << S.F_HOTPLUG)

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
        with self._lock:
            self._events.clear()
            self._events_missed = False

    def info(self) -> dict[str, Any]:
        return {
            "request_queues": self.request_queues,
            "max_target": self.max_target,
            "max_lun": self.max_lun,
            "luns": {f"{t}:{lun}": unit.info() for (t, lun), unit in sorted(self._luns.items())},
            "events_sent": self.events_sent,
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

    def _check_address(self, target: int, lun: int) -> None:
        if not 0 <= target <= self.max_target or not 0 <= lun <= self.max_lun:
            raise ValueError(f"{target}:{lun} is outside targets 0..{self.max_target}, LUNs 0..{self.max_lun}")

    def add_lun(self, target: int, lun: int, unit: ScsiLun) -> ScsiLun:
        """Attach ``unit`` at target:lun and tell the frontend (TRANSPORT_RESET, RESCAN)."""
        self._check_address(target, lun)
        with self._lock:
            if (target, lun) in self._luns:
                raise ValueError(f"LUN {target}:{lun} already exists")
            for (t, _l), other in self._luns.items():
                if t == target:
                    other.pending_ua.append(T.ASC_REPORTED_LUNS_CHANGED)
            self._luns = {**self._luns, (target, lun): unit}
        self._push_event(S.T_TRANSPORT_RESET, target, lun, S.EVT_RESET_RESCAN)
        return unit

    def remove_lun(self, target: int, lun: int) -> ScsiLun:
        """Detach target:lun and tell the frontend (TRANSPORT_RESET, REMOVED).

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
        self._push_event(S.T_TRANSPORT_RESET, target, lun, S.EVT_RESET_REMOVED)
        return unit

    def push_event(self, event: int, target: int, lun: int, reason: int) -> None:
        """Queue any event for the frontend (tests: ASYNC_NOTIFY, PARAM_CHANGE...)."""
        self._push_event(event, target, lun, reason)

    def _push_event(self, event: int, target: int, lun: int, reason: int) -> None:
        with self._lock:
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
            return _scatter(writable, bytes([self._tmf(subtype, lun8, tag)]))
        if ctype in (S.T_AN_QUERY, S.T_AN_SUBSCRIBE):
            if len(raw) < S.CTRL_AN_REQ.size or chain.writable_len < S.CTRL_AN_RESP.size:
                self._bad(S.CONTROL_QUEUE, chain.head, "AN request or response too short")
                return 0
            _t, lun8, _wanted = S.CTRL_AN_REQ.unpack_from(raw)
            response = S.S_OK if isinstance(self._resolve(lun8), tuple) else self._resolve(lun8)
            # No asynchronous notification is supported: event_actual 0.
            return _scatter(writable, S.CTRL_AN_RESP.pack(0, response))
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
        data_in = _skip(writable, resp_size)
        din_len = chain.writable_len - resp_size
        if chain.readable_len < req_size:
            self._bad(queue, chain.head, f"request header of {chain.readable_len} bytes, need {req_size}")
            return self._respond(writable, S.S_FAILURE, T.GOOD, b"", din_len)
        header = _gather(readable, req_size)
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
        data_out = _skip(readable, req_size)
        cmd = _Cmd(
            target, lun_id, self._luns.get(where), cdb, data_out, chain.readable_len - req_size, data_in, din_len
        )
        try:
            self._execute(cmd)
        except _Reject as rej:
            # CHECK CONDITION is an ordinary SCSI answer (initiators probe what is supported).
            self.check_conditions += 1
            log.debug(
                "queue %d: %s on %d:%d: CHECK CONDITION %s, %s %s",
                queue, T.opcode_name(cdb), target, lun_id, T.SENSE_KEY_NAMES[rej.key],
                T.asc_name(rej.asc, rej.ascq), rej,
            )
            return self._respond(writable, S.S_OK, T.CHECK_CONDITION, self._sense(rej.key, (rej.asc, rej.ascq)),
                                 din_len)
        except _Overrun as exc:
            self._bad(queue, chain.head, f"{T.opcode_name(cdb)} on {target}:{lun_id}: overrun: {exc}")
            return self._respond(writable, S.S_OVERRUN, T.GOOD, b"", din_len)
        except OSError as exc:
            # The storage failed (EIO, ENOSPC...): the command fails, the device goes on.
            self._bad(queue, chain.head, f"{T.opcode_name(cdb)} on {target}:{lun_id}: {exc}")
            key = T.MEDIUM_ERROR
            code = T.ASC_WRITE_ERROR if cmd.dout_used else T.ASC_UNRECOVERED_READ_ERROR
            return self._respond(writable, S.S_OK, T.CHECK_CONDITION, self._sense(key, code), din_len)
        resid = (din_len - cmd.din_written) if cmd.din_len else max(0, cmd.dout_len - cmd.dout_used)
        return self._respond(writable, S.S_OK, T.GOOD, b"", resid, cmd.din_written)

    def _sense(self, key: int, code: tuple[int, int], fmt: str | None = None) -> bytes:
        if (fmt or self.sense_format) == "descriptor":
            return T.descriptor_sense(key, *code)
        return T.fixed_sense(key, *code)

    def _respond(
        self, writable: list[memoryview], response: int, status: int, sense: bytes, resid: int, data: int = 0
    ) -> int:
        sense = sense[: self.sense_size]
        head = S.CMD_RESP_HDR.pack(len(sense), resid & 0xFFFFFFFF, 0, status, response)
        resp = head + sense.ljust(self.sense_size, b"\0")
        _scatter(writable, resp)
        return len(resp) + data

    # -- command execution ------------------------------------------------------------------

    def _execute(self, cmd: _Cmd) -> None:
        cdb = cmd.cdb
        op = cdb[0]
        unit = cmd.lun
        if op == T.INQUIRY:
            return self._inquiry(cmd)
        if op == T.REPORT_LUNS:
            return self._report_luns(cmd)
        if unit is None:
            if op == T.REQUEST_SENSE:
                return self._data_in(cmd, self._sense(T.ILLEGAL_REQUEST, T.ASC_LUN_NOT_SUPPORTED), cdb[4])
            raise _illegal(T.ASC_LUN_NOT_SUPPORTED, "no such LUN")
        unit.commands += 1
        if op == T.REQUEST_SENSE:
            fmt = "descriptor" if cdb[1] & 1 else "fixed"
            if unit.pending_ua:
                sense = self._sense(T.UNIT_ATTENTION, unit.pending_ua.pop(0), fmt)
            elif not unit.started:
                sense = self._sense(T.NOT_READY, T.ASC_LUN_NEEDS_START, fmt)
            else:
                sense = self._sense(T.NO_SENSE, T.ASC_NO_ADDITIONAL_SENSE, fmt)
            return self._data_in(cmd, sense, cdb[4])
        if unit.pending_ua:
            raise _Reject(T.UNIT_ATTENTION, unit.pending_ua.pop(0))
        handler = self._HANDLERS.get(op)
        if handler is None:
            raise _illegal(T.ASC_INVALID_OPCODE, f"unsupported opcode 0x{op:02x}")
        if op == T.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F != T.SAI_READ_CAPACITY_16:
            raise _illegal(T.ASC_INVALID_FIELD_IN_CDB, f"service action 0x{cdb[1] & 0x1F:02x}")
        if not unit.started and op not in (T.START_STOP_UNIT, T.MODE_SENSE_6, T.MODE_SENSE_10):
            raise _Reject(T.NOT_READY, T.ASC_LUN_NEEDS_START, "stopped")
        handler(self, cmd, unit)
        return None

    def _data_in(self, cmd: _Cmd, data: bytes, alloc: int) -> None:
        """Return ``data`` cut to the allocation length; more than the buffer holds is an overrun."""
        n = min(len(data), alloc)
        if n > cmd.din_len:
            raise _Overrun(f"{n} bytes to return, data-in buffer of {cmd.din_len}")
        cmd.din_written = _scatter(cmd.data_in, data[:n])

    def _inquiry(self, cmd: _Cmd) -> None:
        cdb = cmd.cdb
        evpd = cdb[1] & 1
        page = cdb[2]
        alloc = BE16.unpack_from(cdb, 3)[0]
        unit = cmd.lun
        if unit is None:
            # SPC-4 §6.6.2: peripheral qualifier 3, type 0x1F: no LUN here.
            first = T.QUALIFIER_NOT_SUPPORTED << 5 | T.TYPE_NO_LUN
            if evpd:
                raise _illegal(T.ASC_LUN_NOT_SUPPORTED, "VPD of a missing LUN")
            data = bytes([first, 0, 6, 0x12, T.STANDARD_INQUIRY_LEN - 5]) + bytes(T.STANDARD_INQUIRY_LEN - 5)
            return self._data_in(cmd, data, alloc)
        if not evpd:
            if page:
                raise _illegal(why="page code without EVPD")
            data = (
                bytes([T.TYPE_DISK, 0, 0x06, 0x12, T.STANDARD_INQUIRY_LEN - 5, 0, 0, 0x02])
                + _ascii(unit.vendor, 8)
                + _ascii(unit.product, 16)
                + _ascii(unit.revision, 4)
            )
            return self._data_in(cmd, data, alloc)
        return self._data_in(cmd, self._vpd(cmd, unit, page), alloc)

    def _serial(self, cmd: _Cmd, unit: ScsiLun) -> str:
        return unit.serial or f"PYV{cmd.target:03d}{cmd.lun_id:05d}"

    def _vpd(self, cmd: _Cmd, unit: ScsiLun, page: int) -> bytes:
        def page_of(body: bytes) -> bytes:
            return bytes([T.TYPE_DISK, page]) + BE16.pack(len(body)) + body

        if page == T.VPD_SUPPORTED_PAGES:
            pages = [
                T.VPD_SUPPORTED_PAGES,
                T.VPD_UNIT_SERIAL,
                T.VPD_DEVICE_ID,
                T.VPD_BLOCK_LIMITS,
                T.VPD_BLOCK_CHARACTERISTICS,
                T.VPD_LB_PROVISIONING,
            ]
            return page_of(bytes(pages))
        if page == T.VPD_UNIT_SERIAL:
            return page_of(self._serial(cmd, unit).encode())
        if page == T.VPD_DEVICE_ID:
            serial = self._serial(cmd, unit).encode()
            t10 = _ascii(unit.vendor, 8) + serial
            # T10 vendor ID designator (ASCII), then an NAA 6 one derived from the serial.
            desig = bytes([0x02, 0x01, 0x00, len(t10)]) + t10
            naa = (0x6 << 60) | (0x5_2549_56 << 24) | (zlib.crc32(serial) & 0xFFFFFF)
            desig += bytes([0x01, 0x03, 0x00, 16]) + BE64.pack(naa) + BE64.pack(zlib.crc32(t10))
            return page_of(desig)
        if page == T.VPD_BLOCK_LIMITS:
            body = bytearray(T.BLOCK_LIMITS_LEN - 4)
            body[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is refused
            BE32.pack_into(body, T.BL_MAX_TRANSFER - 4, unit.max_transfer_blocks)
            BE32.pack_into(body, T.BL_OPTIMAL_TRANSFER - 4, unit.optimal_transfer_blocks)
            if unit.unmap:
                BE32.pack_into(body, T.BL_MAX_UNMAP_LBA_COUNT - 4, unit.max_unmap_blocks)
                BE32.pack_into(body, T.BL_MAX_UNMAP_DESCRIPTORS - 4, unit.max_unmap_descriptors)
                BE32.pack_into(body, T.BL_UNMAP_GRANULARITY - 4, unit.unmap_granularity)
                BE32.pack_into(body, T.BL_UNMAP_ALIGNMENT - 4, 0x80000000)  # UGAVALID, alignment 0
            BE64.pack_into(body, T.BL_MAX_WRITE_SAME - 4, unit.max_write_same_blocks)
            return page_of(bytes(body))
        if page == T.VPD_BLOCK_CHARACTERISTICS:
            body = bytearray(0x3C)
            BE16.pack_into(body, 0, 1)  # medium rotation rate 1: non-rotating
            return page_of(bytes(body))
        if page == T.VPD_LB_PROVISIONING:
            flags = (T.LBP_LBPU | T.LBP_LBPWS | 1 << T.LBP_LBPRZ_SHIFT) if unit.unmap else 0
            return page_of(bytes([0, flags, 0x02 if unit.unmap else 0, 0]))
        raise _illegal(why=f"VPD page 0x{page:02x} not supported")

    def _report_luns(self, cmd: _Cmd) -> None:
        cdb = cmd.cdb
        select = cdb[2]
        alloc = BE32.unpack_from(cdb, 6)[0]
        if select not in (0, 1, 2):
            raise _illegal(why=f"SELECT REPORT 0x{select:02x}")
        if alloc < 16:
            raise _illegal(why=f"allocation length {alloc} < 16")  # SPC-4 §6.33
        ids = sorted(lun for t, lun in self._luns if t == cmd.target) if select != 1 else []
        body = b"".join(T.encode_lun(lun) for lun in ids)
        return self._data_in(cmd, BE32.pack(len(body)) + bytes(4) + body, alloc)

    def _tur(self, cmd: _Cmd, unit: ScsiLun) -> None:
        return None  # readiness and unit attentions were checked by _execute

    def _start_stop(self, cmd: _Cmd, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        if cdb[4] & 0xF0:  # a power condition: not supported
            raise _illegal(why="power condition")
        unit.started = bool(cdb[4] & 1)

    def _read_capacity_10(self, cmd: _Cmd, unit: ScsiLun) -> None:
        last = min(unit.num_blocks - 1, 0xFFFFFFFF)
        return self._data_in(cmd, BE32.pack(last) + BE32.pack(unit.block_size), 8)

    def _read_capacity_16(self, cmd: _Cmd, unit: ScsiLun) -> None:
        alloc = BE32.unpack_from(cmd.cdb, 10)[0]
        data = bytearray(32)
        BE64.pack_into(data, 0, unit.num_blocks - 1)
        BE32.pack_into(data, 8, unit.block_size)
        if unit.unmap:
            data[14] = 0xC0  # LBPME, LBPRZ
        return self._data_in(cmd, bytes(data), alloc)

    @staticmethod
    def _rw_fields(cdb: bytes) -> tuple[int, int]:
        """(LBA, blocks) of a READ / WRITE CDB of any size."""
        op = cdb[0]
        if op in (T.READ_6, T.WRITE_6):
            lba = (cdb[1] & 0x1F) << 16 | cdb[2] << 8 | cdb[3]
            return lba, cdb[4] or 256  # SBC-3 §5.15: 0 means 256 blocks
        if op in (T.READ_10, T.WRITE_10):
            return BE32.unpack_from(cdb, 2)[0], BE16.unpack_from(cdb, 7)[0]
        if op in (T.READ_12, T.WRITE_12):
            return BE32.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 6)[0]
        return BE64.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 10)[0]

    @staticmethod
    def _check_range(unit: ScsiLun, lba: int, blocks: int) -> None:
        if lba + blocks > unit.num_blocks:
            raise _illegal(T.ASC_LBA_OUT_OF_RANGE, f"blocks {lba}+{blocks} beyond {unit.num_blocks}")

    def _read(self, cmd: _Cmd, unit: ScsiLun) -> None:
        lba, blocks = self._rw_fields(cmd.cdb)
        self._check_range(unit, lba, blocks)
        if unit.max_transfer_blocks and blocks > unit.max_transfer_blocks:
            raise _illegal(why=f"{blocks} blocks > maximum transfer {unit.max_transfer_blocks}")
        n = blocks * unit.block_size
        if n > cmd.din_len:
            raise _Overrun(f"{n} bytes to read, data-in buffer of {cmd.din_len}")
        if n:
            unit.storage.readinto(_take(cmd.data_in, n), lba * unit.block_size)
        cmd.din_written = n

    def _write(self, cmd: _Cmd, unit: ScsiLun) -> None:
        lba, blocks = self._rw_fields(cmd.cdb)
        if unit.readonly:
            raise _Reject(T.DATA_PROTECT, T.ASC_WRITE_PROTECTED)
        self._check_range(unit, lba, blocks)
        if unit.max_transfer_blocks and blocks > unit.max_transfer_blocks:
            raise _illegal(why=f"{blocks} blocks > maximum transfer {unit.max_transfer_blocks}")
        n = blocks * unit.block_size
        if n > cmd.dout_len:
            raise _Overrun(f"{n} bytes to write, data-out buffer of {cmd.dout_len}")
        cmd.dout_used = n
        if n:
            unit.storage.writefrom(_take(cmd.data_out, n), lba * unit.block_size)

    def _sync_cache(self, cmd: _Cmd, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        if cdb[0] == T.SYNCHRONIZE_CACHE_10:
            lba, blocks = BE32.unpack_from(cdb, 2)[0], BE16.unpack_from(cdb, 7)[0]
        else:
            lba, blocks = BE64.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 10)[0]
        self._check_range(unit, lba, blocks)  # 0 blocks: to the end of the medium
        unit.storage.flush()

    def _unmap(self, cmd: _Cmd, unit: ScsiLun) -> None:
        if not unit.unmap:
            raise _illegal(T.ASC_INVALID_OPCODE, "UNMAP on a LUN without logical block provisioning")
        if unit.readonly:
            raise _Reject(T.DATA_PROTECT, T.ASC_WRITE_PROTECTED)
        cdb = cmd.cdb
        plen = BE16.unpack_from(cdb, 7)[0]
        if plen == 0:
            return  # SBC-3 §5.28: not an error, nothing to do
        if plen > cmd.dout_len:
            raise _Overrun(f"parameter list of {plen} bytes, data-out buffer of {cmd.dout_len}")
        if plen < 8:
            raise _illegal(T.ASC_PARAMETER_LIST_LENGTH_ERROR, f"parameter list of {plen} bytes")
        cmd.dout_used = plen
        params = _gather(cmd.data_out, plen)
        desc_len = BE16.unpack_from(params, 2)[0]
        if desc_len % 16 or 8 + desc_len > plen:
            raise _illegal(T.ASC_PARAMETER_LIST_LENGTH_ERROR, f"block descriptor data length {desc_len}")
        count = desc_len // 16
        if count > unit.max_unmap_descriptors:
            raise _illegal(T.ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"{count} descriptors > {unit.max_unmap_descriptors}")
        ranges = []
        for i in range(count):
            lba = BE64.unpack_from(params, 8 + 16 * i)[0]
            n = BE32.unpack_from(params, 16 + 16 * i)[0]
            if n > unit.max_unmap_blocks:
                raise _illegal(T.ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"{n} blocks > {unit.max_unmap_blocks}")
            self._check_range(unit, lba, n)
            ranges.append((lba, n))
        bs = unit.block_size
        for lba, n in ranges:
            if n:
                unit.storage.zero(lba * bs, n * bs)  # LBPRZ: unmapped blocks read as zeroes

    def _write_same_16(self, cmd: _Cmd, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        if unit.readonly:
            raise _Reject(T.DATA_PROTECT, T.ASC_WRITE_PROTECTED)
        unmap = bool(cdb[1] & 0x08)
        ndob = bool(cdb[1] & 0x01)
        lba, blocks = BE64.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 10)[0]
        if blocks == 0 or blocks > unit.max_write_same_blocks:
            raise _illegal(why=f"WRITE SAME of {blocks} blocks (1..{unit.max_write_same_blocks})")
        if unmap and not unit.unmap:
            raise _illegal(why="UNMAP bit on a LUN without logical block provisioning")
        self._check_range(unit, lba, blocks)
        bs = unit.block_size
        if ndob:
            pattern = bytes(bs)
        else:
            if cmd.dout_len < bs:
                raise _Overrun(f"one {bs}-byte block to write, data-out buffer of {cmd.dout_len}")
            pattern = _gather(cmd.data_out, bs)
            cmd.dout_used = bs
        if not any(pattern):
            unit.storage.zero(lba * bs, blocks * bs)
            return
        per = max(1, _RW_CHUNK // bs)
        chunk = pattern * min(per, blocks)
        done = 0
        while done < blocks:
            n = min(per, blocks - done)
            unit.storage.writefrom([memoryview(chunk)[: n * bs]], (lba + done) * bs)
            done += n

    def _mode_pages(self, unit: ScsiLun, page: int, pc: int) -> bytes:
        caching = bytearray(20)
        caching[0:2] = b"\x08\x12"
        control = bytearray(12)
        control[0:2] = b"\x0a\x0a"
        if pc != 1:  # current / default values (pc 1 = changeable: nothing is)
            caching[2] = 0x04 if unit.write_cache else 0  # WCE
            control[2] = 0x04 if self.sense_format == "descriptor" else 0  # D_SENSE
        if pc == 3:
            raise _illegal(T.ASC_SAVING_PARAMETERS_NOT_SUPPORTED, "saved values")
        if page == 0x08:
            return bytes(caching)
        if page == 0x0A:
            return bytes(control)
        if page == 0x3F:
            return bytes(caching) + bytes(control)
        raise _illegal(why=f"mode page 0x{page:02x}")

    def _mode_sense(self, cmd: _Cmd, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        six = cdb[0] == T.MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        llbaa = not six and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise _illegal(why=f"mode subpage 0x{subpage:02x}")
        pages = self._mode_pages(unit, page, pc)
        wp = 0x80 if unit.readonly else 0
        if dbd:
            desc = b""
        elif llbaa:
            desc = BE64.pack(unit.num_blocks) + bytes(4) + BE32.pack(unit.block_size)
        else:
            desc = BE32.pack(min(unit.num_blocks, 0xFFFFFFFF)) + b"\0" + BE32.pack(unit.block_size)[1:]
        if six:
            total = 4 + len(desc) + len(pages)
            head = bytes([total - 1, 0, wp, len(desc)])
            alloc = cdb[4]
        else:
            total = 8 + len(desc) + len(pages)
            head = BE16.pack(total - 2) + bytes([0, wp, 1 if llbaa else 0, 0]) + BE16.pack(len(desc))
            alloc = BE16.unpack_from(cdb, 7)[0]
        return self._data_in(cmd, head + desc + pages, alloc)

    _HANDLERS: dict[int, Callable[[ScsiBackend, _Cmd, ScsiLun], None]] = {
        T.TEST_UNIT_READY: _tur,
        T.START_STOP_UNIT: _start_stop,
        T.READ_CAPACITY_10: _read_capacity_10,
        T.SERVICE_ACTION_IN_16: _read_capacity_16,
        T.READ_6: _read,
        T.READ_10: _read,
        T.READ_12: _read,
        T.READ_16: _read,
        T.WRITE_6: _write,
        T.WRITE_10: _write,
        T.WRITE_12: _write,
        T.WRITE_16: _write,
        T.SYNCHRONIZE_CACHE_10: _sync_cache,
        T.SYNCHRONIZE_CACHE_16: _sync_cache,
        T.UNMAP: _unmap,
        T.WRITE_SAME_16: _write_same_16,
        T.MODE_SENSE_6: _mode_sense,
        T.MODE_SENSE_10: _mode_sense,
    }


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
