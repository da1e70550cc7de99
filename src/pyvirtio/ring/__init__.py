"""Virtqueues behind one API (:mod:`.base`): split (:mod:`.split`) and packed (:mod:`.packed`) driver
sides, and their device sides (:mod:`.device_side`, :mod:`.device_packed`)."""

from typing import TYPE_CHECKING

from pyvirtio.ring.base import DeviceRing, RingAddresses, RingQueue
from pyvirtio.ring.device_side import Chain, ChainError, DeviceQueue, PackedDeviceQueue
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue

if TYPE_CHECKING:
    # Static proof that both formats implement both protocols (mypy --strict checks these).
    def _driver_rings(split: SplitQueue, packed: PackedQueue) -> tuple[RingQueue, RingQueue]:
        return split, packed

    def _device_rings(split: DeviceQueue, packed: PackedDeviceQueue) -> tuple[DeviceRing, DeviceRing]:
        return split, packed


__all__ = [
    "Chain",
    "ChainError",
    "DeviceQueue",
    "DeviceRing",
    "PackedDeviceQueue",
    "PackedQueue",
    "RingAddresses",
    "RingQueue",
    "SplitQueue",
]
