"""SCSI itself (T10 SPC-4 / SBC-3 / SAM-5): opcodes, status, sense, VPD pages.

Pure data and pure functions, shared by the virtio-scsi driver
(:mod:`pyvirtio.drivers.scsi`) and the embedded back end
(:mod:`pyvirtio.backends.scsi`). The virtio-scsi transport layer (request
and response headers, response codes, events) is in :mod:`pyvirtio.spec.scsi`.

Sense data comes in two formats (SPC-4 §4.5): *fixed* (response code 0x70 /
0x71; key in byte 2, ASC / ASCQ in bytes 12 / 13) and *descriptor* (0x72 /
0x73; key, ASC, ASCQ in bytes 1..3). :func:`parse_sense` reads both and never
reads past what the device said it wrote.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# -- operation codes (SPC-4, SBC-3) ------------------------------------------------------

TEST_UNIT_READY: Final = 0x00
REQUEST_SENSE: Final = 0x03
READ_6: Final = 0x08
WRITE_6: Final = 0x0A
INQUIRY: Final = 0x12
MODE_SELECT_6: Final = 0x15
MODE_SENSE_6: Final = 0x1A
START_STOP_UNIT: Final = 0x1B
READ_CAPACITY_10: Final = 0x25
READ_10: Final = 0x28
WRITE_10: Final = 0x2A
VERIFY_10: Final = 0x2F
SYNCHRONIZE_CACHE_10: Final = 0x35
WRITE_SAME_10: Final = 0x41
UNMAP: Final = 0x42
MODE_SENSE_10: Final = 0x5A
READ_16: Final = 0x88
WRITE_16: Final = 0x8A
SYNCHRONIZE_CACHE_16: Final = 0x91
WRITE_SAME_16: Final = 0x93
SERVICE_ACTION_IN_16: Final = 0x9E
SAI_READ_CAPACITY_16: Final = 0x10
REPORT_LUNS: Final = 0xA0
READ_12: Final = 0xA8
WRITE_12: Final = 0xAA

OPCODE_NAMES: Final[dict[int, str]] = {
    TEST_UNIT_READY: "TEST UNIT READY",
    REQUEST_SENSE: "REQUEST SENSE",
    READ_6: "READ(6)",
    WRITE_6: "WRITE(6)",
    INQUIRY: "INQUIRY",
    MODE_SELECT_6: "MODE SELECT(6)",
    MODE_SENSE_6: "MODE SENSE(6)",
    START_STOP_UNIT: "START STOP UNIT",
    READ_CAPACITY_10: "READ CAPACITY(10)",
    READ_10: "READ(10)",
    WRITE_10: "WRITE(10)",
    VERIFY_10: "VERIFY(10)",
    SYNCHRONIZE_CACHE_10: "SYNCHRONIZE CACHE(10)",
    WRITE_SAME_10: "WRITE SAME(10)",
    UNMAP: "UNMAP",
    MODE_SENSE_10: "MODE SENSE(10)",
    READ_16: "READ(16)",
    WRITE_16: "WRITE(16)",
    SYNCHRONIZE_CACHE_16: "SYNCHRONIZE CACHE(16)",
    WRITE_SAME_16: "WRITE SAME(16)",
    SERVICE_ACTION_IN_16: "SERVICE ACTION IN(16)",
    REPORT_LUNS: "REPORT LUNS",
    READ_12: "READ(12)",
    WRITE_12: "WRITE(12)",
}


def opcode_name(cdb: bytes) -> str:
    """A command's name from its CDB (READ CAPACITY(16) is named by its service action)."""
    if not cdb:
        return "empty CDB"
    op = cdb[0]
    if op == SERVICE_ACTION_IN_16 and len(cdb) > 1 and cdb[1] & 0x1F == SAI_READ_CAPACITY_16:
        return "READ CAPACITY(16)"
    return OPCODE_NAMES.get(op, f"opcode 0x{op:02x}")


# -- status (SAM-5 §5.3) ----------------------------------------------------------------

GOOD: Final = 0x00
CHECK_CONDITION: Final = 0x02
CONDITION_MET: Final = 0x04
BUSY: Final = 0x08
RESERVATION_CONFLICT: Final = 0x18
TASK_SET_FULL: Final = 0x28
ACA_ACTIVE: Final = 0x30
TASK_ABORTED: Final = 0x40

STATUS_NAMES: Final[dict[int, str]] = {
    GOOD: "GOOD",
    CHECK_CONDITION: "CHECK CONDITION",
    CONDITION_MET: "CONDITION MET",
    BUSY: "BUSY",
    RESERVATION_CONFLICT: "RESERVATION CONFLICT",
    TASK_SET_FULL: "TASK SET FULL",
    ACA_ACTIVE: "ACA ACTIVE",
    TASK_ABORTED: "TASK ABORTED",
}

# -- sense keys (SPC-4 §4.5.6) --------------------------------------------------------------

NO_SENSE: Final = 0x0
RECOVERED_ERROR: Final = 0x1
NOT_READY: Final = 0x2
MEDIUM_ERROR: Final = 0x3
HARDWARE_ERROR: Final = 0x4
ILLEGAL_REQUEST: Final = 0x5
UNIT_ATTENTION: Final = 0x6
DATA_PROTECT: Final = 0x7
BLANK_CHECK: Final = 0x8
VENDOR_SPECIFIC: Final = 0x9
COPY_ABORTED: Final = 0xA
ABORTED_COMMAND: Final = 0xB
VOLUME_OVERFLOW: Final = 0xD
MISCOMPARE: Final = 0xE
COMPLETED: Final = 0xF

SENSE_KEY_NAMES: Final[dict[int, str]] = {
    NO_SENSE: "NO SENSE",
    RECOVERED_ERROR: "RECOVERED ERROR",
    NOT_READY: "NOT READY",
    MEDIUM_ERROR: "MEDIUM ERROR",
    HARDWARE_ERROR: "HARDWARE ERROR",
    ILLEGAL_REQUEST: "ILLEGAL REQUEST",
    UNIT_ATTENTION: "UNIT ATTENTION",
    DATA_PROTECT: "DATA PROTECT",
    BLANK_CHECK: "BLANK CHECK",
    VENDOR_SPECIFIC: "VENDOR SPECIFIC",
    COPY_ABORTED: "COPY ABORTED",
    ABORTED_COMMAND: "ABORTED COMMAND",
    0xC: "RESERVED (0xC)",
    VOLUME_OVERFLOW: "VOLUME OVERFLOW",
    MISCOMPARE: "MISCOMPARE",
    COMPLETED: "COMPLETED",
}

# -- additional sense codes (SPC-4 annex D), the ones pyvirtio meets -----------------------------

ASC_NO_ADDITIONAL_SENSE: Final = (0x00, 0x00)
ASC_LUN_NOT_READY: Final = (0x04, 0x00)
ASC_LUN_BECOMING_READY: Final = (0x04, 0x01)
ASC_LUN_NEEDS_START: Final = (0x04, 0x02)
ASC_WRITE_ERROR: Final = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR: Final = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR: Final = (0x1A, 0x00)
ASC_INVALID_OPCODE: Final = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE: Final = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB: Final = (0x24, 0x00)
ASC_LUN_NOT_SUPPORTED: Final = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST: Final = (0x26, 0x00)
ASC_WRITE_PROTECTED: Final = (0x27, 0x00)
ASC_POWER_ON_RESET: Final = (0x29, 0x00)
ASC_BUS_DEVICE_RESET: Final = (0x29, 0x03)
ASC_I_T_NEXUS_LOSS: Final = (0x29, 0x07)
ASC_CAPACITY_CHANGED: Final = (0x2A, 0x09)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED: Final = (0x39, 0x00)
ASC_MEDIUM_NOT_PRESENT: Final = (0x3A, 0x00)
ASC_REPORTED_LUNS_CHANGED: Final = (0x3F, 0x0E)
ASC_INTERNAL_TARGET_FAILURE: Final = (0x44, 0x00)

ASC_NAMES: Final[dict[tuple[int, int], str]] = {
    ASC_NO_ADDITIONAL_SENSE: "NO ADDITIONAL SENSE INFORMATION",
    ASC_LUN_NOT_READY: "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE",
    ASC_LUN_BECOMING_READY: "LOGICAL UNIT IS IN PROCESS OF BECOMING READY",
    ASC_LUN_NEEDS_START: "LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED",
    (0x04, 0x03): "LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED",
    ASC_WRITE_ERROR: "WRITE ERROR",
    ASC_UNRECOVERED_READ_ERROR: "UNRECOVERED READ ERROR",
    ASC_PARAMETER_LIST_LENGTH_ERROR: "PARAMETER LIST LENGTH ERROR",
    ASC_INVALID_OPCODE: "INVALID COMMAND OPERATION CODE",
    ASC_LBA_OUT_OF_RANGE: "LOGICAL BLOCK ADDRESS OUT OF RANGE",
    ASC_INVALID_FIELD_IN_CDB: "INVALID FIELD IN CDB",
    ASC_LUN_NOT_SUPPORTED: "LOGICAL UNIT NOT SUPPORTED",
    ASC_INVALID_FIELD_IN_PARAMETER_LIST: "INVALID FIELD IN PARAMETER LIST",
    ASC_WRITE_PROTECTED: "WRITE PROTECTED",
    ASC_POWER_ON_RESET: "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED",
    (0x29, 0x01): "POWER ON OCCURRED",
    (0x29, 0x02): "SCSI BUS RESET OCCURRED",
    ASC_BUS_DEVICE_RESET: "BUS DEVICE RESET FUNCTION OCCURRED",
    ASC_I_T_NEXUS_LOSS: "I_T NEXUS LOSS OCCURRED",
    (0x2A, 0x01): "MODE PARAMETERS CHANGED",
    ASC_CAPACITY_CHANGED: "CAPACITY DATA HAS CHANGED",
    ASC_SAVING_PARAMETERS_NOT_SUPPORTED: "SAVING PARAMETERS NOT SUPPORTED",
    ASC_MEDIUM_NOT_PRESENT: "MEDIUM NOT PRESENT",
    ASC_REPORTED_LUNS_CHANGED: "REPORTED LUNS DATA HAS CHANGED",
    ASC_INTERNAL_TARGET_FAILURE: "INTERNAL TARGET FAILURE",
}


def asc_name(asc: int, ascq: int) -> str:
    """The name of an ASC / ASCQ pair, or its numbers when the table lacks it."""
    return ASC_NAMES.get((asc, ascq), f"ASC 0x{asc:02x} ASCQ 0x{ascq:02x}")


# -- sense data (SPC-4 §4.5) ----------------------------------------------------------------

SENSE_FIXED_CURRENT: Final = 0x70
SENSE_FIXED_DEFERRED: Final = 0x71
SENSE_DESC_CURRENT: Final = 0x72
SENSE_DESC_DEFERRED: Final = 0x73
FIXED_SENSE_LEN: Final = 18
DESC_SENSE_LEN: Final = 8


@dataclass(frozen=True)
class Sense:
    """Decoded sense data: key, ASC, ASCQ and their names."""

    key: int
    asc: int
    ascq: int
    format: str  # "fixed" or "descriptor"
    deferred: bool = False

    @property
    def key_name(self) -> str:
        return SENSE_KEY_NAMES.get(self.key, f"sense key 0x{self.key:x}")

    @property
    def asc_name(self) -> str:
        return asc_name(self.asc, self.ascq)

    def __str__(self) -> str:
        return f"{self.key_name}: {self.asc_name}"


def parse_sense(data: bytes | memoryview) -> Sense | None:
    """Decode fixed or descriptor sense data; None if it is not sense data at all.

    Only bytes present are read: a fixed-format buffer too short to hold
    ASC / ASCQ (or whose additional length does not cover them) yields 0 for
    them, as SPC-4 §4.5.3 allows.
    """
    if len(data) < 1:
        return None
    code = data[0] & 0x7F
    if code in (SENSE_FIXED_CURRENT, SENSE_FIXED_DEFERRED):
        if len(data) < 3:
            return None
        key = data[2] & 0x0F
        # additional sense length (byte 7) says how much follows byte 7.
        end = 8 + data[7] if len(data) > 7 else len(data)
        end = min(end, len(data))
        asc = data[12] if end > 12 else 0
        ascq = data[13] if end > 13 else 0
        return Sense(key, asc, ascq, "fixed", code == SENSE_FIXED_DEFERRED)
    if code in (SENSE_DESC_CURRENT, SENSE_DESC_DEFERRED):
        if len(data) < 4:
            return None
        return Sense(data[1] & 0x0F, data[2], data[3], "descriptor", code == SENSE_DESC_DEFERRED)
    return None


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """18 bytes of current fixed-format sense data."""
    out = bytearray(FIXED_SENSE_LEN)
    out[0] = SENSE_FIXED_CURRENT
    out[2] = key & 0x0F
    out[7] = FIXED_SENSE_LEN - 8
    out[12] = asc
    out[13] = ascq
    return bytes(out)


def descriptor_sense(key: int, asc: int, ascq: int) -> bytes:
    """8 bytes of current descriptor-format sense data (no descriptors)."""
    return bytes([SENSE_DESC_CURRENT, key & 0x0F, asc, ascq, 0, 0, 0, 0])


# -- INQUIRY (SPC-4 §6.6) ---------------------------------------------------------------------

TYPE_DISK: Final = 0x00
TYPE_NO_LUN: Final = 0x1F
QUALIFIER_CONNECTED: Final = 0
QUALIFIER_NOT_CONNECTED: Final = 1
QUALIFIER_NOT_SUPPORTED: Final = 3

PERIPHERAL_TYPE_NAMES: Final[dict[int, str]] = {
    0x00: "disk",
    0x01: "tape",
    0x02: "printer",
    0x03: "processor",
    0x04: "write-once",
    0x05: "cd/dvd",
    0x07: "optical",
    0x08: "medium changer",
    0x0C: "storage array",
    0x0D: "enclosure",
    0x0E: "simplified disk",
    0x11: "object storage",
    0x1E: "well-known LU",
    TYPE_NO_LUN: "no device",
}

VPD_SUPPORTED_PAGES: Final = 0x00
VPD_UNIT_SERIAL: Final = 0x80
VPD_DEVICE_ID: Final = 0x83
VPD_BLOCK_LIMITS: Final = 0xB0
VPD_BLOCK_CHARACTERISTICS: Final = 0xB1
VPD_LB_PROVISIONING: Final = 0xB2

STANDARD_INQUIRY_LEN: Final = 36
BLOCK_LIMITS_LEN: Final = 64  # header 4 + page length 0x3C

# Block limits VPD page (SBC-3 §6.5.3): big-endian fields at these offsets.
BL_MAX_TRANSFER: Final = 8  # u32, blocks
BL_OPTIMAL_TRANSFER: Final = 12  # u32, blocks
BL_MAX_UNMAP_LBA_COUNT: Final = 20  # u32
BL_MAX_UNMAP_DESCRIPTORS: Final = 24  # u32
BL_UNMAP_GRANULARITY: Final = 28  # u32
BL_UNMAP_ALIGNMENT: Final = 32  # u32, bit 31 = UGAVALID
BL_MAX_WRITE_SAME: Final = 36  # u64

# Logical block provisioning VPD page (SBC-3 §6.5.4), byte 5.
LBP_LBPU: Final = 0x80  # UNMAP supported
LBP_LBPWS: Final = 0x40  # WRITE SAME(16) with UNMAP supported
LBP_LBPWS10: Final = 0x20
LBP_LBPRZ_SHIFT: Final = 2  # 3-bit field in SBC-4; 1 = unmapped blocks read as zeroes

# -- LUN list encoding (SAM-5 §4.7) -------------------------------------------------------------


def encode_lun(lun: int) -> bytes:
    """The 8-byte single-level LUN of REPORT LUNS: peripheral (< 256) or flat addressing."""
    if not 0 <= lun < 0x4000:
        raise ValueError(f"LUN {lun} does not fit single-level addressing")
    if lun < 256:
        return bytes([0, lun, 0, 0, 0, 0, 0, 0])
    return bytes([0x40 | lun >> 8, lun & 0xFF, 0, 0, 0, 0, 0, 0])


def decode_lun(entry: bytes | memoryview) -> int | None:
    """A single-level LUN number from 8 bytes (peripheral bus 0 or flat); None otherwise."""
    if len(entry) < 8 or any(entry[2:8]):
        return None
    method = entry[0] >> 6
    if method == 0:
        if entry[0] & 0x3F:  # a bus number: not a single-level LUN of this target
            return None
        return int(entry[1])
    if method == 1:
        return (entry[0] & 0x3F) << 8 | entry[1]
    return None


BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
