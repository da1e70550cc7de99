"""SCSI commands an initiator sends, and the data it reads back (T10 SPC-4 / SBC-3).

Pure functions over bytes, next to :mod:`pyvirtio.spec.t10` (opcodes, status,
sense decoding): the CDB builders of the virtio-scsi driver's scan and I/O
(INQUIRY, REPORT LUNS, READ CAPACITY, READ / WRITE (10) and (16),
SYNCHRONIZE CACHE, UNMAP, WRITE SAME(16), MODE SENSE(6)) and the decoders of
what those commands return. Every decoder is bounded by the bytes the device
actually wrote (the allocation length and the data's own length fields may
disagree; the shorter one wins) and never raises on short data: it returns
what is there, and the caller decides whether that is enough.
"""

from __future__ import annotations

from typing import Final

from pyvirtio.spec import t10 as T

BE16, BE32, BE64 = T.BE16, T.BE32, T.BE64

TEST_UNIT_READY_CDB: Final = bytes(6)
START_UNIT_CDB: Final = bytes([T.START_STOP_UNIT, 0, 0, 0, 0x01, 0])
READ_CAPACITY_10_CDB: Final = bytes([T.READ_CAPACITY_10]) + bytes(9)
#: MODE SENSE(6), DBD, all pages, header only (4 bytes): the write-protect bit.
MODE_SENSE_WP_CDB: Final = bytes([T.MODE_SENSE_6, 0x08, 0x3F, 0, 4, 0])
SYNCHRONIZE_CACHE_10_CDB: Final = bytes([T.SYNCHRONIZE_CACHE_10]) + bytes(9)
SYNCHRONIZE_CACHE_16_CDB: Final = bytes([T.SYNCHRONIZE_CACHE_16, 0]) + bytes(8) + bytes(4) + b"\0\0"
#: WRITE SAME(16) byte 1: the UNMAP bit (SBC-3 §5.43).
WRITE_SAME_UNMAP: Final = 0x08


def inquiry_cdb(page: int | None, alloc: int) -> bytes:
    """INQUIRY: standard data (``page`` None) or a VPD page (EVPD set)."""
    return bytes([T.INQUIRY, 0 if page is None else 1, page or 0]) + BE16.pack(alloc) + b"\0"


def rw_cdb(write: bool, lba: int, blocks: int, force16: bool = False) -> bytes:
    """READ / WRITE (10) when LBA and length fit, else (16)."""
    if not force16 and lba + blocks <= 1 << 32 and blocks <= 0xFFFF:
        return bytes([T.WRITE_10 if write else T.READ_10, 0]) + BE32.pack(lba) + b"\0" + BE16.pack(blocks) + b"\0"
    return bytes([T.WRITE_16 if write else T.READ_16, 0]) + BE64.pack(lba) + BE32.pack(blocks) + b"\0\0"


def read_capacity_16_cdb(alloc: int = 32) -> bytes:
    return bytes([T.SERVICE_ACTION_IN_16, T.SAI_READ_CAPACITY_16]) + bytes(8) + BE32.pack(alloc) + b"\0\0"


def report_luns_cdb(alloc: int) -> bytes:
    return bytes([T.REPORT_LUNS, 0, 0, 0, 0, 0]) + BE32.pack(alloc) + b"\0\0"


def unmap_command(extents: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """(CDB, parameter list) of one UNMAP of ``(lba, blocks)`` extents (SBC-3 §5.28)."""
    body = b"".join(BE64.pack(lba) + BE32.pack(n) + bytes(4) for lba, n in extents)
    params = BE16.pack(6 + len(body)) + BE16.pack(len(body)) + bytes(4) + body
    return bytes([T.UNMAP, 0, 0, 0, 0, 0, 0]) + BE16.pack(len(params)) + b"\0", params


#: UNMAP block descriptors one command can carry (its parameter list length is 16 bits).
MAX_UNMAP_DESCRIPTORS: Final = (0xFFFF - 8) // 16


def write_same_16_cdb(lba: int, blocks: int, unmap: bool = False) -> bytes:
    return bytes([T.WRITE_SAME_16, WRITE_SAME_UNMAP if unmap else 0]) + BE64.pack(lba) + BE32.pack(blocks) + b"\0\0"


# -- decoding what the device returned ------------------------------------------------------


def ascii_field(raw: bytes) -> str:
    """An INQUIRY / VPD text field: ASCII, cut at a NUL, blanks stripped."""
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def report_luns_length(data: bytes) -> int:
    """The LUN list length REPORT LUNS says it has (bytes, header excluded); 0 if the header is cut."""
    return BE32.unpack_from(data, 0)[0] if len(data) >= 4 else 0


def report_luns_entries(data: bytes, max_lun: int) -> list[int]:
    """The flat LUN numbers of a REPORT LUNS answer, sorted, without duplicates, up to ``max_lun``."""
    end = min(8 + report_luns_length(data), len(data))
    out: set[int] = set()
    for off in range(8, end - 7, 8):
        n = T.decode_lun(data[off : off + 8])
        if n is not None and n <= max_lun:
            out.add(n)
    return sorted(out)


def vpd_page(data: bytes, page: int) -> bytes | None:
    """A VPD page cut to its own length, or None if ``data`` is not that page."""
    if len(data) < 4 or data[1] != page:
        return None
    return data[: 4 + BE16.unpack_from(data, 2)[0]]


def read_capacity_10(data: bytes) -> tuple[int, int] | None:
    """(last LBA, block size) of READ CAPACITY(10) data; None if shorter than 8 bytes."""
    if len(data) < 8:
        return None
    return BE32.unpack_from(data, 0)[0], BE32.unpack_from(data, 4)[0]


def read_capacity_16(data: bytes) -> tuple[int, int] | None:
    """(last LBA, block size) of READ CAPACITY(16) data; None if shorter than 12 bytes."""
    if len(data) < 12:
        return None
    return BE64.unpack_from(data, 0)[0], BE32.unpack_from(data, 8)[0]


def mode_sense_write_protected(data: bytes) -> bool | None:
    """The WP bit of a MODE SENSE(6) header; None if the header is cut."""
    if len(data) < 3:
        return None
    return bool(data[2] & 0x80)


__all__ = [
    "MAX_UNMAP_DESCRIPTORS",
    "MODE_SENSE_WP_CDB",
    "READ_CAPACITY_10_CDB",
    "START_UNIT_CDB",
    "SYNCHRONIZE_CACHE_10_CDB",
    "SYNCHRONIZE_CACHE_16_CDB",
    "TEST_UNIT_READY_CDB",
    "WRITE_SAME_UNMAP",
    "ascii_field",
    "inquiry_cdb",
    "mode_sense_write_protected",
    "read_capacity_10",
    "read_capacity_16",
    "read_capacity_16_cdb",
    "report_luns_cdb",
    "report_luns_entries",
    "report_luns_length",
    "rw_cdb",
    "unmap_command",
    "vpd_page",
    "write_same_16_cdb",
]
