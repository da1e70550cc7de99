"""What a virtio-net frame looks like on the driver's side of a ring (virtio 1.2 §5.1.6).

Theory of operation. Every buffer the driver posts or reaps starts with the
12-byte ``virtio_net_hdr_v1`` (:class:`NetHdr`; VERSION_1 is always
negotiated, so the header has ``num_buffers`` with and without MRG_RXBUF),
followed by an Ethernet frame of at least :data:`ETH_HLEN` bytes. This module
holds that format and nothing that moves frames: the driver
(:mod:`pyvirtio.drivers.net`) and its queues
(:mod:`pyvirtio.drivers.net_queues`) copy frames in and out of the rings and
use these names to lay them out.

Transmit headers are checked before anything is queued
(:func:`check_tx_header`, virtio 1.2 §5.1.6.2): GSO is not negotiated, so
``gso_type`` must be GSO_NONE; the only flag a driver may set is
NEEDS_CSUM, which needs VIRTIO_NET_F_CSUM negotiated and a checksum field
(``csum_start + csum_offset``, two bytes) inside the frame. A header equal
to the zero header needs no bytes of its own (the slot's header is zeroed);
any other is packed with ``num_buffers`` 0, the device's field.

MAC addresses are 6 bytes everywhere (:func:`parse_mac` accepts the text
forms, :func:`format_mac` writes the colon form, :func:`random_mac` makes a
locally administered unicast address for a device without VIRTIO_NET_F_MAC).
:func:`build_frame` and :func:`inet_checksum` (RFC 1071) are for callers that
make test traffic: the CLI, the benchmark engine, the tests.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from pyvirtio.errors import InvalidArgument
from pyvirtio.spec import net as N

HDR_SIZE = N.HDR_SIZE
ETH_HLEN = 14
ETH_VLAN_HLEN = 18
#: The header of a frame sent without one (a slot whose header was dirtied gets it back).
ZERO_HDR = bytes(HDR_SIZE)


class NetHdr(NamedTuple):
    """``struct virtio_net_hdr_v1`` (virtio 1.2 §5.1.6)."""

    flags: int = 0
    gso_type: int = N.GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return N.HDR.pack(*self)


def check_tx_header(h: NetHdr, length: int, csum: bool) -> bytes | None:
    """``h`` for a ``length``-byte frame, checked (virtio 1.2 §5.1.6.2); None for the zero header.

    ``csum``: VIRTIO_NET_F_CSUM was negotiated.
    """
    if h.gso_type != N.GSO_NONE:
        raise InvalidArgument("GSO is not negotiated by this driver (gso_type must be GSO_NONE)")
    if h.flags & ~N.HDR_F_NEEDS_CSUM:
        raise InvalidArgument(f"transmit header flags 0x{h.flags:x}: only NEEDS_CSUM is allowed")
    if h.flags & N.HDR_F_NEEDS_CSUM:
        if not csum:
            raise InvalidArgument("NEEDS_CSUM needs VIRTIO_NET_F_CSUM negotiated (open with csum=True)")
        if h.csum_start + h.csum_offset + 2 > length:
            raise InvalidArgument(
                f"csum_start {h.csum_start} + csum_offset {h.csum_offset} is beyond the {length}-byte frame"
            )
    if h == NetHdr():
        return None
    return NetHdr(h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset, 0).pack()


def parse_mac(text: str | bytes) -> bytes:
    """``"02:00:00:00:00:01"`` (or 6 bytes) -> 6 bytes."""
    if isinstance(text, bytes | bytearray):
        if len(text) != 6:
            raise InvalidArgument(f"a MAC address has 6 bytes, got {len(text)}")
        return bytes(text)
    parts = text.replace("-", ":").split(":")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise InvalidArgument(f"invalid MAC address {text!r}") from None
    if len(raw) != 6 or any(len(p) not in (1, 2) for p in parts):
        raise InvalidArgument(f"invalid MAC address {text!r}")
    return raw


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


def random_mac() -> bytes:
    """A locally administered unicast address (02:xx:xx:xx:xx:xx)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return bytes(b)


def build_frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (ethertype default 0x88B5, IEEE local experimental), padded to 60 bytes."""
    frame = dst + src + struct.pack("!H", ethertype) + payload
    if len(frame) < 60:
        frame += bytes(60 - len(frame))
    return frame


def inet_checksum(data: bytes | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    total = int(sum(struct.unpack(f"!{len(b) // 2}H", b)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


__all__ = [
    "ETH_HLEN",
    "ETH_VLAN_HLEN",
    "HDR_SIZE",
    "ZERO_HDR",
    "NetHdr",
    "build_frame",
    "check_tx_header",
    "format_mac",
    "inet_checksum",
    "parse_mac",
    "random_mac",
]
