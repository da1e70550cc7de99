"""Split virtqueue layout (virtio 1.2 §2.7) and the event-index rule.

Sizes and offsets are in bytes. The driver keeps the legacy alignment for
the used ring (4096) as SPDK and Linux do: every back end accepts it, and
it keeps the device-written used ring off the driver-written cache lines.
"""

from __future__ import annotations

import struct
from typing import Final

DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4

AVAIL_F_NO_INTERRUPT: Final = 1
USED_F_NO_NOTIFY: Final = 1

DESC_SIZE: Final = 16  # struct vring_desc {le64 addr; le32 len; le16 flags; le16 next}
USED_ELEM_SIZE: Final = 8  # struct vring_used_elem {le32 id; le32 len}
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4
LEGACY_USED_ALIGN: Final = 4096
MAX_QUEUE_SIZE: Final = 32768  # virtio 1.2 §2.7: Queue Size ... maximum 32768

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")

# Offsets inside each part.
DESC_OFF_ADDR: Final = 0
DESC_OFF_LEN: Final = 8
DESC_OFF_FLAGS: Final = 12
DESC_OFF_NEXT: Final = 14
AVAIL_OFF_FLAGS: Final = 0
AVAIL_OFF_IDX: Final = 2
AVAIL_OFF_RING: Final = 4
USED_OFF_FLAGS: Final = 0
USED_OFF_IDX: Final = 2
USED_OFF_RING: Final = 4


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 2 * (3 + num)


def used_size(num: int) -> int:
    """flags, idx, ring[num], avail_event."""
    return 2 * 3 + USED_ELEM_SIZE * num


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def split_layout(num: int, used_align: int = LEGACY_USED_ALIGN) -> tuple[int, int, int]:
    """(avail offset, used offset, total bytes) of one contiguous split ring."""
    avail = desc_table_size(num)
    used = align_up(avail + avail_size(num), used_align)
    return avail, used, used + used_size(num)


def used_event_offset(num: int) -> int:
    """Offset of used_event within the avail ring (after ring[num])."""
    return AVAIL_OFF_RING + 2 * num


def avail_event_offset(num: int) -> int:
    """Offset of avail_event within the used ring (after ring[num])."""
    return USED_OFF_RING + USED_ELEM_SIZE * num


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 §2.7.7.2 / §2.7.10: notify if event_idx is in [old, new).

    ``old`` and ``new`` are the index before and after the entries just
    published: notify if one of them is the entry the other side asked to
    hear about. All three are 16-bit ring indices; arithmetic wraps at 2^16.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
