"""The memory-ordering assumption of pyvirtio's rings, stated once.

The driver and the device share ring memory and each writes fields that the
other polls. Correctness needs three orderings (virtio 1.2 §2.7.13):

1. descriptor and avail-ring entry stores become visible before the avail
   index store that publishes them (write barrier);
2. the used index is read before the used entries it covers (read barrier);
3. the avail index store becomes visible before the driver reads the
   device's notification suppression fields (used.flags / avail_event), and
   symmetric on the device side (full barrier: store then load).

**Assumption.** pyvirtio runs on CPython on x86-64. Every store to a
``memoryview`` is one plain machine store executed in program order (the
interpreter calls a C function per store; no compiler can move a store
across those calls), and x86-64's TSO model keeps store→store and
load→load order. So (1) and (2) hold with no instruction at all.
(3) does not: TSO lets a later load pass an earlier store. :func:`full_barrier`
provides it with a locked read-modify-write, which on x86-64 is a full
fence: CPython's lock acquire is an atomic compare-and-swap.

On other architectures (aarch64) plain stores may be reordered, and
``STRONGLY_ORDERED`` is False: the rings then call :func:`full_barrier` for
(1) and (2) as well. That path is correct but slower, and untested in CI.

Hot loops (the rings' batch fast paths, :mod:`pyvirtio.ring.fixed`) inline
the full barrier as its two halves, :data:`fence_acquire` then
:data:`fence_release` (two C calls instead of a Python call around them).
A loop that wants the fence on its critical path and the rest after it
takes a lock of its own (:func:`private_fence`): the acquire is the fence,
the release may come later, and no other thread ever waits on that lock.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable
from typing import Final

STRONGLY_ORDERED: Final = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

_fence_lock = threading.Lock()

#: :func:`full_barrier` inlined: call ``fence_acquire()`` then ``fence_release()``.
fence_acquire: Final = _fence_lock.acquire
fence_release: Final = _fence_lock.release


def full_barrier() -> None:
    """A full memory fence: a locked atomic operation (acquire + release)."""
    _fence_lock.acquire()
    _fence_lock.release()


def private_fence() -> tuple[Callable[[], bool], Callable[[], None]]:
    """A full fence of the caller's own: (acquire, release) of a fresh lock.

    ``acquire()`` is the fence (a locked compare-and-swap); ``release()``
    must follow before the next ``acquire()``, but may wait until after
    work that is off the ordering's path (e.g. a kick). The lock is the
    caller's alone, so no other thread waits while it is held.
    """
    lock = threading.Lock()
    return lock.acquire, lock.release


def write_barrier() -> None:
    """Order earlier stores before later stores (free on x86-64)."""
    if not STRONGLY_ORDERED:
        full_barrier()


def read_barrier() -> None:
    """Order earlier loads before later loads (free on x86-64)."""
    if not STRONGLY_ORDERED:
        full_barrier()
