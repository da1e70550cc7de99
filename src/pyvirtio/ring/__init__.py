"""Virtqueues: the driver side (:mod:`.split`) and the device side (:mod:`.device_side`)."""

from pyvirtio.ring.device_side import Chain, ChainError, DeviceQueue
from pyvirtio.ring.split import SplitQueue

__all__ = ["Chain", "ChainError", "DeviceQueue", "SplitQueue"]
