"""A vhost-user back end (server or client mode) for any device model: the public names.

Theory of operation
-------------------
:class:`VhostUserServer` listens on a Unix socket and serves one frontend at
a time (:class:`VhostUserClient` connects to a frontend that listens); each
connection is a :class:`VhostUserBackend` serving a *device model*
(:class:`~pyvirtio.backends.model.DeviceModel`: ``num_queues``,
``features()``, ``config()``, ``handle(queue, chain) -> bytes written``, and
the optional hooks declared in :mod:`pyvirtio.backends.model`).
:class:`~pyvirtio.backends.blk.BlockBackend`,
:class:`~pyvirtio.backends.scsi.ScsiBackend` and
:class:`~pyvirtio.backends.net.NetBackend` are the shipped models.

The engine is three modules along its seams:

* :mod:`pyvirtio.backends.control`: the control plane, a sans-I/O state
  machine: decoded messages (and their fds) in; replies to send and rings to
  start or stop out. It holds the negotiated state (features, memory table,
  ring configuration, inflight area) and decides whose fault a request is;
  its docstring lists the checks and the tolerances (GET_CONFIG past the
  device's config, unoffered device feature bits, message orders); the
  frontend's memory regions are checked and mapped by
  :mod:`pyvirtio.backends.regions`, each ring's layout checked and its queue
  built by :mod:`pyvirtio.backends.ringsetup`;
* :mod:`pyvirtio.backends.datapath`: the data path, batches of chains per
  kicked ring, used-ring publication, call and err eventfds, polling before
  sleeping, inflight records;
* :mod:`pyvirtio.backends.listener`: the I/O: sockets, the ``poll`` loop of
  a connection (one thread does everything: messages never race ring
  work), the listener and the client that reconnects.

This module keeps the names callers import (``from pyvirtio.backends.server
import VhostUserServer``).
"""

from __future__ import annotations

from pyvirtio.backends.control import MAX_MEM_SLOTS, OFFERED_PROTOCOL_FEATURES
from pyvirtio.backends.datapath import DEFAULT_POLL_US
from pyvirtio.backends.listener import SEND_TIMEOUT, VhostUserBackend, VhostUserClient, VhostUserServer
from pyvirtio.backends.model import DeviceModel, ModelHooks
from pyvirtio.errors import ProtocolViolation

__all__ = [
    "DEFAULT_POLL_US",
    "MAX_MEM_SLOTS",
    "OFFERED_PROTOCOL_FEATURES",
    "SEND_TIMEOUT",
    "DeviceModel",
    "ModelHooks",
    "ProtocolViolation",
    "VhostUserBackend",
    "VhostUserClient",
    "VhostUserServer",
]
