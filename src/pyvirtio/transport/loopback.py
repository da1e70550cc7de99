"""An in-process virtio device, for tests, examples and benchmarks.

The device side is a real device ring over the driver's own memory
(:class:`~pyvirtio.ring.device_side.DeviceQueue` or, with
VIRTIO_F_RING_PACKED, :class:`~pyvirtio.ring.device_packed.PackedDeviceQueue`;
with VIRTIO_F_IN_ORDER it uses buffers in order and batches), so everything
between the driver and the device goes through shared ring memory exactly as
it would with another process. A *handler* per queue does the device's work: it receives each
available :class:`~pyvirtio.ring.device_side.Chain` and returns the number
of bytes it wrote.

By default a kick processes the queue at once (``auto=True``), which makes a
synchronous round trip; with ``auto=False`` the test decides when the device
runs (:meth:`LoopbackTransport.process`) or writes the used ring itself
(hostile-device tests). The status register and feature negotiation behave
like a strict device: FEATURES_OK does not stick if the driver accepted a
feature that was not offered, and any status bit listed in ``refuse_status``
does not stick either.
"""

from __future__ import annotations

import functools
import os
import select
from collections.abc import Callable
from typing import Any

from pyvirtio.errors import ConnectionLost, InvalidArgument, QueueStateError
from pyvirtio.memory import MemoryPool, MemoryTable
from pyvirtio.ring.base import DeviceRing
from pyvirtio.ring.device_side import Chain, open_device_ring
from pyvirtio.spec.common import (
    F_IN_ORDER,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    STATUS_FEATURES_OK,
)
from pyvirtio.transport.base import QueueSetup

Handler = Callable[[int, Chain], int]


def echo_handler(index: int, chain: Chain) -> int:
    """Copy the readable bytes into the writable buffers; returns bytes written."""
    return chain.write(chain.read_all())


class LoopbackTransport:
    """A virtio device living in this process (see the module docstring)."""

    kind = "loopback"

    def __init__(
        self,
        *,
        device_id: int = 0,
        features: int = (1 << F_VERSION_1) | (1 << F_RING_EVENT_IDX) | (1 << F_RING_INDIRECT_DESC),
        config: bytes = b"",
        num_queues: int = 1,
        queue_size: int = 256,
        handlers: dict[int, Handler] | None = None,
        default_handler: Handler = echo_handler,
        auto: bool = True,
    ) -> None:
        self._device_id = device_id
        self.offered_features = features
        self.driver_features = 0
        self.config = bytearray(config)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.handlers: dict[int, Handler] = dict(handlers or {})
        self.default_handler = default_handler
        self.auto = auto
        self.status = 0
        self.refuse_status = 0
        self.queues: dict[int, DeviceRing] = {}
        self.kicks: dict[int, int] = {}
        self.table: MemoryTable | None = None
        self._calls: dict[int, int] = {}
        self.closed = False

    # -- Transport protocol ---------------------------------------------------

    def device_type(self) -> int:
        return self._device_id

    def read_config(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self.config):
            raise InvalidArgument(f"config read {offset}+{length} outside {len(self.config)} bytes")
        return bytes(self.config[offset : offset + length])

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > len(self.config):
            raise InvalidArgument(f"config write {offset}+{len(data)} outside {len(self.config)} bytes")
        self.config[offset : offset + len(data)] = data

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        if status == 0:
            self._reset_device()
            return
        if status & STATUS_FEATURES_OK and self.driver_features & ~self.offered_features:
            status &= ~STATUS_FEATURES_OK
        self.status = status & ~self.refuse_status

    def get_features(self) -> int:
        return self.offered_features

    def set_features(self, features: int) -> None:
        self.driver_features = features

    def get_queue_size(self, index: int) -> int:
        return self.queue_size if 0 <= index < self.num_queues else 0

    def max_queues(self) -> int:
        return self.num_queues

    def set_memory(self, pool: MemoryPool) -> None:
        self.table = MemoryTable.from_pool(pool)

    def setup_queue(self, setup: QueueSetup) -> None:
        if self.table is None:
            raise QueueStateError("set_memory() must come before setup_queue()")
        features = self.driver_features
        packed = bool(features >> F_RING_PACKED & 1)
        if setup.format != ("packed" if packed else "split"):
            raise QueueStateError(
                f"queue {setup.index}: a {setup.format} ring, but RING_PACKED was {'' if packed else 'not '}negotiated"
            )
        self.queues[setup.index] = open_device_ring(
            setup.format,
            self.table,
            setup.size,
            setup.desc_addr,
            setup.avail_addr,
            setup.used_addr,
            base=setup.base,
            index=setup.index,
            event_idx=bool(features >> F_RING_EVENT_IDX & 1),
            indirect=bool(features >> F_RING_INDIRECT_DESC & 1),
            in_order=bool(features >> F_IN_ORDER & 1),
        )
        if setup.index not in self._calls:
            self._calls[setup.index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def del_queue(self, index: int) -> None:
        q = self.queues.pop(index, None)
        if q is not None:
            q.release()
        fd = self._calls.pop(index, None)
        if fd is not None:
            os.close(fd)

    def notify_queue(self, index: int) -> None:
        self.kicks[index] = self.kicks.get(index, 0) + 1
        if self.auto:
            self.process(index)

    def notifier(self, index: int) -> Callable[[], None]:
        return functools.partial(self.notify_queue, index)

    def wait_queue(self, index: int, timeout: float | None) -> bool:
        fd = self._calls.get(index)
        if fd is None:
            raise QueueStateError(f"queue {index} is not set up")
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        return True

    def queue_fd(self, index: int) -> int | None:
        return self._calls.get(index)

    def ack_queue(self, index: int) -> None:
        fd = self._calls.get(index)
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass

    def has_config(self) -> bool:
        return True

    def check_alive(self) -> None:
        if self.closed:
            raise ConnectionLost("loopback device is closed")

    def close(self) -> None:
        for index in list(self._calls):
            self.del_queue(index)
        self.closed = True

    def info(self) -> dict[str, Any]:
        return {"type": self.kind}

    # -- the device's side ----------------------------------------------------

    def _reset_device(self) -> None:
        for q in self.queues.values():
            q.release()
        self.queues.clear()
        self.status = 0
        self.driver_features = 0

    def process(self, index: int, limit: int | None = None) -> int:
        """Run the device on queue ``index``: pop, handle, push used. Returns chains handled."""
        q = self.queues.get(index)
        if q is None:
            raise QueueStateError(f"queue {index} is not set up")
        handler = self.handlers.get(index, self.default_handler)
        done = 0
        while limit is None or done < limit:
            chain = q.pop()
            if chain is None:
                # Ask for a kick at the next request, then look once more:
                # the driver may have published before it could see the ask.
                if q.enable_notifications():
                    continue
                break
            q.add_used(chain.head, handler(index, chain))
            done += 1
        if done and q.flush_used():
            self.signal(index)
        return done

    def signal(self, index: int) -> None:
        """Raise queue ``index``'s interrupt (write its call eventfd)."""
        fd = self._calls.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)
