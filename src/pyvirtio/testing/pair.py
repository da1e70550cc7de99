"""A driver ring and a device ring joined over one memory pool, in memory.

:class:`RingPair` is the smallest connected system: a
:class:`~pyvirtio.ring.split.SplitQueue` (driver side) and a
:class:`~pyvirtio.ring.device_side.DeviceQueue` (device side) that share the
ring memory of one :class:`~pyvirtio.memory.MemoryPool`, the way a vhost-user
back end shares it across processes. :class:`PackedRingPair` is the same
with a :class:`~pyvirtio.ring.packed.PackedQueue` and a
:class:`~pyvirtio.ring.device_packed.PackedDeviceQueue`. No transport and no
notifications: the test decides when each side runs, and reads the kick /
interrupt decisions that the two rings return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from pyvirtio.memory import Buffer, MemoryPool, MemoryTable
from pyvirtio.ring.device_side import Chain, DeviceQueue, PackedDeviceQueue
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue
from pyvirtio.spec.ring import PACKED_INITIAL_BASE


class _Pair:
    """What both pairs share (see :class:`RingPair`)."""

    driver: SplitQueue | PackedQueue
    device: DeviceQueue | PackedDeviceQueue
    _driver_class: ClassVar[type[SplitQueue] | type[PackedQueue]]

    def __init__(
        self,
        size: int = 8,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        pool: MemoryPool | None = None,
        region_size: int = 1 << 20,
        indirect_threshold: int = 8,
        indirect_max: int = 1024,
        in_order: bool = False,
    ) -> None:
        self.pool = pool if pool is not None else MemoryPool(region_size, name="pyvirtio-ringpair")
        self._own_pool = pool is None
        self._buffers: list[Buffer] = []
        self.event_idx = event_idx
        self.indirect = indirect
        self.in_order = in_order
        self.table = MemoryTable.from_pool(self.pool)
        self.closed = False
        self.driver = self._driver_class(
            size,
            self.pool,
            event_idx=event_idx,
            indirect=indirect,
            indirect_threshold=indirect_threshold,
            indirect_max=indirect_max,
            in_order=in_order,
        )
        self.device = self._new_device()

    def _new_device(self) -> DeviceQueue | PackedDeviceQueue:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self.driver.size

    def sync_memory(self) -> None:
        """Let the device see regions the pool added since the pair was built."""
        if len(self.table) != len(self.pool.regions):
            self.table = MemoryTable.from_pool(self.pool)
            self.device.memory = self.table

    def buffer(self, size: int, fill: bytes | None = None) -> Buffer:
        """A data buffer from the pool (freed by :meth:`close`), optionally filled."""
        buf = self.pool.allocate(size)
        self._buffers.append(buf)
        self.sync_memory()
        if fill is not None:
            buf.view[: len(fill)] = fill
        return buf

    def submit(self, token: object, buffers: Sequence[tuple[int, int, bool]]) -> None:
        """Driver: start a request and add every (addr, length, writable) buffer (not flushed)."""
        self.driver.start(token, len(buffers))
        self.driver.add_buffers(buffers)

    def serve(
        self, handler: Callable[[Chain], int] | None = None, limit: int | None = None
    ) -> tuple[int, bool]:
        """Device: pop and complete available chains (default handler: echo readable into writable).

        Returns (chains completed, whether the driver must be interrupted).
        """
        handle = handler if handler is not None else _echo
        done = 0
        while limit is None or done < limit:
            chain = self.device.pop()
            if chain is None:
                break
            self.device.add_used(chain.head, handle(chain))
            done += 1
        return done, self.device.flush_used()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.device.release()
        self.driver.close()
        for buf in self._buffers:
            self.pool.free(buf)
        self._buffers.clear()
        if self._own_pool:
            self.pool.close()


class RingPair(_Pair):
    """A :class:`SplitQueue` and a :class:`DeviceQueue` over the same memory.

    ``pool`` defaults to a private pool of ``region_size`` bytes that
    :meth:`close` frees. ``event_idx``, ``indirect`` and ``in_order`` are the
    negotiated ring features (both sides get them); ``indirect_threshold``
    and ``indirect_max`` go to the driver ring.
    """

    driver: SplitQueue
    device: DeviceQueue
    _driver_class = SplitQueue

    def _new_device(self) -> DeviceQueue:
        d = self.driver
        return DeviceQueue.from_addresses(
            self.table,
            d.size,
            d.desc_addr,
            d.avail_addr,
            d.used_addr,
            event_idx=self.event_idx,
            indirect=self.indirect,
            in_order=self.in_order,
        )

    def reset_device(self) -> None:
        """Forget the device's state and map the ring again (after ``driver.reset()``)."""
        self.device.release()
        self.device = self._new_device()

    def __enter__(self) -> RingPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackedRingPair(_Pair):
    """A :class:`PackedQueue` and a :class:`PackedDeviceQueue` over the same memory (as :class:`RingPair`).

    Sizes need not be powers of two. :meth:`reset_device` takes the ring
    ``base`` a new device starts at (default: a fresh ring).
    """

    driver: PackedQueue
    device: PackedDeviceQueue
    _driver_class = PackedQueue

    def _new_device(self, base: int = PACKED_INITIAL_BASE) -> PackedDeviceQueue:
        d = self.driver
        return PackedDeviceQueue.from_addresses(
            self.table,
            d.size,
            d.desc_addr,
            d.driver_addr,
            d.device_addr,
            event_idx=self.event_idx,
            indirect=self.indirect,
            in_order=self.in_order,
            base=base,
        )

    def reset_device(self, base: int = PACKED_INITIAL_BASE) -> None:
        """Forget the device's state and map the ring again, the new device starting at ``base``."""
        self.device.release()
        self.device = self._new_device(base)

    def __enter__(self) -> PackedRingPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _echo(chain: Chain) -> int:
    return chain.write(chain.read_all())
