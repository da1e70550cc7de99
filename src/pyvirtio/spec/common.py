"""Device status bits, device-independent feature bits and device IDs.

virtio 1.2 §2.1 (device status field), §6 (reserved feature bits),
§5 (device types). Feature constants are *bit numbers*, as in the spec and
in Linux's uapi headers; use ``1 << BIT`` for masks.
"""

from __future__ import annotations

import struct
from typing import Final

# virtio 1.2 §2.1 Device Status Field
STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8
STATUS_NEEDS_RESET: Final = 0x40
STATUS_FAILED: Final = 0x80

STATUS_NAMES: Final[dict[int, str]] = {
    STATUS_ACKNOWLEDGE: "ACKNOWLEDGE",
    STATUS_DRIVER: "DRIVER",
    STATUS_DRIVER_OK: "DRIVER_OK",
    STATUS_FEATURES_OK: "FEATURES_OK",
    STATUS_NEEDS_RESET: "DEVICE_NEEDS_RESET",
    STATUS_FAILED: "FAILED",
}

# virtio 1.2 §6 Reserved Feature Bits (transport / ring features, bits 24..41)
F_NOTIFY_ON_EMPTY: Final = 24
F_ANY_LAYOUT: Final = 27
F_RING_INDIRECT_DESC: Final = 28
F_RING_EVENT_IDX: Final = 29
F_VERSION_1: Final = 32
F_ACCESS_PLATFORM: Final = 33
F_RING_PACKED: Final = 34
F_IN_ORDER: Final = 35
F_ORDER_PLATFORM: Final = 36
F_SR_IOV: Final = 37
F_NOTIFICATION_DATA: Final = 38
F_NOTIF_CONFIG_DATA: Final = 39
F_RING_RESET: Final = 40

TRANSPORT_F_START: Final = 28
TRANSPORT_F_END: Final = 41

# vhost (kernel and user) uses bit 26 for dirty-page logging (VHOST_F_LOG_ALL).
VHOST_F_LOG_ALL: Final = 26
# vhost-user reuses bit 30 of the device features (VHOST_USER_F_PROTOCOL_FEATURES).
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30

COMMON_FEATURE_NAMES: Final[dict[int, str]] = {
    F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    F_ANY_LAYOUT: "ANY_LAYOUT",
    VHOST_F_LOG_ALL: "LOG_ALL",
    F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC",
    F_RING_EVENT_IDX: "RING_EVENT_IDX",
    VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
    F_VERSION_1: "VERSION_1",
    F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    F_RING_PACKED: "RING_PACKED",
    F_IN_ORDER: "IN_ORDER",
    F_ORDER_PLATFORM: "ORDER_PLATFORM",
    F_SR_IOV: "SR_IOV",
    F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
    F_NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
    F_RING_RESET: "RING_RESET",
}

# virtio 1.2 §5 Device Types
DEVICE_ID_NET: Final = 1
DEVICE_ID_BLOCK: Final = 2
DEVICE_ID_CONSOLE: Final = 3
DEVICE_ID_RNG: Final = 4
DEVICE_ID_SCSI: Final = 8
DEVICE_ID_FS: Final = 26

DEVICE_TYPE_NAMES: Final[dict[int, str]] = {
    DEVICE_ID_NET: "net",
    DEVICE_ID_BLOCK: "blk",
    DEVICE_ID_CONSOLE: "console",
    DEVICE_ID_RNG: "rng",
    DEVICE_ID_SCSI: "scsi",
    DEVICE_ID_FS: "fs",
}


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n


def status_names(status: int) -> list[str]:
    """Names of the bits set in a device status byte, lowest first."""
    return [name for value, name in sorted(STATUS_NAMES.items()) if status & value]


def feature_names(features: int, device_names: dict[int, str] | None = None) -> list[str]:
    """Names of the feature bits set in ``features``.

    ``device_names`` maps device-specific bit numbers to names (for example
    :data:`pyvirtio.spec.blk.FEATURE_NAMES`). Unknown bits are named
    ``BIT_<n>`` so that nothing offered is hidden.
    """
    names: list[str] = []
    table = {**(device_names or {}), **COMMON_FEATURE_NAMES}
    for n in range(64):
        if features >> n & 1:
            names.append(table.get(n, f"BIT_{n}"))
    return names


def unpack_fields(fields: tuple[tuple[str, int, str], ...], data: bytes) -> dict[str, int]:
    """Decode the (name, offset, struct format) fields of a config layout that ``data`` covers.

    A config read may be shorter than the whole structure (a device of an
    older spec version); fields past its end are left out.
    """
    out: dict[str, int] = {}
    for name, off, fmt in fields:
        size = struct.calcsize(fmt)
        if off + size <= len(data):
            out[name] = struct.unpack_from(fmt, data, off)[0]
    return out
