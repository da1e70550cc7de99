"""A virtio PCI function bound to uio_pci_generic: no IOMMU, physical addresses, INTx.

Theory of operation. Without an IOMMU the device reads and writes physical
memory, so every descriptor must carry the physical address of its buffer
and that memory must stay where it is for as long as the device may use it.
:class:`PhysicalAddressing` (the pool's :class:`~pyvirtio.memory.DeviceAddressing`)
makes each region of hugepages when the host has enough free ones
(``/proc/meminfo``: a hugepage is physically contiguous and is never moved
by compaction), else of normal pages, populated and locked at once (then
only if ``vm.compact_unevictable_allowed`` is 0, so the kernel does not
migrate locked pages: strict, since a moved page would be silent memory
corruption). The physical address of each hugepage or page comes from
``/proc/self/pagemap`` (8 bytes per virtual page: bit 63 present, bits
0..54 the page frame number). Without CAP_SYS_ADMIN the kernel reports
frame 0 for every page: that is :class:`~pyvirtio.errors.PciSetupError`
naming the cause, never a descriptor pointing at physical page 0. The
pool keeps buffers inside one segment unless the next segment follows
physically (:mod:`pyvirtio.memory`).

:class:`UioBinding` reaches the function through sysfs: config space
through ``config``, memory BARs mapped from ``resourceN``, the legacy I/O
BAR through pread/pwrite on ``resource0``, and the interrupt through
``/dev/uioN``: a read of exactly 4 bytes (any other size is EINVAL) returns
the interrupt count once INTx fired. uio_pci_generic masks INTx in the
command register when it fires and has no ``irqcontrol`` (a write to
``/dev/uioN`` is ENOSYS): the line is unmasked by clearing
``Interrupt Disable`` in the command register through ``config``, which
is what :meth:`UioBinding.unmask` does. The device's ISR register must be
read to lower the line (virtio 1.2 §4.1.4.5); the transport does that
before it unmasks.
"""

from __future__ import annotations

import os
import re
import struct

from pyvirtio.errors import PciSetupError
from pyvirtio.memory import PAGE_SIZE, DeviceAddressing, Region
from pyvirtio.spec import pci as P
from pyvirtio.transport.pci_access import PortWindow
from pyvirtio.transport.pci_caps import Bar
from pyvirtio.transport.pci_sysfs import DRIVERS, PciFunction

PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as numbers (kB values in bytes; counts as they are)."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^(\S+):\s+(\d+)(\s+kB)?", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


def pagemap_addresses(user_addr: int, size: int, step: int, pagemap: str = "/proc/self/pagemap") -> list[int]:
    """Physical address of each ``step`` bytes of the mapping at ``user_addr`` (see the module docstring)."""
    out = []
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PciSetupError(f"cannot open {pagemap}: {exc.strerror}") from None
    try:
        for addr in range(user_addr, user_addr + size, step):
            data = os.pread(fd, 8, addr // PAGE_SIZE * 8)
            if len(data) != 8:
                raise PciSetupError(f"{pagemap} has no entry for 0x{addr:x} (a {len(data)}-byte read)")
            (entry,) = struct.unpack("<Q", data)
            if not entry & PAGEMAP_PRESENT:
                raise PciSetupError(f"page at 0x{addr:x} is not present in memory although it was locked")
            pfn = entry & PAGEMAP_PFN_MASK
            if pfn == 0:
                raise PciSetupError(
                    f"{pagemap} gives physical address 0 for 0x{addr:x}: reading physical addresses needs "
                    "CAP_SYS_ADMIN (run as root), and uio without an IOMMU cannot work without them"
                )
            out.append(pfn * PAGE_SIZE + addr % PAGE_SIZE)
    finally:
        os.close(fd)
    return out


class PhysicalAddressing:
    """Locked or hugepage regions addressed by their physical addresses (see the module docstring)."""

    kind = "physical"

    def __init__(self, *, meminfo_path: str = "/proc/meminfo", pagemap: str = "/proc/self/pagemap",
                 compact_path: str = "/proc/sys/vm/compact_unevictable_allowed") -> None:
        self._meminfo_path = meminfo_path
        self._pagemap = pagemap
        self._compact_path = compact_path
        #: Page size of the last region made: a hugepage size or PAGE_SIZE.
        self.page_size = 0

    def create_region(self, size: int, name: str) -> Region:
        info = meminfo(self._meminfo_path)
        huge = info.get("Hugepagesize", 0)
        if huge and info.get("HugePages_Free", 0) * huge >= size:
            try:
                region = Region.create(size, name, huge_page=huge, locked=True)
                self.page_size = huge
                return region
            except OSError:
                pass  # taken meanwhile, or not allowed: normal pages below
        try:
            with open(self._compact_path) as f:
                movable = f.read().strip() != "0"
        except OSError:
            movable = True
        if movable:
            raise PciSetupError(
                f"uio DMA memory: {size} bytes of free hugepages are needed (echo N > "
                "/proc/sys/vm/nr_hugepages), or normal pages that compaction will not move "
                f"(echo 0 > {self._compact_path}); a device writing to a page that moved corrupts memory"
            )
        try:
            region = Region.create(size, name, locked=True)
        except OSError as exc:
            raise PciSetupError(f"cannot lock {size} bytes of DMA memory: {exc.strerror} (ulimit -l?)") from None
        self.page_size = PAGE_SIZE
        return region

    def attach(self, region: Region) -> None:
        page = self.page_size or PAGE_SIZE
        region.set_segments(page, pagemap_addresses(region.user_addr, region.size, page, self._pagemap))

    def detach(self, region: Region) -> None:
        pass  # nothing to undo: the device is reset before the memory goes


class UioBinding:
    """A function bound to uio_pci_generic (see the module docstring)."""

    kind = "uio"

    def __init__(self, function: PciFunction, addressing: PhysicalAddressing | None = None) -> None:
        function.require()
        if function.driver() != DRIVERS["uio"]:
            raise PciSetupError(
                f"{function.address} is bound to {function.driver() or 'no driver'}, not uio_pci_generic "
                f"(pyvirtio pci bind {function.address} --driver uio)"
            )
        self.function = function
        self.addressing: DeviceAddressing = addressing or PhysicalAddressing()
        self._config = os.open(function.path / "config", os.O_RDWR | os.O_CLOEXEC)
        self._irq: int | None = None
        self._fds: list[int] = []

    def config_read(self, offset: int, length: int) -> bytes:
        return os.pread(self._config, length, offset)

    def config_write(self, offset: int, data: bytes) -> None:
        os.pwrite(self._config, data, offset)

    def bars(self) -> list[Bar]:
        return self.function.bars()

    def _open_resource(self, index: int) -> int:
        path = self.function.resource_path(index)
        try:
            return os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except OSError as exc:
            raise PciSetupError(f"cannot open {path}: {exc.strerror}") from None

    def map_bar(self, index: int) -> Region:
        bar = self.bars()[index]
        fd = self._open_resource(index)
        try:
            return Region(fd, bar.size, name=f"{self.function.address}-bar{index}", owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    def port_window(self, index: int, length: int) -> PortWindow:
        fd = self._open_resource(index)
        self._fds.append(fd)
        return PortWindow(fd, 0, length, f"{self.function.address} I/O BAR {index}")

    def enable_interrupts(self, count: int) -> list[int]:
        if self._irq is None:
            dev = self.function.uio_device()
            if dev is None:
                raise PciSetupError(f"{self.function.address} has no uio device (is uio_pci_generic bound?)")
            try:
                self._irq = os.open(dev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise PciSetupError(f"cannot open {dev}: {exc.strerror}") from None
        return [self._irq]

    def unmask(self) -> None:
        """Clear Interrupt Disable in the command register (see the module docstring)."""
        if self._irq is None:
            return
        (cmd,) = struct.unpack("<H", self.config_read(P.CFG_COMMAND, 2))
        if cmd & P.COMMAND_INTX_DISABLE:
            self.config_write(P.CFG_COMMAND, struct.pack("<H", cmd & ~P.COMMAND_INTX_DISABLE))

    def drain(self, fd: int) -> None:
        """Consume the interrupt count (4 bytes) so the fd polls quiet until the next interrupt."""
        try:
            os.read(fd, 4)
        except BlockingIOError:
            pass

    @property
    def msix(self) -> bool:
        return False

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._irq is not None:
            os.close(self._irq)
            self._irq = None
        if self._config >= 0:
            os.close(self._config)
            self._config = -1
