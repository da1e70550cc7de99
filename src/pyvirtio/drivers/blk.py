"""VirtioBlk: the virtio-blk driver (virtio 1.2 §5.2; SPDK's bdev_virtio_blk).

Theory of operation. :class:`VirtioBlk` negotiates the block features it
understands, reads the config fields those features guard, starts the
request queues and then turns calls into requests: a 16-byte header
(device-readable), the data buffers, and one status byte (device-writable).

Each thread that does I/O gets a queue of its own on first use
(``find_and_acquire``, SPDK's per-thread channels), so there are no locks on
the data path; more threads than queues is a clear error
(:meth:`VirtioBlk.thread_queue` is the calling thread's). Headers and status
bytes live in per-queue slots allocated once; data is bounced through the
shared memory pool unless the caller passes a :class:`~pyvirtio.memory.Buffer`
from ``blk.pool`` (zero copy).

Three APIs over the same requests:

* sync: :meth:`VirtioBlk.read`, :meth:`~VirtioBlk.write`, ... block until done;
* batch: :meth:`VirtioBlk.submit` many :class:`BlkRequest` objects, one kick,
  then :meth:`VirtioBlk.wait` for them;
* asyncio: :meth:`VirtioBlk.aread`, :meth:`~VirtioBlk.awrite`, ... complete
  from the queue's interrupt fd via ``loop.add_reader``.

A lost back end: with a reconnect policy on the transport, requests in
flight are held while it reconnects and each one not completed is
resubmitted exactly once (:meth:`VirtioDevice.recover
<pyvirtio.device.VirtioDevice.recover>`); callers only see the added
latency. A write may then be executed twice by the device (it had completed
but the old back end died before saying so), which is harmless for block
writes and allowed by virtio across a device reset. Without reconnect, or
once the policy gives up, every pending request of the queue fails with
:class:`~pyvirtio.errors.ConnectionLost`.

Every argument is checked before the ring is touched (range, alignment,
length limits from size_max / seg_max / discard limits, read-only,
feature support). A device status of IOERR or UNSUPP raises
:class:`~pyvirtio.errors.BlockIOError` naming the operation, offset and length.

Layout: the request engine (slots, submit / wait, asyncio, reconnect) is
:mod:`pyvirtio.drivers.requests`, shared with virtio-scsi; the checks and the
sync / async calls (splitting above ``max_transfer``) are the block facade
:mod:`pyvirtio.drivers.block`, shared with a virtio-scsi LUN. This module
negotiates, builds and completes virtio-blk requests (virtio 1.2 §5.2.6).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.block import BlockDevice, split_range
from pyvirtio.drivers.requests import Chain, QueueContext, RequestEngine
from pyvirtio.errors import BlockIOError, DeviceProtocolError, InvalidArgument, QueueFull
from pyvirtio.memory import Buffer
from pyvirtio.spec import blk as B
from pyvirtio.spec.common import DEVICE_ID_BLOCK, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC

if TYPE_CHECKING:
    from pyvirtio.drivers.blk_fixed import FixedIO

SECTOR = B.SECTOR_SIZE

#: Features the driver asks for (the transport adds its own, e.g. vhost-user's bit 30).
DRIVER_FEATURES = (
    (1 << B.F_SIZE_MAX)
    | (1 << B.F_SEG_MAX)
    | (1 << B.F_BLK_SIZE)
    | (1 << B.F_RO)
    | (1 << B.F_FLUSH)
    | (1 << B.F_TOPOLOGY)
    | (1 << B.F_MQ)
    | (1 << B.F_DISCARD)
    | (1 << B.F_WRITE_ZEROES)
    | (1 << F_RING_EVENT_IDX)
    | (1 << F_RING_INDIRECT_DESC)
)

_SLOT_SIZE = 32  # 16-byte header, 1 status byte at offset 16, padding
_STATUS_OFF = 16
_DATA_OPS = frozenset({B.T_IN, B.T_OUT, B.T_GET_ID})


@dataclass(eq=False, slots=True)
class BlkRequest:
    """One block request. Build with the ``VirtioBlk.*_request`` helpers, then ``submit``."""

    op: int
    offset: int = 0
    length: int = 0
    data: Sequence[Buffer] = ()  # zero copy: the request's data buffers (from blk.pool)
    payload: bytes = b""  # discard / write-zeroes segment descriptors
    # Filled in by the driver:
    status: int | None = None
    written: int = 0
    result: bytes | None = None  # what a bounced read / get-id brought
    done: bool = False
    error: BaseException | None = None
    slot: int = field(default=-1, repr=False)  # the engine's (drivers/requests.py)
    waiter: Any = field(default=None, repr=False)
    _bounce: Buffer | None = field(default=None, repr=False)
    _user: Any = field(default=None, repr=False)  # the bytes a bounced write sends

    @property
    def name(self) -> str:
        return B.REQUEST_TYPE_NAMES.get(self.op, str(self.op))

    def check(self) -> None:
        """Raise the request's error (BlockIOError / transport error) if it failed."""
        if self.error is not None:
            raise self.error
        if self.status is not None and self.status != B.S_OK:
            raise BlockIOError(
                self.name, self.offset, self.length, self.status, B.STATUS_NAMES.get(self.status, "UNKNOWN")
            )


class VirtioBlk(RequestEngine[BlkRequest], BlockDevice[BlkRequest]):
    """A virtio-blk device (see the module docstring)."""

    readonly_why = "the device is read-only"

    __slots__ = (
        "block_size", "can_discard", "can_flush", "can_write_zeroes", "capacity", "config", "discard_alignment",
        "engine", "features", "indirect", "max_discard_sectors", "max_discard_seg", "max_queues", "max_segments",
        "max_transfer", "max_write_zeroes_sectors", "max_write_zeroes_seg", "num_queues", "queue_size", "readonly",
        "seg_max", "size_max",
    )

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
        ring: str = "auto",
        in_order: bool | str = "auto",
    ) -> None:
        RequestEngine.__init__(self, device, poll=poll, timeout=timeout, request_type=BlkRequest)
        self.engine = self
        wanted = DRIVER_FEATURES | extra_features
        if not event_idx:
            wanted &= ~(1 << F_RING_EVENT_IDX)
        negotiated = device.reset(wanted, ring=ring, in_order=in_order)
        self.features = negotiated
        cfg = B.parse_config(device.read_config(0, self._config_len()))
        self.config = cfg
        has = device.has_feature
        self.block_size = cfg["blk_size"] if has(B.F_BLK_SIZE) else SECTOR
        if self.block_size < SECTOR or self.block_size % SECTOR:
            device.fail()
            raise DeviceProtocolError(f"device block size {self.block_size} is not a non-zero multiple of 512")
        self.capacity = cfg["capacity"] * SECTOR
        self.readonly = has(B.F_RO)
        self.size_max = cfg["size_max"] if has(B.F_SIZE_MAX) and cfg.get("size_max") else 0
        self.seg_max = cfg["seg_max"] if has(B.F_SEG_MAX) and cfg.get("seg_max") else 0
        # A config that promises more queues than the transport has is the device's
        # inconsistency, not the caller's: use what can actually be set up.
        config_queues = cfg["num_queues"] if has(B.F_MQ) and cfg.get("num_queues") else 1
        self.max_queues = max(1, min(config_queues, device.transport.max_queues()))
        self.can_flush = has(B.F_FLUSH)
        self.can_discard = has(B.F_DISCARD)
        self.can_write_zeroes = has(B.F_WRITE_ZEROES)
        self.max_discard_sectors = cfg.get("max_discard_sectors", 0) or 0xFFFFFFFF
        self.max_discard_seg = cfg.get("max_discard_seg", 0) or 1
        self.discard_alignment = cfg.get("discard_sector_alignment", 0) or 1
        self.max_write_zeroes_sectors = cfg.get("max_write_zeroes_sectors", 0) or 0xFFFFFFFF
        self.max_write_zeroes_seg = cfg.get("max_write_zeroes_seg", 0) or 1
        nq = self.max_queues if num_queues is None else num_queues
        if not 1 <= nq <= self.max_queues:
            device.fail()
            raise InvalidArgument(f"num_queues must be 1..{self.max_queues}, got {nq}")
        device.start(nq, 0, queue_size=queue_size)
        self.num_queues = nq
        self.queue_size = device.queue(0).size
        self.indirect = has(F_RING_INDIRECT_DESC)
        self._start_queues(0, _SLOT_SIZE, "queues")
        # The most data segments one request may have.
        ring_limit = self.queue_size - 2 if not self.indirect else 1024 - 2
        self.max_segments = min(self.seg_max, ring_limit) if self.seg_max else ring_limit
        seg = self.size_max if self.size_max else 1 << 32
        # Bounce buffers must live in the memory the device was given at start,
        # so a transfer is also limited to half of that memory.
        shared = sum(r.size for r in self.pool.regions)
        limit = min(self.max_segments * seg, 0xFFFFFFFF, shared // 2)
        self.max_transfer = limit // self.block_size * self.block_size

    def _config_len(self) -> int:
        """Ask for exactly the config bytes we use (qemu-storage-daemon rejects more than it has)."""
        return B.CONFIG_SIZE_V11

    # -- construction helpers -------------------------------------------------

    @classmethod
    def open(cls, target: str, **kw: Any) -> VirtioBlk:
        """Open ``vhost-user:PATH`` (or a plain socket path).

        Transport options: ``reconnect`` (a
        :class:`~pyvirtio.transport.base.ReconnectPolicy`, True, or a
        timeout in seconds: requests are held across a back-end restart),
        ``server`` (listen on PATH for the back end to connect),
        ``connect_timeout``; ``queue_size`` and ``timeout`` go to both; the
        rest to :class:`VirtioBlk`, among them ``ring`` (``"split"``,
        ``"packed"`` or ``"auto"``) and ``in_order`` (True, False or
        ``"auto"``): the ring format and VIRTIO_F_IN_ORDER
        (:meth:`VirtioDevice.reset <pyvirtio.device.VirtioDevice.reset>`).
        """
        from pyvirtio.targets import open_driver

        return open_driver(cls, target, DEVICE_ID_BLOCK, kw)

    def info(self) -> dict[str, Any]:
        out = self.device.info()
        out["blk"] = {
            "capacity": self.capacity,
            "block_size": self.block_size,
            "readonly": self.readonly,
            "num_queues": self.num_queues,
            "max_queues": self.max_queues,
            "size_max": self.size_max,
            "seg_max": self.seg_max,
            "flush": self.can_flush,
            "discard": self.can_discard,
            "write_zeroes": self.can_write_zeroes,
            "config": self.config,
        }
        return out

    # -- request builders -----------------------------------------------------

    def read_request(self, offset: int, length: int, into: Buffer | None = None) -> BlkRequest:
        self.check_data("read", offset, length)
        if into is not None and len(into) < length:
            raise InvalidArgument(f"read: buffer of {len(into)} bytes for {length}")
        return BlkRequest(B.T_IN, offset, length, (into,) if into is not None else ())

    def write_request(self, offset: int, data: bytes | memoryview | Buffer) -> BlkRequest:
        self.check_writable("write")
        self.check_data("write", offset, len(data))
        if isinstance(data, Buffer):
            return BlkRequest(B.T_OUT, offset, len(data), (data,))
        req = BlkRequest(B.T_OUT, offset, len(data))
        req._user = data
        return req

    def flush_request(self) -> BlkRequest:
        if not self.can_flush:
            raise InvalidArgument("flush: the device did not offer VIRTIO_BLK_F_FLUSH")
        return BlkRequest(B.T_FLUSH)

    def _check_dwz(self, op: int, offset: int, length: int) -> None:
        """The checks of a discard / write-zeroes range (alignment to the discard granularity included)."""
        name = B.REQUEST_TYPE_NAMES[op]
        self.check_writable(name)
        if op == B.T_DISCARD and not self.can_discard:
            raise InvalidArgument("discard: the device did not offer VIRTIO_BLK_F_DISCARD")
        if op == B.T_WRITE_ZEROES and not self.can_write_zeroes:
            raise InvalidArgument("write-zeroes: the device did not offer VIRTIO_BLK_F_WRITE_ZEROES")
        self.check_range(name, offset, length)
        if length == 0:
            raise InvalidArgument(f"{name}: zero length")
        if op == B.T_DISCARD:
            align = self.discard_alignment
            if (offset // SECTOR) % align or (length // SECTOR) % align:
                raise InvalidArgument(f"discard: range must be aligned to {align * SECTOR} bytes")

    def _dwz_request(self, op: int, offset: int, length: int, unmap: bool) -> BlkRequest:
        self._check_dwz(op, offset, length)
        name = B.REQUEST_TYPE_NAMES[op]
        if op == B.T_DISCARD:
            per_seg, max_seg = self.max_discard_sectors, self.max_discard_seg
        else:
            per_seg, max_seg = self.max_write_zeroes_sectors, self.max_write_zeroes_seg
        sectors = length // SECTOR
        sector = offset // SECTOR
        segs = []
        while sectors:
            n = min(sectors, per_seg)
            segs.append(B.DISCARD_WZ.pack(sector, n, B.DWZ_F_UNMAP if unmap else 0))
            sector += n
            sectors -= n
        if len(segs) > max_seg:
            raise InvalidArgument(
                f"{name}: {length} bytes need {len(segs)} segments, the device takes {max_seg} of "
                f"{per_seg * SECTOR} bytes"
            )
        return BlkRequest(op, offset, length, payload=b"".join(segs))

    def range_step(self, op: str) -> int:
        """The most bytes one ``discard`` / ``write-zeroes`` request may cover under the device's limits."""
        if op == "discard":
            per_seg, nseg = self.max_discard_sectors, self.max_discard_seg
            align = self.discard_alignment * SECTOR
        elif op == "write-zeroes":
            per_seg, nseg = self.max_write_zeroes_sectors, self.max_write_zeroes_seg
            align = SECTOR
        else:
            raise InvalidArgument(f"range_step: {op!r} is not discard or write-zeroes")
        unit = math.lcm(self.block_size, align)
        step = per_seg * nseg * SECTOR
        step -= step % unit
        if step <= 0:
            raise InvalidArgument(f"{op}: the device's limits allow no aligned request")
        return step

    def discard_request(self, offset: int, length: int) -> BlkRequest:
        """One DISCARD request (the range must fit the device's per-request limits)."""
        return self._dwz_request(B.T_DISCARD, offset, length, False)

    def write_zeroes_request(self, offset: int, length: int, unmap: bool = False) -> BlkRequest:
        """One WRITE_ZEROES request (the range must fit the device's per-request limits)."""
        return self._dwz_request(B.T_WRITE_ZEROES, offset, length, unmap)

    def discard_requests(self, offset: int, length: int) -> list[BlkRequest]:
        self._check_dwz(B.T_DISCARD, offset, length)
        step = self.range_step("discard")
        return [self.discard_request(o, n) for o, n in split_range(offset, length, step)]

    def write_zeroes_requests(self, offset: int, length: int, unmap: bool = False) -> list[BlkRequest]:
        self._check_dwz(B.T_WRITE_ZEROES, offset, length)
        step = self.range_step("write-zeroes")
        return [self.write_zeroes_request(o, n, unmap) for o, n in split_range(offset, length, step)]

    def get_id_request(self) -> BlkRequest:
        return BlkRequest(B.T_GET_ID, 0, B.ID_BYTES)

    def _read_result(self, req: BlkRequest) -> bytes:
        return req.result or b""

    # -- the engine's hooks: building and completing a request -------------------

    def _segments(self, addr: int, length: int, writable: bool) -> Chain:
        """One buffer as descriptors of at most size_max bytes each."""
        step = self.size_max
        if not step or length <= step:
            return [(addr, length, writable)]
        return [(addr + off, min(step, length - off), writable) for off in range(0, length, step)]

    def _build(self, ctx: QueueContext, req: BlkRequest, slot: int) -> Chain:
        op = req.op
        if op in _DATA_OPS:
            writable = op != B.T_OUT
            if req.data:
                segs: Chain = []
                for b in req.data:
                    if not self.in_device_memory(b):
                        raise InvalidArgument(
                            f"{req.name}: {b!r} is not in the shared memory the device knows "
                            "(the pool grew after the device started)"
                        )
                    segs += self._segments(b.addr, len(b), writable)
            else:
                segs = self._segments(self._bounce_data(ctx, req).addr, req.length, writable)
        elif op == B.T_DISCARD or op == B.T_WRITE_ZEROES:
            buf = self.allocate(len(req.payload), align=8)
            if not self.in_device_memory(buf):
                self.free(buf)
                raise QueueFull(f"{req.name}: no room for its segments in the device's shared memory now")
            req._bounce = buf
            buf.view[:] = req.payload
            segs = [(buf.addr, len(req.payload), False)]
        else:
            segs = []
        base = _SLOT_SIZE * slot
        sv = ctx.slot_view
        B.OUTHDR.pack_into(sv, base, op, 0, req.offset // SECTOR)
        sv[base + _STATUS_OFF] = 0xFF
        addr = ctx.slots.addr + base
        return [(addr, B.OUTHDR_SIZE, False), *segs, (addr + _STATUS_OFF, 1, True)]

    def _bounce_data(self, ctx: QueueContext, req: BlkRequest) -> Buffer:
        """A bounce buffer for ``req``'s data (a write's bytes copied in), in the device's memory."""
        length = req.length
        buf = self.take_bounce(ctx, max(length, 1), SECTOR if length >= SECTOR else 8)
        if buf is None:
            raise QueueFull(
                f"{req.name}: no room for a {length}-byte buffer in the device's shared memory "
                "now; reap requests in flight or use smaller ones"
            )
        req._bounce = buf
        if req.op == B.T_OUT:
            buf.view[:length] = req._user
        return buf

    def _publish_one(self, ctx: QueueContext, req: BlkRequest, slot: int) -> bool:
        """``run``'s lane: a read or write of one piece (its Buffer, or a bounce buffer) is one ``submit3``.

        Header, data, status: the chain :meth:`_build` makes for it, with no
        list built. Anything else (several buffers, a buffer above size_max
        or outside the device's memory, other request types) goes the
        general way, with its checks and errors.
        """
        op = req.op
        if op == B.T_IN or op == B.T_OUT:
            data = req.data
            if not data:
                n = req.length
                b = None
            elif len(data) == 1:
                b = data[0]
                n = b.size
                if not self.in_device_memory(b):
                    n = 0  # refused by _build, with its message
            else:
                n = 0
            if n and not (self.size_max and n > self.size_max):
                if b is None:
                    b = self._bounce_data(ctx, req)
                base = _SLOT_SIZE * slot
                sv = ctx.slot_view
                B.OUTHDR.pack_into(sv, base, op, 0, req.offset // SECTOR)
                sv[base + _STATUS_OFF] = 0xFF
                addr = ctx.slots.addr + base
                return self._submit3(ctx, req, addr, B.OUTHDR_SIZE, b.addr, n, op == B.T_IN, addr + _STATUS_OFF, 1)
        return self._publish_chain(ctx, req, slot)

    def _drop_bounce(self, req: BlkRequest) -> None:
        if req._bounce is not None:
            self.free(req._bounce)
            req._bounce = None

    def _complete(self, ctx: QueueContext, req: BlkRequest, written: int) -> bool:
        status = ctx.slot_view[_SLOT_SIZE * req.slot + _STATUS_OFF]
        req.status = status
        req.written = written
        if written < req.length and req.op == B.T_IN and status == B.S_OK and short_read(
            written, req.length, ctx.vq.ring.format
        ):
            req.error = BlockIOError(
                req.name,
                req.offset,
                req.length,
                status,
                f"short read: the device reported {written} bytes written for {req.length} bytes of data",
            )
        bounce = req._bounce
        if bounce is not None:
            if req.op != B.T_OUT and status == B.S_OK and req.error is None:
                req.result = bytes(bounce.view[: req.length])  # a read or GET_ID: its data
            if req.op in _DATA_OPS:
                self.give_bounce(ctx, bounce)  # from take_bounce: the queue may keep it for the next one
            else:
                self.free(bounce)
            req._bounce = None
        return True

    def _describe(self, req: BlkRequest) -> str:
        return f"{req.name} at {req.offset}"

    # -- blk-only calls ----------------------------------------------------------

    def fixed_io(self, buf: Buffer) -> FixedIO:
        """A request pre-linked for ``buf`` (from :meth:`allocate`): ``read(offset)`` / ``write(offset)``.

        1.5-1.9x a loop of ``readinto`` for same-size I/O (measured,
        docs/benchmarks.md §1.3; drivers/blk_fixed.py); holds the calling
        thread's queue until closed.
        """
        from pyvirtio.drivers.blk_fixed import FixedIO

        return FixedIO(self, buf)

    def readv(self, offset: int, lengths: Sequence[int]) -> list[bytes]:
        """Scatter read: one request whose data lands in one buffer per length."""
        if any(n <= 0 for n in lengths):
            raise InvalidArgument("readv: every length must be positive")
        self.check_data("read", offset, sum(lengths))  # before allocating anything
        bufs = [self.allocate(n, align=SECTOR) for n in lengths]
        try:
            self.readv_into(offset, bufs)
            return [bytes(b.view) for b in bufs]
        finally:
            for b in bufs:
                self.free(b)

    def readv_into(self, offset: int, bufs: Sequence[Buffer]) -> int:
        """Zero-copy scatter read into several pool Buffers, one request."""
        return self._vector(B.T_IN, offset, bufs)

    def writev(self, offset: int, chunks: Sequence[bytes | memoryview | Buffer]) -> None:
        """Gather write: several buffers, one request."""
        self.check_writable("write")
        self.check_data("write", offset, sum(len(c) for c in chunks))  # before allocating anything
        bufs: list[Buffer] = []
        owned: list[Buffer] = []
        try:
            for c in chunks:
                if isinstance(c, Buffer):
                    bufs.append(c)
                else:
                    b = self.allocate(max(len(c), 1), align=SECTOR)
                    b.view[: len(c)] = c
                    owned.append(b)
                    bufs.append(Buffer(b.region, b.offset, len(c)))
            self._vector(B.T_OUT, offset, bufs)
        finally:
            for b in owned:
                self.free(b)

    def _vector(self, op: int, offset: int, bufs: Sequence[Buffer]) -> int:
        total = sum(len(b) for b in bufs)
        name = B.REQUEST_TYPE_NAMES[op]
        self.check_data(name, offset, total)
        nseg = sum(-(-len(b) // self.size_max) if self.size_max else 1 for b in bufs)
        if nseg > self.max_segments:
            raise InvalidArgument(f"{name}: {nseg} segments exceed the device limit {self.max_segments}")
        self.run(BlkRequest(op, offset, total, tuple(bufs)))
        return total

    def get_id(self) -> str:
        """The device's serial number (GET_ID: up to 20 bytes, NUL-padded)."""
        req = self.run(self.get_id_request())
        raw = req.result or b""
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def short_read(written: int, length: int, ring_format: str) -> bool:
    """Did a read whose status byte says OK get fewer than ``length`` bytes, as the device reports it?

    virtio 1.2 §2.7.8.2: nothing beyond the used length may be relied on. A
    length that leaves out the status byte is taken (DPDK's vhost_blk example
    reports just the data on split rings). On a packed ring a length of 0 is
    what the ring reports for a used descriptor without VIRTQ_DESC_F_WRITE,
    whose length is reserved and ignored by drivers (virtio 1.2 §2.8.4):
    with the status byte written (it was preset to 0xFF) the device wrote to
    the buffer and the status decides (DPDK's vhost_blk example never sets
    the flag).
    """
    if written >= length:
        return False
    return written > 0 or ring_format != "packed"


def pack_pattern(block: int, seed: int, size: int) -> bytes:
    """A verifiable block pattern: (block number, seed) repeated over ``size`` bytes."""
    unit = struct.pack("<QQ", block, seed)
    return unit * (size // 16) + unit[: size % 16]
