"""virtio-net: feature bits, config, header and control layouts (virtio 1.2 §5.1)."""

from __future__ import annotations

import struct
from typing import Final

from pyvirtio.spec.common import unpack_fields

F_CSUM: Final = 0
F_GUEST_CSUM: Final = 1
F_CTRL_GUEST_OFFLOADS: Final = 2
F_MTU: Final = 3
F_MAC: Final = 5
F_GSO: Final = 6  # legacy
F_GUEST_TSO4: Final = 7
F_GUEST_TSO6: Final = 8
F_GUEST_ECN: Final = 9
F_GUEST_UFO: Final = 10
F_HOST_TSO4: Final = 11
F_HOST_TSO6: Final = 12
F_HOST_ECN: Final = 13
F_HOST_UFO: Final = 14
F_MRG_RXBUF: Final = 15
F_STATUS: Final = 16
F_CTRL_VQ: Final = 17
F_CTRL_RX: Final = 18
F_CTRL_VLAN: Final = 19
F_CTRL_RX_EXTRA: Final = 20
F_GUEST_ANNOUNCE: Final = 21
F_MQ: Final = 22
F_CTRL_MAC_ADDR: Final = 23
F_HOST_USO: Final = 56
F_HASH_REPORT: Final = 57
F_GUEST_HDRLEN: Final = 59
F_RSS: Final = 60
F_RSC_EXT: Final = 61
F_STANDBY: Final = 62
F_SPEED_DUPLEX: Final = 63

FEATURE_NAMES: Final[dict[int, str]] = {
    F_CSUM: "NET_CSUM",
    F_GUEST_CSUM: "NET_GUEST_CSUM",
    F_CTRL_GUEST_OFFLOADS: "NET_CTRL_GUEST_OFFLOADS",
    F_MTU: "NET_MTU",
    F_MAC: "NET_MAC",
    F_GSO: "NET_GSO",
    F_GUEST_TSO4: "NET_GUEST_TSO4",
    F_GUEST_TSO6: "NET_GUEST_TSO6",
    F_GUEST_ECN: "NET_GUEST_ECN",
    F_GUEST_UFO: "NET_GUEST_UFO",
    F_HOST_TSO4: "NET_HOST_TSO4",
    F_HOST_TSO6: "NET_HOST_TSO6",
    F_HOST_ECN: "NET_HOST_ECN",
    F_HOST_UFO: "NET_HOST_UFO",
    F_MRG_RXBUF: "NET_MRG_RXBUF",
    F_STATUS: "NET_STATUS",
    F_CTRL_VQ: "NET_CTRL_VQ",
    F_CTRL_RX: "NET_CTRL_RX",
    F_CTRL_VLAN: "NET_CTRL_VLAN",
    F_CTRL_RX_EXTRA: "NET_CTRL_RX_EXTRA",
    F_GUEST_ANNOUNCE: "NET_GUEST_ANNOUNCE",
    F_MQ: "NET_MQ",
    F_CTRL_MAC_ADDR: "NET_CTRL_MAC_ADDR",
    F_HOST_USO: "NET_HOST_USO",
    F_HASH_REPORT: "NET_HASH_REPORT",
    F_GUEST_HDRLEN: "NET_GUEST_HDRLEN",
    F_RSS: "NET_RSS",
    F_RSC_EXT: "NET_RSC_EXT",
    F_STANDBY: "NET_STANDBY",
    F_SPEED_DUPLEX: "NET_SPEED_DUPLEX",
}

# struct virtio_net_hdr_v1 {u8 flags, gso_type; le16 hdr_len, gso_size, csum_start, csum_offset, num_buffers}
HDR = struct.Struct("<BBHHHHH")
HDR_SIZE: Final = 12
HDR_F_NEEDS_CSUM: Final = 1
HDR_F_DATA_VALID: Final = 2
HDR_F_RSC_INFO: Final = 4
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
GSO_UDP_L4: Final = 5
GSO_ECN: Final = 0x80

S_LINK_UP: Final = 1
S_ANNOUNCE: Final = 2

# struct virtio_net_ctrl_hdr {u8 class, cmd}; ack is one u8
CTRL_HDR = struct.Struct("<BB")
CTRL_OK: Final = 0
CTRL_ERR: Final = 1
CTRL_RX: Final = 0
CTRL_RX_PROMISC: Final = 0
CTRL_RX_ALLMULTI: Final = 1
CTRL_RX_ALLUNI: Final = 2
CTRL_RX_NOMULTI: Final = 3
CTRL_RX_NOUNI: Final = 4
CTRL_RX_NOBCAST: Final = 5
CTRL_MAC: Final = 1
CTRL_MAC_TABLE_SET: Final = 0
CTRL_MAC_ADDR_SET: Final = 1
CTRL_VLAN: Final = 2
CTRL_ANNOUNCE: Final = 3
CTRL_MQ: Final = 4
CTRL_MQ_VQ_PAIRS_SET: Final = 0
CTRL_MQ_VQ_PAIRS_MIN: Final = 1
CTRL_MQ_VQ_PAIRS_MAX: Final = 0x8000
CTRL_GUEST_OFFLOADS: Final = 5

CONFIG_FIELDS: Final[tuple[tuple[str, int, str], ...]] = (
    ("status", 6, "<H"),
    ("max_virtqueue_pairs", 8, "<H"),
    ("mtu", 10, "<H"),
    ("speed", 12, "<I"),
    ("duplex", 16, "<B"),
    ("rss_max_key_size", 17, "<B"),
    ("rss_max_indirection_table_length", 18, "<H"),
    ("supported_hash_types", 20, "<I"),
)
CONFIG_OFF_MAC: Final = 0
CONFIG_SIZE: Final = 24


def parse_config(data: bytes) -> dict[str, object]:
    out: dict[str, object] = {}
    if len(data) >= 6:
        out["mac"] = ":".join(f"{b:02x}" for b in data[:6])
    out.update(unpack_fields(CONFIG_FIELDS, data))
    return out
