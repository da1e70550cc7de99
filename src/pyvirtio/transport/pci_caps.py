"""Sans-I/O reading of a virtio PCI function's config space: identity, BARs, capabilities.

Theory of operation. :func:`parse_function` takes the bytes of a function's
config space (256 bytes, as sysfs ``config`` gives them) and what the host
knows of its BARs (:class:`Bar`: from sysfs ``resource``), and returns a
:class:`PciLayout`: the virtio device type, whether the function is
transitional, and where each virtio structure lives (:class:`CapWindow`).
Nothing here reads a file or maps a BAR; :mod:`pyvirtio.transport.pci`
does that with what this returns.

The device is not trusted (docs/architecture.md): a capability list is a
linked list the device wrote, so the walk is bounded (at most 48 entries,
each pointer 4-byte aligned, past the 64-byte header and inside the 256
bytes, never visited twice) and every virtio capability's window is checked
against the BAR it names (virtio 1.2 §4.1.4: "the driver MUST ignore"
capabilities of unknown type, and a structure must lie inside its BAR). A
structure the transport needs that points outside its BAR, at an I/O BAR or
at no BAR, or is too short (common config < 56 bytes §4.1.4.3, notify < 2,
ISR < 1, notify cap < 20 bytes §4.1.4.4) raises
:class:`~pyvirtio.errors.DeviceProtocolError` naming the capability, its
offset in config space and what is wrong. Several capabilities of one type
are allowed (§4.1.4.1: the driver uses the first it can): the first one
that passes the checks is taken; a bad one is only an error when no good
one follows.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvirtio.errors import DeviceProtocolError
from pyvirtio.spec import pci as P

#: A capability list longer than this is a loop or garbage (256 bytes hold at most 48 4-byte-aligned caps).
MAX_CAPS = 48
#: Smallest structure length the transport accepts per virtio capability type.
MIN_LENGTH = {P.CAP_COMMON_CFG: P.COMMON_CFG_SIZE_V1, P.CAP_NOTIFY_CFG: 2, P.CAP_ISR_CFG: 1, P.CAP_DEVICE_CFG: 0}


@dataclass(frozen=True, slots=True)
class Bar:
    """One BAR as the host sees it: size 0 means not implemented; ``io``: an I/O port BAR."""

    index: int
    size: int
    io: bool = False


@dataclass(frozen=True, slots=True)
class CapWindow:
    """A virtio structure: ``length`` bytes at ``offset`` in BAR ``bar`` (found at ``cap_offset`` in config space)."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int

    @property
    def name(self) -> str:
        return P.CAP_TYPE_NAMES.get(self.cfg_type, f"type {self.cfg_type}")


@dataclass(frozen=True, slots=True)
class PciLayout:
    """What a function's config space says (see the module docstring)."""

    vendor_id: int
    device_id: int
    device_type: int
    revision: int
    subsystem_id: int
    transitional: bool
    common: CapWindow | None = None
    notify: CapWindow | None = None
    isr: CapWindow | None = None
    device: CapWindow | None = None
    notify_off_multiplier: int = 0
    msix_table_size: int = 0
    #: Every virtio capability found, valid or not, in list order (for info dumps).
    caps: tuple[CapWindow, ...] = field(default=())
    #: Why capabilities were skipped (one line each), for info dumps and errors.
    skipped: tuple[str, ...] = field(default=())

    @property
    def modern(self) -> bool:
        """Has the function a usable modern interface (common, notify and ISR structures)?"""
        return self.common is not None and self.notify is not None and self.isr is not None

    @property
    def legacy(self) -> bool:
        """Has the function the legacy interface (a transitional ID)?"""
        return self.transitional


def walk_capabilities(config: bytes) -> list[tuple[int, int]]:
    """(offset, capability ID) of each entry of the PCI capability list, bounded (module docstring)."""
    if len(config) < P.CFG_HEADER_SIZE:
        raise DeviceProtocolError(f"PCI config space is {len(config)} bytes, shorter than its 64-byte header")
    (status,) = struct.unpack_from("<H", config, P.CFG_STATUS)
    if not status & P.STATUS_CAP_LIST:
        return []
    limit = min(len(config), P.CFG_SPACE_SIZE)
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    pos = config[P.CFG_CAP_PTR] & ~3
    while pos:
        if pos < P.CFG_HEADER_SIZE or pos + 2 > limit:
            raise DeviceProtocolError(f"PCI capability pointer 0x{pos:02x} is outside config space 0x40..0x{limit:x}")
        if pos in seen or len(out) >= MAX_CAPS:
            raise DeviceProtocolError(f"PCI capability list loops (0x{pos:02x} reached again)")
        seen.add(pos)
        out.append((pos, config[pos]))
        pos = config[pos + 1] & ~3
    return out


def _window(config: bytes, pos: int, bars: Sequence[Bar]) -> tuple[CapWindow | None, str | None]:
    """The virtio capability at ``pos`` and, if it cannot be used, why."""
    if pos + P.VIRTIO_CAP.size > len(config):
        return None, f"virtio capability at 0x{pos:02x} runs past config space"
    _vndr, _next, cap_len, cfg_type, bar, _id, offset, length = P.VIRTIO_CAP.unpack_from(config, pos)
    win = CapWindow(cfg_type, bar, offset, length, pos)
    where = f"virtio {win.name} capability at 0x{pos:02x}"
    if cfg_type not in MIN_LENGTH:
        return win, None  # PCI_CFG, shared memory, vendor, unknown: not used, nothing to check (§4.1.4.1)
    if cap_len < P.VIRTIO_CAP.size:
        return win, f"{where} has cap_len {cap_len} < {P.VIRTIO_CAP.size}"
    if cfg_type == P.CAP_NOTIFY_CFG and (cap_len < P.NOTIFY_CAP_SIZE or pos + P.NOTIFY_CAP_SIZE > len(config)):
        return win, f"{where} has cap_len {cap_len} < {P.NOTIFY_CAP_SIZE} (no notify_off_multiplier)"
    if bar >= P.BAR_COUNT:
        return win, f"{where} names BAR {bar} (a function has BARs 0..5)"
    b = next((b for b in bars if b.index == bar), None)
    if b is None or b.size == 0:
        return win, f"{where} names BAR {bar}, which the function does not implement"
    if b.io:
        return win, f"{where} names BAR {bar}, an I/O port BAR (modern structures are in memory BARs)"
    if length < MIN_LENGTH[cfg_type]:
        return win, f"{where} is {length} bytes, shorter than the {MIN_LENGTH[cfg_type]} the structure needs"
    if offset + length > b.size:
        return win, (f"{where} points outside BAR {bar}: offset 0x{offset:x} + length 0x{length:x} "
                     f"> BAR size 0x{b.size:x}")
    return win, None


def parse_function(config: bytes, bars: Sequence[Bar]) -> PciLayout:
    """Identity and virtio structures of a function (module docstring); DeviceProtocolError for a bad list."""
    if len(config) < P.CFG_HEADER_SIZE:
        raise DeviceProtocolError(f"PCI config space is {len(config)} bytes, shorter than its 64-byte header")
    vendor, device_id = struct.unpack_from("<HH", config, P.CFG_VENDOR_ID)
    if vendor != P.VENDOR_ID:
        raise DeviceProtocolError(f"PCI vendor 0x{vendor:04x} is not virtio's 0x{P.VENDOR_ID:04x}")
    device_type = P.device_type_of(device_id)
    if device_type == 0:
        raise DeviceProtocolError(f"PCI device ID 0x{device_id:04x} is not a virtio device ID")
    (subsystem,) = struct.unpack_from("<H", config, P.CFG_SUBSYSTEM_ID)
    found: dict[int, CapWindow] = {}
    caps: list[CapWindow] = []
    skipped: list[str] = []
    bad: dict[int, str] = {}
    msix_size = 0
    multiplier = 0
    for pos, cap_id in walk_capabilities(config):
        if cap_id == P.CAP_ID_MSIX and pos + 4 <= len(config):
            (flags,) = struct.unpack_from("<H", config, pos + P.MSIX_FLAGS)
            msix_size = (flags & P.MSIX_TABLE_SIZE_MASK) + 1
            continue
        if cap_id != P.CAP_ID_VNDR:
            continue
        win, why = _window(config, pos, bars)
        if win is None:
            skipped.append(str(why))
            continue
        caps.append(win)
        if why is not None:
            skipped.append(why)
            bad.setdefault(win.cfg_type, why)
            continue
        if win.cfg_type in MIN_LENGTH and win.cfg_type not in found:
            found[win.cfg_type] = win
            if win.cfg_type == P.CAP_NOTIFY_CFG:
                (multiplier,) = struct.unpack_from("<I", config, pos + P.NOTIFY_CAP_MULT)
    # A needed structure with only bad capabilities is the device's fault: say which and why.
    for cfg_type in (P.CAP_COMMON_CFG, P.CAP_NOTIFY_CFG, P.CAP_ISR_CFG, P.CAP_DEVICE_CFG):
        if cfg_type not in found and cfg_type in bad:
            raise DeviceProtocolError(bad[cfg_type])
    return PciLayout(
        vendor_id=vendor,
        device_id=device_id,
        device_type=device_type,
        revision=config[P.CFG_REVISION],
        subsystem_id=subsystem,
        transitional=P.is_transitional(device_id),
        common=found.get(P.CAP_COMMON_CFG),
        notify=found.get(P.CAP_NOTIFY_CFG),
        isr=found.get(P.CAP_ISR_CFG),
        device=found.get(P.CAP_DEVICE_CFG),
        notify_off_multiplier=multiplier,
        msix_table_size=msix_size,
        caps=tuple(caps),
        skipped=tuple(skipped),
    )


def notify_offset(layout: PciLayout, queue_notify_off: int, width: int = 2) -> int:
    """Offset in the notify BAR of a queue's notification register (§4.1.4.4), checked against the structure.

    ``queue_notify_off * notify_off_multiplier`` from the start of the notify
    structure; a register (``width`` bytes) outside the structure is the
    device's fault (DeviceProtocolError), never a write outside the BAR.
    """
    notify = layout.notify
    if notify is None:
        raise DeviceProtocolError("the function has no virtio notify capability")
    rel = queue_notify_off * layout.notify_off_multiplier
    if rel + width > notify.length:
        raise DeviceProtocolError(
            f"queue notify offset {queue_notify_off} x multiplier {layout.notify_off_multiplier} = 0x{rel:x} "
            f"is outside the 0x{notify.length:x}-byte notify structure"
        )
    return notify.offset + rel
