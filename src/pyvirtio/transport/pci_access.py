"""Register windows of a PCI function, and what a driver binding (uio, vfio) provides.

Theory of operation. A virtio structure lives in a BAR. A memory BAR is
mapped (by :mod:`pyvirtio.memory`, the one place mmaps are made) and its
registers are read and written with accesses of exactly the register's
width: :class:`MmioWindow` goes through ctypes integers placed on the
mapping, whose value get/set is one load or store of 1, 2 or 4 bytes (a
``memoryview`` slice copy may split or repeat an access, which a device
register does not forgive: a double write to ``queue_notify`` is a second
kick, a split read of a 32-bit register may tear). 64-bit registers are
written as two 32-bit halves, low first (virtio 1.2 §4.1.3.1). An I/O port
BAR (the legacy interface) cannot be mapped: :class:`PortWindow` reads and
writes it with ``pread``/``pwrite`` of the register's width on the file
that stands for it (sysfs ``resourceN`` for uio, the vfio device fd at the
region's offset), which the kernel turns into one ``in``/``out``.

Every access is bounds-checked against the window: a register outside the
structure is a bug or a hostile capability, never an access elsewhere.

:class:`PciBinding` is what :class:`~pyvirtio.transport.pci.PciTransport`
needs from the kernel driver the function is bound to:
:class:`~pyvirtio.transport.pci_uio.UioBinding` (uio_pci_generic: physical
addresses, INTx) or :class:`~pyvirtio.transport.pci_vfio.VfioBinding`
(vfio-pci: an IOMMU, MSI-X to eventfds).
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Protocol

from pyvirtio.errors import InvalidArgument, TransportError
from pyvirtio.memory import DeviceAddressing, Region
from pyvirtio.spec import pci as P
from pyvirtio.transport.pci_caps import Bar
from pyvirtio.transport.pci_sysfs import PciFunction

_CTYPES: dict[int, type[ctypes.c_uint8] | type[ctypes.c_uint16] | type[ctypes.c_uint32]] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16,
    4: ctypes.c_uint32,
}
_FORMATS = {1: "<B", 2: "<H", 4: "<I"}

Register = ctypes.c_uint8 | ctypes.c_uint16 | ctypes.c_uint32


class Window(Protocol):
    """Registers of one structure: ``read(offset, width)`` / ``write(offset, width, value)``, width 1, 2 or 4."""

    length: int

    def read(self, offset: int, width: int) -> int: ...

    def write(self, offset: int, width: int, value: int) -> None: ...

    def close(self) -> None: ...


def _check(window: Window, offset: int, width: int) -> None:
    if width not in _FORMATS:
        raise InvalidArgument(f"register width {width} (1, 2 or 4)")
    if offset < 0 or offset + width > window.length:
        raise InvalidArgument(f"register 0x{offset:x}+{width} is outside the 0x{window.length:x}-byte structure")


class MmioWindow:
    """``length`` bytes at ``offset`` of a mapped memory BAR (see the module docstring)."""

    def __init__(self, region: Region, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > region.size:
            raise InvalidArgument(f"window 0x{offset:x}+0x{length:x} is outside the 0x{region.size:x}-byte BAR")
        self.region = region
        self.offset = offset
        self.length = length
        self._regs: dict[tuple[int, int], Register] = {}

    def register(self, offset: int, width: int) -> Register:
        """The ctypes integer on register ``offset`` (``.value`` is one access of ``width`` bytes)."""
        key = (offset, width)
        reg = self._regs.get(key)
        if reg is None:
            _check(self, offset, width)
            if self.region.closed:
                raise TransportError("the BAR mapping is closed")
            reg = _CTYPES[width].from_buffer(self.region.mmap, self.offset + offset)
            self._regs[key] = reg
        return reg

    def read(self, offset: int, width: int) -> int:
        return int(self.register(offset, width).value)

    def write(self, offset: int, width: int, value: int) -> None:
        self.register(offset, width).value = value

    def close(self) -> None:
        """Drop the registers (they hold exports of the mapping, which can only be unmapped without them)."""
        self._regs.clear()


class PortWindow:
    """``length`` bytes at ``base`` of a file standing for an I/O BAR (see the module docstring)."""

    def __init__(self, fd: int, base: int, length: int, name: str) -> None:
        self.fd = fd
        self.base = base
        self.length = length
        self.name = name

    def read(self, offset: int, width: int) -> int:
        _check(self, offset, width)
        try:
            data = os.pread(self.fd, width, self.base + offset)
        except OSError as exc:
            raise TransportError(f"{self.name}: I/O read at 0x{offset:x} failed: {exc.strerror}") from None
        if len(data) != width:
            raise TransportError(f"{self.name}: short I/O read at 0x{offset:x} ({len(data)} of {width} bytes)")
        return int(struct.unpack(_FORMATS[width], data)[0])

    def write(self, offset: int, width: int, value: int) -> None:
        _check(self, offset, width)
        try:
            n = os.pwrite(self.fd, struct.pack(_FORMATS[width], value), self.base + offset)
        except OSError as exc:
            raise TransportError(f"{self.name}: I/O write at 0x{offset:x} failed: {exc.strerror}") from None
        if n != width:
            raise TransportError(f"{self.name}: short I/O write at 0x{offset:x}")

    def close(self) -> None:
        pass


class PciBinding(Protocol):
    """What the transport needs from the driver a function is bound to (module docstring)."""

    #: "uio" or "vfio".
    kind: str
    function: PciFunction
    #: How the device addresses DMA memory (physical, IOVA): installed in the transport's pool.
    addressing: DeviceAddressing

    def config_read(self, offset: int, length: int) -> bytes:
        """Bytes of the function's config space."""
        ...

    def config_write(self, offset: int, data: bytes) -> None: ...

    def bars(self) -> list[Bar]: ...

    def map_bar(self, index: int) -> Region:
        """BAR ``index`` (a memory BAR) mapped shared."""
        ...

    def port_window(self, index: int, length: int) -> PortWindow:
        """The first ``length`` bytes of I/O BAR ``index``."""
        ...

    def enable_interrupts(self, count: int) -> list[int]:
        """Interrupt fds: one per MSI-X vector (vfio; at most ``count``), or the one INTx fd (uio)."""
        ...

    def unmask(self) -> None:
        """Re-enable a level interrupt after it was taken (uio INTx; nothing for MSI-X)."""
        ...

    def drain(self, fd: int) -> None:
        """Consume what ``fd`` signalled (uio: a 4-byte count; vfio: an eventfd's 8 bytes); never blocks."""
        ...

    @property
    def msix(self) -> bool:
        """Are MSI-X vectors enabled (the legacy config then starts at 24)?"""
        ...

    def close(self) -> None: ...


def enable_bus_master(binding: PciBinding, *, intx: bool) -> None:
    """Set memory, I/O space and bus master in the command register (a device must be allowed to DMA).

    ``intx``: may the function assert its INTx line? Only a uio binding
    waiting for interrupts takes INTx. Otherwise INTx is disabled (command
    bit 10): a device whose MSI-X is off signals used buffers on its line
    even while the driver polls, and with no handler for it (vfio-pci
    registers none unless asked) Linux finds the shared line stuck
    ("irq N: nobody cared") and switches it off for every device on it.
    """
    (cmd,) = struct.unpack("<H", binding.config_read(P.CFG_COMMAND, 2))
    want = cmd | P.COMMAND_MASTER | P.COMMAND_MEMORY | P.COMMAND_IO
    want = want & ~P.COMMAND_INTX_DISABLE if intx else want | P.COMMAND_INTX_DISABLE
    if want != cmd:
        binding.config_write(P.CFG_COMMAND, struct.pack("<H", want))
