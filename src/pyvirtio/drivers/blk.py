"""VirtioBlk: the virtio-blk driver (virtio 1.2 §5.2; SPDK's bdev_virtio_blk).

Theory of operation. :class:`VirtioBlk` negotiates the block features it
understands, reads the config fields those features guard, starts the
request queues and then turns calls into requests: a 16-byte header
(device-readable), the data buffers, and one status byte (device-writable).

Each thread that does I/O gets a queue of its own on first use
(``find_and_acquire``, SPDK's per-thread channels), so there are no locks on
the data path; more threads than queues is a clear error. Headers and status
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
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers._checks import check_data, check_range
from pyvirtio.drivers._queues import ThreadQueues
from pyvirtio.errors import (
    BlockIOError,
    ConnectionLost,
    DeviceProtocolError,
    InvalidArgument,
    QueueFull,
    QueueStateError,
    TransportTimeout,
)
from pyvirtio.memory import Buffer
from pyvirtio.spec import blk as B
from pyvirtio.spec.common import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC

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


@dataclass(eq=False)
class BlkRequest:
    """One block request. Build with the ``VirtioBlk.*_request`` helpers, then ``submit``."""

    op: int
    offset: int = 0
    length: int = 0
    data: Sequence[Buffer] = ()
    payload: bytes = b""  # discard / write-zeroes segment descriptors
    # Filled in by the driver:
    status: int | None = None
    written: int = 0
    done: bool = False
    error: BaseException | None = None
    _slot: int = -1
    _bounce: Buffer | None = None
    _user: Any = None
    _waiter: Any = field(default=None, repr=False)

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


class _QueueCtx:
    """Per-queue state: the virtqueue, header/status slots, requests in flight."""

    def __init__(self, blk: VirtioBlk, vq: Virtqueue) -> None:
        self.blk = blk
        self.vq = vq
        self.nslots = vq.size
        self.slots = blk.allocate(_SLOT_SIZE * self.nslots, align=64)
        if not blk._in_device_memory(self.slots):
            blk.free(self.slots)
            raise QueueFull(f"queue {vq.index}: no room for request headers in the device's shared memory")
        self.slot_view = self.slots.view
        self.free_slots = list(range(self.nslots - 1, -1, -1))
        self.inflight = 0
        self.full_reason = ""
        self.held: Any = None  # an open FixedIO owns the queue (drivers/blk_fixed.py)

    def close(self) -> None:
        self.slot_view = memoryview(b"")
        self.blk.free(self.slots)


class VirtioBlk:
    """A virtio-blk device (see the module docstring)."""

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
    ) -> None:
        if poll not in ("busy", "wait", "hybrid"):
            raise InvalidArgument(f"poll must be busy, wait or hybrid, not {poll!r}")
        self.device = device
        self.pool = device.pool
        # The pool's allocator is not thread-safe, and every thread with a queue
        # allocates bounce buffers from it: its calls from here are serialised.
        self._pool_lock = threading.Lock()
        self.poll = poll
        self.timeout = timeout
        wanted = DRIVER_FEATURES | extra_features
        if not event_idx:
            wanted &= ~(1 << F_RING_EVENT_IDX)
        negotiated = device.reset(wanted)
        self.features = negotiated
        cfg = B.parse_config(device.read_config(0, self._config_len()))
        self.config = cfg
        has = device.has_feature
        self.block_size = cfg["blk_size"] if has(B.F_BLK_SIZE) else SECTOR
        if self.block_size < SECTOR or self.block_size % SECTOR:
            device._fail()
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
            device._fail()
            raise InvalidArgument(f"num_queues must be 1..{self.max_queues}, got {nq}")
        device.start(nq, 0, queue_size=queue_size)
        self.num_queues = nq
        self.queue_size = device.queue(0).size
        self.indirect = has(F_RING_INDIRECT_DESC)
        self._queues: ThreadQueues[_QueueCtx] = ThreadQueues(device, 0, lambda vq: _QueueCtx(self, vq), "queues")
        # The most data segments one request may have.
        ring_limit = self.queue_size - 2 if not self.indirect else 1024 - 2
        self.max_segments = min(self.seg_max, ring_limit) if self.seg_max else ring_limit
        seg = self.size_max if self.size_max else 1 << 32
        # Bounce buffers must live in the memory the device was given at start
        # (a region the pool adds later is unknown to it: qemu-storage-daemon
        # drops the connection on such an address). So a transfer is also
        # limited to half of that memory.
        self._regions = tuple(self.pool.regions)
        shared = sum(r.size for r in self._regions)
        limit = min(self.max_segments * seg, 0xFFFFFFFF, shared // 2)
        self.max_transfer = limit // self.block_size * self.block_size

    def allocate(self, size: int, align: int = 8) -> Buffer:
        """A buffer from the device's shared memory pool (thread-safe; pass it for zero copy)."""
        with self._pool_lock:
            return self.pool.allocate(size, align)

    def free(self, buf: Buffer) -> None:
        """Give back a buffer from :meth:`allocate` (thread-safe)."""
        with self._pool_lock:
            self.pool.free(buf)

    def _in_device_memory(self, buf: Buffer) -> bool:
        """Is ``buf`` in a region the device was told about when it started?"""
        return buf.region in self._regions

    def _config_len(self) -> int:
        """Ask for exactly the config bytes we use (qemu-storage-daemon rejects more than it has)."""
        return B.CONFIG_SIZE_V11

    # -- construction helpers -------------------------------------------------

    @classmethod
    def open(cls, target: str, **kw: Any) -> VirtioBlk:
        """Open ``vhost-user:PATH`` (or a plain socket path).

        Transport options: ``reconnect`` (a
        :class:`~pyvirtio.transport.vhost_user.ReconnectPolicy`, True, or a
        timeout in seconds: requests are held across a back-end restart),
        ``server`` (listen on PATH for the back end to connect),
        ``connect_timeout``; the rest go to :class:`VirtioBlk`.
        """
        from pyvirtio.targets import open_device

        transport_kw = {"queue_size": kw["queue_size"]} if kw.get("queue_size") else {}
        for name in ("reconnect", "server", "connect_timeout"):
            if name in kw:
                transport_kw[name] = kw.pop(name)
        device = open_device(target, **transport_kw)
        try:
            return cls(device, **kw)
        except BaseException:
            device.close()
            raise

    def close(self) -> None:
        self._queues.close()
        self.device.close()

    def __enter__(self) -> VirtioBlk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # -- per-thread queues ----------------------------------------------------

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

    # -- argument checks ------------------------------------------------------

    def _check_range(self, op: str, offset: int, length: int) -> None:
        check_range(op, offset, length, block_size=self.block_size, capacity=self.capacity, what="device")

    def _check_data(self, op: str, offset: int, length: int) -> None:
        check_data(
            op,
            offset,
            length,
            block_size=self.block_size,
            capacity=self.capacity,
            max_transfer=self.max_transfer,
            what="device",
        )

    def _check_writable(self, op: str) -> None:
        if self.readonly:
            raise InvalidArgument(f"{op}: the device is read-only")

    # -- request builders -----------------------------------------------------

    def read_request(self, offset: int, length: int, into: Buffer | None = None) -> BlkRequest:
        self._check_data("read", offset, length)
        if into is not None and len(into) < length:
            raise InvalidArgument(f"read: buffer of {len(into)} bytes for {length}")
        return BlkRequest(B.T_IN, offset, length, (into,) if into is not None else ())

    def write_request(self, offset: int, data: bytes | memoryview | Buffer) -> BlkRequest:
        self._check_writable("write")
        if isinstance(data, Buffer):
            self._check_data("write", offset, len(data))
            return BlkRequest(B.T_OUT, offset, len(data), (data,))
        self._check_data("write", offset, len(data))
        req = BlkRequest(B.T_OUT, offset, len(data))
        req._user = data
        return req

    def flush_request(self) -> BlkRequest:
        if not self.can_flush:
            raise InvalidArgument("flush: the device did not offer VIRTIO_BLK_F_FLUSH")
        return BlkRequest(B.T_FLUSH)

    def _dwz_request(self, op: int, offset: int, length: int, unmap: bool) -> BlkRequest:
        name = B.REQUEST_TYPE_NAMES[op]
        self._check_writable(name)
        if op == B.T_DISCARD and not self.can_discard:
            raise InvalidArgument("discard: the device did not offer VIRTIO_BLK_F_DISCARD")
        if op == B.T_WRITE_ZEROES and not self.can_write_zeroes:
            raise InvalidArgument("write-zeroes: the device did not offer VIRTIO_BLK_F_WRITE_ZEROES")
        self._check_range(name, offset, length)
        if length == 0:
            raise InvalidArgument(f"{name}: zero length")
        if op == B.T_DISCARD:
            per_seg, max_seg = self.max_discard_sectors, self.max_discard_seg
            align = self.discard_alignment
            if (offset // SECTOR) % align or (length // SECTOR) % align:
                raise InvalidArgument(f"discard: range must be aligned to {align * SECTOR} bytes")
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

    def discard_request(self, offset: int, length: int) -> BlkRequest:
        return self._dwz_request(B.T_DISCARD, offset, length, False)

    def write_zeroes_request(self, offset: int, length: int, unmap: bool = False) -> BlkRequest:
        return self._dwz_request(B.T_WRITE_ZEROES, offset, length, unmap)

    def get_id_request(self) -> BlkRequest:
        return BlkRequest(B.T_GET_ID, 0, B.ID_BYTES)

    # -- submission and completion --------------------------------------------

    def _segments(self, buf: Buffer, length: int, writable: bool) -> list[tuple[int, int, bool]]:
        """One buffer as descriptors of at most size_max bytes each."""
        step = self.size_max or length
        return [(buf.addr + off, min(step, length - off), writable) for off in range(0, length, step)]

    def _post(self, ctx: _QueueCtx, req: BlkRequest) -> None:
        """Put one request on the ring (no kick)."""
        if ctx.held is not None:
            raise QueueStateError(f"queue {ctx.vq.index} is held by an open FixedIO; close it first")
        if not ctx.free_slots:
            raise QueueFull(f"queue {ctx.vq.index}: {ctx.nslots} requests in flight")
        op = req.op
        # Data buffers in shared memory.
        if op in (B.T_IN, B.T_OUT, B.T_GET_ID):
            if req.data:
                bufs: Sequence[Buffer] = req.data
                for b in bufs:
                    if not self._in_device_memory(b):
                        raise InvalidArgument(
                            f"{req.name}: {b!r} is not in the shared memory the device knows "
                            "(the pool grew after the device started)"
                        )
            else:
                buf = self.allocate(max(req.length, 1), align=SECTOR if req.length >= SECTOR else 8)
                if not self._in_device_memory(buf):
                    self.free(buf)
                    raise QueueFull(
                        f"{req.name}: no room for a {req.length}-byte buffer in the device's shared memory "
                        "now; reap requests in flight or use smaller ones"
                    )
                req._bounce = buf
                if op == B.T_OUT:
                    buf.view[: req.length] = req._user
                bufs = (Buffer(buf.region, buf.offset, req.length),)
            segs = [s for b in bufs for s in self._segments(b, len(b), op != B.T_OUT)]
        elif op in (B.T_DISCARD, B.T_WRITE_ZEROES):
            buf = self.allocate(len(req.payload), align=8)
            if not self._in_device_memory(buf):
                self.free(buf)
                raise QueueFull(f"{req.name}: no room for its segments in the device's shared memory now")
            req._bounce = buf
            buf.view[:] = req.payload
            segs = [(buf.addr, len(req.payload), False)]
        else:
            segs = []
        slot = ctx.free_slots.pop()
        base = _SLOT_SIZE * slot
        sv = ctx.slot_view
        B.OUTHDR.pack_into(sv, base, op, 0, req.offset // SECTOR)
        sv[base + _STATUS_OFF] = 0xFF
        addr = ctx.slots.addr + base
        ring = ctx.vq.ring
        chain = [(addr, B.OUTHDR_SIZE, False), *segs, (addr + _STATUS_OFF, 1, True)]
        try:
            # The ring directly (ctx is the calling thread's queue: _ctx() checked ownership).
            if ring.indirect and len(chain) >= min(ring.indirect_threshold, ring.num_free + 1):
                with self._pool_lock:  # the ring may take an indirect table from the pool
                    ring.submit(req, chain)
            else:
                ring.submit(req, chain)
        except BaseException:
            ctx.free_slots.append(slot)
            if ring._req_head != 32768:
                ring.abort()
            self._drop_bounce(req)
            raise
        req._slot = slot
        req.done = False
        ctx.inflight += 1

    def _drop_bounce(self, req: BlkRequest) -> None:
        if req._bounce is not None:
            self.free(req._bounce)
            req._bounce = None

    def _complete(self, ctx: _QueueCtx, req: BlkRequest, written: int) -> None:
        slot = req._slot
        status = ctx.slot_view[_SLOT_SIZE * slot + _STATUS_OFF]
        ctx.free_slots.append(slot)
        ctx.inflight -= 1
        req._slot = -1
        req.status = status
        req.written = written
        if req.op == B.T_IN and status == B.S_OK and written < req.length:
            # virtio 1.2 §2.7.8.2: nothing beyond the used length may be relied on. (A
            # length that leaves out the status byte is taken: DPDK's vhost_blk example
            # reports just the data, and the status is read from the status byte.)
            req.error = BlockIOError(
                req.name,
                req.offset,
                req.length,
                status,
                f"short read: the device reported {written} bytes written for {req.length} bytes of data",
            )
        if req._bounce is not None:
            if req.op in (B.T_IN, B.T_GET_ID) and status == B.S_OK and req.error is None:
                req._user = bytes(req._bounce.view[: req.length])
            self._drop_bounce(req)
        req.done = True
        if req._waiter is not None:
            waiter, req._waiter = req._waiter, None
            waiter(req)

    def submit(self, requests: Iterable[BlkRequest]) -> int:
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
                        # A queue full of requests a dead peer will never complete:
                        # say the connection is lost, not "queue full" (or reconnect).
                        self._check_alive(ctx)
                    break
                n += 1
        finally:
            if n:
                ctx.vq.flush()
        return n

    def process_completions(self, max_n: int = 1 << 16) -> int:
        """Reap completed requests of the calling thread's queue; returns how many."""
        ctx = self._ctx()
        if ctx.held is not None:
            return 0  # the queue's completions are the FixedIO's
        try:
            done = ctx.vq.reap(max_n)
        except DeviceProtocolError as exc:
            for req, written in exc.completed:
                assert isinstance(req, BlkRequest)
                self._complete(ctx, req, written)
            self._fail_inflight(ctx, exc)
            raise
        for req, written in done:
            assert isinstance(req, BlkRequest)
            self._complete(ctx, req, written)
        return len(done)

    def _check_alive(self, ctx: _QueueCtx) -> float:
        """Is the queue's device there? Recover it (returns the pause) or fail its requests and raise."""
        try:
            ctx.vq.check_alive()
        except ConnectionLost as exc:
            return self._recover(ctx, exc)
        return 0.0

    def _recover(self, ctx: _QueueCtx, lost: ConnectionLost) -> float:
        """The device went away under ``ctx``: reconnect and resubmit, or fail every pending request."""
        device = self.device
        if not device.can_reconnect:
            self._fail_lost(ctx, lost)
            raise lost
        try:
            return device.recover(ctx.vq)
        except (ConnectionLost, DeviceProtocolError) as exc:
            self._fail_lost(ctx, exc)
            raise

    async def _acheck_alive(self, ctx: _QueueCtx) -> float:
        """:meth:`_check_alive` for the asyncio API: a reconnect does not block the loop."""
        try:
            ctx.vq.check_alive()
        except ConnectionLost as lost:
            if not self.device.can_reconnect:
                self._fail_lost(ctx, lost)
                raise lost from None
            try:
                return await self.device.arecover(ctx.vq)
            except (ConnectionLost, DeviceProtocolError) as exc:
                self._fail_lost(ctx, exc)
                raise
        return 0.0

    def _fail_lost(self, ctx: _QueueCtx, exc: BaseException) -> None:
        """Fail every request in flight on ``ctx`` (the device is gone) and give the ring back empty."""
        ring = ctx.vq.ring
        if ring.broken is not None:
            self._fail_inflight(ctx, exc)
            return
        with self._pool_lock:  # a reset gives the ring's indirect tables back to the pool
            lost = ring.reset()
        for token in lost:
            if not isinstance(token, BlkRequest):
                continue
            if token._slot >= 0:
                ctx.free_slots.append(token._slot)
                ctx.inflight -= 1
                token._slot = -1
            token.error = exc
            token.done = True
            self._drop_bounce(token)
            if token._waiter is not None:
                waiter, token._waiter = token._waiter, None
                waiter(token)

    def _fail_inflight(self, ctx: _QueueCtx, exc: BaseException) -> None:
        for token in ctx.vq.ring.in_flight_tokens():
            if isinstance(token, BlkRequest) and not token.done:
                token.error = exc
                token.done = True
                self._drop_bounce(token)
                if token._waiter is not None:
                    waiter, token._waiter = token._waiter, None
                    waiter(token)

    def wait(self, requests: Sequence[BlkRequest], timeout: float | None = -1.0) -> None:
        """Wait until every request is done (polling per ``self.poll``), then raise the first error."""
        ctx = self._ctx()
        tmo = self.timeout if timeout == -1.0 else timeout
        deadline = None if tmo is None else time.monotonic() + tmo
        spins = 0
        pending = [r for r in requests if not r.done]
        while pending:
            got = self.process_completions()
            if not got:
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportTimeout(f"{len(pending)} requests not completed within {tmo} s")
                try:
                    self._idle(ctx, spins, deadline)
                except ConnectionLost as exc:
                    paused = self._recover(ctx, exc)
                    if deadline is not None:
                        deadline += paused  # a reconnect is added latency, not a timeout
                spins += 1
            else:
                spins = 0
            pending = [r for r in pending if not r.done]
        for r in requests:
            r.check()

    def _idle(self, ctx: _QueueCtx, spins: int, deadline: float | None) -> None:
        if self.poll == "busy" or (self.poll == "hybrid" and spins < 2000):
            if spins & 0xFF == 0xFF:  # not on the first spins: a device that answers at once costs no syscall
                ctx.vq.check_alive()
            return
        ring = ctx.vq.ring
        try:
            if ring.enable_interrupts():
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.device.transport.wait_queue(ctx.vq.index, min(left, 0.1) if left is not None else 0.1)
        finally:
            ring.disable_interrupts()

    def fixed_io(self, buf: Buffer) -> FixedIO:
        """A request pre-linked for ``buf`` (from :meth:`allocate`): ``read(offset)`` / ``write(offset)``.

        1.5-1.9x a loop of ``readinto`` for same-size I/O (measured,
        docs/benchmarks.md §1.3; drivers/blk_fixed.py); holds the calling
        thread's queue until closed.
        """
        from pyvirtio.drivers.blk_fixed import FixedIO

        return FixedIO(self, buf)

    def run(self, req: BlkRequest) -> BlkRequest:
        """Submit one request and wait for it."""
        if self.submit([req]) != 1:
            raise QueueFull(self._ctx().full_reason or "no room on the queue")
        self.wait([req])
        return req

    # -- sync API -------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        req = self.run(self.read_request(offset, length))
        data: bytes = req._user
        return data

    def readinto(self, offset: int, buf: Buffer) -> int:
        """Zero copy: read into a Buffer from ``blk.pool``."""
        self.run(self.read_request(offset, len(buf), into=buf))
        return len(buf)

    def write(self, offset: int, data: bytes | memoryview | Buffer) -> None:
        self.run(self.write_request(offset, data))

    def readv(self, offset: int, lengths: Sequence[int]) -> list[bytes]:
        """Scatter read: one request whose data lands in one buffer per length."""
        if any(n <= 0 for n in lengths):
            raise InvalidArgument("readv: every length must be positive")
        self._check_data("read", offset, sum(lengths))  # before allocating anything
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
        self._check_writable("write")
        self._check_data("write", offset, sum(len(c) for c in chunks))  # before allocating anything
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
            self._check_writable("write")
            self._vector(B.T_OUT, offset, bufs)
        finally:
            for b in owned:
                self.free(b)

    def _vector(self, op: int, offset: int, bufs: Sequence[Buffer]) -> int:
        total = sum(len(b) for b in bufs)
        name = B.REQUEST_TYPE_NAMES[op]
        self._check_data(name, offset, total)
        nseg = sum(-(-len(b) // self.size_max) if self.size_max else 1 for b in bufs)
        if nseg > self.max_segments:
            raise InvalidArgument(f"{name}: {nseg} segments exceed the device limit {self.max_segments}")
        self.run(BlkRequest(op, offset, total, tuple(bufs)))
        return total

    def flush(self) -> None:
        self.run(self.flush_request())

    def discard(self, offset: int, length: int) -> None:
        self.run(self.discard_request(offset, length))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.run(self.write_zeroes_request(offset, length, unmap))

    def get_id(self) -> str:
        req = self.run(self.get_id_request())
        raw: bytes = req._user or b""
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    # -- asyncio API ----------------------------------------------------------

    async def asubmit(self, req: BlkRequest) -> BlkRequest:
        """Submit from a coroutine; completes via the queue's interrupt fd."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[BlkRequest] = loop.create_future()

        def done(r: BlkRequest) -> None:
            if not fut.done():
                fut.set_result(r)

        req._waiter = done
        ctx = self._ctx()
        fd = ctx.vq.fd
        if self.submit([req]) != 1:
            req._waiter = None
            raise QueueFull(ctx.full_reason or "no room on the queue")
        if fd is None:
            # No interrupt fd (loopback): the request is done or pollable now.
            while not req.done:
                self.process_completions()
                await asyncio.sleep(0)
        else:
            self._ensure_reader(loop, ctx, fd)
            self._arm(ctx)
            await self._await_done(loop, ctx, req, fut)
        req.check()
        return req

    async def _await_done(
        self, loop: asyncio.AbstractEventLoop, ctx: _QueueCtx, req: BlkRequest, fut: asyncio.Future[BlkRequest]
    ) -> None:
        """Wait for the interrupt reader to complete ``req``, checking the device every 0.2 s meanwhile.

        A reconnect waits for the back end in a worker thread (the loop goes
        on) and restores the queue on the loop's thread, its owner.
        """
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while not fut.done():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TransportTimeout(f"{req.name} at {req.offset} not completed within {self.timeout} s")
            try:
                await asyncio.wait_for(asyncio.shield(fut), 0.2 if left is None else min(0.2, left))
            except TimeoutError:
                paused = await self._acheck_alive(ctx)  # raises, with req failed, if the device is gone for good
                if paused:
                    if deadline is not None:
                        deadline += paused
                    self._arm(ctx)

    def _ensure_reader(self, loop: asyncio.AbstractEventLoop, ctx: _QueueCtx, fd: int) -> None:
        if getattr(ctx, "reader_loop", None) is loop:
            return

        def on_readable() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            try:
                self.process_completions()
            except Exception:  # errors are delivered to the requests themselves
                pass
            self._arm(ctx)

        loop.add_reader(fd, on_readable)
        ctx.reader_loop = loop  # type: ignore[attr-defined]

    def _arm(self, ctx: _QueueCtx) -> None:
        """Enable interrupts while requests are in flight; reap what is already there."""
        while ctx.inflight:
            if not ctx.vq.ring.enable_interrupts():
                return
            self.process_completions()
        ctx.vq.ring.disable_interrupts()

    async def aread(self, offset: int, length: int) -> bytes:
        req = await self.asubmit(self.read_request(offset, length))
        data: bytes = req._user
        return data

    async def awrite(self, offset: int, data: bytes | memoryview | Buffer) -> None:
        await self.asubmit(self.write_request(offset, data))

    async def aflush(self) -> None:
        await self.asubmit(self.flush_request())

    async def adiscard(self, offset: int, length: int) -> None:
        await self.asubmit(self.discard_request(offset, length))

    async def awrite_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        await self.asubmit(self.write_zeroes_request(offset, length, unmap))


def pack_pattern(block: int, seed: int, size: int) -> bytes:
    """A verifiable block pattern: (block number, seed) repeated over ``size`` bytes."""
    unit = struct.pack("<QQ", block, seed)
    return unit * (size // 16) + unit[: size % 16]
