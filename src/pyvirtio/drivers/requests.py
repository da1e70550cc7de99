"""The request engine shared by the block-shaped drivers: virtio-blk and the virtio-scsi request queues.

Theory of operation. A driver that sends requests on its own queues
(:class:`~pyvirtio.drivers.blk.VirtioBlk`,
:class:`~pyvirtio.drivers.scsi.VirtioScsi`) derives from
:class:`RequestEngine` and supplies three small hooks:

``_build(ctx, req, slot)``
    write the request's header into its slot and return its descriptor chain
    (``(addr, length, device_writable)`` triples; bounce buffers allocated here);
``_complete(ctx, req, written)``
    read the device's answer into the request; return False if the request
    was sent again instead (virtio-scsi after UNIT ATTENTION);
``_drop_bounce(req)``
    give back whatever ``_build`` allocated.

Everything else is here, once: per-queue contexts (:class:`QueueContext`:
header/response slots allocated once, the free list, the requests in
flight, SCSI tags), one queue per thread (:mod:`pyvirtio.drivers.queues`,
SPDK's per-thread channels: no locks on the data path), submit with one kick
per batch, reaping with every used entry validated by the ring, waiting under
the poll policy (``busy``: spin; ``wait``: sleep on the queue's interrupt;
``hybrid``: spin 2000 times, then sleep), and the asyncio path (the queue's
interrupt fd on ``loop.add_reader``, acknowledged through
:meth:`~pyvirtio.transport.base.Transport.ack_queue`; the device is checked
every 0.2 s while a coroutine waits).

One request at a time (:meth:`RequestEngine.run`, behind ``read`` /
``write`` / ``readinto``) takes a lane of its own: the driver's
``_publish_one`` hook publishes a three-buffer request (header, data,
status) with the ring's ``submit3``, which also returns the kick decision
(no chain list, one ring call); anything else goes through ``_build`` as a
batch does. A bounced request takes its buffer from the queue's *spare*
(:meth:`RequestEngine.take_bounce` / :meth:`~RequestEngine.give_bounce`:
one buffer of up to :data:`SPARE_MAX` bytes kept per queue, so requests of
one size in a row allocate nothing); the spares are freed before any
allocation would otherwise land outside the device's memory.

A lost device: with a reconnect policy on the transport the queue is
restored (:meth:`~pyvirtio.device.VirtioDevice.recover`, or ``arecover``
from a coroutine: the loop goes on) and each request not completed is
resubmitted exactly once; callers see added latency, which does not count
against their timeout. Without reconnect, or once the policy gives up,
every request pending on the queue fails with the ConnectionLost. A device
that breaks the ring rules (:class:`~pyvirtio.errors.DeviceProtocolError`)
fails every request in flight on that queue with the error; the valid
completions found before it are delivered first.

A request is any object with the fields of :class:`Request` (the drivers'
dataclasses :class:`~pyvirtio.drivers.blk.BlkRequest` and
:class:`~pyvirtio.drivers.scsi.ScsiRequest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, cast

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers.queues import ThreadQueues
from pyvirtio.errors import (
    ConnectionLost,
    DeviceProtocolError,
    InvalidArgument,
    QueueFull,
    QueueStateError,
    TransportTimeout,
)
from pyvirtio.memory import Buffer

#: The poll policies (see the module docstring).
POLL_MODES = ("busy", "wait", "hybrid")
#: Spins before ``hybrid`` sleeps on the interrupt.
HYBRID_SPINS = 2000
#: empty polls ``run`` makes itself before the general wait (not in "wait" mode: one)
RUN_SPINS = 64
#: The largest bounce buffer a queue keeps for its next request (:meth:`RequestEngine.take_bounce`).
SPARE_MAX = 128 << 10

Chain = list[tuple[int, int, bool]]


class Request(Protocol):
    """The fields the engine keeps on every request."""

    #: Set when the request completed (successfully or not).
    done: bool
    #: A transport or protocol error the request failed with (None: see the driver's status fields).
    error: BaseException | None
    #: The slot it occupies while in flight (-1: none).
    slot: int
    #: Called once with the request when it completes (set by ``asubmit``).
    waiter: Callable[[Any], None] | None

    @property
    def name(self) -> str: ...

    def check(self) -> None:
        """Raise the request's error, if it failed."""
        ...


R = TypeVar("R", bound=Request)


class QueueContext:
    """One request queue of the calling thread: :meth:`RequestEngine.thread_queue`.

    Public: ``vq`` (the :class:`~pyvirtio.device.Virtqueue`), ``inflight``
    (requests on it now), ``held`` (an object that took the whole queue,
    e.g. a :class:`~pyvirtio.drivers.blk_fixed.FixedIO` or a bench engine:
    the general API on this queue raises QueueStateError until it is set
    back to None), ``slots`` / ``slot_view`` / ``slot_size`` / ``free_slots``
    (the per-request header slots), ``next_tag`` (SCSI tags),
    ``full_reason`` (why the last submit stopped), ``spare`` (a bounce
    buffer kept for the next request: :meth:`RequestEngine.take_bounce`).
    """

    def __init__(self, vq: Virtqueue, slots: Buffer, slot_size: int, release: Callable[[Buffer], None]) -> None:
        self.vq = vq
        self.nslots = vq.size
        self.slots = slots
        self.slot_size = slot_size
        self.slot_view = slots.view
        self.free_slots = list(range(self.nslots - 1, -1, -1))
        self.inflight = 0
        self.next_tag = vq.index << 48
        self.full_reason = ""
        self.held: object | None = None
        self.reader_loop: asyncio.AbstractEventLoop | None = None
        self.spare: Buffer | None = None  # the engine's, under its pool lock
        self._release = release

    def close(self) -> None:
        """Give the slots back (the queue is released or the device closes; the engine took the spare)."""
        self.slot_view = memoryview(b"")
        self._release(self.slots)


class RequestEngine(Generic[R]):
    """Requests on per-thread queues (see the module docstring); drivers derive from it."""

    #: What wait()'s timeout message calls the requests.
    request_noun: ClassVar[str] = "requests"
    # Slots, not an instance dict: at 30 names (with its bases') CPython 3.11 stops specialising
    # attribute access on the per-request paths (tests/test_hot_attributes.py).
    __slots__ = (
        "_pool_lock", "_queues", "_regions", "_request_type", "_slot_size", "_spares", "device", "poll", "pool",
        "timeout",
    )

    _queues: ThreadQueues[QueueContext]

    def __init__(self, device: VirtioDevice, *, poll: str, timeout: float | None, request_type: type) -> None:
        if poll not in POLL_MODES:
            raise InvalidArgument(f"poll must be busy, wait or hybrid, not {poll!r}")
        self.device = device
        self.pool = device.pool
        self.poll = poll
        self.timeout = timeout
        # The pool's allocator is not thread-safe, and every thread with a queue
        # allocates bounce buffers from it: its calls from here are serialised.
        self._pool_lock = threading.Lock()
        # Queues keeping a spare bounce buffer (take_bounce), under the pool lock.
        self._spares: set[QueueContext] = set()
        self._request_type = request_type
        self._regions: tuple[object, ...] = ()
        self._slot_size = 0

    def _start_queues(self, first: int, slot_size: int, what: str) -> None:
        """After ``device.start``: queues ``first``.. serve threads, ``slot_size`` header bytes per request."""
        # Buffers must live in the memory the device was given at start (a region
        # the pool adds later is unknown to it: qemu-storage-daemon drops the
        # connection on such an address).
        self._regions = tuple(self.pool.regions)
        self._slot_size = slot_size
        self._queues = ThreadQueues(self.device, first, self._make_queue, what)

    def _make_queue(self, vq: Virtqueue) -> QueueContext:
        # Aligned to the slot size's largest power-of-two factor (64 .. 4096): a power-of-two slot then
        # never crosses a page (virtio-scsi's headers must not: drivers/scsi/requests.py, HEADER_PAGE).
        size = self._slot_size
        slots = self.allocate(size * vq.size, align=min(max(64, size & -size), 4096))
        if not self.in_device_memory(slots):
            self.free(slots)
            raise QueueFull(f"queue {vq.index}: no room for request headers in the device's shared memory")
        return QueueContext(vq, slots, self._slot_size, self.free)

    def _close_queues(self) -> None:
        with self._pool_lock:
            self._drop_spares()
        if hasattr(self, "_queues"):
            self._queues.close()

    def close(self) -> None:
        """Free the queues' memory and close the device (the driver adds what it holds)."""
        self._close_queues()
        self.device.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- memory -----------------------------------------------------------------

    def allocate(self, size: int, align: int = 8) -> Buffer:
        """A buffer from the device's shared memory pool (thread-safe; pass it for zero copy).

        The queues' spare bounce buffers never keep a buffer out of the
        device's memory: if one would land outside it, they are freed and the
        allocation is made again.
        """
        with self._pool_lock:
            buf = self.pool.allocate(size, align)
            if self._spares and buf.region not in self._regions:
                self.pool.free(buf)
                self._drop_spares()
                buf = self.pool.allocate(size, align)
            return buf

    def _drop_spares(self) -> None:
        """Free every queue's spare bounce buffer (the pool lock held)."""
        for ctx in self._spares:
            if ctx.spare is not None:
                self.pool.free(ctx.spare)
                ctx.spare = None
        self._spares.clear()

    def free(self, buf: Buffer) -> None:
        """Give back a buffer from :meth:`allocate` (thread-safe)."""
        with self._pool_lock:
            self.pool.free(buf)

    def in_device_memory(self, buf: Buffer) -> bool:
        """Is ``buf`` in a region the device was told about when it started?"""
        return buf.region in self._regions

    def take_bounce(self, ctx: QueueContext, size: int, align: int) -> Buffer | None:
        """A bounce buffer for a request's data on ``ctx``, in the device's memory; None: no room there now.

        The queue's spare when it has this size and alignment (requests of
        one size in a row allocate nothing), else a new one (the spare is
        freed first). Give it back with :meth:`give_bounce`.
        """
        with self._pool_lock:
            spare = ctx.spare
            if spare is not None:
                ctx.spare = None
                self._spares.discard(ctx)
                if spare.size == size and not spare.addr & (align - 1):
                    return spare
                self.pool.free(spare)
        buf = self.allocate(size, align)
        if buf.region not in self._regions:
            self.free(buf)
            return None
        return buf

    def give_bounce(self, ctx: QueueContext, buf: Buffer) -> None:
        """A bounce buffer from :meth:`take_bounce` is done: kept as ``ctx``'s spare (one, small), or freed."""
        with self._pool_lock:
            if ctx.spare is None and buf.size <= SPARE_MAX:
                ctx.spare = buf
                self._spares.add(ctx)
            else:
                self.pool.free(buf)

    # -- per-thread queues ----------------------------------------------------------

    def thread_queue(self) -> QueueContext:
        """The calling thread's queue context, its queue acquired on first use (see :class:`QueueContext`)."""
        return self._queues.get()

    def release_queue(self) -> None:
        """Give the calling thread's queue back (it must have nothing in flight).

        A thread that ends without calling this keeps its queue only until
        another thread finds no free one (:mod:`pyvirtio.drivers.queues`).
        """
        with self._pool_lock:
            self._drop_spares()  # (rare: every queue's, which their threads allocate again if they need)
        self._queues.release()

    # -- hooks ------------------------------------------------------------------------

    def _build(self, ctx: QueueContext, req: R, slot: int) -> Chain:
        """Fill ``slot`` for ``req`` and return its descriptor chain (may raise: nothing is posted then)."""
        raise NotImplementedError

    def _complete(self, ctx: QueueContext, req: R, written: int) -> bool:
        """Take in the device's answer; False if ``req`` went back on the ring instead (it stays in flight)."""
        raise NotImplementedError

    def _drop_bounce(self, req: R) -> None:
        """Free what ``_build`` allocated for ``req``."""
        raise NotImplementedError

    def _describe(self, req: R) -> str:
        """``req`` in a timeout message."""
        return req.name

    # -- submission ---------------------------------------------------------------------

    def submit(self, requests: Iterable[R]) -> int:
        """Post requests and kick once. Returns how many were posted (stops when the queue is full)."""
        return self._submit(self._queues.get(), requests)

    def _submit(self, ctx: QueueContext, requests: Iterable[R]) -> int:
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

    def _post(self, ctx: QueueContext, req: R, decide: bool = False) -> bool:
        """Put one request on the ring, kick not sent; with ``decide``, the one-request lane: returns the kick decision.

        Without ``decide`` (batches) the caller flushes once for the batch
        and False is returned.
        """
        if ctx.held is not None:
            raise QueueStateError(f"queue {ctx.vq.index} is held by an open {type(ctx.held).__name__}; close it first")
        free = ctx.free_slots
        if not free:
            raise QueueFull(f"queue {ctx.vq.index}: {ctx.nslots} requests in flight")
        slot = free.pop()
        try:
            if decide:
                kick = self._publish_one(ctx, req, slot)
            else:
                self._add_chain(ctx, req, self._build(ctx, req, slot))
                kick = False
        except BaseException:
            free.append(slot)
            self._drop_bounce(req)
            raise
        req.slot = slot
        req.done = False
        ctx.inflight += 1
        return kick

    def _publish_one(self, ctx: QueueContext, req: R, slot: int) -> bool:
        """Fill ``slot`` for ``req``, publish it and return the ring's kick decision (``run``'s lane).

        The default goes the general way (:meth:`_publish_chain`); a driver
        whose common requests are three-buffer chains publishes those with
        :meth:`_submit3` and the rest with :meth:`_publish_chain`. May raise:
        nothing is published then.
        """
        return self._publish_chain(ctx, req, slot)

    def _publish_chain(self, ctx: QueueContext, req: R, slot: int) -> bool:
        """:meth:`_build`'s chain published, and the kick decision."""
        self._add_chain(ctx, req, self._build(ctx, req, slot))
        return ctx.vq.ring.kick_prepare()

    def _submit3(
        self, ctx: QueueContext, req: R, a0: int, l0: int, a1: int, l1: int, w1: bool, a2: int, l2: int
    ) -> bool:
        """The ring's one-request fast lane (``submit3``: readable, either, writable; kick decision returned)."""
        ring = ctx.vq.ring
        if ring.indirect and (ring.indirect_threshold <= 3 or ring.num_free < 3):
            with self._pool_lock:  # the ring may take an indirect table from the pool (as _add_chain)
                return ring.submit3(req, a0, l0, a1, l1, w1, a2, l2)
        return ring.submit3(req, a0, l0, a1, l1, w1, a2, l2)

    def _add_chain(self, ctx: QueueContext, req: R, chain: Chain) -> None:
        """Add ``req``'s chain to the ring, published but not kicked (also to send a request in flight again)."""
        # The ring directly: ctx is the calling thread's queue (thread_queue checked ownership).
        ring = ctx.vq.ring
        if ring.indirect and len(chain) >= min(ring.indirect_threshold, ring.num_free + 1):
            with self._pool_lock:  # the ring may take an indirect table from the pool
                ring.submit(req, chain)
        else:
            ring.submit(req, chain)

    # -- completion ----------------------------------------------------------------------

    def reap(self, max_n: int = 1 << 16) -> list[R]:
        """Reap the calling thread's queue; returns the requests that finished (for polling loops)."""
        finished: list[R] = []
        self._reap(self._queues.get(), max_n, finished)
        return finished

    def process_completions(self, max_n: int = 1 << 16) -> int:
        """Reap completed requests of the calling thread's queue; returns how many finished."""
        return self._reap(self._queues.get(), max_n, None)

    def _reap(self, ctx: QueueContext, max_n: int, finished: list[R] | None) -> int:
        if ctx.held is not None:
            return 0  # the queue's completions are its holder's
        vq = ctx.vq
        try:
            # Every token on this ring is one of our requests (the queue is not held). The
            # ring directly: ctx is the calling thread's queue (thread_queue checked ownership).
            done: list[tuple[Any, int]] = vq.ring.reap(max_n)
        except DeviceProtocolError as exc:
            for token, written in exc.completed:
                bad = cast(R, token)
                if self._complete(ctx, bad, written):
                    self._finished(ctx, bad)
            self._fail_inflight(ctx, exc)
            raise
        complete = self._complete
        free = ctx.free_slots
        n = 0
        resent = False
        req: R
        for req, written in done:
            if complete(ctx, req, written):
                free.append(req.slot)
                req.slot = -1
                ctx.inflight -= 1
                req.done = True
                waiter = req.waiter
                if waiter is not None:
                    req.waiter = None
                    waiter(req)
                if finished is not None:
                    finished.append(req)
                n += 1
            else:
                resent = True
        if resent:
            vq.flush()
        return n

    def _finished(self, ctx: QueueContext, req: R) -> None:
        """The bookkeeping of one completed request (the loop in _reap does the same inline)."""
        ctx.free_slots.append(req.slot)
        req.slot = -1
        ctx.inflight -= 1
        req.done = True
        self._notify(req)

    @staticmethod
    def _notify(req: Request) -> None:
        waiter = req.waiter
        if waiter is not None:
            req.waiter = None
            waiter(req)

    def _fail_request(self, req: R, exc: BaseException) -> None:
        req.error = exc
        req.done = True
        self._drop_bounce(req)
        self._notify(req)

    def _fail_inflight(self, ctx: QueueContext, exc: BaseException) -> None:
        """The queue broke: every request still on it fails with ``exc`` (the ring stays broken)."""
        for token in ctx.vq.ring.in_flight_tokens():
            if isinstance(token, self._request_type):
                req = cast(R, token)
                if not req.done:
                    self._fail_request(req, exc)

    def _fail_lost(self, ctx: QueueContext, exc: BaseException) -> None:
        """Fail every request in flight on ``ctx`` (the device is gone) and give the ring back empty."""
        ring = ctx.vq.ring
        if ring.broken is not None:
            self._fail_inflight(ctx, exc)
            return
        with self._pool_lock:  # a reset gives the ring's indirect tables back to the pool
            lost = ring.reset()
        for token in lost:
            if not isinstance(token, self._request_type):
                continue
            req = cast(R, token)
            if req.slot >= 0:
                ctx.free_slots.append(req.slot)
                ctx.inflight -= 1
                req.slot = -1
            self._fail_request(req, exc)

    # -- a lost device ---------------------------------------------------------------

    def _check_alive(self, ctx: QueueContext) -> float:
        """Is the queue's device there? Recover it (returns the pause) or fail its requests and raise."""
        try:
            ctx.vq.check_alive()
        except ConnectionLost as exc:
            return self._recover(ctx, exc)
        return 0.0

    def _recover(self, ctx: QueueContext, lost: ConnectionLost) -> float:
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

    async def _acheck_alive(self, ctx: QueueContext) -> float:
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

    # -- waiting --------------------------------------------------------------------------

    def wait(self, requests: Sequence[R], timeout: float | None = -1.0, *, check: bool = True) -> None:
        """Wait until every request is done (polling per ``self.poll``); then (``check``) raise the first error.

        ``timeout``: seconds (None: forever; default: the driver's). Time spent
        reconnecting to a lost device does not count.
        """
        self._wait(self._queues.get(), requests, timeout, check)

    def _wait(self, ctx: QueueContext, requests: Sequence[R], timeout: float | None, check: bool) -> None:
        pending = [r for r in requests if not r.done]
        tmo = self.timeout if timeout == -1.0 else timeout
        deadline: float | None = None
        spins = 0
        while pending:
            if self._reap(ctx, 1 << 16, None):
                spins = 0
            else:
                now = time.monotonic()
                if tmo is not None:
                    if deadline is None:
                        deadline = now + tmo  # from the first wait: a device that answers at once costs no clock read
                    elif now > deadline:
                        raise TransportTimeout(f"{len(pending)} {self.request_noun} not completed within {tmo} s")
                try:
                    self._idle(ctx, spins, deadline)
                except ConnectionLost as exc:
                    paused = self._recover(ctx, exc)
                    if deadline is not None:
                        deadline += paused  # a reconnect is added latency, not a timeout
                spins += 1
            pending = [r for r in pending if not r.done]
        if check:
            for r in requests:
                r.check()

    def idle(self, spins: int, deadline: float | None = None) -> None:
        """One idle step of the poll policy on the calling thread's queue (for polling loops: benches).

        ``spins``: how many empty polls came before; ``deadline``: a
        ``time.monotonic()`` value a sleep must not pass. Raises ConnectionLost
        if the device is gone.
        """
        self._idle(self._queues.get(), spins, deadline)

    def _idle(self, ctx: QueueContext, spins: int, deadline: float | None) -> None:
        if self.poll == "busy" or (self.poll == "hybrid" and spins < HYBRID_SPINS):
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

    # -- one request, many requests ------------------------------------------------------------

    def run(self, req: R, *, check: bool = True) -> R:
        """Submit one request and wait for it; (``check``) raise its error.

        The one-request path of ``read``/``write``/``readinto`` (docs/benchmarks.md
        §1.3): post and publish with the kick decision in one ring call where
        the driver can (:meth:`_publish_one`, the ring's ``submit3``), kick,
        then reap the ring until the request is done, with no per-call lists;
        a request not done after :data:`RUN_SPINS` empty polls goes to the
        general wait (poll policy, timeout, reconnect).
        """
        ctx = self._queues.get()
        try:
            kick = self._post(ctx, req, True)
        except QueueFull as exc:
            ctx.full_reason = str(exc)
            self._check_alive(ctx)  # a queue full of a dead peer's requests: say so (or reconnect)
            raise
        if kick:
            ctx.vq.notify()
        reap = self._reap
        if not (reap(ctx, 1 << 16, None) and req.done):  # the first look (the device may be done already)
            for _ in range(RUN_SPINS - 1 if self.poll != "wait" else 0):
                if req.done or reap(ctx, 1 << 16, None) and req.done:
                    break
            else:
                self._wait(ctx, (req,), -1.0, False)
        if check:
            req.check()
        return req

    def run_all(self, requests: Sequence[R]) -> None:
        """Run many requests, as many in flight as the queue and the shared memory allow; raise the first error."""
        ctx = self._queues.get()
        i = 0
        while i < len(requests):
            n = self._submit(ctx, requests[i:])
            if n == 0:
                if ctx.inflight:
                    raise QueueStateError(f"queue {ctx.vq.index} is full of other requests: {ctx.full_reason}")
                raise QueueFull(ctx.full_reason or "no room on the queue")
            self._wait(ctx, requests[i : i + n], -1.0, False)
            i += n
        for r in requests:
            r.check()

    # -- asyncio -------------------------------------------------------------------------------

    async def asubmit(self, req: R) -> R:
        """Submit from a coroutine; completes via the queue's interrupt fd. Raises the request's error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()

        def done(r: R) -> None:
            if not fut.done():
                fut.set_result(r)

        req.waiter = done
        ctx = self._queues.get()
        fd = ctx.vq.fd
        if self._submit(ctx, (req,)) != 1:
            req.waiter = None
            raise QueueFull(ctx.full_reason or "no room on the queue")
        if fd is None:
            # No interrupt fd (loopback): the request is done or pollable now.
            while not req.done:
                self._reap(ctx, 1 << 16, None)
                await asyncio.sleep(0)
        else:
            self._ensure_reader(loop, ctx, fd)
            self._arm(ctx)
            await self._await_done(loop, ctx, req, fut)
        req.check()
        return req

    async def _await_done(
        self, loop: asyncio.AbstractEventLoop, ctx: QueueContext, req: R, fut: asyncio.Future[R]
    ) -> None:
        """Wait for the interrupt reader to complete ``req``, checking the device every 0.2 s meanwhile.

        A reconnect waits for the back end in a worker thread (the loop goes
        on) and restores the queue on the loop's thread, its owner.
        """
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while not fut.done():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TransportTimeout(f"{self._describe(req)} not completed within {self.timeout} s")
            try:
                await asyncio.wait_for(asyncio.shield(fut), 0.2 if left is None else min(0.2, left))
            except TimeoutError:
                paused = await self._acheck_alive(ctx)  # raises, with req failed, if the device is gone for good
                if paused:
                    if deadline is not None:
                        deadline += paused
                    self._arm(ctx)

    def _ensure_reader(self, loop: asyncio.AbstractEventLoop, ctx: QueueContext, fd: int) -> None:
        if ctx.reader_loop is loop:
            return
        ack = self.device.transport.ack_queue
        index = ctx.vq.index

        def on_readable() -> None:
            ack(index)
            with contextlib.suppress(Exception):  # errors are delivered to the requests themselves
                self._reap(ctx, 1 << 16, None)
            self._arm(ctx)

        loop.add_reader(fd, on_readable)
        ctx.reader_loop = loop

    def _arm(self, ctx: QueueContext) -> None:
        """Enable interrupts while requests are in flight; reap what is already there."""
        ring = ctx.vq.ring
        while ctx.inflight:
            if not ring.enable_interrupts():
                return
            self._reap(ctx, 1 << 16, None)
        ring.disable_interrupts()


__all__ = ["HYBRID_SPINS", "POLL_MODES", "SPARE_MAX", "QueueContext", "Request", "RequestEngine"]
