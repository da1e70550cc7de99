"""A virtio PCI function bound to vfio-pci: an IOMMU, I/O virtual addresses, MSI-X to eventfds.

Theory of operation (Linux Documentation/driver-api/vfio.rst). The
function's IOMMU group (``/dev/vfio/N``) is attached to a container
(``/dev/vfio/vfio``) with the type-1 IOMMU model; the device fd
(VFIO_GROUP_GET_DEVICE_FD) gives each BAR and the config space as a
*region* at an offset of that fd (VFIO_DEVICE_GET_REGION_INFO): memory BARs
are mapped (by :mod:`pyvirtio.memory`), the legacy I/O BAR and the config
space are read and written with pread/pwrite.

DMA (:class:`IovaAddressing`): each region of the pool is a plain memfd
mapped into the IOMMU with VFIO_IOMMU_MAP_DMA, which pins its pages (they
never move while mapped). I/O virtual addresses follow an offset scheme:
the first region at 4 GiB (:data:`IOVA_BASE`, clear of the low MMIO and
interrupt ranges), each next one after the previous, 2 MiB aligned; the
region's ``guest_addr`` is its IOVA, so a buffer's device address is
``IOVA + offset`` (contiguous, whatever the pages are). The whole scheme
stays far below 2^39, the smallest address width of QEMU's emulated
intel-iommu. A region is unmapped when the pool closes it, after the device
was reset. Contiguous IOVAs do not make a buffer one piece for the device:
QEMU translates DMA one IOMMU page (4 KiB) at a time, so a buffer that
crosses a page reaches the device model as two pieces. Most models do not
care; QEMU's virtio-scsi takes the first piece as the whole response, so
its drivers keep headers inside one page
(:data:`pyvirtio.drivers.scsi.HEADER_PAGE`, docs/testing.md).

Interrupts: VFIO_DEVICE_SET_IRQS binds MSI-X vectors to eventfds
(ACTION_TRIGGER, DATA_EVENTFD): the transport reads an eventfd to wait for
a queue, and event loops watch it.

The ioctl numbers and structure layouts are Linux's ``<linux/vfio.h>``
(``_IO(';', 100 + n)``), checked by tests/test_pci_probe.py against the
header when a C compiler is there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from pyvirtio.errors import PciSetupError
from pyvirtio.memory import DeviceAddressing, Region
from pyvirtio.transport.pci_access import PortWindow
from pyvirtio.transport.pci_caps import Bar
from pyvirtio.transport.pci_sysfs import DRIVERS, PciFunction


def _io(nr: int) -> int:
    return (ord(";") << 8) | (100 + nr)


VFIO_API_VERSION = 0
VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_REGION_INFO_FLAG_MMAP = 4
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_IRQ_SET_DATA_NONE = 1
VFIO_IRQ_SET_DATA_EVENTFD = 4
VFIO_IRQ_SET_ACTION_TRIGGER = 32
VFIO_DMA_MAP_FLAG_READ = 1
VFIO_DMA_MAP_FLAG_WRITE = 2

#: struct vfio_group_status {argsz, flags}
GROUP_STATUS = struct.Struct("<II")
#: struct vfio_region_info {argsz, flags, index, cap_offset, size, offset}
REGION_INFO = struct.Struct("<IIIIQQ")
#: struct vfio_irq_info {argsz, flags, index, count}
IRQ_INFO = struct.Struct("<IIII")
#: struct vfio_irq_set {argsz, flags, index, start, count} + data
IRQ_SET = struct.Struct("<IIIII")
#: struct vfio_iommu_type1_dma_map {argsz, flags, vaddr, iova, size}
DMA_MAP = struct.Struct("<IIQQQ")
#: struct vfio_iommu_type1_dma_unmap {argsz, flags, iova, size}
DMA_UNMAP = struct.Struct("<IIQQ")

#: Where the first pool region is mapped in I/O virtual address space; regions are 2 MiB aligned.
IOVA_BASE = 1 << 32
IOVA_ALIGN = 2 << 20


def _ioctl(fd: int, request: int, arg: bytearray | int, what: str) -> int:
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise PciSetupError(f"vfio: {what} failed: {exc.strerror}") from None


class IovaAddressing:
    """Pool regions mapped into the IOMMU at an offset scheme of IOVAs (see the module docstring)."""

    kind = "iova"

    def __init__(self, container: int) -> None:
        self._container = container
        self._next = IOVA_BASE
        self._mapped: dict[int, tuple[int, int]] = {}  # id(region) -> (iova, size)

    def create_region(self, size: int, name: str) -> Region:
        return Region.create(size, name)

    def attach(self, region: Region) -> None:
        iova = self._next
        arg = bytearray(DMA_MAP.pack(DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                     region.user_addr, iova, region.size))
        _ioctl(self._container, VFIO_IOMMU_MAP_DMA, arg, f"mapping {region.size} bytes at IOVA 0x{iova:x}")
        region.guest_addr = iova
        self._mapped[id(region)] = (iova, region.size)
        self._next = (iova + region.size + IOVA_ALIGN - 1) // IOVA_ALIGN * IOVA_ALIGN

    def detach(self, region: Region) -> None:
        mapped = self._mapped.pop(id(region), None)
        if mapped is None:
            return
        iova, size = mapped
        arg = bytearray(DMA_UNMAP.pack(DMA_UNMAP.size, 0, iova, size))
        _ioctl(self._container, VFIO_IOMMU_UNMAP_DMA, arg, f"unmapping IOVA 0x{iova:x}")


class VfioBinding:
    """A function bound to vfio-pci (see the module docstring)."""

    kind = "vfio"

    def __init__(self, function: PciFunction, *, dev: str = "/dev/vfio") -> None:
        function.require()
        if function.driver() != DRIVERS["vfio"]:
            raise PciSetupError(
                f"{function.address} is bound to {function.driver() or 'no driver'}, not vfio-pci "
                f"(pyvirtio pci bind {function.address} --driver vfio)"
            )
        group = function.iommu_group()
        if group is None:
            raise PciSetupError(f"{function.address} has no IOMMU group (no IOMMU: use --driver uio)")
        self.function = function
        self._container = self._group = self._device = -1
        self._irq_fds: list[int] = []
        self._msix = False
        try:
            self._container = _open(Path(dev) / "vfio")
            if _ioctl(self._container, VFIO_GET_API_VERSION, 0, "API version") != VFIO_API_VERSION:
                raise PciSetupError("vfio: unknown API version")
            iommu = VFIO_TYPE1v2_IOMMU
            if not _ioctl(self._container, VFIO_CHECK_EXTENSION, iommu, "type-1 v2 check"):
                iommu = VFIO_TYPE1_IOMMU
                if not _ioctl(self._container, VFIO_CHECK_EXTENSION, iommu, "type-1 check"):
                    raise PciSetupError("vfio: no type-1 IOMMU support (modprobe vfio_iommu_type1)")
            self._group = _open(Path(dev) / str(group))
            status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
            _ioctl(self._group, VFIO_GROUP_GET_STATUS, status, "group status")
            if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
                raise PciSetupError(f"vfio: IOMMU group {group} is not viable (bind every device in it to vfio-pci)")
            _ioctl(self._group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", self._container)),
                   "attaching the group to the container")
            _ioctl(self._container, VFIO_SET_IOMMU, iommu, "setting the IOMMU model")
            self._device = _ioctl(self._group, VFIO_GROUP_GET_DEVICE_FD,
                                  bytearray(function.address.encode() + b"\0"), "getting the device fd")
            self._config_offset = self._region(VFIO_PCI_CONFIG_REGION_INDEX)[2]
        except BaseException:
            self.close()
            raise
        self.addressing: DeviceAddressing = IovaAddressing(self._container)

    def _region(self, index: int) -> tuple[int, int, int]:
        """(flags, size, offset) of region ``index`` of the device fd."""
        arg = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        _ioctl(self._device, VFIO_DEVICE_GET_REGION_INFO, arg, f"region {index} info")
        _argsz, flags, _index, _cap, size, offset = REGION_INFO.unpack(arg)
        return flags, size, offset

    def config_read(self, offset: int, length: int) -> bytes:
        return os.pread(self._device, length, self._config_offset + offset)

    def config_write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._device, data, self._config_offset + offset)

    def bars(self) -> list[Bar]:
        return self.function.bars()

    def map_bar(self, index: int) -> Region:
        flags, size, offset = self._region(index)
        if not flags & VFIO_REGION_INFO_FLAG_MMAP:
            raise PciSetupError(f"vfio: BAR {index} of {self.function.address} cannot be mapped")
        return Region(self._device, size, fd_offset=offset, name=f"{self.function.address}-bar{index}",
                      owns_fd=False)

    def port_window(self, index: int, length: int) -> PortWindow:
        _flags, _size, offset = self._region(index)
        return PortWindow(self._device, offset, length, f"{self.function.address} I/O BAR {index} (vfio)")

    def enable_interrupts(self, count: int) -> list[int]:
        if self._irq_fds:
            return list(self._irq_fds)
        info = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, VFIO_PCI_MSIX_IRQ_INDEX, 0))
        _ioctl(self._device, VFIO_DEVICE_GET_IRQ_INFO, info, "MSI-X info")
        available = IRQ_INFO.unpack(info)[3]
        if available == 0:
            raise PciSetupError(f"vfio: {self.function.address} has no MSI-X vectors")
        n = max(1, min(count, available))
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        arg = bytearray(IRQ_SET.pack(IRQ_SET.size + 4 * n, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                     VFIO_PCI_MSIX_IRQ_INDEX, 0, n) + struct.pack(f"<{n}i", *fds))
        try:
            _ioctl(self._device, VFIO_DEVICE_SET_IRQS, arg, f"binding {n} MSI-X vectors to eventfds")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._irq_fds = fds
        self._msix = True
        return list(fds)

    def drain(self, fd: int) -> None:
        """Consume an eventfd's count (8 bytes) so it polls quiet until the next interrupt."""
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass

    def unmask(self) -> None:
        pass  # MSI-X is edge-triggered: nothing to unmask

    @property
    def msix(self) -> bool:
        return self._msix

    def disable_interrupts(self) -> None:
        if self._msix and self._device >= 0:
            arg = bytearray(IRQ_SET.pack(IRQ_SET.size, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                         VFIO_PCI_MSIX_IRQ_INDEX, 0, 0))
            try:
                _ioctl(self._device, VFIO_DEVICE_SET_IRQS, arg, "disabling MSI-X")
            except PciSetupError:
                pass
        self._msix = False
        for fd in self._irq_fds:
            os.close(fd)
        self._irq_fds = []

    def close(self) -> None:
        """Close the device, group and container (closing the container drops every DMA mapping left)."""
        self.disable_interrupts()
        if self._device >= 0:
            os.close(self._device)
            self._device = -1
        if self._group >= 0:
            os.close(self._group)
            self._group = -1
        if self._container >= 0:
            os.close(self._container)
            self._container = -1


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (modprobe vfio-pci; is the IOMMU on: intel_iommu=on?)" if exc.errno == errno.ENOENT else ""
        raise PciSetupError(f"vfio: cannot open {path}: {exc.strerror}{hint}") from None
