"""The Transport protocol: how a VirtioDevice reaches its device.

It mirrors SPDK's ``struct virtio_dev_ops`` (reference: read/write_dev_cfg,
get/set_status, get/set_features, get_queue_size, setup/del/notify_queue,
destruct_dev, dump_json_info), plus what a driver needs that the seed left
out: the shared memory the device may access, blocking waits on a queue's
interrupt, and a file descriptor for event loops.

Implementations: :mod:`.loopback` (an in-process device),
:mod:`.vhost_user` (a vhost-user back end over a Unix socket) and
:mod:`.vhost_user_net` (a vhost-user-net back end plus the frontend's share
of the net device).

Two optional capabilities are protocols of their own or explicit methods,
so that callers never reach for them with ``getattr``:

* :meth:`Transport.has_config`: does the device have a config space the
  transport can reach? A vhost-user back end without PROTOCOL_F_CONFIG has
  none (SPDK's vhost-user-scsi target): the driver then keeps the config
  itself (:meth:`~pyvirtio.device.VirtioDevice.keep_config`), as QEMU does.
* :class:`ReconnectingTransport`: a transport that can lose its device and
  get it back (vhost-user with a :class:`ReconnectPolicy`). The device
  layer checks for it once, with ``isinstance``, when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pyvirtio.errors import InvalidArgument
from pyvirtio.memory import MemoryPool
from pyvirtio.ring.base import RingQueue
from pyvirtio.ring.packed import PackedQueue


@dataclass(frozen=True, slots=True)
class QueueSetup:
    """Where one ring lives and how it starts, for :meth:`Transport.setup_queue`.

    ``format`` is the ring layout (``"split"``, virtio 1.2 §2.7, or
    ``"packed"``, §2.8); the three addresses are its Descriptor, Driver and
    Device Areas (§2.6): split: descriptor table, avail ring, used ring;
    packed: descriptor ring, driver and device event suppression structures.
    ``base`` is the ring base the device starts from (vhost-user's
    SET_VRING_BASE): split, the next avail index; packed, both positions with
    their wrap counters (:func:`~pyvirtio.spec.ring.packed_base`). Build one
    from a driver ring with :meth:`from_ring`.
    """

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    base: int = 0
    format: str = "split"

    @classmethod
    def from_ring(cls, ring: RingQueue) -> QueueSetup:
        """The setup of a fresh driver ring: its addresses, format and initial base."""
        a = ring.addresses()
        base = ring.initial_base if isinstance(ring, PackedQueue) else 0
        return cls(ring.index, ring.size, a.desc, a.driver, a.device, base, ring.format)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How long a lost device is waited for (a :class:`ReconnectingTransport`'s policy).

    Attempts are retried with exponential backoff from ``delay`` to
    ``max_delay`` seconds until ``timeout`` seconds have passed since the
    loss, or ``attempts`` attempts have failed (None: no count limit). In
    vhost-user server mode an attempt is waiting for the back end to connect.
    """

    timeout: float = 30.0
    attempts: int | None = None
    delay: float = 0.01
    max_delay: float = 0.5

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.delay <= 0 or self.max_delay < self.delay:
            raise InvalidArgument(f"bad reconnect policy {self!r}")
        if self.attempts is not None and self.attempts < 1:
            raise InvalidArgument(f"reconnect attempts must be positive, got {self.attempts}")

    @classmethod
    def from_arg(cls, value: ReconnectPolicy | bool | float | None) -> ReconnectPolicy | None:
        """None/False: off; True: the defaults; a number: that timeout in seconds."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, ReconnectPolicy):
            return value
        if isinstance(value, int | float):
            return cls(timeout=float(value))
        raise InvalidArgument(f"reconnect must be a ReconnectPolicy, a bool or seconds, not {value!r}")


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

    def ack_queue(self, index: int) -> None:
        """Acknowledge queue ``index``'s signal: :meth:`queue_fd` stays readable until this is called.

        Event-loop readers call it when the fd turns readable, before they
        reap (a signal that arrives meanwhile makes the fd readable again);
        nothing to acknowledge is not an error. :meth:`wait_queue`
        acknowledges the signal it returns for by itself.
        """
        ...

    def has_config(self) -> bool:
        """Does the device have a config space this transport can read and write?

        False for a vhost-user back end without PROTOCOL_F_CONFIG: then
        :meth:`read_config` and :meth:`write_config` raise
        :class:`~pyvirtio.errors.TransportError`, and a driver that can keeps the
        config in the frontend instead.
        """
        ...

    def check_alive(self) -> None:
        """Raise :class:`~pyvirtio.errors.ConnectionLost` if the device is known to be gone."""
        ...

    def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """Transport fields for the info dump (seed: dump_json_info)."""
        ...


@runtime_checkable
class ReconnectingTransport(Transport, Protocol):
    """A transport that can lose its device and reconnect to it (vhost-user).

    Each successful reconnect starts a new :attr:`generation`; a queue set
    up on an older one is *stale* until :meth:`restart_queue` starts it on
    the new connection. :class:`~pyvirtio.device.VirtioDevice` drives this
    (``recover``); drivers only see ConnectionLost or added latency.
    """

    #: None: a lost device is final (the data path fails its requests).
    reconnect_policy: ReconnectPolicy | None
    #: Successful reconnects so far.
    generation: int
    #: The current back end took over the previous one's inflight area and resubmits by itself.
    device_resubmits: bool
    #: Hand the inflight area to a new back end (True, the default); False: a fresh area each time and the
    #: frontend resubmits (the device layer's choice when its rings cannot resume where the old area says).
    hand_over_inflight: bool

    def reconnect(self, deadline: float | None = None) -> bool:
        """Make sure a working connection is up; True if this call made a new one.

        Raises :class:`~pyvirtio.errors.ReconnectFailed` when reconnecting is
        off, the policy's limit (or ``deadline``, a ``time.monotonic()``
        value) is reached, or the new device cannot resume.
        """
        ...

    def restart_queue(self, index: int, base: int) -> None:
        """Start existing queue ``index`` on the current connection at ring base ``base``.

        ``base`` as in :class:`QueueSetup` (split: a 16-bit avail index; packed:
        positions and wrap counters in 32 bits).
        """
        ...

    def resume(self) -> None:
        """After a reconnect, once the queues are restarted: let the device run (DRIVER_OK)."""
        ...

    def plan_queues(self, count: int) -> None:
        """The driver will start ``count`` queues (before ``set_memory``; sizes state kept across reconnects)."""
        ...
