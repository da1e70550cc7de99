"""Naming devices on the command line and in the drivers' ``open``.

A target is ``vhost-user:PATH`` or a plain path to a vhost-user socket, or
``pci:DDDD:BB:SS.F[,legacy][,irq][,uio|,vfio]``: a virtio PCI function bound
to uio_pci_generic or vfio-pci (:mod:`pyvirtio.transport.pci`; the flags
pick the legacy interface, interrupts instead of polling, and insist on a
binding). :func:`open_driver` is every driver's ``open``: it splits the
keyword arguments between the transport and the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pyvirtio.device import VirtioDevice
from pyvirtio.errors import InvalidArgument
from pyvirtio.spec import pci as P
from pyvirtio.spec.common import DEVICE_ID_BLOCK


def parse_target(target: str) -> tuple[str, str]:
    """(kind, address) of a target string."""
    if target.startswith("pci:"):
        if not target[4:]:
            raise InvalidArgument("pci target needs a function address: pci:DDDD:BB:SS.F")
        return "pci", target[4:]
    if target.startswith("vhost-user:"):
        path = target[len("vhost-user:") :]
        if not path:
            raise InvalidArgument("vhost-user target needs a socket path: vhost-user:PATH")
        return "vhost-user", path
    if ":" in target.split("/")[0] and not target.startswith(("/", ".")):
        raise InvalidArgument(
            f"unknown target kind in {target!r} (expected vhost-user:PATH, pci:ADDR or a socket path)"
        )
    return "vhost-user", target


def open_device(
    target: str, *, device_type: int = DEVICE_ID_BLOCK, packed_zero_wrap: bool = False, **kw: Any
) -> VirtioDevice:
    """Connect to ``target`` and return an un-negotiated VirtioDevice (``kw`` to the transport)."""
    from pyvirtio.transport.vhost_user import VhostUserTransport

    kind, addr = parse_target(target)
    if kind == "pci":
        return _open_pci(target, addr, device_type, kw)
    transport = VhostUserTransport(addr, device_type=device_type, **kw)
    return VirtioDevice(target, transport, packed_zero_wrap=packed_zero_wrap)


def _open_pci(target: str, addr: str, device_type: int, kw: dict[str, Any]) -> VirtioDevice:
    """A device on the PCI transport (which owns the DMA pool: the device is given it)."""
    from pyvirtio.transport.pci import PciTransport, parse_pci_target

    for name in ("reconnect", "server"):
        if kw.get(name):
            raise InvalidArgument(f"{name} applies to vhost-user targets, not to {target}")
    address, pci_kw = parse_pci_target(addr)
    transport = PciTransport(address, device_type=device_type, queue_size=kw.get("queue_size"),
                             timeout=float(kw.get("timeout") or 5.0), **pci_kw)
    return VirtioDevice(target, transport, pool=transport.pool)


def target_device_type(target: str, *, root: str = "/sys") -> int | None:
    """The virtio device type a target names, when the transport can tell without opening it.

    A PCI function says what it is (its device ID, virtio 1.2 §4.1.2); a
    vhost-user socket does not (None: the caller must know).
    """
    kind, addr = parse_target(target)
    if kind != "pci":
        return None
    from pyvirtio.transport.pci import parse_pci_target
    from pyvirtio.transport.pci_sysfs import PciFunction

    fn = PciFunction(parse_pci_target(addr)[0], root)
    fn.require()
    vendor, device = fn.ids()
    return P.device_type_of(device) if vendor == P.VENDOR_ID else 0


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
