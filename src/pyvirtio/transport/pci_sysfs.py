"""PCI functions through Linux sysfs: addresses, identity, BARs, driver binding.

Theory of operation. Every PCI function is a directory
``/sys/bus/pci/devices/DDDD:BB:SS.F``: ``config`` (its config space; the
first 64 bytes readable by anyone, the rest by root), ``resource`` (one line
per BAR: start, end, flags; flag 0x100 = I/O ports), ``resourceN`` (BAR N:
mmap for a memory BAR; an I/O BAR cannot be mmapped and is read and written
with pread/pwrite of 1, 2 or 4 bytes), ``driver`` (a link to the bound
driver) and ``driver_override``.

Moving a function between drivers (:func:`bind`, :func:`unbind`): write the
address to the current driver's ``unbind``, set ``driver_override`` to the
wanted driver (uio_pci_generic, vfio-pci), and ask the kernel to probe it
(``/sys/bus/pci/drivers_probe``); giving it back clears the override and
probes again, so the kernel's own driver (virtio-pci) takes it. Needs root;
the driver's module must be loaded (``modprobe uio_pci_generic`` or
``vfio-pci``): a missing one is named in the error.

``root`` (default ``/sys``) is a parameter so that tests can run the same
code against a fake tree.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pyvirtio.errors import InvalidArgument, PciSetupError
from pyvirtio.spec import pci as P
from pyvirtio.spec.common import DEVICE_TYPE_NAMES
from pyvirtio.transport.pci_caps import Bar

_ADDRESS_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
#: ``resource`` flag of an I/O port BAR (IORESOURCE_IO).
IORESOURCE_IO = 0x100
#: What ``--driver`` names, and the kernel driver each stands for.
DRIVERS = {"uio": "uio_pci_generic", "vfio": "vfio-pci"}
KERNEL_DRIVER = "virtio-pci"


def parse_address(text: str) -> str:
    """``DDDD:BB:SS.F`` (domain 0000 added when left out), lower case; InvalidArgument for anything else."""
    m = _ADDRESS_RE.match(text.strip())
    if not m:
        raise InvalidArgument(f"{text!r} is not a PCI address (DDDD:BB:SS.F, e.g. 0000:00:04.0)")
    domain, bus, slot, fn = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{fn}"


@dataclass(frozen=True)
class PciFunction:
    """One function's sysfs directory."""

    address: str
    root: str = "/sys"

    @property
    def path(self) -> Path:
        return Path(self.root) / "bus/pci/devices" / self.address

    def exists(self) -> bool:
        return self.path.is_dir()

    def require(self) -> None:
        if not self.exists():
            raise PciSetupError(f"no PCI function {self.address} ({self.path} does not exist)")

    def read_config(self, length: int = P.CFG_SPACE_SIZE) -> bytes:
        """The first ``length`` bytes of config space (past 64 bytes needs root: a short read says so)."""
        try:
            with open(self.path / "config", "rb") as f:
                data = f.read(length)
        except OSError as exc:
            raise PciSetupError(f"cannot read the config space of {self.address}: {exc.strerror}") from None
        return data

    def write_config(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path / "config", os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, data, offset) != len(data):
                raise PciSetupError(f"short write to the config space of {self.address}")
        finally:
            os.close(fd)

    def ids(self) -> tuple[int, int]:
        """(vendor, device) from sysfs."""
        return int((self.path / "vendor").read_text(), 16), int((self.path / "device").read_text(), 16)

    def bars(self) -> list[Bar]:
        """BARs 0..5 as sysfs ``resource`` lists them (size 0: not implemented)."""
        try:
            lines = (self.path / "resource").read_text().splitlines()
        except OSError as exc:
            raise PciSetupError(f"cannot read the BARs of {self.address}: {exc.strerror}") from None
        out = []
        for i, line in enumerate(lines[: P.BAR_COUNT]):
            start, end, flags = (int(x, 16) for x in line.split()[:3])
            size = end - start + 1 if end else 0
            out.append(Bar(i, size, bool(flags & IORESOURCE_IO)))
        return out

    def resource_path(self, index: int) -> Path:
        return self.path / f"resource{index}"

    def driver(self) -> str | None:
        """The name of the bound driver, None if none."""
        link = self.path / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def iommu_group(self) -> int | None:
        link = self.path / "iommu_group"
        return int(os.path.basename(os.readlink(link))) if link.is_symlink() else None

    def uio_device(self) -> str | None:
        """``/dev/uioN`` of a function bound to uio_pci_generic (None if not)."""
        d = self.path / "uio"
        if not d.is_dir():
            return None
        names = sorted(p.name for p in d.iterdir() if p.name.startswith("uio"))
        return f"/dev/{names[0]}" if names else None

    def describe(self) -> dict[str, object]:
        """What ``pyvirtio pci list`` shows: address, IDs, device type, interface, driver."""
        vendor, device = self.ids()
        dtype = P.device_type_of(device) if vendor == P.VENDOR_ID else 0
        return {
            "address": self.address,
            "vendor": f"{vendor:04x}",
            "device": f"{device:04x}",
            "type": DEVICE_TYPE_NAMES.get(dtype, str(dtype)),
            "interface": "transitional" if P.is_transitional(device) else "modern",
            "driver": self.driver() or "-",
            "iommu_group": self.iommu_group(),
        }


def virtio_functions(root: str = "/sys") -> list[PciFunction]:
    """Every virtio PCI function (vendor 0x1AF4 with a virtio device ID), by address."""
    base = Path(root) / "bus/pci/devices"
    if not base.is_dir():
        return []
    out = []
    for entry in sorted(base.iterdir()):
        fn = PciFunction(entry.name, root)
        try:
            vendor, device = fn.ids()
        except (OSError, ValueError):
            continue
        if vendor == P.VENDOR_ID and P.device_type_of(device):
            out.append(fn)
    return out


def _write(path: Path, text: str, what: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise PciSetupError(f"{what}: writing {text.strip()!r} to {path} failed: {exc.strerror}") from None


def unbind(fn: PciFunction) -> None:
    """Detach ``fn`` from its driver (nothing if none)."""
    current = fn.driver()
    if current is not None:
        _write(fn.path / "driver/unbind", fn.address, f"unbind {fn.address} from {current}")


def bind(fn: PciFunction, driver: str, timeout: float = 5.0) -> None:
    """Bind ``fn`` to ``driver`` (a kernel driver name, e.g. uio_pci_generic) via driver_override."""
    fn.require()
    if fn.driver() == driver:
        return
    if not (Path(fn.root) / "bus/pci/drivers" / driver).is_dir():
        module = driver.replace("-", "_")
        raise PciSetupError(f"driver {driver} is not loaded (modprobe {module})")
    unbind(fn)
    _write(fn.path / "driver_override", driver, f"bind {fn.address} to {driver}")
    _write(Path(fn.root) / "bus/pci/drivers_probe", fn.address, f"bind {fn.address} to {driver}")
    _wait_driver(fn, driver, timeout)


def give_back(fn: PciFunction, timeout: float = 5.0) -> str | None:
    """Clear the override, unbind, and let the kernel probe: its own driver (virtio-pci) takes ``fn`` back."""
    fn.require()
    _write(fn.path / "driver_override", "\n", f"clear the driver override of {fn.address}")
    unbind(fn)
    _write(Path(fn.root) / "bus/pci/drivers_probe", fn.address, f"probe {fn.address}")
    deadline = time.monotonic() + timeout
    while fn.driver() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return fn.driver()


def _wait_driver(fn: PciFunction, driver: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while fn.driver() != driver:
        if time.monotonic() >= deadline:
            raise PciSetupError(f"{fn.address} is bound to {fn.driver() or 'no driver'}, not {driver}, "
                                f"{timeout} s after the probe")
        time.sleep(0.02)
