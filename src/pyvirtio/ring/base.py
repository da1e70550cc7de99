"""The virtqueue API both ring formats implement: :class:`RingQueue` (driver) and :class:`DeviceRing` (device).

Theory of operation. A virtqueue has two layouts (virtio 1.2 §2.7 split,
§2.8 packed) and one job: the driver hands buffers to the device and gets
them back with the number of bytes the device wrote. Everything above the
ring layer (device.py, transports, drivers, back ends, engines) goes through
the two protocols here and never through a format's private state, so a
format is chosen once, at queue creation (``format`` names it).

**Driver side** (:class:`RingQueue`; :class:`~pyvirtio.ring.split.SplitQueue`,
:class:`~pyvirtio.ring.packed.PackedQueue`). The semantics, stated once:

* *Building a request* (SPDK's virtqueue API). ``start(token, n)`` opens a
  request of ``n`` buffers identified by ``token`` (an opaque object handed
  back at completion); ``add(addr, length, writable)`` adds one buffer,
  device-readable ones first (§2.7.4.2, §2.8.17); ``add_buffers`` adds
  several. Starting a request while one is open publishes the open one.
  ``abort()`` drops the open request. ``submit(token, buffers)`` is start +
  add + publish in one call (the fast path); a refused ``submit`` leaves
  nothing open. ``submit3(token, a0, l0, a1, l1, w1, a2, l2)`` is the
  one-request fast lane: ``submit`` of a three-buffer chain (readable,
  either, writable: a block request's header, data, status) and then
  ``kick_prepare()``, returning the kick decision, with no list built.
  Errors: :class:`~pyvirtio.errors.RequestTooLarge` (never fits),
  :class:`~pyvirtio.errors.QueueFull` (not now), ``InvalidArgument`` (bad
  buffer), :class:`~pyvirtio.errors.QueueBroken` (see below).
* *Publishing and the kick decision.* ``flush()`` publishes the open request
  and returns the kick decision for everything published since the last
  decision: True if the device must be notified (it did not suppress
  notifications, §2.7.10 / §2.8.10). ``kick_prepare()`` is the decision
  alone. The ring does no I/O: the transport notifies (Linux's
  kick_prepare / notify).
* *Completions.* ``reap(max_n)`` returns up to ``max_n`` ``(token, length)``
  pairs, length being the bytes the device wrote. Each used entry is
  validated before it is believed: an id out of range or not in flight, a
  length above the device-writable bytes the buffer offered, more
  completions than requests in flight, malformed entries (format-specific:
  a used index that jumps, a wrap counter that does not match). A violation
  marks the queue *broken* (``broken`` holds the reason), raises
  :class:`~pyvirtio.errors.DeviceProtocolError` whose ``completed`` holds the
  completions validated before the bad entry, and leaves the bad entry's
  buffer in flight: nothing in flight is lost or returned twice. A broken
  queue refuses all work with :class:`~pyvirtio.errors.QueueBroken` until
  ``reset()``. ``pending()`` counts completions ready to reap.
* *VIRTIO_F_IN_ORDER* (``in_order``, §2.7.9 / §2.8.8): the device may write one
  used entry for a batch, naming the batch's last buffer; ``reap`` then
  completes every buffer up to it, in order, the skipped ones with all their
  device-writable bytes ("used completely"). Completions still come back one
  per request.
* *Interrupts.* ``disable_interrupts()`` (polling, the default) and
  ``enable_interrupts()``, which returns True if completions are already
  pending (reap instead of sleeping: the device may have used buffers before
  it saw the request).
* *Lifecycle.* ``reset()`` re-initialises the ring (device reset) and returns
  the tokens that were in flight; ``close()`` releases the ring memory.
  ``in_flight_tokens()``: tokens published and not yet returned by ``reap``.
* *Reconnect.* ``restart_base(resubmit)`` prepares the ring for a new device
  behind the same memory (vhost-user reconnect) and returns the ring base
  for SET_VRING_BASE: completions the old device published stay reapable
  (once); with ``resubmit`` every other request in flight is made available
  again, exactly once. On a fresh ring it returns the initial base (split:
  0; packed: :data:`~pyvirtio.spec.ring.PACKED_INITIAL_BASE`).
* ``addresses()``: where the three areas are (:class:`RingAddresses`), for
  the transport's SET_VRING_ADDR / queue registers.

**Device side** (:class:`DeviceRing`; :class:`~pyvirtio.ring.device_side.DeviceQueue`,
:class:`~pyvirtio.ring.device_side.PackedDeviceQueue`): ``pop()`` the next
available chain (a :class:`~pyvirtio.ring.chain.Chain`, its ``head`` being
the id to report) or None, raising :class:`~pyvirtio.ring.chain.ChainError`
for a malformed one; ``add_used(head, length)`` then ``flush_used()``, which
publishes and returns the notify decision; ``enable_notifications()`` /
``disable_notifications()`` for kick suppression (True: work is already
pending, do not sleep); ``avail_pending()`` is non-zero when a chain is
available (split: how many; packed keeps no count: 1 or 0); ``base`` is the
GET_VRING_BASE value (split: the next avail index; packed: both positions
with their wrap counters, :func:`~pyvirtio.spec.ring.packed_base`), and the
constructors take it back (``last_avail=`` / ``base=``); ``release()`` drops
the views before unmapping. With ``in_order`` the device uses buffers in
the order it popped them and batches used entries (§2.7.9 / §2.8.8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pyvirtio.memory import MemoryTable
    from pyvirtio.ring.chain import Chain

#: One completion: the request's token and the number of bytes the device wrote.
Completion = tuple[object, int]


@dataclass(frozen=True)
class RingAddresses:
    """Where a ring's three areas live (virtio 1.2 §2.6: Descriptor, Driver and Device Area).

    Split: descriptor table, avail ring, used ring. Packed: descriptor ring,
    driver event suppression, device event suppression. vhost-user's
    SET_VRING_ADDR carries them as (desc, avail, used) for both formats.
    Sizes are in bytes.
    """

    desc: int
    driver: int
    device: int
    desc_size: int
    driver_size: int
    device_size: int


@runtime_checkable
class RingQueue(Protocol):
    """The driver side of a virtqueue, whatever its format (semantics: module docstring)."""

    format: ClassVar[str]
    index: int
    size: int
    broken: str | None
    event_idx: bool
    indirect: bool
    indirect_threshold: int
    in_order: bool
    num_free: int
    outstanding: int
    #: Clamp a used length above the writable bytes offered instead of breaking (a peer's quirk; counted).
    clamp_used_len: bool
    long_used: int

    def addresses(self) -> RingAddresses: ...

    def start(self, token: object, n: int) -> None: ...

    def add(self, addr: int, length: int, writable: bool = False) -> None: ...

    def add_buffers(self, buffers: Iterable[tuple[int, int, bool]]) -> None: ...

    def submit(self, token: object, buffers: Sequence[tuple[int, int, bool]]) -> None: ...

    def submit3(self, token: object, a0: int, l0: int, a1: int, l1: int, w1: bool, a2: int, l2: int) -> bool: ...

    def abort(self) -> None: ...

    @property
    def request_open(self) -> bool: ...

    def flush(self) -> bool: ...

    def kick_prepare(self) -> bool: ...

    def pending(self) -> int: ...

    def reap(self, max_n: int = 1 << 16) -> list[Completion]: ...

    def enable_interrupts(self) -> bool: ...

    def disable_interrupts(self) -> None: ...

    @property
    def interrupts_enabled(self) -> bool: ...

    def in_flight_tokens(self) -> list[object]: ...

    def reset(self) -> list[object]: ...

    def restart_base(self, resubmit: bool = True) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class DeviceRing(Protocol):
    """The device side of a virtqueue, whatever its format (semantics: module docstring)."""

    format: ClassVar[str]
    index: int
    size: int
    memory: MemoryTable
    event_idx: bool
    indirect: bool
    in_order: bool

    def pop(self) -> Chain | None: ...

    def avail_pending(self) -> int: ...

    def add_used(self, head: int, length: int) -> None: ...

    def flush_used(self) -> bool: ...

    def push_used(self, head: int, length: int) -> bool: ...

    def enable_notifications(self) -> bool: ...

    def disable_notifications(self) -> None: ...

    @property
    def base(self) -> int: ...

    def release(self) -> None: ...
