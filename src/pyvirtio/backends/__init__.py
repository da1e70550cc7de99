"""Embedded device back ends: device models and the vhost-user server.

A *device model* (:class:`~pyvirtio.backends.blk.BlockBackend`,
:class:`~pyvirtio.backends.scsi.ScsiBackend`, :class:`~pyvirtio.backends.net.NetBackend`) executes requests
taken from descriptor chains;
:class:`~pyvirtio.backends.server.VhostUserServer` serves any model to
vhost-user frontends over a Unix socket (``pyvirtio serve``).
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
