"""Per-thread queues of a driver (blk, scsi): one queue for each thread that does I/O.

Used by the request engine (:mod:`pyvirtio.drivers.requests`); its contexts
are :class:`~pyvirtio.drivers.requests.QueueContext` objects.

A thread gets a queue of its own on its first request (the core's ownership
rules: only the owner may use a queue) and keeps it until it calls
``release_queue``. A thread that ends without releasing its queue would
hold it for good; instead, when a thread finds no free queue, it takes over
the queue of a thread that has ended, with whatever that thread left in
flight: those requests complete under the new owner as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.errors import OwnershipError, QueueStateError


class QueueState(Protocol):
    """What this module needs of a queue context."""

    vq: Virtqueue
    inflight: int
    held: object | None  # a FixedIO / bench engine holding the queue (it is never taken over)

    def close(self) -> None: ...


C = TypeVar("C", bound=QueueState)


class ThreadQueues(Generic[C]):
    """The queue contexts of one driver, by thread (see the module docstring)."""

    def __init__(self, device: VirtioDevice, first: int, make: Callable[[Virtqueue], C], what: str) -> None:
        self.device = device
        self.first = first
        self.make = make
        self.what = what
        self._local = threading.local()
        self._lock = threading.Lock()
        self._owners: dict[int, tuple[C, threading.Thread]] = {}  # id(ctx) -> (ctx, owning thread)

    @property
    def contexts(self) -> list[C]:
        with self._lock:
            return [ctx for ctx, _ in self._owners.values()]

    def get(self) -> C:
        """The calling thread's context: its queue, acquired on first use."""
        ctx: C | None = getattr(self._local, "ctx", None)
        if ctx is not None:
            return ctx
        try:
            vq = self.device.find_and_acquire(self.first)
        except OwnershipError:
            ctx = self._take_over()
        else:
            try:
                ctx = self.make(vq)
            except BaseException:
                self.device.release(vq.index)
                raise
        with self._lock:
            self._owners[id(ctx)] = (ctx, threading.current_thread())
        self._local.ctx = ctx
        return ctx

    def _take_over(self) -> C:
        me = threading.current_thread()
        with self._lock:
            for key, (ctx, thread) in list(self._owners.items()):
                if thread.is_alive() or ctx.held is not None:
                    continue  # (a queue held by a FixedIO stays with it)
                self.device.take_over(ctx.vq.index, thread.ident)
                del self._owners[key]
                return ctx
            busy = len(self._owners)
        raise OwnershipError(
            f"all {busy} {self.what} are owned by other threads (thread {me.name} found none free); "
            "open the device with more queues or release one"
        )

    def release(self) -> None:
        """Give the calling thread's queue back (it must have nothing in flight)."""
        ctx: C | None = getattr(self._local, "ctx", None)
        if ctx is None:
            return
        if ctx.inflight:
            raise QueueStateError(f"{ctx.inflight} requests still in flight on queue {ctx.vq.index}")
        self.device.release(ctx.vq.index)
        self._local.ctx = None
        with self._lock:
            self._owners.pop(id(ctx), None)
        ctx.close()

    def close(self) -> None:
        """Free every context's buffers (the device is closing)."""
        with self._lock:
            for ctx, _ in self._owners.values():
                ctx.close()
            self._owners.clear()
