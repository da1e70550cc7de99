"""The two register sets of a virtio PCI function: modern (§4.1.4) and legacy (§4.1.5).

Theory of operation. :class:`~pyvirtio.transport.pci.PciTransport` drives a
device through one of these, never through offsets of its own:

* :class:`ModernRegisters`: the common configuration structure
  (features in 32-bit halves through the select registers, device status,
  config generation, per queue: select, size, MSI-X vector, the three ring
  addresses as 32-bit halves low first, notify offset, enable, reset), the
  notification structure (one 16-bit register per queue at
  ``queue_notify_off * notify_off_multiplier``, checked to lie in the
  structure, §4.1.4.4), the ISR byte and the device configuration.
* :class:`LegacyRegisters`: the I/O BAR: 32-bit features, queue select,
  the read-only queue size, the queue's page frame number (the ring laid out
  contiguously with the used ring 4096-aligned, §2.7.2 "Legacy Interfaces"),
  the notify register, status, ISR, and the device configuration after them
  (at 20, or 24 while MSI-X is enabled).

Each method is one register access or a fixed short sequence of them; the
decisions (which features, when to reset, what is the device's fault) are
the transport's. Ring addresses are programmed in one method of each
(:meth:`ModernRegisters.program_queue` / :meth:`LegacyRegisters.program_queue`),
the place where a packed ring's descriptor, driver and device areas will go
the same way (§4.1.4.3: ``queue_desc``/``queue_driver``/``queue_device``
mean those areas for a packed ring).
"""

from __future__ import annotations

from pyvirtio.errors import DeviceProtocolError, InvalidArgument
from pyvirtio.spec import pci as P
from pyvirtio.spec.ring import split_layout
from pyvirtio.transport.pci_access import MmioWindow, PortWindow, Register, Window
from pyvirtio.transport.pci_caps import PciLayout, notify_offset


def _offset(name: str) -> int:
    return P.COMMON_FIELDS[name][0]


_DFSELECT = _offset("device_feature_select")
_DF = _offset("device_feature")
_GFSELECT = _offset("driver_feature_select")
_GF = _offset("driver_feature")
_MSIX_CONFIG = _offset("config_msix_vector")
_NUMQ = _offset("num_queues")
_STATUS = _offset("device_status")
_GENERATION = _offset("config_generation")
_Q_SELECT = _offset("queue_select")
_Q_SIZE = _offset("queue_size")
_Q_MSIX = _offset("queue_msix_vector")
_Q_ENABLE = _offset("queue_enable")
_Q_NOFF = _offset("queue_notify_off")
_Q_DESC = _offset("queue_desc")
_Q_DRIVER = _offset("queue_driver")
_Q_DEVICE = _offset("queue_device")
_Q_RESET = _offset("queue_reset")


def read_config_bytes(window: Window, offset: int, length: int) -> bytes:
    """``length`` bytes of a config structure, each field read with the widest aligned access that fits."""
    out = bytearray()
    pos, end = offset, offset + length
    while pos < end:
        width = 4 if pos % 4 == 0 and end - pos >= 4 else 2 if pos % 2 == 0 and end - pos >= 2 else 1
        out += window.read(pos, width).to_bytes(width, "little")
        pos += width
    return bytes(out)


def write_config_bytes(window: Window, offset: int, data: bytes) -> None:
    pos, i = offset, 0
    while i < len(data):
        left = len(data) - i
        width = 4 if pos % 4 == 0 and left >= 4 else 2 if pos % 2 == 0 and left >= 2 else 1
        window.write(pos, width, int.from_bytes(data[i : i + width], "little"))
        pos += width
        i += width


class ModernRegisters:
    """The modern interface (see the module docstring)."""

    interface = "modern"

    def __init__(self, layout: PciLayout, common: Window, notify: MmioWindow, isr: Window,
                 device: Window | None) -> None:
        self.layout = layout
        self.common = common
        self.notify = notify
        self.isr = isr
        self.device = device
        #: Has the common config the queue_reset register (virtio 1.2, VIRTIO_F_RING_RESET)?
        self.has_queue_reset = common.length >= P.COMMON_CFG_SIZE

    def features(self) -> int:
        c = self.common
        c.write(_DFSELECT, 4, 0)
        low = c.read(_DF, 4)
        c.write(_DFSELECT, 4, 1)
        return low | c.read(_DF, 4) << 32

    def set_features(self, features: int) -> None:
        c = self.common
        c.write(_GFSELECT, 4, 0)
        c.write(_GF, 4, features & 0xFFFFFFFF)
        c.write(_GFSELECT, 4, 1)
        c.write(_GF, 4, features >> 32 & 0xFFFFFFFF)

    def status(self) -> int:
        return self.common.read(_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common.write(_STATUS, 1, status)

    def generation(self) -> int:
        return self.common.read(_GENERATION, 1)

    def num_queues(self) -> int:
        return self.common.read(_NUMQ, 2)

    def queue_size(self, index: int) -> int:
        self.common.write(_Q_SELECT, 2, index)
        return self.common.read(_Q_SIZE, 2)

    def set_config_vector(self, vector: int) -> int:
        """Write config_msix_vector and return what the device kept (NO_VECTOR: refused)."""
        self.common.write(_MSIX_CONFIG, 2, vector)
        return self.common.read(_MSIX_CONFIG, 2)

    def program_queue(self, index: int, size: int, desc: int, driver: int, device: int, vector: int) -> int:
        """Select queue ``index`` and write its size, MSI-X vector and area addresses; returns the vector kept."""
        c = self.common
        c.write(_Q_SELECT, 2, index)
        c.write(_Q_SIZE, 2, size)
        kept = P.MSI_NO_VECTOR
        if vector != P.MSI_NO_VECTOR:
            c.write(_Q_MSIX, 2, vector)
            kept = c.read(_Q_MSIX, 2)
        for off, addr in ((_Q_DESC, desc), (_Q_DRIVER, driver), (_Q_DEVICE, device)):
            c.write(off, 4, addr & 0xFFFFFFFF)
            c.write(off + 4, 4, addr >> 32)
        return kept

    def notify_register(self, index: int) -> Register:
        """The queue's notification register (selects it to read queue_notify_off; checked §4.1.4.4)."""
        self.common.write(_Q_SELECT, 2, index)
        noff = self.common.read(_Q_NOFF, 2)
        assert self.layout.notify is not None
        return self.notify.register(notify_offset(self.layout, noff) - self.layout.notify.offset, 2)

    def enable_queue(self, index: int) -> None:
        self.common.write(_Q_SELECT, 2, index)
        self.common.write(_Q_ENABLE, 2, 1)

    def queue_enabled(self, index: int) -> bool:
        self.common.write(_Q_SELECT, 2, index)
        return bool(self.common.read(_Q_ENABLE, 2))

    def reset_queue(self, index: int) -> None:
        """Ask the device to reset queue ``index`` (VIRTIO_F_RING_RESET, §4.1.4.3.2)."""
        self.common.write(_Q_SELECT, 2, index)
        self.common.write(_Q_RESET, 2, 1)

    def queue_reset_done(self, index: int) -> bool:
        self.common.write(_Q_SELECT, 2, index)
        return bool(self.common.read(_Q_RESET, 2))

    def read_isr(self) -> int:
        return self.isr.read(0, 1)

    def config_window(self) -> Window | None:
        return self.device

    def config_base(self) -> int:
        return 0

    def close(self) -> None:
        for w in (self.common, self.notify, self.isr, self.device):
            if w is not None:
                w.close()


def _legacy(name: str) -> tuple[int, int]:
    off, fmt = P.LEGACY_FIELDS[name]
    return off, {"<B": 1, "<H": 2, "<I": 4}[fmt]


class LegacyRegisters:
    """The legacy interface in I/O BAR 0 (see the module docstring)."""

    interface = "legacy"
    has_queue_reset = False

    def __init__(self, port: PortWindow, msix: bool) -> None:
        self.port = port
        self.msix = msix

    def _r(self, name: str) -> int:
        off, width = _legacy(name)
        return self.port.read(off, width)

    def _w(self, name: str, value: int) -> None:
        off, width = _legacy(name)
        self.port.write(off, width, value)

    def features(self) -> int:
        return self._r("host_features")

    def set_features(self, features: int) -> None:
        if features >> 32:
            raise InvalidArgument(f"the legacy interface has 32 feature bits, not 0x{features:x}")
        self._w("guest_features", features)

    def status(self) -> int:
        return self._r("status")

    def set_status(self, status: int) -> None:
        self._w("status", status)

    def generation(self) -> int:
        return 0  # legacy has no config generation (§4.1.5.1: reads are not atomic)

    def queue_size(self, index: int) -> int:
        self._w("queue_sel", index)
        return self._r("queue_num")

    def set_config_vector(self, vector: int) -> int:
        self._w("config_msix_vector", vector)
        return self._r("config_msix_vector")

    def program_queue(self, index: int, size: int, desc: int, driver: int, device: int, vector: int) -> int:
        """Select queue ``index``, check the contiguous legacy layout and write its page frame number."""
        self._w("queue_sel", index)
        fixed = self._r("queue_num")
        if size != fixed:
            raise InvalidArgument(f"legacy queue {index} has the fixed size {fixed}; a ring of {size} cannot be used")
        avail_off, used_off, _total = split_layout(size, P.LEGACY_VRING_ALIGN)
        if desc % P.LEGACY_VRING_ALIGN or driver != desc + avail_off or device != desc + used_off:
            raise InvalidArgument(
                f"queue {index}: the legacy interface needs one contiguous 4096-aligned ring "
                f"(desc 0x{desc:x}, avail 0x{driver:x}, used 0x{device:x})"
            )
        pfn = desc >> P.LEGACY_QUEUE_ADDR_SHIFT
        if pfn >> 32:
            raise InvalidArgument(f"queue {index}: ring address 0x{desc:x} does not fit the 32-bit legacy PFN")
        kept = P.MSI_NO_VECTOR
        if vector != P.MSI_NO_VECTOR and self.msix:
            self._w("queue_msix_vector", vector)
            kept = self._r("queue_msix_vector")
        self._w("queue_pfn", pfn)
        return kept

    def notify_register(self, index: int) -> Register | None:
        return None  # an I/O port: see notify()

    def notify(self, index: int) -> None:
        self._w("queue_notify", index)

    def enable_queue(self, index: int) -> None:
        pass  # a legacy queue is live once its PFN is written

    def queue_enabled(self, index: int) -> bool:
        self._w("queue_sel", index)
        return self._r("queue_pfn") != 0

    def disable_queue(self, index: int) -> None:
        self._w("queue_sel", index)
        self._w("queue_pfn", 0)

    def read_isr(self) -> int:
        return self._r("isr")

    def config_window(self) -> Window | None:
        return self.port

    def config_base(self) -> int:
        return P.LEGACY_CONFIG_OFFSET_MSIX if self.msix else P.LEGACY_CONFIG_OFFSET

    def close(self) -> None:
        self.port.close()


def check_queue_size(index: int, size: int, maximum: int) -> None:
    """A ring size the device can take (device's fault if it offers none)."""
    if maximum == 0:
        raise DeviceProtocolError(f"queue {index} has size 0: the device offers no such queue")
    if size > maximum:
        raise InvalidArgument(f"queue {index}: ring of {size} entries, the device takes at most {maximum}")
