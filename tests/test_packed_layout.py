"""Packed-ring layout and rules in pyvirtio.spec.ring against the text of virtio 1.2 §2.8.

The C header comparison lives in test_spec_probe.py (struct vring_packed_desc,
VRING_PACKED_* from /usr/include/linux/virtio_ring.h); this module checks the
values against the spec's own text and the arithmetic helpers against a
brute-force model of the wrap counters.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.spec import ring
from pyvirtio.spec.ring import (
    PACKED_INITIAL_BASE,
    packed_base,
    packed_layout,
    packed_need_event,
    parse_packed_base,
)


def test_flag_bits_are_the_spec_values() -> None:
    # §2.8.1: #define VIRTQ_DESC_F_AVAIL (1 << 7), #define VIRTQ_DESC_F_USED (1 << 15)
    assert ring.PACKED_DESC_F_AVAIL == 0x80
    assert ring.PACKED_DESC_F_USED == 0x8000
    assert ring.PACKED_DESC_F_WRAP_BITS == 0x8080
    # §2.8.3, §2.8.6, §2.8.7: the same NEXT/WRITE/INDIRECT as the split ring.
    assert (ring.DESC_F_NEXT, ring.DESC_F_WRITE, ring.DESC_F_INDIRECT) == (1, 2, 4)
    # §2.8.10: ENABLE 0x0, DISABLE 0x1, DESC 0x2, 0x3 reserved.
    assert (ring.RING_EVENT_FLAGS_ENABLE, ring.RING_EVENT_FLAGS_DISABLE, ring.RING_EVENT_FLAGS_DESC) == (0, 1, 2)
    assert ring.RING_EVENT_FLAGS_MASK == 3
    assert ring.RING_EVENT_WRAP_SHIFT == 15  # desc_event_off : 15, desc_event_wrap : 1


def test_descriptor_layout() -> None:
    # §2.8.13: struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
    assert ring.PACKED_DESC.format == "<QIHH"
    assert ring.PACKED_DESC.size == ring.DESC_SIZE == 16
    raw = ring.PACKED_DESC.pack(0x1122334455667788, 0xAABBCCDD, 0x1234, 0x8081)
    assert raw[ring.PACKED_DESC_OFF_ADDR : ring.PACKED_DESC_OFF_ADDR + 8] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[ring.PACKED_DESC_OFF_LEN : ring.PACKED_DESC_OFF_LEN + 4] == (0xAABBCCDD).to_bytes(4, "little")
    assert raw[ring.PACKED_DESC_OFF_ID : ring.PACKED_DESC_OFF_ID + 2] == (0x1234).to_bytes(2, "little")
    assert raw[ring.PACKED_DESC_OFF_FLAGS : ring.PACKED_DESC_OFF_FLAGS + 2] == (0x8081).to_bytes(2, "little")


def test_event_suppression_layout() -> None:
    # §2.8.14: struct pvirtq_event_suppress { le16 desc (off:15, wrap:1); le16 flags (flags:2, reserved:14) }
    assert ring.EVENT_SUPPRESS.size == ring.EVENT_SUPPRESS_SIZE == 4
    raw = ring.EVENT_SUPPRESS.pack(5 | 1 << 15, ring.RING_EVENT_FLAGS_DESC)
    assert struct.unpack_from("<H", raw, ring.EVENT_OFF_OFF_WRAP)[0] == 0x8005
    assert struct.unpack_from("<H", raw, ring.EVENT_OFF_FLAGS)[0] == 2


@pytest.mark.parametrize("num", [1, 2, 3, 5, 7, 100, 255, 256, 257, 1000, 1023, 1024, 32767, 32768])
def test_layout_sizes_and_alignment(num: int) -> None:
    # §2.8.10.1: descriptor ring 16-aligned, 16 * size bytes; each event structure 4-aligned, 4 bytes.
    driver, device, total = packed_layout(num)
    assert driver >= ring.DESC_SIZE * num
    assert driver % ring.EVENT_SUPPRESS_ALIGN == 0 and device % ring.EVENT_SUPPRESS_ALIGN == 0
    assert device >= driver + ring.EVENT_SUPPRESS_SIZE
    assert device // 64 != driver // 64  # separate cache lines
    assert total == device + ring.EVENT_SUPPRESS_SIZE


def test_base_encoding_is_vhost_users() -> None:
    # vhost-user.rst: bits 0-14 avail index, bit 15 avail wrap, bits 16-30 used index, bit 31 used wrap.
    assert packed_base(0, 1, 0, 1) == PACKED_INITIAL_BASE == 0x8000_8000
    assert packed_base(0x7FFF, 0, 3, 1) == 0x8003_7FFF
    assert parse_packed_base(0x8003_7FFF) == (0x7FFF, 0, 3, 1)
    # Only the avail half (what DPDK reads): used = avail.
    assert parse_packed_base(0x8005) == (5, 1, 5, 1)


@given(st.integers(0, 0x7FFF), st.integers(0, 1), st.integers(0, 0x7FFF), st.integers(0, 1))
def test_base_round_trip(ap: int, aw: int, up: int, uw: int) -> None:
    base = packed_base(ap, aw, up, uw)
    assert 0 <= base <= 0xFFFFFFFF
    if base >> 16:
        assert parse_packed_base(base) == (ap, aw, up, uw)
    else:  # (used 0, wrap 0) cannot be told from "no used half"
        assert (up, uw) == (0, 0)


def _laps(size: int, start_pos: int, start_wrap: int, count: int) -> list[tuple[int, int]]:
    """The (slot, wrap counter) of ``count`` descriptors made available one by one from a start."""
    out = []
    pos, wrap = start_pos, start_wrap
    for _ in range(count):
        out.append((pos, wrap))
        pos += 1
        if pos == size:
            pos, wrap = 0, wrap ^ 1
    return out


@given(st.data())
def test_need_event_is_membership_in_the_window(data: st.DataObject) -> None:
    """§2.8.10: notify iff the event descriptor (offset, wrap) is among those just made available."""
    size = data.draw(st.integers(1, 40))
    pos = data.draw(st.integers(0, size - 1))
    wrap = data.draw(st.integers(0, 1))
    count = data.draw(st.integers(0, 2 * size + 2))
    ev_pos = data.draw(st.integers(0, size - 1))
    ev_wrap = data.draw(st.integers(0, 1))
    window = _laps(size, pos, wrap, count)
    end_pos, end_wrap = _laps(size, pos, wrap, count + 1)[-1]
    got = packed_need_event(ev_pos | ev_wrap << 15, end_pos, end_wrap, count, size)
    if count >= size:
        assert got  # a whole lap or more passed every descriptor
    else:
        assert got == ((ev_pos, ev_wrap) in window)
