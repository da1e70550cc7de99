"""pyvirtio: a pure-Python userspace virtio driver stack.

Layers (bottom up): :mod:`pyvirtio.spec` (constants and layouts),
:mod:`pyvirtio.memory` (shared memfd memory), :mod:`pyvirtio.ring` (split
virtqueues, driver and device side), :mod:`pyvirtio.transport` (how a device
is reached), :class:`VirtioDevice` (lifecycle, features, queues), and the
device drivers in :mod:`pyvirtio.drivers`.
"""

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.drivers.scsi import ScsiError, VirtioScsi
from pyvirtio.errors import (
    BlockIOError,
    ConnectionLost,
    DeviceError,
    DeviceProtocolError,
    DriverProtocolError,
    InvalidArgument,
    NegotiationError,
    OwnershipError,
    PyvirtioError,
    QueueBroken,
    QueueFull,
    QueueStateError,
    RequestTooLarge,
    TransportError,
    TransportTimeout,
)
from pyvirtio.memory import Buffer, MemoryPool, MemoryTable, Region
from pyvirtio.ring import Chain, ChainError, DeviceQueue, SplitQueue
from pyvirtio.transport.loopback import LoopbackTransport

__version__ = "0.1.0"

__all__ = [
    "BlockIOError",
    "Buffer",
    "Chain",
    "ChainError",
    "ConnectionLost",
    "DeviceError",
    "DeviceProtocolError",
    "DeviceQueue",
    "DriverProtocolError",
    "InvalidArgument",
    "LoopbackTransport",
    "MemoryPool",
    "MemoryTable",
    "NegotiationError",
    "OwnershipError",
    "PyvirtioError",
    "QueueBroken",
    "QueueFull",
    "QueueStateError",
    "Region",
    "RequestTooLarge",
    "SplitQueue",
    "TransportError",
    "TransportTimeout",
    "ScsiError",
    "Virtqueue",
    "VirtioBlk",
    "VirtioDevice",
    "VirtioScsi",
    "__version__",
]
