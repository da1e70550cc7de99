"""pyvirtio: a pure-Python userspace virtio driver stack.

Layers (bottom up): :mod:`pyvirtio.spec` (constants and layouts),
:mod:`pyvirtio.memory` (shared memfd memory), :mod:`pyvirtio.ring` (split
virtqueues, driver and device side), :mod:`pyvirtio.transport` (how a device
is reached), :class:`VirtioDevice` (lifecycle, features, queues), and the
device drivers in :mod:`pyvirtio.drivers`; beside the transports, the
embedded back ends in :mod:`pyvirtio.backends`; above the drivers, the
benchmark engines in :mod:`pyvirtio.bench`. What may import what, the rules
of the house and the mapping from SPDK's lib/virtio: docs/architecture.md.
"""

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.drivers.net import VirtioNet
from pyvirtio.drivers.scsi import ScsiDisk, VirtioScsi
from pyvirtio.errors import (
    BlockIOError,
    ConnectionLost,
    DeviceError,
    DeviceProtocolError,
    DriverProtocolError,
    InvalidArgument,
    LunNotFound,
    NegotiationError,
    OwnershipError,
    PyvirtioError,
    QueueBroken,
    QueueFull,
    QueueStateError,
    ReconnectFailed,
    RequestTooLarge,
    ScsiError,
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
    "LunNotFound",
    "LoopbackTransport",
    "MemoryPool",
    "MemoryTable",
    "NegotiationError",
    "OwnershipError",
    "PyvirtioError",
    "QueueBroken",
    "QueueFull",
    "QueueStateError",
    "ReconnectFailed",
    "Region",
    "RequestTooLarge",
    "SplitQueue",
    "ScsiDisk",
    "ScsiError",
    "TransportError",
    "TransportTimeout",
    "Virtqueue",
    "VirtioBlk",
    "VirtioDevice",
    "VirtioNet",
    "VirtioScsi",
    "__version__",
]
