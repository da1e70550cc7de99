"""Public test helpers: connected ring pairs, hostile peers, resource counters.

* :class:`RingPair`: a driver :class:`~pyvirtio.ring.split.SplitQueue` and a
  device :class:`~pyvirtio.ring.device_side.DeviceQueue` over one memory pool.
* :class:`HostileDevice`: writes arbitrary used entries into a driver's ring.
* :class:`RawDriver`: writes arbitrary descriptors and avail entries for a
  device ring.
* :class:`PackedRingPair`, :class:`HostilePackedDevice`, :class:`RawPackedDriver`:
  the same three for packed rings.
* :func:`open_fd_count`, :func:`open_fds`, :func:`fds_opened_since`: this
  process's open file descriptors (leak checks).
* :mod:`pyvirtio.testing.strategies`: Hypothesis strategies (imported on its
  own, since it needs Hypothesis).
"""

from __future__ import annotations

import gc
import os

from pyvirtio.testing.hostile import HostileDevice, HostilePackedDevice, RawDriver, RawPackedDriver
from pyvirtio.testing.pair import PackedRingPair, RingPair


def open_fd_count(collect: bool = True) -> int:
    """The number of file descriptors this process has open (Linux: /proc/self/fd).

    With ``collect`` (the default) garbage is collected first: an mmap keeps
    a private duplicate of its fd until the object dies, and a memoryview
    caught in a reference cycle (a traceback, say) can keep one alive for a
    while, which would make leak checks flaky.
    """
    if collect:
        gc.collect()
    return len(os.listdir("/proc/self/fd"))


def open_fds(collect: bool = True) -> dict[int, str]:
    """This process's open file descriptors and what each points at (``readlink``), after a collection."""
    if collect:
        gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (listdir's own fd, another thread's)
            continue
    return out


def fds_opened_since(before: dict[int, str]) -> dict[int, str]:
    """The descriptors open now that were not open (to the same thing) in ``before``, an :func:`open_fds` result.

    A leak check that a descriptor closed meanwhile by someone else (an
    earlier test's server thread finishing) cannot upset, and that names
    what leaked.
    """
    now = open_fds()
    return {fd: target for fd, target in now.items() if before.get(fd) != target}


__all__ = [
    "HostileDevice",
    "HostilePackedDevice",
    "PackedRingPair",
    "RawDriver",
    "RawPackedDriver",
    "RingPair",
    "fds_opened_since",
    "open_fd_count",
    "open_fds",
]
