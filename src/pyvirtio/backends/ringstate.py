"""One ring of an embedded back end, as the frontend configured it.

:class:`RingState` is shared by the two halves of a connection: the control
plane (:mod:`pyvirtio.backends.control`) fills it from SET_VRING_* messages
and builds or releases its :class:`~pyvirtio.ring.device_side.DeviceQueue`;
the data path (:mod:`pyvirtio.backends.datapath`) runs the queue while it
exists, signals ``call`` and ``err``, and keeps the inflight record. The
control plane owns the fds it holds (``kick``, ``call``, ``err``) and closes
them.
"""

from __future__ import annotations

import os

from pyvirtio.backends.inflight import QueueInflight
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.device_side import DeviceQueue

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
        "inflight", "resubmit",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: vu.VringAddr | None = None
        self.base = 0
        self.kick = -1
        self.kick_polled = False  # SET_VRING_KICK with NOFD: no kicks, poll the ring
        self.call = -1
        #: A used buffer notification was due while the ring had no call fd (the next one gets it).
        self.call_missed = False
        self.err = -1
        self.enabled = False
        self.queue: DeviceQueue | None = None
        self.inflight: QueueInflight | None = None  # INFLIGHT_SHMFD tracking while the ring runs
        self.resubmit: list[int] = []  # heads a previous back end left in flight, to run first

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
        if queue is not None:
            out["last_avail"] = queue.last_avail
            out["used_idx"] = queue.used_idx
        else:
            out["base"] = self.base
        return out
