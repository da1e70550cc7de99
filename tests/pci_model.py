"""An in-memory virtio PCI function for host-side tests of the PCI transport (no kernel, no QEMU).

* :func:`config_space` builds a function's 256-byte config space with the
  virtio capabilities given (and optionally MSI-X), laid out from 0x40.
* :class:`CommonModel` is a model of the modern common configuration
  structure (virtio 1.2 §4.1.4.3) as a register window: the select
  registers choose which feature half and which queue the other registers
  show, a reset can take a few reads to complete, the config generation can
  be made to move, and every access is logged as ``(op, name, value)`` so a
  test can assert the exact sequence the driver used.
* :class:`LegacyModel` is the legacy I/O BAR (§4.1.5) as a port window.
* :class:`FakeBinding` is a :class:`~pyvirtio.transport.pci_access.PciBinding`
  over these: memory BARs are memfd regions (notify, ISR and device config
  are plain memory the test can read and fill), the common config is the
  model (:class:`ModelTransport` puts it in place of the mapped structure),
  and DMA addresses follow an IOVA-like offset scheme (:class:`OffsetAddressing`),
  so device addresses differ from process addresses as they do on real
  hardware.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from pyvirtio.memory import Region
from pyvirtio.spec import pci as P
from pyvirtio.transport.pci import PciTransport
from pyvirtio.transport.pci_access import MmioWindow
from pyvirtio.transport.pci_caps import Bar, CapWindow
from pyvirtio.transport.pci_sysfs import PciFunction

ADDRESS = "0000:00:04.0"
#: Where the standard layout puts each structure: cfg_type -> (bar, offset, length).
STANDARD_CAPS = {
    P.CAP_COMMON_CFG: (4, 0x0000, 0x1000),
    P.CAP_ISR_CFG: (4, 0x1000, 0x1000),
    P.CAP_DEVICE_CFG: (4, 0x2000, 0x1000),
    P.CAP_NOTIFY_CFG: (4, 0x3000, 0x1000),
}
NOTIFY_MULTIPLIER = 4
BAR4_SIZE = 0x4000
IOVA_BASE = 1 << 32


def config_space(device_id: int = P.MODERN_DEVICE_BASE + 2, caps: list[tuple[int, int, int, int]] | None = None,
                 *, multiplier: int = NOTIFY_MULTIPLIER, msix_vectors: int = 0, vendor: int = P.VENDOR_ID,
                 cap_len: int | None = None) -> bytearray:
    """Config space with ``caps`` = [(cfg_type, bar, offset, length)] chained from 0x40 (standard layout by default)."""
    if caps is None:
        caps = [(t, *where) for t, where in STANDARD_CAPS.items()]
    cfg = bytearray(P.CFG_SPACE_SIZE)
    struct.pack_into("<HH", cfg, P.CFG_VENDOR_ID, vendor, device_id)
    struct.pack_into("<H", cfg, P.CFG_STATUS, P.STATUS_CAP_LIST)
    struct.pack_into("<H", cfg, P.CFG_SUBSYSTEM_ID, 2)
    pos, prev = 0x40, P.CFG_CAP_PTR
    entries: list[tuple[int, bytes]] = []
    if msix_vectors:
        entries.append((P.CAP_ID_MSIX, struct.pack("<H", msix_vectors - 1) + bytes(8)))
    for cfg_type, bar, offset, length in caps:
        size = P.NOTIFY_CAP_SIZE if cfg_type == P.CAP_NOTIFY_CFG else P.VIRTIO_CAP.size
        body = bytearray(size - 2)
        struct.pack_into("<BBBx2xII", body, 0, cap_len if cap_len is not None else size, cfg_type, bar,
                         offset, length)
        if cfg_type == P.CAP_NOTIFY_CFG:
            struct.pack_into("<I", body, P.NOTIFY_CAP_MULT - 2, multiplier)
        entries.append((P.CAP_ID_VNDR, bytes(body)))
    for cap_id, body in entries:
        cfg[prev if prev == P.CFG_CAP_PTR else prev + 1] = pos
        cfg[pos] = cap_id
        cfg[pos + 2 : pos + 2 + len(body)] = body
        prev = pos
        pos = (pos + 2 + len(body) + 3) & ~3
    return cfg


_COMMON_BY_OFFSET = {off: (name, struct.calcsize(fmt)) for name, (off, fmt) in P.COMMON_FIELDS.items()}


class CommonModel:
    """The modern common configuration (see the module docstring)."""

    def __init__(self, features: int, queue_sizes: list[int], *, length: int = P.COMMON_CFG_SIZE,
                 reset_reads: int = 0, notify_offs: list[int] | None = None) -> None:
        self.length = length
        self.features = features
        self.queue_sizes = list(queue_sizes)
        self.notify_offs = notify_offs or list(range(len(queue_sizes)))
        #: How many status reads still show the old status after 0 was written (-1: never reset).
        self.reset_reads = reset_reads
        self.pending_reset = 0
        self.status = 0
        self.generation = 0
        #: Each read of config_generation adds this many to it (a device changing its config all the time).
        self.generation_step = 0
        self.dfselect = self.gfselect = self.qselect = 0
        self.driver_features = [0, 0]
        self.config_vector = P.MSI_NO_VECTOR
        self.queues: list[dict[str, int]] = [
            {"size": s, "msix": P.MSI_NO_VECTOR, "enable": 0, "desc": 0, "driver": 0, "device": 0, "reset": 0}
            for s in queue_sizes
        ]
        self.log: list[tuple[str, str, int]] = []
        self.closed = False

    def _field(self, offset: int, width: int) -> tuple[str, int]:
        """Register name at ``offset``, with ``_hi`` for the upper half of a 64-bit one."""
        if offset in _COMMON_BY_OFFSET:
            name, size = _COMMON_BY_OFFSET[offset]
            if size == 8 and width == 4:
                return name + "_lo", offset
            if size != width:
                raise AssertionError(f"{name}: access of {width} bytes, the register is {size}")
            return name, offset
        name, size = _COMMON_BY_OFFSET[offset - 4]
        assert size == 8 and width == 4, f"unaligned access at {offset}"
        return name + "_hi", offset

    def _queue(self) -> dict[str, int] | None:
        return self.queues[self.qselect] if self.qselect < len(self.queues) else None

    def read(self, offset: int, width: int) -> int:
        name, _ = self._field(offset, width)
        value = self._read(name)
        self.log.append(("r", name, value))
        return value

    def _read(self, name: str) -> int:
        q = self._queue()
        if name == "device_feature":
            return self.features >> (32 * self.dfselect) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if name == "device_status":
            if self.pending_reset:
                if self.reset_reads < 0:
                    return self.pending_reset
                if self.reset_reads > 0:
                    self.reset_reads -= 1
                    return self.pending_reset
                self.pending_reset = 0
                self.status = 0
            return self.status
        if name == "config_generation":
            g = self.generation
            self.generation = (self.generation + self.generation_step) & 0xFF
            return g
        if name == "num_queues":
            return len(self.queues)
        if name == "config_msix_vector":
            return self.config_vector
        if name == "queue_select":
            return self.qselect
        if name == "device_feature_select":
            return self.dfselect
        if name == "queue_notify_off":
            return self.notify_offs[self.qselect] if q is not None else 0
        if q is None:
            return 0
        key = name.removeprefix("queue_").removesuffix("_lo").removesuffix("_hi")
        key = {"msix_vector": "msix"}.get(key, key)
        value = q[key]
        if name.endswith("_lo"):
            return value & 0xFFFFFFFF
        if name.endswith("_hi"):
            return value >> 32
        return value

    def write(self, offset: int, width: int, value: int) -> None:
        name, _ = self._field(offset, width)
        self.log.append(("w", name, value))
        q = self._queue()
        if name == "device_feature_select":
            self.dfselect = value
        elif name == "driver_feature_select":
            self.gfselect = value
        elif name == "driver_feature":
            if self.gfselect < 2:
                self.driver_features[self.gfselect] = value
        elif name == "device_status":
            if value == 0:
                self.pending_reset = self.status or 0x01
                if self.reset_reads == 0:
                    self.pending_reset = 0
                    self.status = 0
                for qq in self.queues:
                    qq.update(enable=0, msix=P.MSI_NO_VECTOR)
            else:
                self.status = value
        elif name == "config_msix_vector":
            self.config_vector = value
        elif name == "queue_select":
            self.qselect = value
        elif q is not None:
            key = name.removeprefix("queue_").removesuffix("_lo").removesuffix("_hi")
            key = {"msix_vector": "msix"}.get(key, key)
            if name.endswith("_lo"):
                q[key] = (q[key] & ~0xFFFFFFFF) | value
            elif name.endswith("_hi"):
                q[key] = (q[key] & 0xFFFFFFFF) | value << 32
            elif key == "reset":
                q.update(reset=1, enable=0)
            else:
                q[key] = value

    def driver_feature_bits(self) -> int:
        return self.driver_features[0] | self.driver_features[1] << 32

    def writes(self) -> list[tuple[str, int]]:
        return [(n, v) for op, n, v in self.log if op == "w"]

    def close(self) -> None:
        self.closed = True


_LEGACY_BY_OFFSET = {off: (name, struct.calcsize(fmt)) for name, (off, fmt) in P.LEGACY_FIELDS.items()}


class LegacyModel:
    """The legacy I/O BAR 0 (§4.1.5) with ``config`` bytes after the registers."""

    def __init__(self, features: int, queue_sizes: list[int], config: bytes = b"", *, msix: bool = False) -> None:
        self.features = features
        self.queue_sizes = list(queue_sizes)
        self.pfns = [0] * len(queue_sizes)
        self.base = P.LEGACY_CONFIG_OFFSET_MSIX if msix else P.LEGACY_CONFIG_OFFSET
        self.config = bytearray(config)
        self.length = self.base + len(config)
        self.guest_features = 0
        self.status = 0
        self.sel = 0
        self.notified: list[int] = []
        self.log: list[tuple[str, str, int]] = []

    def read(self, offset: int, width: int) -> int:
        if offset >= self.base:
            return int.from_bytes(self.config[offset - self.base : offset - self.base + width], "little")
        name, size = _LEGACY_BY_OFFSET[offset]
        assert size == width, f"{name}: {width}-byte access to a {size}-byte register"
        value = {
            "host_features": self.features,
            "guest_features": self.guest_features,
            "queue_pfn": self.pfns[self.sel] if self.sel < len(self.pfns) else 0,
            "queue_num": self.queue_sizes[self.sel] if self.sel < len(self.queue_sizes) else 0,
            "queue_sel": self.sel,
            "status": self.status,
            "isr": 0,
        }.get(name, P.MSI_NO_VECTOR)
        self.log.append(("r", name, value))
        return value

    def write(self, offset: int, width: int, value: int) -> None:
        if offset >= self.base:
            self.config[offset - self.base : offset - self.base + width] = value.to_bytes(width, "little")
            return
        name, size = _LEGACY_BY_OFFSET[offset]
        assert size == width, f"{name}: {width}-byte access to a {size}-byte register"
        self.log.append(("w", name, value))
        if name == "guest_features":
            self.guest_features = value
        elif name == "queue_sel":
            self.sel = value
        elif name == "queue_pfn":
            self.pfns[self.sel] = value
        elif name == "queue_notify":
            self.notified.append(value)
        elif name == "status":
            self.status = value
            if value == 0:
                self.pfns = [0] * len(self.pfns)

    def close(self) -> None:
        pass


class OffsetAddressing:
    """Device address = IOVA_BASE + the region's place in the pool (an IOMMU-like offset scheme)."""

    kind = "iova"

    def __init__(self) -> None:
        self.next = IOVA_BASE
        self.attached: list[Region] = []
        self.detached: list[Region] = []

    def create_region(self, size: int, name: str) -> Region:
        return Region.create(size, name)

    def attach(self, region: Region) -> None:
        region.guest_addr = self.next
        self.next += (region.size + (2 << 20) - 1) // (2 << 20) * (2 << 20)
        self.attached.append(region)

    def detach(self, region: Region) -> None:
        self.detached.append(region)


class FakeBinding:
    """A :class:`PciBinding` over in-memory models (see the module docstring)."""

    kind = "fake"

    def __init__(self, config: bytes, *, common: CommonModel | None = None, legacy: LegacyModel | None = None,
                 bars: list[Bar] | None = None) -> None:
        self.function = PciFunction(ADDRESS, root="/nonexistent")
        self.addressing = OffsetAddressing()
        self.config = bytearray(config)
        self.common = common
        self.legacy = legacy
        self._bars = bars if bars is not None else [
            Bar(0, 0x40 if legacy is not None else 0, io=legacy is not None), Bar(1, 0x1000), Bar(2, 0), Bar(3, 0),
            Bar(4, BAR4_SIZE), Bar(5, 0),
        ]
        self.regions: dict[int, Region] = {}
        self.config_writes: list[tuple[int, bytes]] = []
        self.irq_fds: list[int] = []
        #: "drain" / "unmask" in the order the transport did them.
        self.irq_log: list[str] = []
        self.closed = False

    def config_read(self, offset: int, length: int) -> bytes:
        return bytes(self.config[offset : offset + length])

    def config_write(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))
        self.config[offset : offset + len(data)] = data

    def bars(self) -> list[Bar]:
        return list(self._bars)

    def map_bar(self, index: int) -> Region:
        region = self.regions[index] = Region.create(self._bars[index].size, f"bar{index}")
        return region

    def port_window(self, index: int, length: int) -> Any:
        assert self.legacy is not None
        return self.legacy

    def enable_interrupts(self, count: int) -> list[int]:
        self.irq_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]
        return self.irq_fds

    def unmask(self) -> None:
        self.irq_log.append("unmask")

    def drain(self, fd: int) -> None:
        self.irq_log.append("drain")
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass

    @property
    def msix(self) -> bool:
        return False

    def close(self) -> None:
        for fd in self.irq_fds:
            os.close(fd)
        self.irq_fds = []
        self.closed = True

    def bar_bytes(self, index: int, offset: int, length: int) -> bytes:
        return bytes(self.regions[index].view[offset : offset + length])


class ModelTransport(PciTransport):
    """PciTransport whose common config is the binding's :class:`CommonModel` (the rest mapped memfds)."""

    def map_window(self, window: CapWindow) -> MmioWindow:
        binding = self.binding
        if window.cfg_type == P.CAP_COMMON_CFG and isinstance(binding, FakeBinding) and binding.common is not None:
            return binding.common  # type: ignore[return-value]
        return super().map_window(window)


def modern(features: int, queue_sizes: list[int], **kw: Any) -> tuple[ModelTransport, FakeBinding, CommonModel]:
    """A transport on a modern model (keyword arguments go to :class:`CommonModel`)."""
    common = CommonModel(features, queue_sizes, **kw)
    binding = FakeBinding(config_space(), common=common)
    return ModelTransport(ADDRESS, binding=binding), binding, common
