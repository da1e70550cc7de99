"""virtio over PCI from userspace: the transport of a function bound to uio_pci_generic or vfio-pci.

Theory of operation. The kernel's virtio driver is unbound from the
function and a generic one bound instead (``pyvirtio pci bind``, see
:mod:`~pyvirtio.transport.pci_sysfs`); :class:`PciTransport` then drives
the device itself:

* **Discovery**: the config space is read through the binding and parsed
  without I/O (:mod:`~pyvirtio.transport.pci_caps`: the capability walk,
  every structure checked against its BAR). Bus mastering is switched on
  (a device must be allowed to DMA).
* **Interface**: the modern one (virtio 1.2 §4.1.4) when the function has
  it; the legacy one (§4.1.5, I/O BAR 0) when asked for (``legacy=True``) on
  a transitional function, or when the function has no modern structures.
  The registers are :mod:`~pyvirtio.transport.pci_regs`.
* **The legacy interface seen as 1.0**: the device layer drives virtio 1.0
  devices (VERSION_1), so over the legacy interface this transport presents
  the device as one: VERSION_1 is added to the 32 offered bits and taken out
  again when the features are written, ANY_LAYOUT (implied by 1.0) is
  accepted on the driver's behalf, rings are laid out contiguously with a
  4096-aligned used ring (what :class:`~pyvirtio.ring.split.SplitQueue`
  does anyway; checked) and given by page frame number. That is exact on a
  little-endian host only (legacy fields are guest-endian; refused
  elsewhere), and for virtio-net only with MRG_RXBUF (without it the legacy
  header is 10 bytes, not the 12 the driver builds: refused with
  NegotiationError).
* **Features the transport accepts itself**: ACCESS_PLATFORM (§6: the
  device's addresses are what the binding gives: physical or IOVA, which is
  what that bit asks of a driver) and RING_RESET when offered and the common
  config has ``queue_reset``; over legacy, ANY_LAYOUT. They are written to
  the device with the driver's features and shown in :meth:`info`.
* **Status**: a reset (status 0) waits until the device reads 0 again,
  bounded by ``timeout`` (§4.1.4.3.2), else TransportTimeout; FAILED is
  written when the device proves faulty during set-up (a queue of size 0
  among ``num_queues``, a notification register outside its structure, an
  MSI-X vector refused); :meth:`check_alive` reads the status:
  DEVICE_NEEDS_RESET, or DRIVER_OK gone while the driver runs (a reset
  under it), raise :class:`~pyvirtio.errors.DeviceNeedsReset` (a
  ConnectionLost: the data path fails its requests); all-ones (the function
  went away) ConnectionLost.
* **Config reads** honour the config generation (§2.5.1, §4.1.4.3.1): the
  bytes are read between two reads of ``config_generation`` and read again
  until both agree (bounded).
* **Queues**: size, MSI-X vector, addresses and enable through the common
  config; the kick is one 16-bit store of the queue index to the queue's
  notification register (:meth:`notifier` returns exactly that store). A
  queue deleted while the device may still use it is reset first (queue
  reset where negotiated, else the whole device), so ring memory is never
  freed under a running device.
* **Memory**: the transport owns a :class:`~pyvirtio.memory.MemoryPool`
  whose regions the binding makes and addresses (uio: hugepages and
  physical addresses; vfio: IOVAs in the IOMMU); a device must be given
  this pool (``VirtioDevice(..., pool=transport.pool)``, as
  :func:`pyvirtio.targets.open_device` does).
* **Interrupts**: polling by default (``interrupts=False``):
  :meth:`wait_queue` pauses briefly and says "look again", :meth:`queue_fd`
  is None. With ``interrupts=True``: vfio binds MSI-X vectors to eventfds
  (vector 0 for config changes, one per queue while there are vectors),
  each queue's fd is its vector's eventfd; uio has one INTx for the whole
  function: every queue's fd is ``/dev/uioN``, a wait reads the ISR
  (lowering the line; a queue bit set means "look again" so no signal is
  lost between the caller's ring check and the wait), unmasks INTx and
  polls the fd. Whoever drains the fd (a wait, :meth:`ack_queue`) also
  reads the ISR and unmasks: uio_pci_generic masked INTx when the
  interrupt came, and a line left masked signals nothing again.
"""

from __future__ import annotations

import functools
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtio.errors import (
    ConnectionLost,
    DeviceNeedsReset,
    DeviceProtocolError,
    InvalidArgument,
    NegotiationError,
    PciSetupError,
    PyvirtioError,
    TransportError,
    TransportTimeout,
)
from pyvirtio.memory import MemoryPool, Region
from pyvirtio.spec import net as N
from pyvirtio.spec import pci as P
from pyvirtio.spec.common import (
    DEVICE_ID_NET,
    DEVICE_TYPE_NAMES,
    F_ACCESS_PLATFORM,
    F_ANY_LAYOUT,
    F_RING_RESET,
    F_VERSION_1,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_NEEDS_RESET,
)
from pyvirtio.spec.ring import PACKED_INITIAL_BASE
from pyvirtio.transport.base import QueueSetup
from pyvirtio.transport.pci_access import MmioWindow, PciBinding, enable_bus_master
from pyvirtio.transport.pci_caps import CapWindow, PciLayout, parse_function
from pyvirtio.transport.pci_regs import (
    LegacyRegisters,
    ModernRegisters,
    check_queue_size,
    read_config_bytes,
    write_config_bytes,
)
from pyvirtio.transport.pci_sysfs import DRIVERS, PciFunction, parse_address
from pyvirtio.transport.pci_uio import UioBinding
from pyvirtio.transport.pci_vfio import VfioBinding

#: Default DMA pool: 32 MiB to start (16 hugepages), growing by as much up to 8 regions.
DEFAULT_PCI_POOL = 32 << 20
#: How long a polling wait pauses before "look again".
POLL_PAUSE = 0.0002
#: Config generation retries before the device is called faulty.
GENERATION_RETRIES = 64
#: Target options after the address: ``pci:ADDR[,legacy][,irq][,uio|,vfio]``.
TARGET_FLAGS = ("legacy", "irq", "uio", "vfio")


@dataclass
class _Queue:
    index: int
    kick: Callable[[], None]
    fd: int | None
    enabled: bool = True


def open_binding(function: PciFunction, kind: str | None) -> PciBinding:
    """The binding for ``function``'s current driver (``kind``: "uio" or "vfio" to insist on one)."""
    driver = function.driver()
    want = kind or next((k for k, d in DRIVERS.items() if d == driver), None)
    if want == "uio":
        return UioBinding(function)
    if want == "vfio":
        return VfioBinding(function)
    raise PciSetupError(
        f"{function.address} is bound to {driver or 'no driver'}; bind it to uio_pci_generic or vfio-pci "
        f"first (pyvirtio pci bind {function.address} --driver uio|vfio)"
    )


def parse_pci_target(text: str) -> tuple[str, dict[str, Any]]:
    """``ADDR[,legacy][,irq][,uio|,vfio]`` -> (address, PciTransport keyword arguments)."""
    address, *flags = text.split(",")
    kw: dict[str, Any] = {}
    for flag in flags:
        if flag not in TARGET_FLAGS:
            raise InvalidArgument(f"unknown pci target option {flag!r} (known: {', '.join(TARGET_FLAGS)})")
        if flag == "legacy":
            kw["legacy"] = True
        elif flag == "irq":
            kw["interrupts"] = True
        else:
            kw["binding"] = flag
    return parse_address(address), kw


class PciTransport:
    """A virtio PCI function driven from userspace (see the module docstring).

    ``address``: ``DDDD:BB:SS.F``. ``binding``: "uio", "vfio" (the function
    must be bound to that driver), None (whichever it is bound to), or a
    ready :class:`~pyvirtio.transport.pci_access.PciBinding` (tests).
    ``device_type``: the virtio type the caller expects (checked; None: any).
    ``legacy``: use the legacy interface of a transitional function.
    ``interrupts``: MSI-X (vfio) or INTx (uio) instead of polling.
    ``pool_size``: the first DMA region's size. ``timeout``: bound of a
    device reset and of a queue reset.
    """

    kind = "pci"

    def __init__(
        self,
        address: str,
        *,
        binding: str | PciBinding | None = None,
        device_type: int | None = None,
        legacy: bool = False,
        interrupts: bool = False,
        pool_size: int = DEFAULT_PCI_POOL,
        timeout: float = 5.0,
        queue_size: int | None = None,
        root: str = "/sys",
    ) -> None:
        self.address = parse_address(address)
        self.timeout = timeout
        self.queue_size_limit = queue_size
        self._queues: dict[int, _Queue] = {}
        self._bars: dict[int, Region] = {}
        self._irq_fds: list[int] = []
        self._started = False
        self._closed = False
        self._num_queues: int | None = None
        self.driver_features = 0
        #: Feature bits this transport accepted on the driver's behalf (module docstring).
        self.transport_features = 0
        self.config_changes = 0
        if isinstance(binding, str) or binding is None:
            if binding not in (None, *DRIVERS):
                raise InvalidArgument(f"binding must be one of {', '.join(DRIVERS)}, not {binding!r}")
            self.binding = open_binding(PciFunction(self.address, root), binding)
        else:
            self.binding = binding
        self.pool: MemoryPool | None = None
        self._interface_open = False
        try:
            self.layout = self._discover(device_type)
            if interrupts:
                self._irq_fds = self.binding.enable_interrupts(max(1, self.layout.msix_table_size))
            enable_bus_master(self.binding, intx=bool(self._irq_fds) and not self.binding.msix)
            self.regs: ModernRegisters | LegacyRegisters = self._open_interface(legacy)
            self._interface_open = True
            if self.binding.msix and self.regs.set_config_vector(0) != 0:
                raise DeviceProtocolError(f"{self.address}: the device refused MSI-X vector 0 for config changes")
            self.pool = MemoryPool(pool_size, name=f"pyvirtio-pci-{self.address}",
                                   addressing=self.binding.addressing)
        except BaseException:
            self.close()
            raise

    # -- discovery ------------------------------------------------------------

    def _discover(self, expected: int | None) -> PciLayout:
        config = self.binding.config_read(0, P.CFG_SPACE_SIZE)
        if len(config) < P.CFG_SPACE_SIZE:
            raise PciSetupError(f"{self.address}: only {len(config)} bytes of config space readable (run as root)")
        layout = parse_function(config, self.binding.bars())
        if expected is not None and layout.device_type != expected:
            raise InvalidArgument(
                f"{self.address} is a virtio-{DEVICE_TYPE_NAMES.get(layout.device_type, layout.device_type)} "
                f"device, not virtio-{DEVICE_TYPE_NAMES.get(expected, expected)}"
            )
        return layout

    def map_window(self, window: CapWindow) -> MmioWindow:
        """The registers of one virtio structure (its BAR mapped once); tests put a model of a device here."""
        region = self._bars.get(window.bar)
        if region is None:
            region = self._bars[window.bar] = self.binding.map_bar(window.bar)
        return MmioWindow(region, window.offset, window.length)

    def _open_interface(self, legacy: bool) -> ModernRegisters | LegacyRegisters:
        layout = self.layout
        if legacy or not layout.modern:
            if not layout.legacy:
                why = "was asked for" if legacy else "is needed (no modern capabilities)"
                raise DeviceProtocolError(f"{self.address}: the legacy interface {why}, but the function "
                                          f"(0x{layout.device_id:04x}) is not transitional")
            if sys.byteorder != "little":
                raise InvalidArgument("the legacy interface is guest-endian: only little-endian hosts are supported")
            bars = {b.index: b for b in self.binding.bars()}
            bar0 = bars.get(0)
            if bar0 is None or not bar0.io or bar0.size < P.LEGACY_CONFIG_OFFSET_MSIX:
                raise DeviceProtocolError(f"{self.address}: BAR 0 is not the legacy I/O BAR")
            return LegacyRegisters(self.binding.port_window(0, bar0.size), self.binding.msix)
        assert layout.common is not None and layout.notify is not None and layout.isr is not None
        device = self.map_window(layout.device) if layout.device is not None else None
        return ModernRegisters(layout, self.map_window(layout.common), self.map_window(layout.notify),
                               self.map_window(layout.isr),
                               device)

    # -- Transport: identity and config ---------------------------------------

    def device_type(self) -> int:
        return self.layout.device_type

    def has_config(self) -> bool:
        return self.regs.config_window() is not None

    def _config(self, offset: int, length: int) -> tuple[Any, int]:
        window = self.regs.config_window()
        if window is None:
            raise TransportError(f"{self.address}: the device has no config structure")
        base = self.regs.config_base()
        if offset < 0 or length < 0 or base + offset + length > window.length:
            raise InvalidArgument(f"config range {offset}+{length} outside the {window.length - base}-byte config")
        return window, base + offset

    def read_config(self, offset: int, length: int) -> bytes:
        """Config bytes read between two equal config generations (§2.5.1, §4.1.4.3.1)."""
        window, at = self._config(offset, length)
        regs = self.regs
        for _ in range(GENERATION_RETRIES):
            before = regs.generation()
            data = read_config_bytes(window, at, length)
            if regs.generation() == before:
                return data
        self._fail()
        raise DeviceProtocolError(f"{self.address}: config generation changed during each of "
                                  f"{GENERATION_RETRIES} reads")

    def write_config(self, offset: int, data: bytes) -> None:
        window, at = self._config(offset, len(data))
        write_config_bytes(window, at, data)

    # -- status and features --------------------------------------------------

    def get_status(self) -> int:
        return self.regs.status()

    def set_status(self, status: int) -> None:
        if status == 0:
            self._reset()
            return
        self.regs.set_status(status)
        if status & STATUS_DRIVER_OK:
            self._started = True

    def _reset(self) -> None:
        """Write 0 and wait (bounded) until the device reads 0 (§4.1.4.3.2)."""
        self.regs.set_status(0)
        self._started = False
        deadline = time.monotonic() + self.timeout
        while (status := self.regs.status()) != 0:
            if time.monotonic() > deadline:
                raise TransportTimeout(f"{self.address}: device status still 0x{status:02x} {self.timeout} s "
                                       "after a reset")
            time.sleep(0.001)
        for q in self._queues.values():
            q.enabled = False

    def _fail(self) -> None:
        """Set FAILED (the device proved faulty); never raises."""
        try:
            self.regs.set_status(self.regs.status() | STATUS_FAILED)
        except PyvirtioError:
            pass

    def get_features(self) -> int:
        offered = self.regs.features()
        if isinstance(self.regs, LegacyRegisters):
            offered |= 1 << F_VERSION_1  # the legacy interface seen as 1.0 (module docstring)
        return offered

    def set_features(self, features: int) -> None:
        offered = self.get_features()
        own = 0
        for bit in (F_ACCESS_PLATFORM, F_RING_RESET):
            if offered >> bit & 1 and (bit != F_RING_RESET or self.regs.has_queue_reset):
                own |= 1 << bit
        if isinstance(self.regs, LegacyRegisters):
            own = offered & (1 << F_ANY_LAYOUT)
            if self.layout.device_type == DEVICE_ID_NET and not features >> N.F_MRG_RXBUF & 1:
                raise NegotiationError(f"{self.address}: virtio-net over the legacy interface needs MRG_RXBUF "
                                       "(its header is 10 bytes without it; the driver builds 12)")
            features &= ~(1 << F_VERSION_1)
        self.transport_features = own & ~features
        self.driver_features = features | own
        self.regs.set_features(features | own)

    # -- queues ---------------------------------------------------------------

    def max_queues(self) -> int:
        if self._num_queues is None:
            if isinstance(self.regs, ModernRegisters):
                self._num_queues = self.regs.num_queues()
            else:
                n = 0
                while n < 64 and self.regs.queue_size(n):
                    n += 1
                self._num_queues = n
        return self._num_queues

    def get_queue_size(self, index: int) -> int:
        if not 0 <= index < self.max_queues():
            return 0
        size = self.regs.queue_size(index)
        if size == 0:
            self._fail()
            raise DeviceProtocolError(f"{self.address}: queue {index} has size 0 although the device "
                                      f"reports {self.max_queues()} queues")
        if self.queue_size_limit and isinstance(self.regs, ModernRegisters):
            size = min(size, self.queue_size_limit)
        return size

    def set_memory(self, pool: MemoryPool) -> None:
        if pool is not self.pool:
            raise InvalidArgument(f"{self.address}: a PCI device's DMA memory must be the transport's own pool "
                                  "(VirtioDevice(name, transport, pool=transport.pool))")

    def _vector(self, index: int) -> int:
        """The MSI-X vector of queue ``index`` (vector 0 is config changes)."""
        n = len(self._irq_fds)
        if not self.binding.msix:
            return P.MSI_NO_VECTOR
        return 1 + index % (n - 1) if n > 1 else 0

    def setup_queue(self, setup: QueueSetup) -> None:
        initial = PACKED_INITIAL_BASE if setup.format == "packed" else 0
        if setup.base != initial:
            raise InvalidArgument(f"queue {setup.index}: a PCI queue starts from its initial ring state "
                                  f"(base 0x{initial:x}), not 0x{setup.base:x}")
        regs = self.regs
        i = setup.index
        if setup.format == "packed" and isinstance(regs, LegacyRegisters):
            raise InvalidArgument(f"queue {i}: the legacy interface has split rings only (§4.1.5)")
        try:
            check_queue_size(i, setup.size, regs.queue_size(i))
            vector = self._vector(i)
            kept = self._program(setup, vector)
            if vector != P.MSI_NO_VECTOR and kept != vector:
                raise DeviceProtocolError(f"{self.address}: the device refused MSI-X vector {vector} for queue {i}")
            kick = self._kick(i)
            regs.enable_queue(i)
        except DeviceProtocolError:
            self._fail()
            raise
        fd = None
        if self._irq_fds:
            fd = self._irq_fds[vector] if vector != P.MSI_NO_VECTOR else self._irq_fds[0]
        self._queues[i] = _Queue(i, kick, fd)

    def _program(self, setup: QueueSetup, vector: int) -> int:
        """Where the ring lives, to the device: the one place queue addresses are written.

        A packed ring's descriptor ring and driver / device event suppression
        areas go in the same three registers (§4.1.4.3: queue_desc,
        queue_driver, queue_device name the areas, whatever the format).
        """
        return self.regs.program_queue(setup.index, setup.size, setup.desc_addr, setup.avail_addr,
                                       setup.used_addr, vector)

    def _kick(self, index: int) -> Callable[[], None]:
        regs = self.regs
        if isinstance(regs, LegacyRegisters):
            return functools.partial(regs.notify, index)
        reg = regs.notify_register(index)
        # One 16-bit store of the queue index (no NOTIFICATION_DATA): the whole kick.
        return functools.partial(setattr, reg, "value", index)

    def del_queue(self, index: int) -> None:
        q = self._queues.pop(index, None)
        if q is None or not q.enabled:
            return
        if not self.regs.status():
            return  # reset already: the device holds no queue
        # The device may still use the ring: stop it before its memory goes (module docstring).
        if self.driver_features >> F_RING_RESET & 1 and isinstance(self.regs, ModernRegisters):
            self.regs.reset_queue(index)
            deadline = time.monotonic() + self.timeout
            while not self.regs.queue_reset_done(index):
                if time.monotonic() > deadline:
                    self._reset()
                    return
                time.sleep(0.001)
        else:
            self._reset()

    def notify_queue(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None:
            raise InvalidArgument(f"{self.address}: queue {index} is not set up")
        q.kick()

    def notifier(self, index: int) -> Callable[[], None]:
        q = self._queues.get(index)
        if q is None:
            raise InvalidArgument(f"{self.address}: queue {index} is not set up")
        return q.kick

    # -- interrupts -----------------------------------------------------------

    def queue_fd(self, index: int) -> int | None:
        q = self._queues.get(index)
        return None if q is None else q.fd

    def wait_queue(self, index: int, timeout: float | None) -> bool:
        """Wait for queue ``index``'s interrupt; polling mode: a short pause, then True ("look again").

        The device's status is checked first (:meth:`check_alive`), so a
        waiter on a device that was reset or needs a reset is told at once.
        """
        self.check_alive()
        q = self._queues.get(index)
        if q is None or q.fd is None:
            time.sleep(POLL_PAUSE if timeout is None else max(0.0, min(timeout, POLL_PAUSE)))
            return True
        if not self.binding.msix and self._take_isr():
            return True  # signalled since the caller looked: look again (no lost wakeup)
        ready, _, _ = select.select([q.fd], [], [], timeout)
        if not ready:
            return False
        # INTx: the interrupt that made the fd readable left the line masked by uio_pci_generic; draining
        # the fd without reading the ISR and unmasking would leave it masked with the ISR set, and the next
        # completion (an asyncio waiter's, say) would never be signalled.
        self.ack_queue(index)
        return True

    def _take_isr(self) -> bool:
        """INTx: read (and so clear) the ISR, unmask the line; True if a queue was signalled."""
        isr = self.regs.read_isr()
        if isr & P.ISR_CONFIG:
            self.config_changes += 1
        self.binding.unmask()
        return bool(isr & P.ISR_QUEUE)

    def ack_queue(self, index: int) -> None:
        q = self._queues.get(index)
        if q is None or q.fd is None:
            return
        self.binding.drain(q.fd)
        if not self.binding.msix:
            self._take_isr()

    # -- liveness, info, close ------------------------------------------------

    def check_alive(self) -> None:
        if self._closed:
            raise ConnectionLost(f"{self.address}: the transport is closed")
        status = self.regs.status()
        if status == 0xFF:
            raise ConnectionLost(f"{self.address}: the function reads all-ones (removed or powered off)")
        if status & STATUS_NEEDS_RESET:
            raise DeviceNeedsReset(f"{self.address}: the device set DEVICE_NEEDS_RESET (status 0x{status:02x})")
        if self._started and not status & STATUS_DRIVER_OK:
            raise DeviceNeedsReset(f"{self.address}: the device was reset under the driver (status 0x{status:02x})")

    def info(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "type": self.kind,
            "address": self.address,
            "driver": self.binding.kind,
            "interface": self.regs.interface,
            "device_id": f"0x{layout.device_id:04x}",
            "transitional": layout.transitional,
            "interrupts": ("msix" if self.binding.msix else "intx") if self._irq_fds else "poll",
            "dma": self.binding.addressing.kind,
            "notify_off_multiplier": layout.notify_off_multiplier,
            "msix_vectors": layout.msix_table_size,
            "transport_features": [n for b, n in ((F_ACCESS_PLATFORM, "ACCESS_PLATFORM"), (F_RING_RESET, "RING_RESET"),
                                                  (F_ANY_LAYOUT, "ANY_LAYOUT")) if self.transport_features >> b & 1],
            "capabilities": [f"{c.name}@bar{c.bar}+0x{c.offset:x}/0x{c.length:x}" for c in layout.caps],
        }

    def close(self) -> None:
        """Reset the device, then free its DMA memory, unmap the BARs and let go of the binding."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._interface_open:
                try:
                    self._reset()
                except PyvirtioError:
                    pass
                self.regs.close()
        finally:
            self._queues.clear()
            if self.pool is not None:
                self.pool.close()
            for region in self._bars.values():
                region.close()
            self._bars.clear()
            self.binding.close()

