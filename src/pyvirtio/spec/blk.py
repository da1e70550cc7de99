"""virtio-blk: feature bits, config layout, request header (virtio 1.2 §5.2)."""

from __future__ import annotations

import struct
from typing import Final

from pyvirtio.spec.common import unpack_fields

F_BARRIER: Final = 0  # legacy
F_SIZE_MAX: Final = 1
F_SEG_MAX: Final = 2
F_GEOMETRY: Final = 4
F_RO: Final = 5
F_BLK_SIZE: Final = 6
F_SCSI: Final = 7  # legacy
F_FLUSH: Final = 9
F_TOPOLOGY: Final = 10
F_CONFIG_WCE: Final = 11
F_MQ: Final = 12
F_DISCARD: Final = 13
F_WRITE_ZEROES: Final = 14
F_LIFETIME: Final = 15
F_SECURE_ERASE: Final = 16

FEATURE_NAMES: Final[dict[int, str]] = {
    F_BARRIER: "BLK_BARRIER",
    F_SIZE_MAX: "BLK_SIZE_MAX",
    F_SEG_MAX: "BLK_SEG_MAX",
    F_GEOMETRY: "BLK_GEOMETRY",
    F_RO: "BLK_RO",
    F_BLK_SIZE: "BLK_BLK_SIZE",
    F_SCSI: "BLK_SCSI",
    F_FLUSH: "BLK_FLUSH",
    F_TOPOLOGY: "BLK_TOPOLOGY",
    F_CONFIG_WCE: "BLK_CONFIG_WCE",
    F_MQ: "BLK_MQ",
    F_DISCARD: "BLK_DISCARD",
    F_WRITE_ZEROES: "BLK_WRITE_ZEROES",
    F_LIFETIME: "BLK_LIFETIME",
    F_SECURE_ERASE: "BLK_SECURE_ERASE",
}

# Request types (virtio 1.2 §5.2.6)
T_IN: Final = 0
T_OUT: Final = 1
T_FLUSH: Final = 4
T_GET_ID: Final = 8
T_GET_LIFETIME: Final = 10
T_DISCARD: Final = 11
T_WRITE_ZEROES: Final = 13
T_SECURE_ERASE: Final = 14

REQUEST_TYPE_NAMES: Final[dict[int, str]] = {
    T_IN: "read",
    T_OUT: "write",
    T_FLUSH: "flush",
    T_GET_ID: "get-id",
    T_GET_LIFETIME: "get-lifetime",
    T_DISCARD: "discard",
    T_WRITE_ZEROES: "write-zeroes",
    T_SECURE_ERASE: "secure-erase",
}

S_OK: Final = 0
S_IOERR: Final = 1
S_UNSUPP: Final = 2

STATUS_NAMES: Final[dict[int, str]] = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}

SECTOR_SIZE: Final = 512
ID_BYTES: Final = 20

# struct virtio_blk_outhdr {le32 type; le32 ioprio; le64 sector}
OUTHDR = struct.Struct("<IIQ")
OUTHDR_SIZE: Final = 16

# struct virtio_blk_discard_write_zeroes {le64 sector; le32 num_sectors; le32 flags}
DISCARD_WZ = struct.Struct("<QII")
DISCARD_WZ_SIZE: Final = 16
DWZ_F_UNMAP: Final = 1

# struct virtio_blk_config: (name, offset, struct format)
CONFIG_FIELDS: Final[tuple[tuple[str, int, str], ...]] = (
    ("capacity", 0, "<Q"),
    ("size_max", 8, "<I"),
    ("seg_max", 12, "<I"),
    ("cylinders", 16, "<H"),
    ("heads", 18, "<B"),
    ("sectors", 19, "<B"),
    ("blk_size", 20, "<I"),
    ("physical_block_exp", 24, "<B"),
    ("alignment_offset", 25, "<B"),
    ("min_io_size", 26, "<H"),
    ("opt_io_size", 28, "<I"),
    ("wce", 32, "<B"),
    ("num_queues", 34, "<H"),
    ("max_discard_sectors", 36, "<I"),
    ("max_discard_seg", 40, "<I"),
    ("discard_sector_alignment", 44, "<I"),
    ("max_write_zeroes_sectors", 48, "<I"),
    ("max_write_zeroes_seg", 52, "<I"),
    ("write_zeroes_may_unmap", 56, "<B"),
    ("max_secure_erase_sectors", 60, "<I"),
    ("max_secure_erase_seg", 64, "<I"),
    ("secure_erase_sector_alignment", 68, "<I"),
)
CONFIG_SIZE: Final = 72
# The bytes up to and including write_zeroes_may_unmap and its padding: what
# every back end of the 1.1 era (qemu-storage-daemon 7.2) serves.
CONFIG_SIZE_V11: Final = 60


def parse_config(data: bytes) -> dict[str, int]:
    """Decode the fields of a virtio_blk_config that ``data`` covers."""
    return unpack_fields(CONFIG_FIELDS, data)
