"""Embedded device back ends: device models and the vhost-user server.

A *device model* (:class:`~pyvirtio.backends.blk.BlockBackend`,
:class:`~pyvirtio.backends.scsi.ScsiBackend`, :class:`~pyvirtio.backends.net.NetBackend`) executes requests
taken from descriptor chains (what a model must and may have:
:mod:`pyvirtio.backends.model`);
:class:`~pyvirtio.backends.server.VhostUserServer` serves any model to
vhost-user frontends over a Unix socket (``pyvirtio serve``): a sans-I/O
control plane (:mod:`~pyvirtio.backends.control`), the data path
(:mod:`~pyvirtio.backends.datapath`) and the sockets
(:mod:`~pyvirtio.backends.listener`). The scsi model is virtio-scsi framing
(:mod:`~pyvirtio.backends.scsi`) over a SCSI target emulation
(:mod:`~pyvirtio.backends.scsi_target`).
"""

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.net import NetBackend
from pyvirtio.backends.scsi import ScsiBackend, ScsiLun
from pyvirtio.backends.server import DeviceModel, ProtocolViolation, VhostUserBackend, VhostUserServer

__all__ = [
    "BlockBackend",
    "DeviceModel",
    "NetBackend",
    "ProtocolViolation",
    "ScsiBackend",
    "ScsiLun",
    "Storage",
    "VhostUserBackend",
    "VhostUserServer",
]
