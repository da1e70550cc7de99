"""What the embedded vhost-user back end needs from a device model, declared.

A *device model* (:class:`~pyvirtio.backends.blk.BlockBackend`,
:class:`~pyvirtio.backends.scsi.ScsiBackend`,
:class:`~pyvirtio.backends.net.NetBackend`, or a test's own) executes the
requests of one device type; the vhost-user server
(:mod:`pyvirtio.backends.server`) does everything else. The contract is a
required :class:`DeviceModel` protocol and a few optional *capability*
protocols, each a set of members a model has or lacks as a whole:

=========================  =======================================================
protocol                   members, and what the back end does with them
=========================  =======================================================
:class:`DeviceModel`       ``num_queues``, ``features()``, ``config()``,
                           ``handle(queue, chain) -> bytes written``: required
:class:`NegotiatesFeatures` ``negotiated(features)``: called at SET_FEATURES with
                           the features in force (net: MRG_RXBUF; scsi: CHANGE)
:class:`WritableConfig`    ``set_config(offset, data)``: SET_CONFIG (without it
                           the config is read-only: SET_CONFIG is refused)
:class:`Resettable`        ``reset()``: RESET_OWNER / RESET_DEVICE
:class:`Describable`       ``info() -> dict``: the server's ``info()["device"]``
:class:`CountsQueuePairs`  ``vhost_queue_num``: the GET_QUEUE_NUM answer (net
                           answers queue *pairs*); default ``num_queues``
:class:`DeviceInitiated`   ``gated_queues``, ``wake_fd``, ``pending(queue)``:
                           chains of the gated rings are taken only while
                           ``pending`` says the model wants them (receive
                           buffers, event buffers); the model writes ``wake_fd``
                           (an eventfd) when ``pending`` may have grown
:class:`OptionalConfigSpace` ``config_space``: False when the device's config
                           lives in the frontend (SPDK's vhost-user-scsi
                           targets): PROTOCOL_F_CONFIG is then not offered
=========================  =======================================================

A model's ``features()`` holds its device-type bits and :data:`RING_FEATURES`,
the ring features the data path serves for every model: VERSION_1, indirect
descriptors, event index, packed rings and in-order use (virtio 1.2 §6; the
data path handles chains in pop order, so IN_ORDER costs a model nothing).

The protocols are checked once, when a connection's engine is built
(:meth:`ModelHooks.of`): the hooks a model has are bound into a
:class:`ModelHooks` record, so nothing on the message or data path asks a
model what it has (no ``getattr``). A model that has part of a capability
(``gated_queues`` without ``pending``, say) is refused then, with a
:class:`TypeError` naming what is missing: a programming error, not a
frontend's fault.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pyvirtio.ring.device_side import Chain
from pyvirtio.spec.common import F_IN_ORDER, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED, F_VERSION_1

__all__ = [
    "RING_FEATURES",
    "CountsQueuePairs",
    "DeviceInitiated",
    "DeviceModel",
    "Describable",
    "ModelHooks",
    "NegotiatesFeatures",
    "OptionalConfigSpace",
    "Resettable",
    "WritableConfig",
]


#: The ring features of every embedded back end (see the module docstring).
RING_FEATURES = (
    (1 << F_VERSION_1)
    | (1 << F_RING_INDIRECT_DESC)
    | (1 << F_RING_EVENT_IDX)
    | (1 << F_RING_PACKED)
    | (1 << F_IN_ORDER)
)


@runtime_checkable
class DeviceModel(Protocol):
    """What the back end needs from every device (blk, scsi, net...)."""

    num_queues: int

    def features(self) -> int: ...

    def config(self) -> bytes: ...

    def handle(self, queue: int, chain: Chain) -> int: ...


@runtime_checkable
class NegotiatesFeatures(Protocol):
    """A model whose work depends on the negotiated features."""

    def negotiated(self, features: int) -> None: ...


@runtime_checkable
class WritableConfig(Protocol):
    """A model whose config the driver may write (raises ValueError for what it refuses)."""

    def set_config(self, offset: int, data: bytes) -> None: ...


@runtime_checkable
class Resettable(Protocol):
    """A model with state a device reset clears."""

    def reset(self) -> None: ...


@runtime_checkable
class Describable(Protocol):
    """A model that describes itself for ``info()``."""

    def info(self) -> dict[str, Any]: ...


@runtime_checkable
class CountsQueuePairs(Protocol):
    """A model whose GET_QUEUE_NUM answer is not ``num_queues`` (net: queue pairs)."""

    vhost_queue_num: int


@runtime_checkable
class DeviceInitiated(Protocol):
    """A model that sends device-initiated buffers on some rings (see the module docstring)."""

    gated_queues: Collection[int]
    wake_fd: int

    def pending(self, queue: int) -> int: ...


@runtime_checkable
class OptionalConfigSpace(Protocol):
    """A model that may keep its config out of the back end (no PROTOCOL_F_CONFIG)."""

    config_space: bool


_DEVICE_INITIATED = ("gated_queues", "wake_fd", "pending")


@dataclass(frozen=True, slots=True)
class ModelHooks:
    """A model's hooks, looked up once (:meth:`of`); ``None`` where the model lacks one."""

    model: DeviceModel
    num_queues: int
    features: Callable[[], int]
    config: Callable[[], bytes]
    handle: Callable[[int, Chain], int]
    negotiated: Callable[[int], None] | None
    set_config: Callable[[int, bytes], None] | None
    reset: Callable[[], None] | None
    info: Callable[[], dict[str, Any]] | None
    queue_num: int
    gated: frozenset[int]
    wake_fd: int
    pending: Callable[[int], int] | None
    config_space: bool

    @classmethod
    def of(cls, model: object) -> ModelHooks:
        """Check ``model`` against the protocols and bind what it has; TypeError if it is no model."""
        if not isinstance(model, DeviceModel):
            missing = [m for m in ("num_queues", "features", "config", "handle") if not hasattr(model, m)]
            raise TypeError(f"{type(model).__name__} is not a device model: it lacks {', '.join(missing)}")
        num_queues = int(model.num_queues)
        if num_queues < 1:
            raise TypeError(f"{type(model).__name__}.num_queues is {num_queues}: a device needs a queue")
        gated: frozenset[int] = frozenset()
        wake_fd = -1
        pending = None
        if isinstance(model, DeviceInitiated):
            gated = frozenset(int(q) for q in model.gated_queues)
            if gated:
                wake_fd = int(model.wake_fd)
                pending = model.pending
        elif any(hasattr(model, m) for m in _DEVICE_INITIATED):
            missing = [m for m in _DEVICE_INITIATED if not hasattr(model, m)]
            raise TypeError(
                f"{type(model).__name__} has part of DeviceInitiated: it lacks {', '.join(missing)}"
            )
        return cls(
            model=model,
            num_queues=num_queues,
            features=model.features,
            config=model.config,
            handle=model.handle,
            negotiated=model.negotiated if isinstance(model, NegotiatesFeatures) else None,
            set_config=model.set_config if isinstance(model, WritableConfig) else None,
            reset=model.reset if isinstance(model, Resettable) else None,
            info=model.info if isinstance(model, Describable) else None,
            queue_num=int(model.vhost_queue_num) if isinstance(model, CountsQueuePairs) else num_queues,
            gated=gated,
            wake_fd=wake_fd,
            pending=pending,
            config_space=bool(model.config_space) if isinstance(model, OptionalConfigSpace) else True,
        )
