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


# -- packed virtqueue (virtio 1.2 §2.8) ------------------------------------------------
#
# One descriptor ring (Descriptor Area) that both sides write, and two 4-byte
# event suppression structures: the driver's (Driver Area, read by the device)
# and the device's (Device Area, read by the driver). A descriptor is
# struct pvirtq_desc {le64 addr; le32 len; le16 id; le16 flags} (§2.8.13), the
# same 16 bytes as a split descriptor with (id, flags) where split has
# (flags, next). Queue sizes need not be powers of two, up to 2^15 (§2.8).

#: Flag values (not shifts: Linux's VRING_PACKED_DESC_F_AVAIL/USED are the shifts 7/15).
PACKED_DESC_F_AVAIL: Final = 1 << 7
PACKED_DESC_F_USED: Final = 1 << 15
#: Both wrap bits: XOR with it moves a flags word to the other lap.
PACKED_DESC_F_WRAP_BITS: Final = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED

PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
PACKED_DESC_OFF_ADDR: Final = 0
PACKED_DESC_OFF_LEN: Final = 8
PACKED_DESC_OFF_ID: Final = 12
PACKED_DESC_OFF_FLAGS: Final = 14

#: Descriptor Ring Change Event Flags (§2.8.10); 3 is reserved.
RING_EVENT_FLAGS_ENABLE: Final = 0x0
RING_EVENT_FLAGS_DISABLE: Final = 0x1
RING_EVENT_FLAGS_DESC: Final = 0x2
RING_EVENT_FLAGS_MASK: Final = 0x3
#: Bit of desc_event_off_wrap holding the wrap counter (Linux: VRING_PACKED_EVENT_F_WRAP_CTR).
RING_EVENT_WRAP_SHIFT: Final = 15

EVENT_SUPPRESS = struct.Struct("<HH")  # struct pvirtq_event_suppress {le16 off_wrap; le16 flags}
EVENT_SUPPRESS_SIZE: Final = 4
EVENT_OFF_OFF_WRAP: Final = 0
EVENT_OFF_FLAGS: Final = 2
EVENT_SUPPRESS_ALIGN: Final = 4
PACKED_DESC_ALIGN: Final = 16


def packed_layout(num: int) -> tuple[int, int, int]:
    """(driver area offset, device area offset, total bytes) of one contiguous packed ring.

    The descriptor ring comes first; each event suppression structure gets a
    cache line of its own (the spec asks 4-byte alignment, §2.8.10.1), so the
    device's stores to its structure do not pull the driver's line away.
    """
    driver = align_up(DESC_SIZE * num, 64)
    device = driver + 64
    return driver, device, device + EVENT_SUPPRESS_SIZE


def packed_base(avail_pos: int, avail_wrap: int, used_pos: int, used_wrap: int) -> int:
    """The ring state a vhost-user SET/GET_VRING_BASE carries for a packed ring.

    vhost-user.rst, "Vring descriptor indices for packed virtqueues": bits
    0-14 the next available descriptor, bit 15 the driver (avail) wrap
    counter, bits 16-30 the next used descriptor, bit 31 the device (used)
    wrap counter.
    """
    return (avail_pos & 0x7FFF) | (avail_wrap & 1) << 15 | (used_pos & 0x7FFF) << 16 | (used_wrap & 1) << 31


#: Marks a packed ring base whose two halves are meant as given, for bases a back end computes
#: itself (an inflight area's resume point): bit 32, beyond the 32 bits vhost-user carries.
PACKED_BASE_EXACT: Final = 1 << 32


def parse_packed_base(num: int) -> tuple[int, int, int, int]:
    """(avail position, avail wrap, used position, used wrap) from a packed ring base.

    A base whose upper 16 bits are zero (a frontend that sends only the avail
    half, as DPDK reads it) means "used = avail": a stopped ring has used
    everything it popped. That reading would also swallow a used half of
    position 0 in lap 0 (wrap counter 0); a base built with both halves
    meaningful carries :data:`PACKED_BASE_EXACT` and is taken as it is.
    """
    avail_pos, avail_wrap = num & 0x7FFF, num >> 15 & 1
    if not num >> 16 & 0xFFFF and not num & PACKED_BASE_EXACT:
        return avail_pos, avail_wrap, avail_pos, avail_wrap
    return avail_pos, avail_wrap, num >> 16 & 0x7FFF, num >> 31 & 1


#: The base of a packed ring nobody has used yet: positions 0, both wrap counters 1 (§2.8.1).
PACKED_INITIAL_BASE: Final = 0x8000_8000


def packed_need_event(off_wrap: int, new_pos: int, new_wrap: int, count: int, size: int) -> bool:
    """§2.8.10: did the last ``count`` descriptors, ending just before (new_pos, new_wrap), pass the event?

    ``off_wrap`` is the other side's desc_event_off_wrap: the descriptor
    (offset, wrap counter) whose availability (or use) it wants to hear of.
    Positions are numbered along two laps (a wrap counter of 1 is the even
    lap), so a window of fewer than ``size`` descriptors is unambiguous; a
    longer window passed every descriptor and always notifies.
    """
    if count >= size:
        return True
    if not count:
        return False
    lap = 2 * size
    new = new_pos if new_wrap else new_pos + size
    event = (off_wrap & 0x7FFF) + (0 if off_wrap >> RING_EVENT_WRAP_SHIFT & 1 else size)
    # notify iff event lies in [new - count, new) along the two-lap circle
    return (new - event - 1) % lap < count
