"""Naming devices on the command line and in the drivers' ``open``.

A target is ``vhost-user:PATH`` or a plain path to a vhost-user socket.
:func:`open_driver` is every driver's ``open``: it splits the keyword
arguments between the transport and the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

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


def open_device(
    target: str, *, device_type: int = DEVICE_ID_BLOCK, packed_zero_wrap: bool = False, **kw: Any
) -> VirtioDevice:
    """Connect to ``target`` and return an un-negotiated VirtioDevice (``kw`` to the transport)."""
    from pyvirtio.transport.vhost_user import VhostUserTransport

    kind, addr = parse_target(target)
    transport = VhostUserTransport(addr, device_type=device_type, **kw)
    return VirtioDevice(target, transport, packed_zero_wrap=packed_zero_wrap)


D = TypeVar("D")

#: Keyword arguments of a driver's ``open`` that go to :func:`open_device` only (the transport's, and
#: ``packed_zero_wrap`` for the device).
TRANSPORT_OPTIONS = ("reconnect", "server", "connect_timeout", "packed_zero_wrap")
#: Keyword arguments both take (the transport's reply timeout, its ring size).
SHARED_OPTIONS = ("queue_size", "timeout")


def open_driver(make: Callable[..., D], target: str, device_type: int, kw: dict[str, Any]) -> D:
    """``make(device, **driver_kw)`` on a new device at ``target`` (closed again if ``make`` fails).

    ``kw``: :data:`TRANSPORT_OPTIONS` go to the transport only,
    :data:`SHARED_OPTIONS` (when set) to both, the rest to the driver.
    """
    driver_kw = dict(kw)
    transport_kw: dict[str, Any] = {name: driver_kw.pop(name) for name in TRANSPORT_OPTIONS if name in driver_kw}
    for name in SHARED_OPTIONS:
        if driver_kw.get(name):
            transport_kw[name] = driver_kw[name]
    device = open_device(target, device_type=device_type, **transport_kw)
    try:
        return make(device, **driver_kw)
    except BaseException:
        device.close()
        raise
