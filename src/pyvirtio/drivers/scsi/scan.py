"""The virtio-scsi scan: which targets and LUNs exist, and what each LUN is (SPDK's scan, extended).

Theory of operation. For each target, REPORT LUNS (SPDK looks at LUN 0
only; a target that does not support it falls back to LUN 0); per LUN,
standard INQUIRY (a disk, peripheral qualifier 0), TEST UNIT READY (again
after UNIT ATTENTION; START STOP UNIT when the LUN says it needs one, NOT
READY / 04h 02h, which is the condition SPDK meant to test), VPD 0x00 and
then 0xB0 (block limits), 0xB2 (provisioning: UNMAP, WRITE SAME with
UNMAP) and 0x80 (serial) when listed, READ CAPACITY(10) and (16) when the
capacity does not fit, and MODE SENSE(6) for write protection. Every
command is tried at most :data:`MAX_ATTEMPTS` times while the answer is
transient (BUSY, RESET, UNIT ATTENTION, BECOMING READY...); BAD_TARGET /
INCORRECT_LUN mean "absent" (:class:`~pyvirtio.errors.LunNotFound`).

:class:`LunScanner` only sends commands (through the ``execute`` it is
given) and interprets the answers; the driver keeps what it found.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.drivers.scsi.requests import ScsiRequest
from pyvirtio.errors import DeviceProtocolError, LunNotFound, ScsiError
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec import t10_cdb as C

#: Attempts per scan command while the answer is transient (SPDK's bound).
MAX_ATTEMPTS = 5

_TRANSIENT_RESPONSES = frozenset({S.S_BUSY, S.S_RESET, S.S_ABORTED, S.S_TRANSPORT_FAILURE})
_BE16, _BE32, _BE64 = T.BE16, T.BE32, T.BE64


@dataclass
class LunInfo:
    """What the scan learnt about one LUN."""

    target: int
    lun: int
    peripheral_type: int = T.TYPE_DISK
    vendor: str = ""
    product: str = ""
    revision: str = ""
    serial: str = ""
    block_size: int = 0
    num_blocks: int = 0
    readonly: bool = False
    unmap: bool = False  # UNMAP supported (VPD 0xB2 LBPU)
    write_same_unmap: bool = False  # WRITE SAME(16) with UNMAP (LBPWS)
    lbprz: bool = False
    vpd_pages: list[int] = field(default_factory=list)
    max_transfer_blocks: int = 0  # 0: not reported
    optimal_transfer_blocks: int = 0
    max_unmap_blocks: int = 0
    max_unmap_descriptors: int = 0
    unmap_granularity: int = 0
    max_write_same_blocks: int = 0
    read_capacity_16: bool = False
    started: bool = False  # START STOP UNIT was needed and sent

    @property
    def capacity(self) -> int:
        return self.block_size * self.num_blocks

    @property
    def is_disk(self) -> bool:
        return self.peripheral_type == T.TYPE_DISK

    @property
    def type_name(self) -> str:
        return T.PERIPHERAL_TYPE_NAMES.get(self.peripheral_type, f"type 0x{self.peripheral_type:02x}")

    @property
    def geometry(self) -> tuple[int, int, bool]:
        """What a rescan compares: (blocks, block size, read-only)."""
        return self.num_blocks, self.block_size, self.readonly

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "lun": self.lun,
            "type": self.type_name,
            "vendor": self.vendor,
            "product": self.product,
            "revision": self.revision,
            "serial": self.serial,
            "capacity": self.capacity,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "readonly": self.readonly,
            "unmap": self.unmap,
            "write_same_unmap": self.write_same_unmap,
            "max_transfer_blocks": self.max_transfer_blocks,
            "max_unmap_blocks": self.max_unmap_blocks,
            "max_unmap_descriptors": self.max_unmap_descriptors,
            "max_write_same_blocks": self.max_write_same_blocks,
            "vpd_pages": [f"0x{p:02x}" for p in self.vpd_pages],
        }


def transient(req: ScsiRequest) -> bool:
    """Is the answer worth asking again (busy, reset, UNIT ATTENTION, becoming ready...)?"""
    if req.response in _TRANSIENT_RESPONSES:
        return True
    if req.response != S.S_OK:
        return False
    if req.status in (T.BUSY, T.TASK_SET_FULL):
        return True
    if req.status == T.CHECK_CONDITION:
        sense = req.sense_data
        if sense is None:
            return False
        if sense.key in (T.UNIT_ATTENTION, T.ABORTED_COMMAND):
            return True
        return sense.key == T.NOT_READY and (sense.asc, sense.ascq) == T.ASC_LUN_BECOMING_READY
    return False


class LunScanner:
    """Scan commands over ``execute`` (send one request, wait for it); LUNs above ``max_lun`` are ignored."""

    def __init__(self, execute: Callable[[ScsiRequest], ScsiRequest], max_lun: int) -> None:
        self.execute = execute
        self.max_lun = max_lun

    def command(self, target: int, lun: int, cdb: bytes, data_in: int = 0) -> ScsiRequest:
        """One scan command, sent again while the answer is transient; absent targets raise LunNotFound."""
        req = ScsiRequest(target, lun, cdb, data_in=data_in, ua_retries=0)
        for attempt in range(MAX_ATTEMPTS):
            req = ScsiRequest(target, lun, cdb, data_in=data_in, ua_retries=0)
            self.execute(req)
            if req.response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN):
                raise LunNotFound(req.name, target, lun, response=req.response)
            if not transient(req):
                return req
            busy = req.status in (T.BUSY, T.TASK_SET_FULL) or req.response == S.S_BUSY
            if attempt + 1 < MAX_ATTEMPTS and busy:
                time.sleep(0.001 * (attempt + 1))
        return req

    def report_luns(self, target: int) -> list[int]:
        """The LUNs of ``target`` (REPORT LUNS; [0] if the target does not support it)."""
        alloc = 16 + 8 * 256
        req = self.command(target, 0, C.report_luns_cdb(alloc), alloc)
        if req.response == S.S_OK and req.status == T.CHECK_CONDITION:
            sense = req.sense_data
            if sense is not None and sense.key == T.ILLEGAL_REQUEST:
                return [0]  # no REPORT LUNS: LUN 0 only, as SPDK
        req.check()
        data = req.data or b""
        if len(data) < 8:
            raise DeviceProtocolError(f"REPORT LUNS on target {target}: {len(data)} bytes of data")
        listed = C.report_luns_length(data)
        if listed > alloc - 8:
            # More LUNs than fit: ask again with room for all of them (bounded by the LUN space).
            alloc = 8 + min(listed, 8 * 16384)
            req = self.command(target, 0, C.report_luns_cdb(alloc), alloc)
            req.check()
            data = req.data or b""
        return C.report_luns_entries(data, self.max_lun)

    def probe_lun(self, target: int, lun: int) -> LunInfo | None:
        """INQUIRY, TEST UNIT READY, VPD pages, READ CAPACITY of one LUN; None if nothing is there."""
        inq = self.command(target, lun, C.inquiry_cdb(None, 96), 96)
        inq.check()
        data = inq.data or b""
        if len(data) < 1:
            raise DeviceProtocolError(f"INQUIRY on {target}:{lun} returned no data")
        qualifier, ptype = data[0] >> 5, data[0] & 0x1F
        if qualifier != T.QUALIFIER_CONNECTED:
            return None
        info = LunInfo(
            target,
            lun,
            ptype,
            vendor=C.ascii_field(data[8:16]),
            product=C.ascii_field(data[16:32]),
            revision=C.ascii_field(data[32:36]),
        )
        if not info.is_disk:
            return info
        self._make_ready(info)
        self._read_vpd(info)
        self._read_capacity(info)
        self._read_write_protect(info)
        return info

    def scan_target(self, target: int) -> tuple[dict[tuple[int, int], LunInfo], dict[tuple[int, int], str]]:
        """The disks of ``target`` and, by (target, LUN or -1), why others could not be used."""
        errors: dict[tuple[int, int], str] = {}
        try:
            ids = self.report_luns(target)
        except LunNotFound:
            ids = []
        except (ScsiError, DeviceProtocolError) as exc:
            # The target answers but not usefully: skip it, say why (SPDK: -EBUSY).
            errors[(target, -1)] = str(exc)
            ids = []
        found: dict[tuple[int, int], LunInfo] = {}
        for lun in ids:
            try:
                info = self.probe_lun(target, lun)
            except LunNotFound:
                info = None
            except (ScsiError, DeviceProtocolError) as exc:
                errors[(target, lun)] = str(exc)
                info = None
            if info is not None and info.is_disk:
                found[(target, lun)] = info
            elif info is not None:
                errors[(target, lun)] = f"peripheral type {info.type_name}, not a disk"
        return found, errors

    def _make_ready(self, info: LunInfo) -> None:
        t, lun = info.target, info.lun
        for _ in range(MAX_ATTEMPTS):
            req = self.command(t, lun, C.TEST_UNIT_READY_CDB)
            if req.response == S.S_OK and req.status == T.GOOD:
                return
            sense = req.sense_data
            if (
                not info.started
                and req.status == T.CHECK_CONDITION
                and sense is not None
                and sense.key == T.NOT_READY
                and sense.asc == 0x04
                and sense.ascq not in (0x01, 0x03)  # becoming ready (retried) / manual intervention
            ):
                self.command(t, lun, C.START_UNIT_CDB).check()
                info.started = True
                continue
            req.check()
        raise ScsiError("TEST UNIT READY", t, lun, detail=f"not ready after {MAX_ATTEMPTS} attempts")

    def _vpd(self, info: LunInfo, page: int, alloc: int) -> bytes | None:
        req = self.command(info.target, info.lun, C.inquiry_cdb(page, alloc), alloc)
        if req.response == S.S_OK and req.status == T.CHECK_CONDITION:
            return None  # page not supported after all
        req.check()
        return C.vpd_page(req.data or b"", page)

    def _read_vpd(self, info: LunInfo) -> None:
        pages = self._vpd(info, T.VPD_SUPPORTED_PAGES, 255)
        info.vpd_pages = list(pages[4:]) if pages else []
        if T.VPD_BLOCK_LIMITS in info.vpd_pages:
            bl = self._vpd(info, T.VPD_BLOCK_LIMITS, T.BLOCK_LIMITS_LEN)
            if bl is not None and len(bl) >= 16:
                info.max_transfer_blocks = _BE32.unpack_from(bl, T.BL_MAX_TRANSFER)[0]
                info.optimal_transfer_blocks = _BE32.unpack_from(bl, T.BL_OPTIMAL_TRANSFER)[0]
            if bl is not None and len(bl) >= 32:
                info.max_unmap_blocks = _BE32.unpack_from(bl, T.BL_MAX_UNMAP_LBA_COUNT)[0]
                info.max_unmap_descriptors = _BE32.unpack_from(bl, T.BL_MAX_UNMAP_DESCRIPTORS)[0]
                info.unmap_granularity = _BE32.unpack_from(bl, T.BL_UNMAP_GRANULARITY)[0]
            if bl is not None and len(bl) >= 44:
                info.max_write_same_blocks = _BE64.unpack_from(bl, T.BL_MAX_WRITE_SAME)[0]
        if T.VPD_LB_PROVISIONING in info.vpd_pages:
            lbp = self._vpd(info, T.VPD_LB_PROVISIONING, 8)
            if lbp is not None and len(lbp) >= 6:
                info.unmap = bool(lbp[5] & T.LBP_LBPU)
                info.write_same_unmap = bool(lbp[5] & T.LBP_LBPWS)
                info.lbprz = bool(lbp[5] >> T.LBP_LBPRZ_SHIFT & 0x7)
        if info.unmap and T.VPD_BLOCK_LIMITS in info.vpd_pages and info.max_unmap_blocks == 0:
            info.unmap = False  # SBC-3 §6.5.3: a zero MAXIMUM UNMAP LBA COUNT means no UNMAP
        if T.VPD_UNIT_SERIAL in info.vpd_pages:
            serial = self._vpd(info, T.VPD_UNIT_SERIAL, 255)
            if serial is not None:
                info.serial = C.ascii_field(serial[4:])

    def _read_capacity(self, info: LunInfo) -> None:
        t, lun = info.target, info.lun
        rc = self.command(t, lun, C.READ_CAPACITY_10_CDB, 8)
        rc.check()
        got = C.read_capacity_10(rc.data or b"")
        if got is None:
            raise DeviceProtocolError(f"READ CAPACITY(10) on {t}:{lun}: {len(rc.data or b'')} bytes of data")
        last, bs = got
        if last == 0xFFFFFFFF:
            rc = self.command(t, lun, C.read_capacity_16_cdb(32), 32)
            rc.check()
            got = C.read_capacity_16(rc.data or b"")
            if got is None:
                raise DeviceProtocolError(f"READ CAPACITY(16) on {t}:{lun}: {len(rc.data or b'')} bytes of data")
            last, bs = got
            info.read_capacity_16 = True
        if bs == 0 or bs % 512 or bs > 1 << 20:
            raise DeviceProtocolError(f"{t}:{lun} reports block size {bs} (not a multiple of 512 up to 1 MiB)")
        info.block_size = bs
        info.num_blocks = last + 1

    def _read_write_protect(self, info: LunInfo) -> None:
        req = self.command(info.target, info.lun, C.MODE_SENSE_WP_CDB, 4)
        if req.ok and req.data:
            wp = C.mode_sense_write_protected(req.data)
            if wp is not None:
                info.readonly = wp


__all__ = ["MAX_ATTEMPTS", "LunInfo", "LunScanner", "transient"]
