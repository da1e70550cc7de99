"""virtio over PCI: config-space, capability and register layouts, as data.

virtio 1.2 §4.1. A virtio PCI function has vendor 0x1AF4; its device ID is
0x1040 + the virtio device type for a modern-only function (§4.1.2.1), or
one of the transitional IDs 0x1000..0x103F (:data:`TRANSITIONAL_DEVICE_TYPES`)
for a function that also has the legacy interface.

The *modern* interface (§4.1.4) is a list of vendor-specific capabilities
(:class:`VirtioCap`, ``struct virtio_pci_cap``) in the function's config
space, each naming a BAR, an offset and a length: the common configuration
(:data:`COMMON_FIELDS`, ``struct virtio_pci_common_cfg``), the notification
area (with ``notify_off_multiplier``), the ISR byte and the device-specific
configuration. The *legacy* interface (§4.1.5) is a fixed register layout at
the start of I/O BAR 0 (:data:`LEGACY_FIELDS`), followed by the
device-specific configuration (at 20, or 24 while MSI-X is enabled).

Every offset here is checked against Linux's ``<linux/virtio_pci.h>`` by
tests/test_pci_probe.py. Sans-I/O parsing of these layouts lives in
:mod:`pyvirtio.transport.pci_caps`.
"""

from __future__ import annotations

import struct
from typing import Final

from pyvirtio.spec.common import (
    DEVICE_ID_BLOCK,
    DEVICE_ID_CONSOLE,
    DEVICE_ID_NET,
    DEVICE_ID_RNG,
    DEVICE_ID_SCSI,
)

VENDOR_ID: Final = 0x1AF4
#: Modern device IDs: MODERN_DEVICE_BASE + virtio device type (§4.1.2.1).
MODERN_DEVICE_BASE: Final = 0x1040
MODERN_DEVICE_LAST: Final = 0x107F
TRANSITIONAL_FIRST: Final = 0x1000
TRANSITIONAL_LAST: Final = 0x103F
#: Transitional device IDs and the virtio device type each stands for (§4.1.2.3).
TRANSITIONAL_DEVICE_TYPES: Final[dict[int, int]] = {
    0x1000: DEVICE_ID_NET,
    0x1001: DEVICE_ID_BLOCK,
    0x1002: 5,  # memory balloon
    0x1003: DEVICE_ID_CONSOLE,
    0x1004: DEVICE_ID_SCSI,
    0x1005: DEVICE_ID_RNG,
    0x1009: 9,  # 9P transport
}

# -- PCI config space (PCI Local Bus 3.0, type 0 header) ----------------------
CFG_VENDOR_ID: Final = 0x00
CFG_DEVICE_ID: Final = 0x02
CFG_COMMAND: Final = 0x04
CFG_STATUS: Final = 0x06
CFG_REVISION: Final = 0x08
CFG_HEADER_TYPE: Final = 0x0E
CFG_BAR0: Final = 0x10
CFG_SUBSYSTEM_ID: Final = 0x2E
CFG_CAP_PTR: Final = 0x34
#: Status register bit: the capability list at CFG_CAP_PTR is valid.
STATUS_CAP_LIST: Final = 0x10
#: Command register bits.
COMMAND_IO: Final = 0x1
COMMAND_MEMORY: Final = 0x2
COMMAND_MASTER: Final = 0x4
COMMAND_INTX_DISABLE: Final = 0x400
#: Standard config space; capabilities live in it, after the header.
CFG_SPACE_SIZE: Final = 256
CFG_HEADER_SIZE: Final = 0x40
BAR_COUNT: Final = 6

CAP_ID_VNDR: Final = 0x09
CAP_ID_MSIX: Final = 0x11
#: MSI-X capability: message control at +2 (table size - 1 in bits 0..10, enable bit 15).
MSIX_FLAGS: Final = 2
MSIX_TABLE_SIZE_MASK: Final = 0x7FF
MSIX_ENABLE: Final = 0x8000

# -- virtio capabilities (§4.1.4) ---------------------------------------------
CAP_COMMON_CFG: Final = 1
CAP_NOTIFY_CFG: Final = 2
CAP_ISR_CFG: Final = 3
CAP_DEVICE_CFG: Final = 4
CAP_PCI_CFG: Final = 5
CAP_SHARED_MEMORY_CFG: Final = 8
CAP_VENDOR_CFG: Final = 9

CAP_TYPE_NAMES: Final[dict[int, str]] = {
    CAP_COMMON_CFG: "common",
    CAP_NOTIFY_CFG: "notify",
    CAP_ISR_CFG: "isr",
    CAP_DEVICE_CFG: "device",
    CAP_PCI_CFG: "pci",
    CAP_SHARED_MEMORY_CFG: "shared-memory",
    CAP_VENDOR_CFG: "vendor",
}

#: struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length.
VIRTIO_CAP: Final = struct.Struct("<BBBBBB2xII")
CAP_VNDR: Final = 0
CAP_NEXT: Final = 1
CAP_LEN: Final = 2
CAP_CFG_TYPE: Final = 3
CAP_BAR: Final = 4
CAP_ID: Final = 5
CAP_OFFSET: Final = 8
CAP_LENGTH: Final = 12
#: struct virtio_pci_notify_cap: the cap, then notify_off_multiplier.
NOTIFY_CAP_MULT: Final = 16
NOTIFY_CAP_SIZE: Final = 20

#: struct virtio_pci_common_cfg (§4.1.4.3): name -> (offset, struct format).
COMMON_FIELDS: Final[dict[str, tuple[int, str]]] = {
    "device_feature_select": (0, "<I"),
    "device_feature": (4, "<I"),
    "driver_feature_select": (8, "<I"),
    "driver_feature": (12, "<I"),
    "config_msix_vector": (16, "<H"),
    "num_queues": (18, "<H"),
    "device_status": (20, "<B"),
    "config_generation": (21, "<B"),
    "queue_select": (22, "<H"),
    "queue_size": (24, "<H"),
    "queue_msix_vector": (26, "<H"),
    "queue_enable": (28, "<H"),
    "queue_notify_off": (30, "<H"),
    "queue_desc": (32, "<Q"),
    "queue_driver": (40, "<Q"),
    "queue_device": (48, "<Q"),
    "queue_notify_data": (56, "<H"),
    "queue_reset": (58, "<H"),
}
#: The common config of virtio 1.0 ends after queue_device; 1.2 adds queue_notify_data and queue_reset.
COMMON_CFG_SIZE_V1: Final = 56
COMMON_CFG_SIZE: Final = 60
ISR_QUEUE: Final = 0x1
ISR_CONFIG: Final = 0x2
MSI_NO_VECTOR: Final = 0xFFFF

# -- the legacy interface (§4.1.5): I/O BAR 0 ---------------------------------
#: name -> (offset, struct format) of the legacy registers.
LEGACY_FIELDS: Final[dict[str, tuple[int, str]]] = {
    "host_features": (0, "<I"),
    "guest_features": (4, "<I"),
    "queue_pfn": (8, "<I"),
    "queue_num": (12, "<H"),
    "queue_sel": (14, "<H"),
    "queue_notify": (16, "<H"),
    "status": (18, "<B"),
    "isr": (19, "<B"),
    "config_msix_vector": (20, "<H"),
    "queue_msix_vector": (22, "<H"),
}
#: Device config offset in the legacy BAR without / with MSI-X enabled.
LEGACY_CONFIG_OFFSET: Final = 20
LEGACY_CONFIG_OFFSET_MSIX: Final = 24
#: The legacy queue address is a page frame number: address >> 12, the ring contiguous and used ring 4096-aligned.
LEGACY_QUEUE_ADDR_SHIFT: Final = 12
LEGACY_VRING_ALIGN: Final = 4096


def device_type_of(device_id: int) -> int:
    """The virtio device type of a PCI device ID (0: not a virtio device ID)."""
    if MODERN_DEVICE_BASE < device_id <= MODERN_DEVICE_LAST:
        return device_id - MODERN_DEVICE_BASE
    return TRANSITIONAL_DEVICE_TYPES.get(device_id, 0)


def is_transitional(device_id: int) -> bool:
    """Does this device ID name a transitional function (one with the legacy interface too)?"""
    return TRANSITIONAL_FIRST <= device_id <= TRANSITIONAL_LAST
