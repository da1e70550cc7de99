"""The Transport protocol: how a VirtioDevice reaches its device.

It mirrors SPDK's ``struct virtio_dev_ops`` (reference: read/write_dev_cfg,
get/set_status, get/set_features, get_queue_size, setup/del/notify_queue,
destruct_dev, dump_json_info), plus what a driver needs that the seed left
out: the shared memory the device may access, blocking waits on a queue's
interrupt, and a file descriptor for event loops.

Implementations: :mod:`.loopback` (an in-process device) and
:mod:`.vhost_user` (a vhost-user back end over a Unix socket).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pyvirtio.memory import MemoryPool


@dataclass(frozen=True, slots=True)
class QueueSetup:
    """Where one split ring lives, for :meth:`Transport.setup_queue`."""

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail: int = 0


@runtime_checkable
class Transport(Protocol):
    """What a transport provides. All methods may raise :class:`~pyvirtio.errors.TransportError`."""

    #: short transport name for info dumps ("user", "loopback", "pci")
    kind: str

    def device_type(self) -> int:
        """The virtio device ID (1 = net, 2 = blk, 8 = scsi...), 0 if unknown."""
        ...

    def read_config(self, offset: int, length: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def get_status(self) -> int: ...

    def set_status(self, status: int) -> None: ...

    def get_features(self) -> int: ...

    def set_features(self, features: int) -> None: ...

    def get_queue_size(self, index: int) -> int:
        """The largest ring the device supports for queue ``index`` (0: no such queue)."""
        ...

    def max_queues(self) -> int:
        """How many queues the device offers."""
        ...

    def set_memory(self, pool: MemoryPool) -> None:
        """The memory the device may access (before any queue is set up)."""
        ...

    def setup_queue(self, setup: QueueSetup) -> None: ...

    def del_queue(self, index: int) -> None: ...

    def notify_queue(self, index: int) -> None:
        """Kick: tell the device queue ``index`` has new available buffers."""
        ...

    def notifier(self, index: int) -> Callable[[], None]:
        """A callable that kicks queue ``index``, as cheap as the transport can make it (hot loops)."""
        ...

    def wait_queue(self, index: int, timeout: float | None) -> bool:
        """Block until the device signals queue ``index`` (True) or ``timeout`` expires (False)."""
        ...

    def queue_fd(self, index: int) -> int | None:
        """A file descriptor that becomes readable when queue ``index`` is signalled, if any."""
        ...

    def check_alive(self) -> None:
        """Raise :class:`~pyvirtio.errors.ConnectionLost` if the device is known to be gone."""
        ...

    def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """Transport fields for the info dump (seed: dump_json_info)."""
        ...
