"""One ring of an embedded back end, as the frontend configured it.

:class:`RingState` is shared by the two halves of a connection: the control
plane (:mod:`pyvirtio.backends.control`) fills it from SET_VRING_* messages
and builds or releases its queue (a :class:`~pyvirtio.ring.base.DeviceRing`,
split or packed as negotiated); the data path
(:mod:`pyvirtio.backends.datapath`) runs the queue while it exists, signals
``call`` and ``err``, and keeps the inflight record (``inflight``, a
:class:`~pyvirtio.backends.inflight.RingTracker` bound to the queue). The
control plane owns the fds it holds (``kick``, ``call``, ``err``) and closes
them.
"""

from __future__ import annotations

import os

from pyvirtio.backends.inflight import RingTracker
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.base import DeviceRing
from pyvirtio.ring.device_side import DeviceQueue
from pyvirtio.spec.ring import PACKED_BASE_EXACT, parse_packed_base

__all__ = ["RingState", "close_fd"]


def close_fd(fd: int) -> None:
    """Close ``fd``, ignoring an fd already gone (the frontend's fds are not trusted to stay valid)."""
    try:
        os.close(fd)
    except OSError:
        pass


class RingState:
    """Per-ring state as the frontend configured it, and the running queue."""

    __slots__ = (
        "index", "num", "addr", "base", "kick", "kick_polled", "call", "call_missed", "err", "enabled", "queue",
        "inflight",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: vu.VringAddr | None = None
        self.base = 0  # SET_VRING_BASE's value, or where the queue stopped (DeviceRing.base)
        self.kick = -1
        self.kick_polled = False  # SET_VRING_KICK with NOFD: no kicks, poll the ring
        self.call = -1
        #: A used buffer notification was due while the ring had no call fd (the next one gets it).
        self.call_missed = False
        self.err = -1
        self.enabled = False
        self.queue: DeviceRing | None = None
        #: INFLIGHT_SHMFD tracking while the ring runs (it holds what a predecessor left, to run first).
        self.inflight: RingTracker | None = None

    def close_fds(self) -> None:
        """Close the ring's eventfds (kick, call, err)."""
        if self.kick >= 0:
            close_fd(self.kick)
            self.kick = -1
        if self.call >= 0:
            close_fd(self.call)
            self.call = -1
        if self.err >= 0:
            close_fd(self.err)
            self.err = -1
        self.kick_polled = False

    def describe(self) -> dict[str, object]:
        """The ring's state for ``info()``."""
        queue = self.queue
        out: dict[str, object] = {
            "index": self.index,
            "size": self.num,
            "enabled": self.enabled,
            "running": queue is not None,
            "kick": "polled" if self.kick_polled else ("eventfd" if self.kick >= 0 else None),
            "call": self.call >= 0,
            "inflight": self.inflight is not None,
        }
        if isinstance(queue, DeviceQueue):
            out.update(format="split", in_order=queue.in_order, last_avail=queue.last_avail, used_idx=queue.used_idx)
        elif queue is not None:
            avail, avail_wrap, used, used_wrap = parse_packed_base(queue.base | PACKED_BASE_EXACT)  # both halves
            out.update(format="packed", in_order=queue.in_order, avail=avail, avail_wrap=avail_wrap, used=used,
                       used_wrap=used_wrap)
        else:
            out["base"] = self.base
        return out
