"""The sans-I/O capability walk of a virtio PCI function (transport/pci_caps.py), against forged config spaces.

Each hostile case must be refused with a DeviceProtocolError that names the
capability and what is wrong with it (virtio 1.2 §4.1.4), never an access
outside a BAR later.
"""

from __future__ import annotations

import struct

import pytest

from pci_model import BAR4_SIZE, NOTIFY_MULTIPLIER, STANDARD_CAPS, config_space
from pyvirtio.errors import DeviceProtocolError
from pyvirtio.spec import pci as P
from pyvirtio.transport.pci_caps import Bar, notify_offset, parse_function, walk_capabilities

BARS = [Bar(0, 0x40, io=True), Bar(1, 0x1000), Bar(2, 0), Bar(3, 0), Bar(4, BAR4_SIZE), Bar(5, 0)]


def caps_with(**changes: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """The standard caps with some replaced: name=(bar, offset, length)."""
    names = {"common": P.CAP_COMMON_CFG, "notify": P.CAP_NOTIFY_CFG, "isr": P.CAP_ISR_CFG, "device": P.CAP_DEVICE_CFG}
    where = dict(STANDARD_CAPS)
    for name, w in changes.items():
        where[names[name]] = w
    return [(t, *w) for t, w in where.items()]


def test_standard_layout_gives_every_structure_and_the_multiplier() -> None:
    layout = parse_function(bytes(config_space(msix_vectors=3)), BARS)
    assert layout.device_type == 2 and not layout.transitional and layout.modern
    assert layout.common is not None and (layout.common.bar, layout.common.offset) == (4, 0)
    assert layout.notify is not None and layout.notify.offset == 0x3000
    assert layout.isr is not None and layout.device is not None
    assert layout.notify_off_multiplier == NOTIFY_MULTIPLIER
    assert layout.msix_table_size == 3
    assert layout.skipped == ()


def test_transitional_device_id_is_legacy_capable() -> None:
    layout = parse_function(bytes(config_space(device_id=0x1001)), BARS)
    assert layout.device_type == 2 and layout.transitional and layout.legacy and layout.modern


def test_a_capability_pointing_outside_its_bar_is_refused_with_where_and_why() -> None:
    cfg = config_space(caps=caps_with(notify=(4, BAR4_SIZE - 0x100, 0x1000)))
    with pytest.raises(DeviceProtocolError) as exc:
        parse_function(bytes(cfg), BARS)
    msg = str(exc.value)
    assert "notify capability" in msg and "outside BAR 4" in msg and f"0x{BAR4_SIZE:x}" in msg


def test_an_offset_that_overflows_32_bits_is_still_outside_the_bar() -> None:
    cfg = config_space(caps=caps_with(device=(4, 0xFFFFFFF0, 0x20)))
    with pytest.raises(DeviceProtocolError, match="outside BAR 4"):
        parse_function(bytes(cfg), BARS)


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ((2, 0, 0x100), "does not implement"),
        ((0, 0, 0x38), "I/O port BAR"),
        ((7, 0, 0x38), "BARs 0..5"),
        ((4, 0, 0x20), "shorter than the 56"),
    ],
)
def test_a_bad_common_capability_says_why(where: tuple[int, int, int], why: str) -> None:
    cfg = config_space(caps=caps_with(common=where))
    with pytest.raises(DeviceProtocolError, match=why):
        parse_function(bytes(cfg), BARS)


def test_a_bad_capability_followed_by_a_good_one_of_the_same_type_is_skipped() -> None:
    caps = [(P.CAP_NOTIFY_CFG, 4, BAR4_SIZE, 0x1000), *caps_with()]
    layout = parse_function(bytes(config_space(caps=caps)), BARS)
    assert layout.notify is not None and layout.notify.offset == 0x3000
    assert len(layout.skipped) == 1 and "outside BAR 4" in layout.skipped[0]


def test_unknown_and_unused_capability_types_are_ignored() -> None:
    caps = [(P.CAP_VENDOR_CFG, 9, 0xFFFFFFFF, 0xFFFFFFFF), (42, 0, 0, 0), *caps_with()]
    layout = parse_function(bytes(config_space(caps=caps)), BARS)
    assert layout.modern and layout.skipped == ()


def test_notify_capability_too_short_for_its_multiplier_is_refused() -> None:
    cfg = config_space(caps=caps_with(), cap_len=16)
    with pytest.raises(DeviceProtocolError, match="notify_off_multiplier"):
        parse_function(bytes(cfg), BARS)


def test_a_capability_list_that_loops_is_refused() -> None:
    cfg = config_space()
    caps = walk_capabilities(bytes(cfg))
    last = caps[-1][0]
    cfg[last + 1] = caps[0][0]  # the last one points back at the first
    with pytest.raises(DeviceProtocolError, match="loops"):
        walk_capabilities(bytes(cfg))


@pytest.mark.parametrize(("size", "pointer"), [(256, 0x10), (0x80, 0x90)])
def test_a_pointer_into_the_header_or_past_the_end_is_refused(size: int, pointer: int) -> None:
    cfg = config_space()
    cfg[P.CFG_CAP_PTR] = pointer
    with pytest.raises(DeviceProtocolError, match="outside config space"):
        walk_capabilities(bytes(cfg[:size]))


def test_without_the_capability_list_status_bit_there_is_no_list() -> None:
    cfg = config_space()
    struct.pack_into("<H", cfg, P.CFG_STATUS, 0)
    assert walk_capabilities(bytes(cfg)) == []
    assert not parse_function(bytes(cfg), BARS).modern


def test_not_a_virtio_function() -> None:
    with pytest.raises(DeviceProtocolError, match="vendor"):
        parse_function(bytes(config_space(vendor=0x8086)), BARS)
    with pytest.raises(DeviceProtocolError, match="device ID"):
        parse_function(bytes(config_space(device_id=0x1100)), BARS)
    with pytest.raises(DeviceProtocolError, match="64-byte header"):
        walk_capabilities(bytes(0x20))


def test_notify_offset_is_checked_against_the_structure() -> None:
    layout = parse_function(bytes(config_space()), BARS)
    assert notify_offset(layout, 3) == 0x3000 + 3 * NOTIFY_MULTIPLIER
    last = (0x1000 - 2) // NOTIFY_MULTIPLIER
    assert notify_offset(layout, last) == 0x3000 + last * NOTIFY_MULTIPLIER
    with pytest.raises(DeviceProtocolError, match="outside the 0x1000-byte notify structure"):
        notify_offset(layout, 0x400)


def test_device_type_of_ids() -> None:
    assert P.device_type_of(0x1041) == 1 and P.device_type_of(0x1048) == 8
    assert P.device_type_of(0x1000) == 1 and P.device_type_of(0x1004) == 8
    assert P.device_type_of(0x1040) == 0 and P.device_type_of(0x1234) == 0
    assert P.is_transitional(0x103F) and not P.is_transitional(0x1040)
