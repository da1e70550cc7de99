"""VirtioDevice: one virtio device as a driver sees it (SPDK's virtio_dev).

Theory of operation. A device is a :class:`~pyvirtio.transport.base.Transport`
plus the driver's state: the shared memory pool, the negotiated features and
the queues. Its life follows virtio 1.2 §3.1.1:

``reset(features, ring=, in_order=)``
    status 0 (and queues deleted), ACKNOWLEDGE, DRIVER, read the offered
    features, write ``requested & offered`` (VERSION_1 always requested),
    FEATURES_OK. Every step is read back; a step that does not stick writes
    FAILED (SPDK never does) and raises :class:`~pyvirtio.errors.NegotiationError`.
``start(request_queues, fixed_queues)``
    allocate and set up each ring in the negotiated format, then DRIVER_OK
    (checked).

Ring format and IN_ORDER (virtio 1.2 §2.7 / §2.8, §6: VIRTIO_F_RING_PACKED,
VIRTIO_F_IN_ORDER) are chosen at ``reset`` by ``ring`` (``"split"``: never
packed; ``"packed"``: VIRTIO_F_RING_PACKED, a :class:`NegotiationError` if
the device does not offer it; ``"auto"``: :data:`AUTO_RING` when the device
offers it) and ``in_order`` (True: VIRTIO_F_IN_ORDER, an error if not
offered; False: never; ``"auto"``: :data:`AUTO_IN_ORDER`). ``start`` then
builds a :class:`~pyvirtio.ring.split.SplitQueue` or a
:class:`~pyvirtio.ring.packed.PackedQueue`; everything above goes through
the ring protocol (:class:`~pyvirtio.ring.base.RingQueue`), whatever the
format. ``packed_zero_wrap`` (a constructor option) keeps every packed ring
base the device hands a back end in lap 0 (both wrap counters 0), for DPDK's
vhost_blk example, which reads bit 15 of the base as part of the position
(:mod:`pyvirtio.ring.packed`, "Bases in lap 0"). A restart may then move the
ring to the other lap, where a back end's inflight area no longer applies:
such a device asks its transport not to hand the area over
(``hand_over_inflight``) and resubmits requests in flight itself.
``stop()`` / ``close()``
    status 0, queues deleted; ``close`` also closes the transport and frees
    the memory. The device is a context manager.

Status bits accumulate as in the seed: a non-zero status write is OR-ed into
the current status.

Config space: read and written through the transport, unless the device
has none the transport can reach (``transport.has_config()`` False: a
vhost-user back end without PROTOCOL_F_CONFIG). A driver that knows what the
config must hold then keeps it here (:meth:`VirtioDevice.keep_config`, QEMU's
way for vhost-user-scsi): reads are served from the kept bytes and writes go
through the driver's check, never to the back end.

Reconnect: a :class:`~pyvirtio.transport.base.ReconnectingTransport` can lose
its device and get it back; the device checks for that protocol once, when
it is built, and :meth:`VirtioDevice.recover` drives it.

Queue ownership (the seed's acquire/release, with the calling thread as the
owner): a queue is used by one thread at a time. :meth:`acquire` /
:meth:`find_and_acquire` / :meth:`release`; only the owner may release, and
the data-path calls of :class:`Virtqueue` raise
:class:`~pyvirtio.errors.OwnershipError` from any other thread. There are no
locks on the data path.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvirtio.errors import (
    ConnectionLost,
    InvalidArgument,
    NegotiationError,
    OwnershipError,
    PyvirtioError,
    QueueStateError,
    ReconnectFailed,
)
from pyvirtio.memory import DEFAULT_REGION_SIZE, MemoryPool
from pyvirtio.ring.base import Completion, RingQueue
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue
from pyvirtio.spec.common import (
    DEVICE_TYPE_NAMES,
    F_IN_ORDER,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    status_names,
)
from pyvirtio.spec.features import device_feature_names
from pyvirtio.spec.ring import MAX_QUEUE_SIZE, is_power_of_two
from pyvirtio.transport.base import QueueSetup, ReconnectingTransport, Transport

#: Writes to a config the frontend keeps: ``check(offset, data)`` raises to refuse one.
ConfigWriteCheck = Callable[[int, bytes], None]

#: The values of ``ring=`` (the drivers' ``open`` and :meth:`VirtioDevice.reset`).
RING_CHOICES = ("split", "packed", "auto")
#: What ``ring="auto"`` negotiates when the device offers both formats. Issue 12 makes
#: packed the default only where it is measured not slower than split; until the
#: engines' packed fast path has been measured against split on a quiet machine,
#: auto stays split (the one place to change it).
AUTO_RING = "split"
#: What ``in_order="auto"`` negotiates when the device offers VIRTIO_F_IN_ORDER: off, for
#: the same reason (and the fixed-chain fast paths of split rings need it off).
AUTO_IN_ORDER = False


class Virtqueue:
    """A started queue: its ring (either format), the transport's kick, and its owner check.

    Build requests with :meth:`start` / :meth:`add` / :meth:`flush` (or
    :meth:`submit` for a whole request), collect completions with
    :meth:`reap` (polling) or :meth:`wait` (blocking on the interrupt).
    """

    __slots__ = (
        "ring",
        "index",
        "_transport",
        "_reconnecting",
        "_owner",
        "add",
        "add_buffers",
        "kicks",
        "generation",
        "_device",
    )

    def __init__(self, ring: RingQueue, transport: Transport, device: VirtioDevice | None = None) -> None:
        self.ring = ring
        self.index = ring.index
        self._transport = transport
        self._reconnecting = device.reconnecting if device is not None else _reconnecting(transport)
        self._device = device
        self._owner: int | None = None
        # add() is only reachable after start(), which checks the owner.
        self.add = ring.add
        self.add_buffers = ring.add_buffers
        self.kicks = 0
        #: The transport connection (generation) this queue runs on; see VirtioDevice.recover.
        self.generation = 0 if self._reconnecting is None else self._reconnecting.generation

    def check_alive(self) -> None:
        """Raise ConnectionLost if the device is gone, or if this queue still waits to be restored after a reconnect."""
        self._transport.check_alive()
        r = self._reconnecting
        if r is not None and self.generation != r.generation:
            raise ConnectionLost(f"queue {self.index} has not been restored since the back end reconnected")

    def _check_owner(self) -> None:
        if self._owner != threading.get_ident():
            raise OwnershipError(
                f"queue {self.index} is "
                + ("not acquired" if self._owner is None else f"owned by thread {self._owner}")
                + f", not by the calling thread {threading.get_ident()}"
            )

    def start(self, token: object, n: int) -> None:
        self._check_owner()
        self.ring.start(token, n)

    def submit(self, token: object, buffers: list[tuple[int, int, bool]]) -> None:
        """start + add every (addr, length, writable) buffer; flush separately."""
        self._check_owner()
        ring = self.ring
        ring.start(token, len(buffers))
        try:
            for addr, length, writable in buffers:
                ring.add(addr, length, writable)
        except PyvirtioError:
            ring.abort()
            raise

    def abort(self) -> None:
        self._check_owner()
        self.ring.abort()

    def flush(self) -> bool:
        """Publish what was added and kick the device if it wants a kick; True if kicked."""
        self._check_owner()
        if self.ring.flush():
            self.notify()
            return True
        return False

    def notify(self) -> None:
        """Kick the device, counted (the ring's kick decision said so: ``flush`` or ``submit3``)."""
        self._transport.notify_queue(self.index)
        self.kicks += 1

    def reap(self, max_n: int = 1 << 16) -> list[Completion]:
        self._check_owner()
        return self.ring.reap(max_n)

    def wait(self, timeout: float | None = None) -> list[Completion]:
        """Block (interrupts on) until at least one completion or ``timeout``; returns them."""
        self._check_owner()
        ring = self.ring
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                done = ring.reap()
                if done:
                    return done
                if ring.enable_interrupts():
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                try:
                    self._transport.wait_queue(self.index, left)
                except ConnectionLost:
                    if self._device is None or not self._device.can_reconnect:
                        raise
                    paused = self._device.recover(self)
                    if deadline is not None:
                        deadline += paused
        finally:
            ring.disable_interrupts()

    @property
    def owner(self) -> int | None:
        return self._owner

    @property
    def size(self) -> int:
        return self.ring.size

    @property
    def fd(self) -> int | None:
        """The queue's interrupt fd, for event loops (asyncio add_reader)."""
        return self._transport.queue_fd(self.index)


class VirtioDevice:
    """A virtio device driven over ``transport`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        *,
        pool: MemoryPool | None = None,
        pool_size: int = DEFAULT_REGION_SIZE,
        packed_zero_wrap: bool = False,
    ) -> None:
        self.name = name
        self.transport = transport
        #: Packed rings start in lap 0 and restart there (module docstring).
        self.packed_zero_wrap = packed_zero_wrap
        #: The transport as a ReconnectingTransport, if it is one (checked once, here).
        self.reconnecting: ReconnectingTransport | None = _reconnecting(transport)
        self._kept_config: bytearray | None = None  # keep_config: the frontend holds the config
        self._config_check: ConfigWriteCheck | None = None
        #: Where the config space lives: "device", or "frontend (<why>)" after keep_config.
        self.config_source = "device"
        self.pool = pool if pool is not None else MemoryPool(pool_size, name=f"pyvirtio-{name}")
        self._own_pool = pool is None
        self.offered_features = 0
        self.negotiated_features = 0
        #: The ring format ``start`` builds: "split" or "packed" (from the negotiated features).
        self.ring_format = "split"
        self.fixed_queues = 0
        self._queues: list[Virtqueue] = []
        self._lock = threading.Lock()
        self._recover_lock = threading.RLock()
        self.closed = False

    # -- status and features --------------------------------------------------

    @property
    def status(self) -> int:
        return self.transport.get_status()

    def set_status(self, bits: int) -> None:
        """Write 0 as-is (reset); OR anything else into the current status (seed semantics)."""
        if bits == 0:
            self.transport.set_status(0)
        else:
            self.transport.set_status(self.transport.get_status() | bits)

    def _require(self, bit: int, what: str) -> None:
        self.set_status(bit)
        status = self.status
        if not status & bit:
            self.fail()
            raise NegotiationError(f"{self.name}: {what}: device did not accept status {status_names(bit)[0]}")

    def fail(self) -> None:
        """Set FAILED (virtio 1.2 §3.1.1: the driver gave up on the device); never raises.

        Drivers call it when the device's config or answers make it unusable,
        before they raise the error that says why.
        """
        try:
            self.set_status(STATUS_FAILED)
        except PyvirtioError:
            pass

    def reset(self, requested_features: int, *, ring: str = "auto", in_order: bool | str = "auto") -> int:
        """Reset the device and negotiate features; returns the negotiated set.

        ``ring`` and ``in_order`` choose the ring format and VIRTIO_F_IN_ORDER
        (module docstring); the two bits in ``requested_features`` are ignored.
        """
        self._check_open()
        if ring not in RING_CHOICES:
            raise InvalidArgument(f"ring must be one of {', '.join(RING_CHOICES)}, not {ring!r}")
        if in_order not in (True, False, "auto"):
            raise InvalidArgument(f"in_order must be True, False or 'auto', not {in_order!r}")
        requested = requested_features & ~((1 << F_RING_PACKED) | (1 << F_IN_ORDER)) | (1 << F_VERSION_1)
        self.stop()
        self._require(STATUS_ACKNOWLEDGE, "reset")
        self._require(STATUS_DRIVER, "reset")
        offered = self.transport.get_features()
        self.offered_features = offered
        if not offered >> F_VERSION_1 & 1:
            self.fail()
            raise NegotiationError(f"{self.name}: device does not offer VERSION_1 (legacy devices are not supported)")
        requested |= self._ring_request(offered, F_RING_PACKED, "packed", ring == "packed", ring == "split")
        requested |= self._ring_request(offered, F_IN_ORDER, "IN_ORDER", in_order is True, in_order is False)
        if ring == "auto" and AUTO_RING == "packed":
            requested |= offered & (1 << F_RING_PACKED)
        if in_order == "auto" and AUTO_IN_ORDER:
            requested |= offered & (1 << F_IN_ORDER)
        negotiated = requested & offered
        self.transport.set_features(negotiated)
        self.negotiated_features = negotiated
        self.ring_format = "packed" if negotiated >> F_RING_PACKED & 1 else "split"
        self._require(STATUS_FEATURES_OK, "feature negotiation")
        return negotiated

    def _ring_request(self, offered: int, bit: int, what: str, must: bool, never: bool) -> int:
        """The feature bit to request for ``ring=`` / ``in_order=`` (0 for auto: decided by the caller)."""
        if never or not must:
            return 0
        if not offered >> bit & 1:
            self.fail()
            raise NegotiationError(
                f"{self.name}: {what} asked for, but the device does not offer VIRTIO_F_"
                f"{'RING_PACKED' if bit == F_RING_PACKED else 'IN_ORDER'}"
            )
        return 1 << bit

    def has_feature(self, bit: int) -> bool:
        return bool(self.negotiated_features >> bit & 1)

    def feature_names(self, features: int | None = None) -> list[str]:
        """Names of ``features`` (default: negotiated) for this device type."""
        return device_feature_names(
            self.transport.device_type(), self.negotiated_features if features is None else features
        )

    # -- queues ---------------------------------------------------------------

    def start(self, request_queues: int, fixed_queues: int = 0, *, queue_size: int | None = None) -> None:
        """Set up ``fixed_queues + request_queues`` queues and set DRIVER_OK."""
        self._check_open()
        if not self.status & STATUS_FEATURES_OK:
            raise QueueStateError(f"{self.name}: start() before a successful reset()")
        if self._queues:
            raise QueueStateError(f"{self.name}: already started")
        total = request_queues + fixed_queues
        if request_queues < 0 or fixed_queues < 0:
            raise InvalidArgument("queue counts must not be negative")
        available = self.transport.max_queues()
        if total > available:
            raise InvalidArgument(f"{self.name}: {total} queues requested, the device has {available}")
        packed = self.ring_format == "packed"
        size_ok = 1 <= (queue_size or 0) <= MAX_QUEUE_SIZE if packed else is_power_of_two(queue_size or 0)
        if queue_size is not None and not size_ok:
            raise InvalidArgument(
                f"queue size must be {'1..32768' if packed else 'a power of two'} for a {self.ring_format} ring, "
                f"got {queue_size}"
            )
        self.fixed_queues = fixed_queues
        if self.reconnecting is not None:
            # vhost-user sizes its inflight area (INFLIGHT_SHMFD) by the queues really used.
            self.reconnecting.plan_queues(total)
            # A ring kept in lap 0 changes lap at a restart: an old inflight area's positions no longer hold.
            self.reconnecting.hand_over_inflight = not (packed and self.packed_zero_wrap)
        self.transport.set_memory(self.pool)
        event_idx = self.has_feature(F_RING_EVENT_IDX)
        indirect = self.has_feature(F_RING_INDIRECT_DESC)
        in_order = self.has_feature(F_IN_ORDER)
        extra = {"zero_wrap": True} if packed and self.packed_zero_wrap else {}
        make: type[SplitQueue] | type[PackedQueue] = PackedQueue if packed else SplitQueue
        try:
            for i in range(total):
                size = self.transport.get_queue_size(i)
                if size == 0:
                    raise InvalidArgument(f"{self.name}: queue {i} does not exist")
                if not (size <= MAX_QUEUE_SIZE if packed else is_power_of_two(size)):
                    # virtio 1.2 §2.7: a split queue's size is a power of 2; §2.8: packed up to 32768.
                    raise NegotiationError(
                        f"{self.name}: queue {i} size {size} is not "
                        + ("at most 32768" if packed else "a power of two")
                    )
                if queue_size is not None:
                    size = min(size, queue_size)
                ring = make(
                    size, self.pool, index=i, event_idx=event_idx, indirect=indirect, in_order=in_order, **extra
                )
                self._queues.append(Virtqueue(ring, self.transport, self))
                self.transport.setup_queue(QueueSetup.from_ring(ring))
            self._require(STATUS_DRIVER_OK, "start")
        except BaseException:
            self._free_queues()
            raise

    def stop(self) -> None:
        """Reset the device (status 0) and delete its queues."""
        if self.closed:
            return
        self.set_status(0)
        self.status  # noqa: B018 - read back once to flush the reset, as the seed does
        self._free_queues()

    def _free_queues(self) -> None:
        for vq in self._queues:
            self.transport.del_queue(vq.index)
            vq.ring.close()
        self._queues.clear()

    def close(self) -> None:
        if self.closed:
            return
        try:
            try:
                self.stop()
            except PyvirtioError:
                self._free_queues_quietly()
            self.transport.close()
        finally:
            self.closed = True
            if self._own_pool:
                self.pool.close()

    def _free_queues_quietly(self) -> None:
        for vq in self._queues:
            try:
                self.transport.del_queue(vq.index)
            except PyvirtioError:
                pass
            vq.ring.close()
        self._queues.clear()

    def __enter__(self) -> VirtioDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise QueueStateError(f"{self.name}: device is closed")

    @property
    def num_queues(self) -> int:
        return len(self._queues)

    def queue(self, index: int) -> Virtqueue:
        """The started queue ``index`` (ownership is checked by its data-path calls)."""
        if not 0 <= index < len(self._queues):
            raise InvalidArgument(f"{self.name}: no queue {index} ({len(self._queues)} started)")
        return self._queues[index]

    # -- reconnect (vhost-user back end restarts) ---------------------------------

    @property
    def can_reconnect(self) -> bool:
        """Does the transport reconnect to a lost device (a reconnect policy is set)?"""
        r = self.reconnecting
        return r is not None and r.reconnect_policy is not None

    def recover(self, vq: Virtqueue, restart: Callable[[bool], int] | None = None) -> float:
        """Bring queue ``vq`` back after the transport lost the device; returns the seconds it took.

        Called by the queue's owner when the data path raised ConnectionLost.
        The first caller reconnects (the transport's policy bounds the wait;
        other callers wait for it) and also restores every queue nobody owns;
        then each owner restores its own queue, so no ring is touched by a
        thread that does not own it. Restoring a queue means
        ``restart(resubmit)`` (default: ``vq.ring.restart_base``): the ring
        is prepared from the driver's shadow state and its base returned,
        with ``resubmit`` False when the new back end took the inflight area
        and resubmits by itself; then the transport starts the ring there.
        Requests in flight are not failed: each one not completed is
        resubmitted exactly once, and completions still in the used ring are
        reaped as usual afterwards. Raises ConnectionLost
        (:class:`~pyvirtio.errors.ReconnectFailed`) when the
        transport cannot reconnect; the caller then fails its requests.
        """
        start, deadline = self._recover_start()
        while True:
            try:
                with self._recover_lock:
                    self._restore_own(vq, restart, self._reconnect(vq, deadline))
                return time.monotonic() - start
            except ConnectionLost as exc:
                if isinstance(exc, ReconnectFailed) or time.monotonic() >= deadline:
                    raise
                # Lost again while restoring: the next round reconnects.

    async def arecover(self, vq: Virtqueue, restart: Callable[[bool], int] | None = None) -> float:
        """:meth:`recover` for a coroutine on the queue owner's event loop.

        The wait for the back end (and the restoring of queues nobody owns)
        runs in a worker thread, so the loop goes on meanwhile; the queue
        itself is restored on the loop's thread, its owner.
        """
        loop = asyncio.get_running_loop()
        start, deadline = self._recover_start()

        def reconnect() -> bool:
            with self._recover_lock:
                return self._reconnect(vq, deadline)

        while True:
            try:
                made = await loop.run_in_executor(None, reconnect)
                with self._recover_lock:
                    self._restore_own(vq, restart, made)
                return time.monotonic() - start
            except ConnectionLost as exc:
                if isinstance(exc, ReconnectFailed) or time.monotonic() >= deadline:
                    raise

    def _recover_start(self) -> tuple[float, float]:
        r = self.reconnecting
        policy = None if r is None else r.reconnect_policy
        if policy is None:
            raise ConnectionLost(f"{self.name}: the device was lost and reconnect is off")
        start = time.monotonic()
        return start, start + float(policy.timeout)

    def _reconnecting_transport(self) -> ReconnectingTransport:
        t = self.reconnecting
        if t is None:
            raise ConnectionLost(f"{self.name}: the device was lost and its transport cannot reconnect")
        return t

    def _reconnect(self, caller: Virtqueue, deadline: float) -> bool:
        """Reconnect if nobody has yet (True if this call did) and restore the queues nobody owns."""
        made = self._reconnecting_transport().reconnect(deadline)
        if made:
            self._restore_unowned(caller)
        return made

    def _restore_own(self, vq: Virtqueue, restart: Callable[[bool], int] | None, made: bool) -> None:
        """Restart the caller's own queue on the new connection; resume the device if the caller reconnected."""
        t = self._reconnecting_transport()
        if vq.generation != t.generation:
            t.restart_queue(vq.index, (restart or vq.ring.restart_base)(not t.device_resubmits))
            vq.generation = t.generation
        if made:
            t.resume()

    def _restore_unowned(self, caller: Virtqueue) -> None:
        t = self._reconnecting_transport()
        with self._lock:  # nobody can acquire a queue while it is restored
            for other in self._queues:
                if other is caller or other._owner is not None or other.ring.broken is not None:
                    continue
                t.restart_queue(other.index, other.ring.restart_base(not t.device_resubmits))
                other.generation = t.generation

    # -- ownership (seed: virtio_dev_acquire_queue & co) -----------------------

    def acquire(self, index: int) -> Virtqueue:
        """Make the calling thread the owner of queue ``index``."""
        vq = self.queue(index)
        with self._lock:
            if vq._owner is not None:
                raise OwnershipError(f"{self.name}: queue {index} is already owned by thread {vq._owner}")
            vq._owner = threading.get_ident()
        return vq

    def find_and_acquire(self, start: int = 0) -> Virtqueue:
        """Acquire the first unowned queue at or after ``start``."""
        with self._lock:
            for vq in self._queues[start:]:
                if vq._owner is None:
                    vq._owner = threading.get_ident()
                    return vq
        raise OwnershipError(f"{self.name}: no free queue at or after index {start}")

    def release(self, index: int) -> None:
        """Give up queue ``index``; only its owner may."""
        vq = self.queue(index)
        with self._lock:
            if vq._owner != threading.get_ident():
                raise OwnershipError(
                    f"{self.name}: queue {index} can only be released by its owner "
                    f"({'nobody' if vq._owner is None else vq._owner})"
                )
            vq._owner = None

    def take_over(self, index: int, previous: int | None) -> Virtqueue:
        """Make the calling thread owner of queue ``index``, now owned by thread ``previous``.

        For a caller that knows ``previous`` has ended (thread idents are
        reused, so the core cannot tell); fails if the owner changed meanwhile.
        """
        vq = self.queue(index)
        with self._lock:
            if vq._owner != previous:
                raise OwnershipError(f"{self.name}: queue {index} is no longer owned by thread {previous}")
            vq._owner = threading.get_ident()
        return vq

    def owner(self, index: int) -> int | None:
        """The thread ident owning queue ``index``, or None."""
        return self.queue(index)._owner

    def is_acquired(self, index: int) -> bool:
        return self.owner(index) is not None

    # -- config ---------------------------------------------------------------

    def read_config(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"bad config range {offset}+{length}")
        kept = self._kept_config
        if kept is not None:
            if offset + length > len(kept):
                raise InvalidArgument(f"config read {offset}+{length} outside the {len(kept)}-byte config")
            return bytes(kept[offset : offset + length])
        return self.transport.read_config(offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0:
            raise InvalidArgument(f"bad config offset {offset}")
        kept = self._kept_config
        if kept is not None:
            # The back end has no config space: nothing is sent to it.
            if offset + len(data) > len(kept):
                raise InvalidArgument(f"config write {offset}+{len(data)} outside the {len(kept)}-byte config")
            if self._config_check is not None:
                self._config_check(offset, bytes(data))
            kept[offset : offset + len(data)] = data
            return
        self.transport.write_config(offset, data)

    def keep_config(self, config: bytes, check_write: ConfigWriteCheck | None, why: str) -> None:
        """From now on the config space is ``config``, held here (the transport has none: see the module docstring).

        ``check_write(offset, data)`` is called for every :meth:`write_config`
        and raises (InvalidArgument) to refuse it; None refuses nothing.
        ``why`` is shown in :meth:`info` (``config``).
        """
        self._kept_config = bytearray(config)
        self._config_check = check_write
        self.config_source = f"frontend ({why})"

    @property
    def config_kept(self) -> bool:
        """Is the config space held in the frontend (:meth:`keep_config`)?"""
        return self._kept_config is not None

    # -- info (seed: virtio_dev_dump_json_info) ---------------------------------

    def info(self) -> dict[str, Any]:
        dtype = self.transport.device_type()
        virtio: dict[str, Any] = {
            "vq_count": len(self._queues),
            "vq_size": self._queues[0].size if self._queues else self.transport.get_queue_size(0),
            "ring": self.ring_format,
            "in_order": self.has_feature(F_IN_ORDER),
        }
        virtio.update(self.transport.info())
        if self._kept_config is not None:
            virtio["config"] = self.config_source
        return {
            "name": self.name,
            "device_type": DEVICE_TYPE_NAMES.get(dtype, str(dtype)),
            "status": status_names(self.status),
            "offered_features": device_feature_names(dtype, self.offered_features),
            "negotiated_features": device_feature_names(dtype, self.negotiated_features),
            "fixed_queues": self.fixed_queues,
            "virtio": virtio,
        }


def _reconnecting(transport: Transport) -> ReconnectingTransport | None:
    """``transport`` as a ReconnectingTransport, or None if it cannot reconnect."""
    return transport if isinstance(transport, ReconnectingTransport) else None
