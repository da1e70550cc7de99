"""virtio-scsi: feature bits, config, request / response layouts (virtio 1.2 §5.6)."""

from __future__ import annotations

import struct
from typing import Final

from pyvirtio.spec.common import unpack_fields

F_INOUT: Final = 0
F_HOTPLUG: Final = 1
F_CHANGE: Final = 2
F_T10_PI: Final = 3

FEATURE_NAMES: Final[dict[int, str]] = {
    F_INOUT: "SCSI_INOUT",
    F_HOTPLUG: "SCSI_HOTPLUG",
    F_CHANGE: "SCSI_CHANGE",
    F_T10_PI: "SCSI_T10_PI",
}

CDB_SIZE: Final = 32
SENSE_SIZE: Final = 96

# struct virtio_scsi_cmd_req {u8 lun[8]; le64 tag; u8 task_attr, prio, crn; u8 cdb[32]}
CMD_REQ_HDR = struct.Struct("<8sQBBB")
CMD_REQ_SIZE: Final = 19 + CDB_SIZE
# struct virtio_scsi_cmd_resp {le32 sense_len, resid; le16 status_qualifier; u8 status, response;
#                              u8 sense[96]}
CMD_RESP_HDR = struct.Struct("<IIHBB")
CMD_RESP_SIZE: Final = 12 + SENSE_SIZE
# struct virtio_scsi_ctrl_tmf_req {le32 type, subtype; u8 lun[8]; le64 tag}
CTRL_TMF_REQ = struct.Struct("<II8sQ")
CTRL_TMF_RESP_SIZE: Final = 1
# struct virtio_scsi_ctrl_an_req {le32 type; u8 lun[8]; le32 event_requested}
CTRL_AN_REQ = struct.Struct("<I8sI")
# struct virtio_scsi_ctrl_an_resp {le32 event_actual; u8 response}
CTRL_AN_RESP = struct.Struct("<IB")
# struct virtio_scsi_event {le32 event; u8 lun[8]; le32 reason}
EVENT = struct.Struct("<I8sI")

# Response codes
S_OK: Final = 0
S_OVERRUN: Final = 1
S_ABORTED: Final = 2
S_BAD_TARGET: Final = 3
S_RESET: Final = 4
S_BUSY: Final = 5
S_TRANSPORT_FAILURE: Final = 6
S_TARGET_FAILURE: Final = 7
S_NEXUS_FAILURE: Final = 8
S_FAILURE: Final = 9
S_FUNCTION_SUCCEEDED: Final = 10
S_FUNCTION_REJECTED: Final = 11
S_INCORRECT_LUN: Final = 12

RESPONSE_NAMES: Final[dict[int, str]] = {
    S_OK: "OK",
    S_OVERRUN: "OVERRUN",
    S_ABORTED: "ABORTED",
    S_BAD_TARGET: "BAD_TARGET",
    S_RESET: "RESET",
    S_BUSY: "BUSY",
    S_TRANSPORT_FAILURE: "TRANSPORT_FAILURE",
    S_TARGET_FAILURE: "TARGET_FAILURE",
    S_NEXUS_FAILURE: "NEXUS_FAILURE",
    S_FAILURE: "FAILURE",
    S_FUNCTION_SUCCEEDED: "FUNCTION_SUCCEEDED",
    S_FUNCTION_REJECTED: "FUNCTION_REJECTED",
    S_INCORRECT_LUN: "INCORRECT_LUN",
}

# Task attributes
S_SIMPLE: Final = 0
S_ORDERED: Final = 1
S_HEAD: Final = 2
S_ACA: Final = 3

# Control queue
T_TMF: Final = 0
T_AN_QUERY: Final = 1
T_AN_SUBSCRIBE: Final = 2
T_TMF_ABORT_TASK: Final = 0
T_TMF_ABORT_TASK_SET: Final = 1
T_TMF_CLEAR_ACA: Final = 2
T_TMF_CLEAR_TASK_SET: Final = 3
T_TMF_I_T_NEXUS_RESET: Final = 4
T_TMF_LOGICAL_UNIT_RESET: Final = 5
T_TMF_QUERY_TASK: Final = 6
T_TMF_QUERY_TASK_SET: Final = 7

# Events
T_NO_EVENT: Final = 0
T_TRANSPORT_RESET: Final = 1
T_ASYNC_NOTIFY: Final = 2
T_PARAM_CHANGE: Final = 3
T_EVENTS_MISSED: Final = 0x80000000
EVT_RESET_HARD: Final = 0
EVT_RESET_RESCAN: Final = 1
EVT_RESET_REMOVED: Final = 2

# struct virtio_scsi_config
CONFIG_FIELDS: Final[tuple[tuple[str, int, str], ...]] = (
    ("num_queues", 0, "<I"),
    ("seg_max", 4, "<I"),
    ("max_sectors", 8, "<I"),
    ("cmd_per_lun", 12, "<I"),
    ("event_info_size", 16, "<I"),
    ("sense_size", 20, "<I"),
    ("cdb_size", 24, "<I"),
    ("max_channel", 28, "<H"),
    ("max_target", 30, "<H"),
    ("max_lun", 32, "<I"),
)
CONFIG_SIZE: Final = 36

CONTROL_QUEUE: Final = 0
EVENT_QUEUE: Final = 1
FIRST_REQUEST_QUEUE: Final = 2


def lun_address(target: int, lun: int) -> bytes:
    """virtio 1.2 §5.6.6.1: lun[0]=1, lun[1]=target, lun[2..3]=LUN (flat space)."""
    return bytes([1, target, 0x40 | (lun >> 8) if lun >= 256 else lun >> 8, lun & 0xFF, 0, 0, 0, 0])


def parse_config(data: bytes) -> dict[str, int]:
    return unpack_fields(CONFIG_FIELDS, data)


def decode_lun_address(lun8: bytes | memoryview) -> tuple[int, int]:
    """(target, LUN) of a virtio-scsi LUN field (the inverse of :func:`lun_address`; flat or peripheral LUN)."""
    target = lun8[1]
    method = lun8[2] >> 6
    lun = (lun8[2] & 0x3F) << 8 | lun8[3] if method == 1 else lun8[3]
    return target, lun


def pack_config(fields: dict[str, int]) -> bytes:
    """A ``virtio_scsi_config`` from named fields (missing ones 0): the inverse of :func:`parse_config`."""
    unknown = set(fields) - {name for name, _off, _fmt in CONFIG_FIELDS}
    if unknown:
        raise ValueError(f"not virtio-scsi config fields: {', '.join(sorted(unknown))}")
    out = bytearray(CONFIG_SIZE)
    for name, off, fmt in CONFIG_FIELDS:
        struct.pack_into(fmt, out, off, fields.get(name, 0))
    return bytes(out)
