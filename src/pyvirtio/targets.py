"""Naming devices on the command line and in ``VirtioBlk.open``.

A target is ``vhost-user:PATH`` or a plain path to a vhost-user socket.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.device import VirtioDevice
from pyvirtio.errors import InvalidArgument
from pyvirtio.spec.common import DEVICE_ID_BLOCK


def parse_target(target: str) -> tuple[str, str]:
    """(kind, address) of a target string."""
    if target.startswith("vhost-user:"):
        path = target[len("vhost-user:") :]
        if not path:
            raise InvalidArgument("vhost-user target needs a socket path: vhost-user:PATH")
        return "vhost-user", path
    if ":" in target.split("/")[0] and not target.startswith(("/", ".")):
        raise InvalidArgument(f"unknown target kind in {target!r} (expected vhost-user:PATH or a socket path)")
    return "vhost-user", target


def open_device(target: str, *, device_type: int = DEVICE_ID_BLOCK, **kw: Any) -> VirtioDevice:
    """Connect to ``target`` and return an un-negotiated VirtioDevice."""
    from pyvirtio.transport.vhost_user import VhostUserTransport

    kind, addr = parse_target(target)
    transport = VhostUserTransport(addr, device_type=device_type, **kw)
    return VirtioDevice(target, transport)
