"""Feature-bit names for every device type: the one table the info dumps and error messages use.

Device-specific bits (0..23, and 50..63 for some types) mean different
things per device type (virtio 1.2 §5.x.3); the transport and ring bits
(24..41, virtio 1.2 §6) are common. :func:`device_feature_names` names the
bits of a feature word for a device ID; unknown bits are shown as ``BIT_<n>``
so that nothing offered is hidden.
"""

from __future__ import annotations

from typing import Final

from pyvirtio.spec import blk, net, scsi
from pyvirtio.spec.common import DEVICE_ID_BLOCK, DEVICE_ID_NET, DEVICE_ID_SCSI, feature_names

#: Device ID -> {bit: name} of the device-specific feature bits.
DEVICE_FEATURE_NAMES: Final[dict[int, dict[int, str]]] = {
    DEVICE_ID_BLOCK: blk.FEATURE_NAMES,
    DEVICE_ID_SCSI: scsi.FEATURE_NAMES,
    DEVICE_ID_NET: net.FEATURE_NAMES,
}


def device_feature_names(device_type: int, features: int) -> list[str]:
    """Names of the bits set in ``features`` for a device of type ``device_type`` (0: unknown)."""
    return feature_names(features, DEVICE_FEATURE_NAMES.get(device_type))


__all__ = ["DEVICE_FEATURE_NAMES", "device_feature_names"]
