"""SCSI data (spec/t10.py) and the virtio-scsi layouts the driver and back end share.

Sense decoding in both formats, bounded by what the device wrote; LUN
encodings (REPORT LUNS entries, the virtio LUN field); names of opcodes,
status, sense keys and ASC / ASCQ; the ScsiError message carrying them.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.drivers.scsi import LunNotFound, ScsiError, inquiry_cdb, read_capacity_16_cdb, report_luns_cdb, rw_cdb
from pyvirtio.errors import BlockIOError, DeviceError
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T


def test_fixed_sense() -> None:
    raw = T.fixed_sense(T.MEDIUM_ERROR, 0x11, 0x00)
    assert len(raw) == 18
    sense = T.parse_sense(raw)
    assert sense == T.Sense(T.MEDIUM_ERROR, 0x11, 0x00, "fixed")
    assert (sense.key_name, sense.asc_name) == ("MEDIUM ERROR", "UNRECOVERED READ ERROR")
    assert str(sense) == "MEDIUM ERROR: UNRECOVERED READ ERROR"


def test_descriptor_sense() -> None:
    raw = T.descriptor_sense(T.UNIT_ATTENTION, 0x29, 0x03)
    sense = T.parse_sense(raw + b"\x00" * 20)
    assert sense == T.Sense(T.UNIT_ATTENTION, 0x29, 0x03, "descriptor")
    assert sense is not None and sense.asc_name == "BUS DEVICE RESET FUNCTION OCCURRED"
    deferred = T.parse_sense(bytes([0x73, 0x03, 0x0C, 0x00]))
    assert deferred is not None and deferred.deferred and deferred.key_name == "MEDIUM ERROR"


def test_fixed_sense_cut_short_reads_only_what_is_there() -> None:
    raw = bytearray(T.fixed_sense(T.ILLEGAL_REQUEST, 0x24, 0x00))
    assert T.parse_sense(bytes(raw[:12])) == T.Sense(T.ILLEGAL_REQUEST, 0, 0, "fixed")
    raw[7] = 4  # additional length stops before ASC
    assert T.parse_sense(bytes(raw)) == T.Sense(T.ILLEGAL_REQUEST, 0, 0, "fixed")


def test_not_sense_data() -> None:
    assert T.parse_sense(b"") is None
    assert T.parse_sense(b"\x00" * 18) is None
    assert T.parse_sense(b"\x70\x00") is None
    assert T.parse_sense(b"\x72\x05\x24") is None


@given(st.binary(max_size=64))
def test_parse_sense_never_fails(data: bytes) -> None:
    sense = T.parse_sense(data)
    if sense is not None:
        assert 0 <= sense.key <= 15 and sense.format in ("fixed", "descriptor")
        assert sense.key_name and sense.asc_name


def test_unknown_names_fall_back_to_numbers() -> None:
    assert T.asc_name(0x7E, 0x01) == "ASC 0x7e ASCQ 0x01"
    assert T.opcode_name(bytes([0xC0])) == "opcode 0xc0"
    assert T.opcode_name(read_capacity_16_cdb()) == "READ CAPACITY(16)"
    assert T.opcode_name(b"") == "empty CDB"


@given(st.integers(0, 0x3FFF))
def test_report_luns_entry_round_trip(lun: int) -> None:
    entry = T.encode_lun(lun)
    assert len(entry) == 8 and T.decode_lun(entry) == lun
    assert entry[0] >> 6 == (0 if lun < 256 else 1)


def test_decode_lun_refuses_other_address_methods() -> None:
    assert T.decode_lun(bytes([0x80, 1, 0, 0, 0, 0, 0, 0])) is None  # logical unit addressing
    assert T.decode_lun(bytes([0x01, 1, 0, 0, 0, 0, 0, 0])) is None  # bus 1
    assert T.decode_lun(bytes([0x00, 1, 0x40, 2, 0, 0, 0, 0])) is None  # second level
    assert T.decode_lun(b"\0" * 7) is None


def test_virtio_lun_field() -> None:
    assert S.lun_address(3, 5) == bytes([1, 3, 0, 5, 0, 0, 0, 0])
    assert S.lun_address(0, 300) == bytes([1, 0, 0x41, 0x2C, 0, 0, 0, 0])


def test_cdbs() -> None:
    assert inquiry_cdb(None, 96) == bytes([0x12, 0, 0, 0, 96, 0])
    assert inquiry_cdb(0xB0, 64) == bytes([0x12, 1, 0xB0, 0, 64, 0])
    assert rw_cdb(False, 0x01020304, 8) == bytes([0x28, 0, 1, 2, 3, 4, 0, 0, 8, 0])
    assert rw_cdb(True, 1 << 32, 1) == bytes([0x8A, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])
    assert report_luns_cdb(16)[6:10] == b"\0\0\0\x10"
    assert S.CMD_REQ_HDR.size + S.CDB_SIZE == S.CMD_REQ_SIZE == 51
    assert S.CMD_RESP_HDR.size + S.SENSE_SIZE == S.CMD_RESP_SIZE == 108


def test_scsi_error_carries_names() -> None:
    sense = T.Sense(T.ILLEGAL_REQUEST, 0x21, 0x00, "fixed")
    err = ScsiError("READ(10)", 0, 1, status=T.CHECK_CONDITION, sense=sense, offset=4096, length=512)
    assert isinstance(err, BlockIOError) and isinstance(err, DeviceError)
    assert (err.key, err.key_name, err.asc, err.ascq) == (5, "ILLEGAL REQUEST", 0x21, 0)
    assert err.asc_name == "LOGICAL BLOCK ADDRESS OUT OF RANGE"
    assert str(err) == (
        "READ(10) on 0:1 at offset 4096 length 512 failed: CHECK CONDITION, ILLEGAL REQUEST (0x5), "
        "LOGICAL BLOCK ADDRESS OUT OF RANGE (ASC 0x21 ASCQ 0x00)"
    )
    absent = LunNotFound("INQUIRY", 9, 0, response=S.S_BAD_TARGET)
    assert "virtio response BAD_TARGET" in str(absent) and absent.key is None
