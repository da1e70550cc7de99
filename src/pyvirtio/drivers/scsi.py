"""VirtioScsi: the virtio-scsi driver (virtio 1.2 §5.6; SPDK's bdev_virtio_scsi).

Theory of operation. :class:`VirtioScsi` negotiates HOTPLUG (plus the ring
features), reads the config (num_queues, seg_max, max_sectors, cdb_size,
sense_size, max_target, max_lun) and starts queue 0 (control), queue 1
(events) and ``num_queues`` request queues. As in the blk driver, each thread
doing I/O gets a request queue of its own on first use
(``find_and_acquire(2)``); header and response slots are allocated once per
queue, data is bounced through the shared pool unless a
:class:`~pyvirtio.memory.Buffer` from ``scsi.pool`` is given. The control and
event queues belong to whichever thread does management work at the time,
one at a time (a lock, then acquire / release around it).

A request is ``virtio_scsi_cmd_req`` (LUN, tag, task attribute, CDB padded
to ``cdb_size``), data-out, then ``virtio_scsi_cmd_resp`` (sense_len, resid,
status, response, ``sense_size`` bytes of sense) and data-in. Every
completion is checked: the virtio response code first (BAD_TARGET and
INCORRECT_LUN raise :class:`LunNotFound`; any other non-OK code is an error,
where SPDK ignores it), then the SCSI status; CHECK CONDITION sense, fixed or
descriptor format, becomes a :class:`ScsiError` carrying key, ASC, ASCQ and
their names. A response the device never wrote, a sense length beyond
``sense_size`` or a residual beyond the buffer are device faults; a READ /
WRITE that moved fewer bytes than asked is an error, never silent success.
A command that meets UNIT ATTENTION is sent again (at most ``ua_retries``
times), as after a reset or a LUN change every initiator sees one.

Scan (:meth:`VirtioScsi.scan`; SPDK's, extended): for each target
0..max_target, REPORT LUNS (SPDK looks at LUN 0 only; a target that does not
support it falls back to LUN 0); per LUN, standard INQUIRY (a disk,
qualifier 0), TEST UNIT READY (again after UNIT ATTENTION; START STOP UNIT
when the LUN says it needs one, NOT READY / 04h 02h, which is the condition
SPDK meant to test), VPD 0x00 and then 0xB0 (block limits), 0xB2
(provisioning: UNMAP, WRITE SAME with UNMAP) and 0x80 (serial) when listed,
READ CAPACITY(10) and (16) when the capacity does not fit, and MODE SENSE(6)
for write protection. Every command is tried at most
:data:`MAX_ATTEMPTS` times while the answer is transient (BUSY, RESET, UNIT
ATTENTION, BECOMING READY...); BAD_TARGET / INCORRECT_LUN mean "absent".

I/O on a LUN goes through :class:`ScsiDisk` (``scsi.disk(target, lun)``):
READ / WRITE (10), or (16) when the LBA or length needs it; transfers above
the LUN's limit (block limits, max_sectors, shared memory) are split by the
sync API and refused by the request builders. UNMAP is split by the block
limits (blocks per descriptor, descriptors per command); SYNCHRONIZE CACHE
flushes (SPDK advertises flush and fails it); ``write_zeroes(unmap=True)``
is WRITE SAME(16) with the UNMAP bit when the LUN reports LBPWS.

Task management: :meth:`VirtioScsi.lun_reset` (LOGICAL UNIT RESET) and
:meth:`~VirtioScsi.abort_task` (ABORT TASK; SPDK has none) on the control
queue. Events: buffers stay posted on the event queue; :meth:`poll_events`
reaps them, re-posts them, and turns TRANSPORT_RESET (RESCAN: the LUN is
probed; REMOVED: it is dropped), PARAM_CHANGE and EVENTS_MISSED (a full
rescan) into :class:`ScsiEvent` objects, also passed to the callbacks
registered with :meth:`~VirtioScsi.on_event`. ``scsi.event_fd`` becomes
readable when events arrive (for select / asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers._checks import check_data, check_range
from pyvirtio.drivers._queues import ThreadQueues
from pyvirtio.errors import (
    BlockIOError,
    DeviceProtocolError,
    InvalidArgument,
    QueueFull,
    QueueStateError,
    TransportTimeout,
)
from pyvirtio.memory import Buffer
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import DEVICE_ID_SCSI, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC

BE16, BE32, BE64 = T.BE16, T.BE32, T.BE64

#: Features the driver asks for (the transport adds its own, e.g. vhost-user's bit 30).
#: INOUT (bidirectional commands), CHANGE and T10_PI are not used.
DRIVER_FEATURES = (1 << S.F_HOTPLUG) | (1 << F_RING_EVENT_IDX) | (1 << F_RING_INDIRECT_DESC)

#: Attempts per scan command while the answer is transient (SPDK's bound).
MAX_ATTEMPTS = 5
#: Times an I/O command is sent again after UNIT ATTENTION.
UA_RETRIES = 3
#: Event buffers kept posted (SPDK: 16).
EVENT_BUFFERS = 16
#: Largest CDB and sense buffer sizes accepted from the config (a hostile device cannot make slots huge).
MAX_CDB_SIZE = 256
MAX_SENSE_SIZE = 256

_RESP_SENTINEL = 0xFF  # a response code no device writes: "the response was never written"
_TRANSIENT_RESPONSES = frozenset({S.S_BUSY, S.S_RESET, S.S_ABORTED, S.S_TRANSPORT_FAILURE})
_IO_OPCODES = frozenset({T.READ_10, T.READ_16, T.WRITE_10, T.WRITE_16, T.READ_6, T.WRITE_6, T.READ_12, T.WRITE_12})
_TMF_NAMES = {**S.RESPONSE_NAMES, S.S_OK: "FUNCTION_COMPLETE"}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# -- errors -----------------------------------------------------------------------------


class ScsiError(BlockIOError):
    """A SCSI command failed: a virtio response other than OK, a SCSI status other than GOOD.

    ``response`` / ``response_name`` are the virtio-scsi response, ``status`` /
    ``status_name`` the SCSI status, and for CHECK CONDITION ``sense`` (a
    :class:`~pyvirtio.spec.t10.Sense`), ``key`` / ``key_name``, ``asc``, ``ascq``
    and ``asc_name``.
    """

    def __init__(
        self,
        op: str,
        target: int,
        lun: int,
        *,
        response: int = S.S_OK,
        status: int = T.GOOD,
        sense: T.Sense | None = None,
        offset: int = 0,
        length: int = 0,
        detail: str = "",
    ) -> None:
        status_name = T.STATUS_NAMES.get(status, f"status 0x{status:02x}")
        super().__init__(op, offset, length, status, status_name)
        self.target = target
        self.lun = lun
        self.response = response
        self.response_name = S.RESPONSE_NAMES.get(response, f"response {response}")
        self.sense = sense
        self.key = sense.key if sense else None
        self.key_name = sense.key_name if sense else None
        self.asc = sense.asc if sense else None
        self.ascq = sense.ascq if sense else None
        self.asc_name = sense.asc_name if sense else None
        where = f"{op} on {target}:{lun}" + (f" at offset {offset} length {length}" if length else "")
        if detail:
            why = detail
        elif response != S.S_OK:
            why = f"virtio response {self.response_name}"
        elif sense is not None:
            why = (
                f"{status_name}, {sense.key_name} ({sense.key:#x}), {sense.asc_name} "
                f"(ASC {sense.asc:#04x} ASCQ {sense.ascq:#04x})"
            )
        else:
            why = status_name
        self.args = (f"{where} failed: {why}",)

    def __str__(self) -> str:
        return str(self.args[0])


class LunNotFound(ScsiError):
    """The target or LUN does not exist (BAD_TARGET, INCORRECT_LUN, LOGICAL UNIT NOT SUPPORTED)."""


# -- requests ---------------------------------------------------------------------------


@dataclass(eq=False)
class ScsiRequest:
    """One SCSI command. Build with :class:`ScsiDisk` helpers or directly; ``submit`` / ``run``."""

    target: int
    lun: int
    cdb: bytes
    data_out: bytes | memoryview | Buffer | None = None
    data_in: int = 0  # bytes of data-in buffer
    into: Buffer | None = None  # zero copy data-in
    offset: int = 0  # for error messages: the byte range on the LUN
    length: int = 0
    task_attr: int = S.S_SIMPLE
    ua_retries: int = UA_RETRIES
    full_transfer: bool = False  # a residual is an error (READ / WRITE)
    # Filled in by the driver:
    tag: int = 0
    response: int | None = None
    status: int | None = None
    sense: bytes = b""
    resid: int = 0
    data: bytes | None = None
    written: int = 0
    attempts: int = 0
    done: bool = False
    error: BaseException | None = None
    _slot: int = -1
    _bounce: list[Buffer] = field(default_factory=list, repr=False)
    _segs: list[tuple[int, int, bool]] = field(default_factory=list, repr=False)
    _waiter: Any = field(default=None, repr=False)
    _cookie: int = 0  # free for the submitter (ScsiBench keeps its slot number here)

    @property
    def name(self) -> str:
        return T.opcode_name(self.cdb)

    @property
    def sense_data(self) -> T.Sense | None:
        return T.parse_sense(self.sense)

    @property
    def ok(self) -> bool:
        return self.done and self.exception() is None

    @property
    def transferred(self) -> int:
        """Data-in bytes the device says it moved (buffer length minus residual)."""
        return max(0, self.data_in - self.resid) if self.data_in else 0

    def exception(self) -> BaseException | None:
        """The error this request completed with, or None."""
        if self.error is not None:
            return self.error
        if self.response is None:
            return None
        kw: dict[str, Any] = {"offset": self.offset, "length": self.length}
        if self.response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN):
            return LunNotFound(self.name, self.target, self.lun, response=self.response, **kw)
        if self.response != S.S_OK:
            return ScsiError(self.name, self.target, self.lun, response=self.response, **kw)
        if self.status != T.GOOD:
            sense = self.sense_data
            cls = ScsiError
            if sense is not None and (sense.key, sense.asc, sense.ascq) == (T.ILLEGAL_REQUEST, 0x25, 0x00):
                cls = LunNotFound  # LOGICAL UNIT NOT SUPPORTED
            return cls(self.name, self.target, self.lun, status=self.status or 0, sense=sense, **kw)
        if self.full_transfer and self.resid:
            return ScsiError(
                self.name,
                self.target,
                self.lun,
                detail=f"short transfer: the device left {self.resid} of {self.length} bytes",
                **kw,
            )
        return None

    def check(self) -> None:
        """Raise the request's error (ScsiError / LunNotFound / transport error) if it failed."""
        exc = self.exception()
        if exc is not None:
            raise exc


class _QueueCtx:
    """Per-request-queue state: the virtqueue, header/response slots, tags, requests in flight."""

    def __init__(self, scsi: VirtioScsi, vq: Virtqueue) -> None:
        self.scsi = scsi
        self.vq = vq
        self.nslots = vq.size
        self.slots = scsi.pool.allocate(scsi._slot_size * self.nslots, align=64)
        if not scsi._in_device_memory(self.slots):
            scsi.pool.free(self.slots)
            raise QueueFull(f"queue {vq.index}: no room for request headers in the device's shared memory")
        self.slot_view = self.slots.view
        self.free_slots = list(range(self.nslots - 1, -1, -1))
        self.inflight = 0
        self.next_tag = vq.index << 48
        self.full_reason = ""

    def close(self) -> None:
        self.slot_view = memoryview(b"")
        self.scsi.pool.free(self.slots)


# -- scan results and events -------------------------------------------------------------------


@dataclass
class LunInfo:
    """What the scan learnt about one LUN."""

    target: int
    lun: int
    peripheral_type: int = T.TYPE_DISK
    vendor: str = ""
    product: str = ""
    revision: str = ""
    serial: str = ""
    block_size: int = 0
    num_blocks: int = 0
    readonly: bool = False
    unmap: bool = False  # UNMAP supported (VPD 0xB2 LBPU)
    write_same_unmap: bool = False  # WRITE SAME(16) with UNMAP (LBPWS)
    lbprz: bool = False
    vpd_pages: list[int] = field(default_factory=list)
    max_transfer_blocks: int = 0  # 0: not reported
    optimal_transfer_blocks: int = 0
    max_unmap_blocks: int = 0
    max_unmap_descriptors: int = 0
    unmap_granularity: int = 0
    max_write_same_blocks: int = 0
    read_capacity_16: bool = False
    started: bool = False  # START STOP UNIT was needed and sent

    @property
    def capacity(self) -> int:
        return self.block_size * self.num_blocks

    @property
    def is_disk(self) -> bool:
        return self.peripheral_type == T.TYPE_DISK

    @property
    def type_name(self) -> str:
        return T.PERIPHERAL_TYPE_NAMES.get(self.peripheral_type, f"type 0x{self.peripheral_type:02x}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "lun": self.lun,
            "type": self.type_name,
            "vendor": self.vendor,
            "product": self.product,
            "revision": self.revision,
            "serial": self.serial,
            "capacity": self.capacity,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "readonly": self.readonly,
            "unmap": self.unmap,
            "write_same_unmap": self.write_same_unmap,
            "max_transfer_blocks": self.max_transfer_blocks,
            "max_unmap_blocks": self.max_unmap_blocks,
            "max_unmap_descriptors": self.max_unmap_descriptors,
            "max_write_same_blocks": self.max_write_same_blocks,
            "vpd_pages": [f"0x{p:02x}" for p in self.vpd_pages],
        }


@dataclass
class ScsiEvent:
    """What an event meant: ``kind`` is added, removed, changed, reset, param_change, async, missed, unknown."""

    kind: str
    target: int = 0
    lun: int = 0
    event: int = 0
    reason: int = 0
    info: LunInfo | None = None


def _decode_event_lun(lun8: bytes) -> tuple[int, int]:
    target = lun8[1]
    method = lun8[2] >> 6
    lun = (lun8[2] & 0x3F) << 8 | lun8[3] if method == 1 else lun8[3]
    return target, lun


# -- CDBs ---------------------------------------------------------------------------------------


def inquiry_cdb(page: int | None, alloc: int) -> bytes:
    return bytes([T.INQUIRY, 0 if page is None else 1, page or 0]) + BE16.pack(alloc) + b"\0"


def rw_cdb(write: bool, lba: int, blocks: int, force16: bool = False) -> bytes:
    """READ / WRITE (10) when LBA and length fit, else (16)."""
    if not force16 and lba + blocks <= 1 << 32 and blocks <= 0xFFFF:
        return bytes([T.WRITE_10 if write else T.READ_10, 0]) + BE32.pack(lba) + b"\0" + BE16.pack(blocks) + b"\0"
    return bytes([T.WRITE_16 if write else T.READ_16, 0]) + BE64.pack(lba) + BE32.pack(blocks) + b"\0\0"


def read_capacity_16_cdb(alloc: int = 32) -> bytes:
    return bytes([T.SERVICE_ACTION_IN_16, T.SAI_READ_CAPACITY_16]) + bytes(8) + BE32.pack(alloc) + b"\0\0"


def report_luns_cdb(alloc: int) -> bytes:
    return bytes([T.REPORT_LUNS, 0, 0, 0, 0, 0]) + BE32.pack(alloc) + b"\0\0"


TEST_UNIT_READY_CDB = bytes(6)
START_UNIT_CDB = bytes([T.START_STOP_UNIT, 0, 0, 0, 0x01, 0])
READ_CAPACITY_10_CDB = bytes([T.READ_CAPACITY_10]) + bytes(9)


# -- the driver ---------------------------------------------------------------------------------


class VirtioScsi:
    """A virtio-scsi host adapter (see the module docstring)."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        num_queues: int | None = None,
        queue_size: int | None = None,
        extra_features: int = 0,
        event_idx: bool = True,
        poll: str = "hybrid",
        timeout: float | None = 30.0,
        scan: bool = True,
        targets: Iterable[int] | None = None,
    ) -> None:
        if poll not in ("busy", "wait", "hybrid"):
            raise InvalidArgument(f"poll must be busy, wait or hybrid, not {poll!r}")
        self.device = device
        self.pool = device.pool
        self.poll = poll
        self.timeout = timeout
        wanted = DRIVER_FEATURES | extra_features
        if not event_idx:
            wanted &= ~(1 << F_RING_EVENT_IDX)
        self.features = device.reset(wanted)
        cfg = S.parse_config(device.read_config(0, S.CONFIG_SIZE))
        self.config = cfg
        self.cdb_size = cfg.get("cdb_size", S.CDB_SIZE)
        self.sense_size = cfg.get("sense_size", S.SENSE_SIZE)
        if not 16 <= self.cdb_size <= MAX_CDB_SIZE or self.sense_size > MAX_SENSE_SIZE:
            device._fail()
            raise DeviceProtocolError(
                f"device config cdb_size {self.cdb_size} / sense_size {self.sense_size} out of range "
                f"(16..{MAX_CDB_SIZE} / 0..{MAX_SENSE_SIZE})"
            )
        self.seg_max = cfg.get("seg_max", 0)
        self.max_sectors = cfg.get("max_sectors", 0)
        self.cmd_per_lun = cfg.get("cmd_per_lun", 0)
        self.max_target = min(cfg.get("max_target", 255), 255)  # lun[1] is one byte
        self.max_lun = min(cfg.get("max_lun", 16383), 16383)  # single-level flat space
        self.hotplug = device.has_feature(S.F_HOTPLUG)
        transport_queues = device.transport.max_queues()
        self.max_queues = min(cfg.get("num_queues", 1) or 1, transport_queues - S.FIRST_REQUEST_QUEUE)
        if self.max_queues < 1:
            device._fail()
            raise DeviceProtocolError(
                f"the device has {transport_queues} queues; virtio-scsi needs control, event and a request queue"
            )
        nq = self.max_queues if num_queues is None else num_queues
        if not 1 <= nq <= self.max_queues:
            device._fail()
            raise InvalidArgument(f"num_queues must be 1..{self.max_queues}, got {nq}")
        device.start(nq, S.FIRST_REQUEST_QUEUE, queue_size=queue_size)
        self.num_queues = nq
        self.queue_size = device.queue(S.FIRST_REQUEST_QUEUE).size
        self.indirect = device.has_feature(F_RING_INDIRECT_DESC)
        # Slot layout: request header, then the response at an 8-byte boundary.
        self._req_size = 19 + self.cdb_size
        self._resp_size = 12 + self.sense_size
        self._resp_off = _align(self._req_size, 8)
        self._slot_size = _align(self._resp_off + self._resp_size, 64)
        self._regions = tuple(self.pool.regions)
        shared = sum(r.size for r in self._regions)
        self.max_transfer_bytes = min(shared // 2, 0xFFFFFFFF)
        if self.max_sectors:
            self.max_transfer_bytes = min(self.max_transfer_bytes, self.max_sectors * 512)
        self._queues: ThreadQueues[_QueueCtx] = ThreadQueues(
            device, S.FIRST_REQUEST_QUEUE, lambda vq: _QueueCtx(self, vq), "request queues"
        )
        self._mgmt_lock = threading.RLock()
        self._callbacks: list[Callable[[ScsiEvent], None]] = []
        self.luns: dict[tuple[int, int], LunInfo] = {}
        #: Targets / LUNs the last scan could not use, and why.
        self.scan_errors: dict[tuple[int, int], str] = {}
        self.events: list[ScsiEvent] = []  # the last 100 events, oldest first
        self._ctrl = self.pool.allocate(64, align=64)
        nev = min(EVENT_BUFFERS, device.queue(S.EVENT_QUEUE).size)
        self._event_bufs = self.pool.allocate(S.EVENT.size * nev, align=64)
        self._nevents = nev
        try:
            with self._mgmt() as (_cq, eq):
                for i in range(nev):
                    self._post_event(eq, i)
                eq.flush()
                eq.ring.enable_interrupts()
            if scan:
                self.scan(targets)
        except BaseException:
            self._free_mgmt()
            raise

    def _in_device_memory(self, buf: Buffer) -> bool:
        """Is ``buf`` in a region the device was told about when it started?"""
        return buf.region in self._regions

    # -- construction helpers -------------------------------------------------

    @classmethod
    def open(cls, target: str, **kw: Any) -> VirtioScsi:
        """Open ``vhost-user:PATH`` (or a plain socket path) as a virtio-scsi device."""
        from pyvirtio.targets import open_device

        transport_kw: dict[str, Any] = {"device_type": DEVICE_ID_SCSI}
        for name in ("queue_size", "connect_timeout"):
            if kw.get(name):
                transport_kw[name] = kw[name]
        kw.pop("connect_timeout", None)
        if kw.get("timeout"):
            transport_kw["timeout"] = kw["timeout"]
        device = open_device(target, **transport_kw)
        try:
            return cls(device, **kw)
        except BaseException:
            device.close()
            raise

    def close(self) -> None:
        self._queues.close()
        self._free_mgmt()
        self.device.close()

    def _free_mgmt(self) -> None:
        for name in ("_ctrl", "_event_bufs"):
            buf = getattr(self, name, None)
            if buf is not None and not self.device.closed:
                self.pool.free(buf)
                setattr(self, name, None)

    def __enter__(self) -> VirtioScsi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        out = self.device.info()
        out["scsi"] = {
            "num_queues": self.num_queues,
            "max_queues": self.max_queues,
            "seg_max": self.seg_max,
            "max_sectors": self.max_sectors,
            "cmd_per_lun": self.cmd_per_lun,
            "cdb_size": self.cdb_size,
            "sense_size": self.sense_size,
            "max_target": self.max_target,
            "max_lun": self.max_lun,
            "hotplug": self.hotplug,
            "config": self.config,
            "luns": [info.to_dict() for _k, info in sorted(self.luns.items())],
        }
        return out

    # -- per-thread request queues --------------------------------------------

    def _ctx(self) -> _QueueCtx:
        return self._queues.get()

    def thread_queue(self) -> _QueueCtx:
        return self._ctx()

    def release_queue(self) -> None:
        """Give the calling thread's queue back (it must have nothing in flight).

        A thread that ends without calling this keeps its queue only until
        another thread finds no free one (drivers/_queues.py).
        """
        self._queues.release()

    # -- submission and completion --------------------------------------------

    def _bounce(self, req: ScsiRequest, size: int) -> Buffer:
        buf = self.pool.allocate(max(size, 1), align=512 if size >= 512 else 8)
        if not self._in_device_memory(buf):
            self.pool.free(buf)
            raise QueueFull(
                f"{req.name}: no room for a {size}-byte buffer in the device's shared memory now; "
                "reap requests in flight or use smaller ones"
            )
        req._bounce.append(buf)
        return buf

    def _check_user_buffer(self, req: ScsiRequest, buf: Buffer) -> None:
        if not self._in_device_memory(buf):
            raise InvalidArgument(
                f"{req.name}: {buf!r} is not in the shared memory the device knows (the pool grew after start)"
            )

    def _post(self, ctx: _QueueCtx, req: ScsiRequest) -> None:
        """Put one request on the ring (no kick)."""
        if not ctx.free_slots:
            raise QueueFull(f"queue {ctx.vq.index}: {ctx.nslots} requests in flight")
        if len(req.cdb) > self.cdb_size:
            raise InvalidArgument(f"{req.name}: CDB of {len(req.cdb)} bytes, the device takes {self.cdb_size}")
        out_segs: list[tuple[int, int, bool]] = []
        in_segs: list[tuple[int, int, bool]] = []
        try:
            dout = req.data_out
            if isinstance(dout, Buffer):
                self._check_user_buffer(req, dout)
                out_segs.append((dout.addr, len(dout), False))
            elif dout is not None and len(dout):
                buf = self._bounce(req, len(dout))
                buf.view[: len(dout)] = dout
                out_segs.append((buf.addr, len(dout), False))
            if req.data_in:
                if req.into is not None:
                    self._check_user_buffer(req, req.into)
                    in_segs.append((req.into.addr, req.data_in, True))
                else:
                    buf = self._bounce(req, req.data_in)
                    in_segs.append((buf.addr, req.data_in, True))
        except BaseException:
            self._drop_bounce(req)
            raise
        slot = ctx.free_slots.pop()
        base = self._slot_size * slot
        addr = ctx.slots.addr + base
        sv = ctx.slot_view
        sv[base + 19 : base + self._req_size] = req.cdb.ljust(self.cdb_size, b"\0")
        req._segs = [(addr, self._req_size, False), *out_segs, (addr + self._resp_off, self._resp_size, True), *in_segs]
        req._slot = slot
        try:
            self._enqueue(ctx, req)
        except BaseException:
            ctx.free_slots.append(slot)
            req._slot = -1
            self._drop_bounce(req)
            raise
        ctx.inflight += 1

    def _enqueue(self, ctx: _QueueCtx, req: ScsiRequest) -> None:
        """Write the header (fresh tag) and response sentinel of ``req``'s slot and add its chain."""
        base = self._slot_size * req._slot
        sv = ctx.slot_view
        tag = ctx.next_tag
        ctx.next_tag = tag + 1
        req.tag = tag
        S.CMD_REQ_HDR.pack_into(sv, base, S.lun_address(req.target, req.lun), tag, req.task_attr, 0, 0)
        S.CMD_RESP_HDR.pack_into(sv, base + self._resp_off, 0, 0, 0, 0, _RESP_SENTINEL)
        segs = req._segs
        ring = ctx.vq.ring
        ctx.vq.start(req, len(segs))
        try:
            for a, n, w in segs:
                ring.add(a, n, w)
        except BaseException:
            ring.abort()
            raise
        req.attempts += 1
        req.done = False

    def _drop_bounce(self, req: ScsiRequest) -> None:
        for buf in req._bounce:
            self.pool.free(buf)
        req._bounce = []

    def _complete(self, ctx: _QueueCtx, req: ScsiRequest, written: int) -> bool:
        """Record a completion; False if the request was sent again (UNIT ATTENTION)."""
        base = self._slot_size * req._slot + self._resp_off
        sv = ctx.slot_view
        sense_len, resid, _qual, status, response = S.CMD_RESP_HDR.unpack_from(sv, base)
        req.written = written
        error: BaseException | None = None
        if response == _RESP_SENTINEL:
            error = DeviceProtocolError(f"{req.name} on {req.target}:{req.lun}: the device did not write a response")
        elif response not in S.RESPONSE_NAMES:
            error = DeviceProtocolError(
                f"{req.name} on {req.target}:{req.lun}: invalid virtio-scsi response {response}"
            )
        elif sense_len > self.sense_size:
            error = DeviceProtocolError(
                f"{req.name} on {req.target}:{req.lun}: sense_len {sense_len} exceeds sense_size {self.sense_size}"
            )
        else:
            limit = req.data_in if req.data_in else (len(req.data_out) if req.data_out is not None else 0)
            if resid > limit:
                error = DeviceProtocolError(
                    f"{req.name} on {req.target}:{req.lun}: residual {resid} exceeds the {limit}-byte buffer"
                )
        if error is None:
            req.response = response
            req.status = status
            req.resid = resid
            req.sense = bytes(sv[base + 12 : base + 12 + sense_len]) if sense_len else b""
            if (
                response == S.S_OK
                and status == T.CHECK_CONDITION
                and req.attempts <= req.ua_retries
                and (sense := T.parse_sense(req.sense)) is not None
                and sense.key == T.UNIT_ATTENTION
            ):
                try:
                    self._enqueue(ctx, req)
                    return False
                except QueueFull:
                    pass  # reported as the UNIT ATTENTION it is
        else:
            req.error = error
            req.response = response
        ctx.free_slots.append(req._slot)
        ctx.inflight -= 1
        req._slot = -1
        if req._bounce and req.data_in and req.into is None and error is None and response == S.S_OK:
            buf = req._bounce[-1]
            req.data = bytes(buf.view[: req.transferred])
        self._drop_bounce(req)
        req.done = True
        if req._waiter is not None:
            waiter, req._waiter = req._waiter, None
            waiter(req)
        return True

    def submit(self, requests: Iterable[ScsiRequest]) -> int:
        """Post requests and kick once. Returns how many were posted (stops when the queue is full)."""
        ctx = self._ctx()
        n = 0
        try:
            for req in requests:
                try:
                    self._post(ctx, req)
                except QueueFull as exc:
                    ctx.full_reason = str(exc)
                    if not n:
                        self.device.transport.check_alive()
                    break
                n += 1
        finally:
            if n:
                ctx.vq.flush()
        return n

    def _reap(self, ctx: _QueueCtx, max_n: int = 1 << 16) -> list[ScsiRequest]:
        """Reap the calling thread's queue; returns the requests that finished."""
        finished: list[ScsiRequest] = []
        resent = False
        try:
            done = ctx.vq.reap(max_n)
        except DeviceProtocolError as exc:
            for token, written in exc.completed:
                assert isinstance(token, ScsiRequest)
                if self._complete(ctx, token, written):
                    finished.append(token)
            self._fail_inflight(ctx, exc)
            raise
        for token, written in done:
            assert isinstance(token, ScsiRequest)
            if self._complete(ctx, token, written):
                finished.append(token)
            else:
                resent = True
        if resent:
            ctx.vq.flush()
        return finished

    def process_completions(self, max_n: int = 1 << 16) -> int:
        """Reap completed requests of the calling thread's queue; returns how many finished."""
        return len(self._reap(self._ctx(), max_n))

    def _fail_inflight(self, ctx: _QueueCtx, exc: BaseException) -> None:
        for token in ctx.vq.ring.in_flight_tokens():
            if isinstance(token, ScsiRequest) and not token.done:
                token.error = exc
                token.done = True
                self._drop_bounce(token)
                if token._waiter is not None:
                    waiter, token._waiter = token._waiter, None
                    waiter(token)

    def wait(self, requests: Sequence[ScsiRequest], timeout: float | None = -1.0, *, check: bool = True) -> None:
        """Wait until every request is done; then (``check``) raise the first error."""
        ctx = self._ctx()
        tmo = self.timeout if timeout == -1.0 else timeout
        deadline = None if tmo is None else time.monotonic() + tmo
        spins = 0
        pending = [r for r in requests if not r.done]
        while pending:
            if not self._reap(ctx):
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportTimeout(f"{len(pending)} SCSI requests not completed within {tmo} s")
                self._idle(ctx, spins, deadline)
                spins += 1
            else:
                spins = 0
            pending = [r for r in pending if not r.done]
        if check:
            for r in requests:
                r.check()

    def _idle(self, ctx: _QueueCtx, spins: int, deadline: float | None) -> None:
        if self.poll == "busy" or (self.poll == "hybrid" and spins < 2000):
            if spins & 0xFF == 0xFF:  # not on the first spins: a device that answers at once costs no syscall
                self.device.transport.check_alive()
            return
        ring = ctx.vq.ring
        try:
            if ring.enable_interrupts():
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.device.transport.wait_queue(ctx.vq.index, min(left, 0.1) if left is not None else 0.1)
        finally:
            ring.disable_interrupts()

    def execute(self, req: ScsiRequest) -> ScsiRequest:
        """Submit one request and wait for it; the caller inspects response / status / sense."""
        if self.submit([req]) != 1:
            raise QueueFull(self._ctx().full_reason or "no room on the queue")
        self.wait([req], check=False)
        if req.error is not None:
            raise req.error
        return req

    def run(self, req: ScsiRequest) -> ScsiRequest:
        """Submit one request, wait for it, raise its error."""
        self.execute(req)
        req.check()
        return req

    def run_all(self, requests: Sequence[ScsiRequest]) -> None:
        """Run many requests, as many in flight as the queue and the shared memory allow."""
        ctx = self._ctx()
        i = 0
        while i < len(requests):
            n = self.submit(requests[i:])
            if n == 0:
                if ctx.inflight:
                    raise QueueStateError(f"queue {ctx.vq.index} is full of other requests: {ctx.full_reason}")
                raise QueueFull(ctx.full_reason or "no room on the queue")
            self.wait(requests[i : i + n], check=False)
            i += n
        for r in requests:
            r.check()

    def command(
        self,
        target: int,
        lun: int,
        cdb: bytes,
        *,
        data_out: bytes | Buffer | None = None,
        data_in: int = 0,
        ua_retries: int = UA_RETRIES,
        check: bool = True,
    ) -> ScsiRequest:
        """Send any CDB to target:lun; returns the completed request (``req.data`` holds data-in)."""
        self._check_address(target, lun)
        req = ScsiRequest(target, lun, bytes(cdb), data_out=data_out, data_in=data_in, ua_retries=ua_retries)
        return self.run(req) if check else self.execute(req)

    def _check_address(self, target: int, lun: int) -> None:
        if not 0 <= target <= self.max_target or not 0 <= lun <= self.max_lun:
            raise InvalidArgument(
                f"{target}:{lun} is outside the device's targets 0..{self.max_target} and LUNs 0..{self.max_lun}"
            )

    # -- asyncio --------------------------------------------------------------

    async def asubmit(self, req: ScsiRequest) -> ScsiRequest:
        """Submit from a coroutine; completes via the queue's interrupt fd. Raises the request's error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ScsiRequest] = loop.create_future()

        def done(r: ScsiRequest) -> None:
            if not fut.done():
                fut.set_result(r)

        req._waiter = done
        ctx = self._ctx()
        fd = ctx.vq.fd
        if self.submit([req]) != 1:
            req._waiter = None
            raise QueueFull(ctx.full_reason or "no room on the queue")
        if fd is None:
            while not req.done:
                self._reap(ctx)
                await asyncio.sleep(0)
        else:
            self._ensure_reader(loop, ctx, fd)
            self._arm(ctx)
            # Wait, checking every 0.2 s that the back end is still there: a
            # peer that died raises ConnectionLost now, not a timeout later.
            deadline = None if self.timeout is None else loop.time() + self.timeout
            while not fut.done():
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TransportTimeout(
                        f"{req.name} on {req.target}:{req.lun} not completed within {self.timeout} s"
                    )
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 0.2 if left is None else min(0.2, left))
                except TimeoutError:
                    self.device.transport.check_alive()
        req.check()
        return req

    def _ensure_reader(self, loop: asyncio.AbstractEventLoop, ctx: _QueueCtx, fd: int) -> None:
        if getattr(ctx, "reader_loop", None) is loop:
            return

        def on_readable() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            with contextlib.suppress(Exception):  # errors are delivered to the requests themselves
                self._reap(ctx)
            self._arm(ctx)

        loop.add_reader(fd, on_readable)
        ctx.reader_loop = loop  # type: ignore[attr-defined]

    def _arm(self, ctx: _QueueCtx) -> None:
        while ctx.inflight:
            if not ctx.vq.ring.enable_interrupts():
                return
            self._reap(ctx)
        ctx.vq.ring.disable_interrupts()

    # -- control and event queues ----------------------------------------------

    @contextlib.contextmanager
    def _mgmt(self) -> Iterator[tuple[Virtqueue, Virtqueue]]:
        """Own the control and event queues for a while (one thread at a time)."""
        with self._mgmt_lock:
            dev = self.device
            cq = dev.queue(S.CONTROL_QUEUE)
            if cq.owner == threading.get_ident():  # re-entered
                yield cq, dev.queue(S.EVENT_QUEUE)
                return
            cq = dev.acquire(S.CONTROL_QUEUE)
            try:
                eq = dev.acquire(S.EVENT_QUEUE)
                try:
                    yield cq, eq
                finally:
                    dev.release(S.EVENT_QUEUE)
            finally:
                dev.release(S.CONTROL_QUEUE)

    def _post_event(self, eq: Virtqueue, i: int) -> None:
        assert self._event_bufs is not None
        eq.start(i, 1)
        eq.add(self._event_bufs.addr + S.EVENT.size * i, S.EVENT.size, True)

    @property
    def event_fd(self) -> int | None:
        """Readable when the device may have delivered events: then call :meth:`poll_events`."""
        return self.device.queue(S.EVENT_QUEUE).fd

    def on_event(self, callback: Callable[[ScsiEvent], None]) -> None:
        """Call ``callback(event)`` for every :class:`ScsiEvent` that :meth:`poll_events` produces."""
        self._callbacks.append(callback)

    def poll_events(self, timeout: float = 0.0) -> list[ScsiEvent]:
        """Reap event buffers (waiting up to ``timeout`` s for one), act on them, re-post them."""
        raw: list[tuple[int, bytes, int]] = []
        with self._mgmt() as (_cq, eq):
            fd = eq.fd
            if fd is not None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)  # drained here, so event_fd is level-meaningful for select
            done = eq.reap()
            if not done and timeout > 0:
                done = eq.wait(timeout)
            assert self._event_bufs is not None
            view = self._event_bufs.view
            for token, written in done:
                assert isinstance(token, int)
                if written >= S.EVENT.size:
                    ev, lun8, reason = S.EVENT.unpack_from(view, S.EVENT.size * token)
                    raw.append((ev, bytes(lun8), reason))
                self._post_event(eq, token)
            if done:
                eq.flush()
            if eq.ring.enable_interrupts():
                pass  # more already there: event_fd stays meaningful, the next poll reaps them
        out: list[ScsiEvent] = []
        for ev, lun8, reason in raw:
            out.extend(self._on_raw_event(ev, lun8, reason))
        for e in out:
            self.events.append(e)
            for cb in list(self._callbacks):
                cb(e)
        del self.events[:-100]
        return out

    def _on_raw_event(self, event: int, lun8: bytes, reason: int) -> list[ScsiEvent]:
        missed = bool(event & S.T_EVENTS_MISSED)
        event &= ~S.T_EVENTS_MISSED
        out: list[ScsiEvent] = []
        if event != S.T_NO_EVENT and lun8[0] != 1:
            out.append(ScsiEvent("unknown", event=event, reason=reason))
        elif event == S.T_TRANSPORT_RESET:
            target, lun = _decode_event_lun(lun8)
            if reason == S.EVT_RESET_RESCAN:
                out.extend(self._rescan_lun(target, lun))
            elif reason == S.EVT_RESET_REMOVED:
                info = self.luns.pop((target, lun), None)
                out.append(ScsiEvent("removed", target, lun, event, reason, info))
            else:
                out.append(ScsiEvent("reset", target, lun, event, reason))
        elif event == S.T_PARAM_CHANGE:
            target, lun = _decode_event_lun(lun8)
            out.append(ScsiEvent("param_change", target, lun, event, reason, self.luns.get((target, lun))))
            asc, ascq = reason & 0xFF, reason >> 8 & 0xFF
            if (target, lun) in self.luns and (asc, ascq) in (T.ASC_CAPACITY_CHANGED, T.ASC_REPORTED_LUNS_CHANGED):
                out.extend(self._rescan_lun(target, lun))
        elif event == S.T_ASYNC_NOTIFY:
            target, lun = _decode_event_lun(lun8)
            out.append(ScsiEvent("async", target, lun, event, reason))
        elif event != S.T_NO_EVENT:
            out.append(ScsiEvent("unknown", event=event, reason=reason))
        if missed:
            out.append(ScsiEvent("missed", event=S.T_EVENTS_MISSED))
            out.extend(self.rescan())
        return out

    def _rescan_lun(self, target: int, lun: int) -> list[ScsiEvent]:
        old = self.luns.get((target, lun))
        try:
            info = self.probe_lun(target, lun)
        except ScsiError:
            info = None
        if info is None or not info.is_disk:
            if old is not None:
                del self.luns[(target, lun)]
                return [ScsiEvent("removed", target, lun, S.T_TRANSPORT_RESET, S.EVT_RESET_RESCAN, old)]
            return []
        self.luns[(target, lun)] = info
        if old is not None and _geometry(old) == _geometry(info):
            return []  # a RESCAN of a LUN we know, unchanged (a stale event, say)
        kind = "added" if old is None else "changed"
        return [ScsiEvent(kind, target, lun, S.T_TRANSPORT_RESET, S.EVT_RESET_RESCAN, info)]

    def rescan(self, targets: Iterable[int] | None = None) -> list[ScsiEvent]:
        """Scan again; returns what changed (added / removed / changed LUNs)."""
        before = dict(self.luns)
        self.scan(targets)
        out: list[ScsiEvent] = []
        for key, info in self.luns.items():
            old = before.get(key)
            if old is None:
                out.append(ScsiEvent("added", key[0], key[1], info=info))
            elif _geometry(old) != _geometry(info):
                out.append(ScsiEvent("changed", key[0], key[1], info=info))
        for key, old in before.items():
            if key not in self.luns:
                out.append(ScsiEvent("removed", key[0], key[1], info=old))
        return out

    # -- task management -------------------------------------------------------

    def task_management(self, subtype: int, target: int, lun: int, tag: int = 0, timeout: float | None = -1.0) -> int:
        """Send one TMF on the control queue; returns the virtio response code."""
        self._check_address(target, lun)
        tmo = self.timeout if timeout == -1.0 else timeout
        with self._mgmt() as (cq, _eq):
            buf = self._ctrl
            assert buf is not None
            S.CTRL_TMF_REQ.pack_into(buf.view, 0, S.T_TMF, subtype, S.lun_address(target, lun), tag)
            buf.view[32] = _RESP_SENTINEL
            token = ("tmf", subtype, tag)
            cq.start(token, 2)
            cq.add(buf.addr, S.CTRL_TMF_REQ.size, False)
            cq.add(buf.addr + 32, S.CTRL_TMF_RESP_SIZE, True)
            cq.flush()
            deadline = None if tmo is None else time.monotonic() + tmo
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransportTimeout(f"task management function {subtype} not answered within {tmo} s")
                done = cq.wait(min(left, 0.1) if left is not None else 0.1)
                if any(t is token for t, _n in done):
                    written = next(n for t, n in done if t is token)
                    break
                self.device.transport.check_alive()
            response = buf.view[32]
        if written < 1 or response == _RESP_SENTINEL:
            raise DeviceProtocolError(f"TMF {subtype} on {target}:{lun}: the device did not write a response")
        if response not in S.RESPONSE_NAMES:
            raise DeviceProtocolError(f"TMF {subtype} on {target}:{lun}: invalid response {response}")
        return int(response)

    def lun_reset(self, target: int, lun: int) -> None:
        """LOGICAL UNIT RESET; raises ScsiError unless the device completed it."""
        response = self.task_management(S.T_TMF_LOGICAL_UNIT_RESET, target, lun)
        if response not in (S.S_OK, S.S_FUNCTION_SUCCEEDED):
            cls = LunNotFound if response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN) else ScsiError
            raise cls("LOGICAL UNIT RESET", target, lun, response=response)

    def abort_task(self, target: int, lun: int, tag: int) -> str:
        """ABORT TASK for the command with ``tag`` (``req.tag``); returns the response name.

        FUNCTION_COMPLETE means aborted, or not found (it had completed):
        SAM-5 §7.2 does not tell them apart.
        """
        response = self.task_management(S.T_TMF_ABORT_TASK, target, lun, tag)
        if response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN):
            raise LunNotFound("ABORT TASK", target, lun, response=response)
        return _TMF_NAMES[response]

    # -- scan -------------------------------------------------------------------

    def _scan_command(self, target: int, lun: int, cdb: bytes, data_in: int = 0) -> ScsiRequest:
        """One scan command, sent again while the answer is transient; absent targets raise LunNotFound."""
        req = ScsiRequest(target, lun, cdb, data_in=data_in, ua_retries=0)
        for attempt in range(MAX_ATTEMPTS):
            req = ScsiRequest(target, lun, cdb, data_in=data_in, ua_retries=0)
            self.execute(req)
            if req.response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN):
                raise LunNotFound(req.name, target, lun, response=req.response)
            if not self._transient(req):
                return req
            if attempt + 1 < MAX_ATTEMPTS and req.status in (T.BUSY, T.TASK_SET_FULL):
                time.sleep(0.001 * (attempt + 1))
            elif attempt + 1 < MAX_ATTEMPTS and req.response == S.S_BUSY:
                time.sleep(0.001 * (attempt + 1))
        return req

    @staticmethod
    def _transient(req: ScsiRequest) -> bool:
        if req.response in _TRANSIENT_RESPONSES:
            return True
        if req.response != S.S_OK:
            return False
        if req.status in (T.BUSY, T.TASK_SET_FULL):
            return True
        if req.status == T.CHECK_CONDITION:
            sense = req.sense_data
            if sense is None:
                return False
            if sense.key in (T.UNIT_ATTENTION, T.ABORTED_COMMAND):
                return True
            return sense.key == T.NOT_READY and (sense.asc, sense.ascq) == T.ASC_LUN_BECOMING_READY
        return False

    def report_luns(self, target: int) -> list[int]:
        """The LUNs of ``target`` (REPORT LUNS; [0] if the target does not support it)."""
        alloc = 16 + 8 * 256
        req = self._scan_command(target, 0, report_luns_cdb(alloc), alloc)
        if req.response == S.S_OK and req.status == T.CHECK_CONDITION:
            sense = req.sense_data
            if sense is not None and sense.key == T.ILLEGAL_REQUEST:
                return [0]  # no REPORT LUNS: LUN 0 only, as SPDK
        req.check()
        data = req.data or b""
        if len(data) < 8:
            raise DeviceProtocolError(f"REPORT LUNS on target {target}: {len(data)} bytes of data")
        listed = BE32.unpack_from(data, 0)[0]
        if listed > alloc - 8:
            # More LUNs than fit: ask again with room for all of them (bounded by the LUN space).
            alloc = 8 + min(listed, 8 * 16384)
            req = self._scan_command(target, 0, report_luns_cdb(alloc), alloc)
            req.check()
            data = req.data or b""
        end = min(8 + BE32.unpack_from(data, 0)[0], len(data))
        out: list[int] = []
        for off in range(8, end - 7, 8):
            n = T.decode_lun(data[off : off + 8])
            if n is not None and n <= self.max_lun and n not in out:
                out.append(n)
        return sorted(out)

    def probe_lun(self, target: int, lun: int) -> LunInfo | None:
        """INQUIRY, TEST UNIT READY, VPD pages, READ CAPACITY of one LUN; None if nothing is there."""
        self._check_address(target, lun)
        inq = self._scan_command(target, lun, inquiry_cdb(None, 96), 96)
        inq.check()
        data = inq.data or b""
        if len(data) < 1:
            raise DeviceProtocolError(f"INQUIRY on {target}:{lun} returned no data")
        qualifier, ptype = data[0] >> 5, data[0] & 0x1F
        if qualifier != T.QUALIFIER_CONNECTED:
            return None
        info = LunInfo(
            target,
            lun,
            ptype,
            vendor=_text(data[8:16]),
            product=_text(data[16:32]),
            revision=_text(data[32:36]),
        )
        if not info.is_disk:
            return info
        self._make_ready(info)
        self._read_vpd(info)
        self._read_capacity(info)
        self._read_write_protect(info)
        return info

    def _make_ready(self, info: LunInfo) -> None:
        t, lun = info.target, info.lun
        for _ in range(MAX_ATTEMPTS):
            req = self._scan_command(t, lun, TEST_UNIT_READY_CDB)
            if req.response == S.S_OK and req.status == T.GOOD:
                return
            sense = req.sense_data
            if (
                not info.started
                and req.status == T.CHECK_CONDITION
                and sense is not None
                and sense.key == T.NOT_READY
                and sense.asc == 0x04
                and sense.ascq not in (0x01, 0x03)  # becoming ready (retried) / manual intervention
            ):
                self._scan_command(t, lun, START_UNIT_CDB).check()
                info.started = True
                continue
            req.check()
        raise ScsiError("TEST UNIT READY", t, lun, detail=f"not ready after {MAX_ATTEMPTS} attempts")

    def _vpd(self, info: LunInfo, page: int, alloc: int) -> bytes | None:
        req = self._scan_command(info.target, info.lun, inquiry_cdb(page, alloc), alloc)
        if req.response == S.S_OK and req.status == T.CHECK_CONDITION:
            return None  # page not supported after all
        req.check()
        data = req.data or b""
        if len(data) < 4 or data[1] != page:
            return None
        return data[: 4 + BE16.unpack_from(data, 2)[0]]

    def _read_vpd(self, info: LunInfo) -> None:
        pages = self._vpd(info, T.VPD_SUPPORTED_PAGES, 255)
        info.vpd_pages = list(pages[4:]) if pages else []
        if T.VPD_BLOCK_LIMITS in info.vpd_pages:
            bl = self._vpd(info, T.VPD_BLOCK_LIMITS, T.BLOCK_LIMITS_LEN)
            if bl is not None and len(bl) >= 16:
                info.max_transfer_blocks = BE32.unpack_from(bl, T.BL_MAX_TRANSFER)[0]
                info.optimal_transfer_blocks = BE32.unpack_from(bl, T.BL_OPTIMAL_TRANSFER)[0]
            if bl is not None and len(bl) >= 32:
                info.max_unmap_blocks = BE32.unpack_from(bl, T.BL_MAX_UNMAP_LBA_COUNT)[0]
                info.max_unmap_descriptors = BE32.unpack_from(bl, T.BL_MAX_UNMAP_DESCRIPTORS)[0]
                info.unmap_granularity = BE32.unpack_from(bl, T.BL_UNMAP_GRANULARITY)[0]
            if bl is not None and len(bl) >= 44:
                info.max_write_same_blocks = BE64.unpack_from(bl, T.BL_MAX_WRITE_SAME)[0]
        if T.VPD_LB_PROVISIONING in info.vpd_pages:
            lbp = self._vpd(info, T.VPD_LB_PROVISIONING, 8)
            if lbp is not None and len(lbp) >= 6:
                info.unmap = bool(lbp[5] & T.LBP_LBPU)
                info.write_same_unmap = bool(lbp[5] & T.LBP_LBPWS)
                info.lbprz = bool(lbp[5] >> T.LBP_LBPRZ_SHIFT & 0x7)
        if info.unmap and T.VPD_BLOCK_LIMITS in info.vpd_pages and info.max_unmap_blocks == 0:
            info.unmap = False  # SBC-3 §6.5.3: a zero MAXIMUM UNMAP LBA COUNT means no UNMAP
        if T.VPD_UNIT_SERIAL in info.vpd_pages:
            serial = self._vpd(info, T.VPD_UNIT_SERIAL, 255)
            if serial is not None:
                info.serial = _text(serial[4:])

    def _read_capacity(self, info: LunInfo) -> None:
        t, lun = info.target, info.lun
        rc = self._scan_command(t, lun, READ_CAPACITY_10_CDB, 8)
        rc.check()
        data = rc.data or b""
        if len(data) < 8:
            raise DeviceProtocolError(f"READ CAPACITY(10) on {t}:{lun}: {len(data)} bytes of data")
        last, bs = BE32.unpack_from(data, 0)[0], BE32.unpack_from(data, 4)[0]
        if last == 0xFFFFFFFF:
            rc = self._scan_command(t, lun, read_capacity_16_cdb(32), 32)
            rc.check()
            data = rc.data or b""
            if len(data) < 12:
                raise DeviceProtocolError(f"READ CAPACITY(16) on {t}:{lun}: {len(data)} bytes of data")
            last, bs = BE64.unpack_from(data, 0)[0], BE32.unpack_from(data, 8)[0]
            info.read_capacity_16 = True
        if bs == 0 or bs % 512 or bs > 1 << 20:
            raise DeviceProtocolError(f"{t}:{lun} reports block size {bs} (not a multiple of 512 up to 1 MiB)")
        info.block_size = bs
        info.num_blocks = last + 1

    def _read_write_protect(self, info: LunInfo) -> None:
        cdb = bytes([T.MODE_SENSE_6, 0x08, 0x3F, 0, 4, 0])  # DBD, all pages, header only
        req = self._scan_command(info.target, info.lun, cdb, 4)
        if req.ok and req.data and len(req.data) >= 3:
            info.readonly = bool(req.data[2] & 0x80)

    def scan(self, targets: Iterable[int] | None = None) -> list[LunInfo]:
        """Scan ``targets`` (default 0..max_target); returns the disks found, also kept in ``self.luns``."""
        wanted = range(self.max_target + 1) if targets is None else list(targets)
        found: list[LunInfo] = []
        for t in wanted:
            if not 0 <= t <= self.max_target:
                raise InvalidArgument(f"target {t} is outside 0..{self.max_target}")
            for key in [k for k in self.scan_errors if k[0] == t]:
                del self.scan_errors[key]
            try:
                ids = self.report_luns(t)
            except LunNotFound:
                ids = []
            except (ScsiError, DeviceProtocolError) as exc:
                # The target answers but not usefully: skip it, say why (SPDK: -EBUSY).
                self.scan_errors[(t, -1)] = str(exc)
                ids = []
            fresh: dict[tuple[int, int], LunInfo] = {}
            for lun in ids:
                try:
                    info = self.probe_lun(t, lun)
                except LunNotFound:
                    info = None
                except (ScsiError, DeviceProtocolError) as exc:
                    self.scan_errors[(t, lun)] = str(exc)
                    info = None
                if info is not None and info.is_disk:
                    fresh[(t, lun)] = info
                elif info is not None:
                    self.scan_errors[(t, lun)] = f"peripheral type {info.type_name}, not a disk"
            for key in [k for k in self.luns if k[0] == t]:
                del self.luns[key]
            self.luns.update(fresh)
            found.extend(fresh.values())
        return found

    # -- LUN handles -------------------------------------------------------------

    def disk(self, target: int, lun: int) -> ScsiDisk:
        """A handle for I/O on target:lun (probed now if the scan did not find it)."""
        info = self.luns.get((target, lun))
        if info is None:
            info = self.probe_lun(target, lun)
            if info is None or not info.is_disk:
                raise LunNotFound("INQUIRY", target, lun, detail="no disk at this address")
            self.luns[(target, lun)] = info
        return ScsiDisk(self, info)


def _geometry(info: LunInfo) -> tuple[int, int, bool]:
    return info.num_blocks, info.block_size, info.readonly


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


# -- one LUN as a disk -----------------------------------------------------------------------------


class ScsiDisk:
    """Block I/O on one LUN of a :class:`VirtioScsi` (byte offsets, block-aligned)."""

    def __init__(self, scsi: VirtioScsi, info: LunInfo) -> None:
        self.scsi = scsi
        self.info = info
        self.target = info.target
        self.lun = info.lun
        self.block_size = info.block_size
        self.capacity = info.capacity
        self.readonly = info.readonly
        limit = scsi.max_transfer_bytes
        if info.max_transfer_blocks:
            limit = min(limit, info.max_transfer_blocks * info.block_size)
        #: The largest single READ / WRITE, in bytes.
        self.max_transfer = max(limit // info.block_size, 1) * info.block_size
        self.can_flush = True
        self.can_unmap = info.unmap
        self._sync16 = info.num_blocks > 1 << 32

    def __repr__(self) -> str:
        return f"ScsiDisk({self.target}:{self.lun}, {self.capacity} bytes, block {self.block_size})"

    # -- checks

    def _check_range(self, op: str, offset: int, length: int) -> None:
        check_range(op, offset, length, block_size=self.block_size, capacity=self.capacity, what="LUN")

    def _check_data(self, op: str, offset: int, length: int) -> None:
        check_data(
            op,
            offset,
            length,
            block_size=self.block_size,
            capacity=self.capacity,
            max_transfer=self.max_transfer,
            what="LUN",
        )

    def _check_writable(self, op: str) -> None:
        if self.readonly:
            raise InvalidArgument(f"{op}: LUN {self.target}:{self.lun} is write-protected")

    # -- request builders (one command each)

    def read_request(self, offset: int, length: int, into: Buffer | None = None) -> ScsiRequest:
        self._check_data("read", offset, length)
        if into is not None and len(into) < length:
            raise InvalidArgument(f"read: buffer of {len(into)} bytes for {length}")
        bs = self.block_size
        cdb = rw_cdb(False, offset // bs, length // bs)
        return ScsiRequest(
            self.target, self.lun, cdb, data_in=length, into=into, offset=offset, length=length, full_transfer=True
        )

    def write_request(self, offset: int, data: bytes | memoryview | Buffer) -> ScsiRequest:
        self._check_writable("write")
        self._check_data("write", offset, len(data))
        bs = self.block_size
        cdb = rw_cdb(True, offset // bs, len(data) // bs)
        return ScsiRequest(
            self.target, self.lun, cdb, data_out=data, offset=offset, length=len(data), full_transfer=True
        )

    def flush_request(self) -> ScsiRequest:
        if self._sync16:
            cdb = bytes([T.SYNCHRONIZE_CACHE_16, 0]) + bytes(8) + bytes(4) + b"\0\0"
        else:
            cdb = bytes([T.SYNCHRONIZE_CACHE_10]) + bytes(9)
        return ScsiRequest(self.target, self.lun, cdb)

    def unmap_requests(self, offset: int, length: int) -> list[ScsiRequest]:
        """UNMAP commands covering the range, split by the block limits."""
        self._check_writable("unmap")
        self._check_range("unmap", offset, length)
        info = self.info
        if not self.can_unmap:
            raise InvalidArgument(f"unmap: LUN {self.target}:{self.lun} does not support UNMAP (no LBPU in VPD 0xB2)")
        bs = self.block_size
        per_desc = min(info.max_unmap_blocks or 0xFFFFFFFF, 0xFFFFFFFF)
        per_cmd = info.max_unmap_descriptors if info.max_unmap_descriptors not in (0, 0xFFFFFFFF) else 1
        per_cmd = min(per_cmd, (0xFFFF - 8) // 16)  # parameter list length is 16 bits
        lba, blocks = offset // bs, length // bs
        descs: list[tuple[int, int]] = []
        while blocks:
            n = min(blocks, per_desc)
            descs.append((lba, n))
            lba += n
            blocks -= n
        out = []
        for i in range(0, len(descs), per_cmd):
            group = descs[i : i + per_cmd]
            body = b"".join(BE64.pack(a) + BE32.pack(n) + bytes(4) for a, n in group)
            params = BE16.pack(6 + len(body)) + BE16.pack(len(body)) + bytes(4) + body
            cdb = bytes([T.UNMAP, 0, 0, 0, 0, 0, 0]) + BE16.pack(len(params)) + b"\0"
            first, total = group[0][0] * bs, sum(n for _a, n in group) * bs
            out.append(ScsiRequest(self.target, self.lun, cdb, data_out=params, offset=first, length=total))
        return out

    def write_zeroes_requests(self, offset: int, length: int, unmap: bool = False) -> list[ScsiRequest]:
        """WRITE SAME(16) of a zero block over the range (UNMAP bit when asked and supported)."""
        self._check_writable("write-zeroes")
        self._check_range("write-zeroes", offset, length)
        bs = self.block_size
        per = min(self.info.max_write_same_blocks or 0xFFFFFFFF, 0xFFFFFFFF)
        flags = 0x08 if unmap and self.info.write_same_unmap else 0
        lba, blocks = offset // bs, length // bs
        zero = bytes(bs)
        out = []
        while blocks:
            n = min(blocks, per)
            cdb = bytes([T.WRITE_SAME_16, flags]) + BE64.pack(lba) + BE32.pack(n) + b"\0\0"
            out.append(ScsiRequest(self.target, self.lun, cdb, data_out=zero, offset=lba * bs, length=n * bs))
            lba += n
            blocks -= n
        return out

    # -- sync API (splits above the limits)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_transfer
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def read(self, offset: int, length: int) -> bytes:
        self._check_range("read", offset, length)
        if length == 0:
            return b""
        reqs = [self.read_request(o, n) for o, n in self._pieces(offset, length)]
        self.scsi.run_all(reqs)
        return b"".join(r.data or b"" for r in reqs)

    def readinto(self, offset: int, buf: Buffer) -> int:
        """Zero copy: read into a Buffer from ``scsi.pool`` (one command: at most ``max_transfer``)."""
        self.scsi.run(self.read_request(offset, len(buf), into=buf))
        return len(buf)

    def write(self, offset: int, data: bytes | memoryview | Buffer) -> None:
        self._check_writable("write")
        self._check_range("write", offset, len(data))
        if isinstance(data, Buffer):
            self.scsi.run(self.write_request(offset, data))
            return
        view = memoryview(data)
        reqs = [self.write_request(o, view[o - offset : o - offset + n]) for o, n in self._pieces(offset, len(view))]
        self.scsi.run_all(reqs)

    def flush(self) -> None:
        req = self.flush_request()
        self.scsi.execute(req)
        sense = req.sense_data
        if not self._sync16 and sense is not None and (sense.key, sense.asc) == (T.ILLEGAL_REQUEST, 0x20):
            self._sync16 = True  # no SYNCHRONIZE CACHE(10): try (16)
            req = self.scsi.run(self.flush_request())
        req.check()

    def unmap(self, offset: int, length: int) -> None:
        self.scsi.run_all(self.unmap_requests(offset, length))

    def discard(self, offset: int, length: int) -> None:
        """The blk driver's name for :meth:`unmap`."""
        self.unmap(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.scsi.run_all(self.write_zeroes_requests(offset, length, unmap))

    # -- asyncio

    async def aread(self, offset: int, length: int) -> bytes:
        self._check_range("read", offset, length)
        reqs = [self.read_request(o, n) for o, n in self._pieces(offset, length)]
        done = await asyncio.gather(*(self.scsi.asubmit(r) for r in reqs))
        return b"".join(r.data or b"" for r in done)

    async def awrite(self, offset: int, data: bytes | memoryview | Buffer) -> None:
        self._check_writable("write")
        self._check_range("write", offset, len(data))
        if isinstance(data, Buffer):
            await self.scsi.asubmit(self.write_request(offset, data))
            return
        view = memoryview(data)
        reqs = [self.write_request(o, view[o - offset : o - offset + n]) for o, n in self._pieces(offset, len(view))]
        await asyncio.gather(*(self.scsi.asubmit(r) for r in reqs))

    async def aflush(self) -> None:
        await self.scsi.asubmit(self.flush_request())

    async def aunmap(self, offset: int, length: int) -> None:
        for req in self.unmap_requests(offset, length):
            await self.scsi.asubmit(req)

    async def awrite_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        for req in self.write_zeroes_requests(offset, length, unmap):
            await self.scsi.asubmit(req)
