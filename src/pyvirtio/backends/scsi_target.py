"""SCSI target emulation for the embedded virtio-scsi back end: T10 commands on logical units.

:class:`ScsiLun` is one logical unit, a :class:`~pyvirtio.backends.blk.Storage`
(RAM or a file) seen as ``num_blocks`` blocks of ``block_size`` bytes, with
its inquiry data, limits and state (started, pending unit attentions).
:class:`ScsiTarget` executes a :class:`ScsiCommand` (a CDB with its data-out
and data-in buffers) against the logical units of a SCSI host, as a real
target does; it knows nothing of virtio. The virtio-scsi framing
(:mod:`pyvirtio.backends.scsi`: request headers, LUN addresses, the control
and event queues) builds the command and turns the outcome into a
``virtio_scsi_cmd_resp``.

Commands (SPC-4 / SBC-3): INQUIRY (standard; VPD 0x00, 0x80, 0x83, 0xB0,
0xB1, 0xB2), TEST UNIT READY, REQUEST SENSE, START STOP UNIT, READ CAPACITY
(10) and (16), READ / WRITE (6, 10, 12, 16), UNMAP, WRITE SAME(16),
SYNCHRONIZE CACHE (10, 16), MODE SENSE (6, 10: caching and control pages),
REPORT LUNS. Anything else ends in CHECK CONDITION, ILLEGAL REQUEST / INVALID
COMMAND OPERATION CODE. A missing LUN on a present target answers INQUIRY
with peripheral qualifier 3, REPORT LUNS with the target's list, and
anything else with CHECK CONDITION / LOGICAL UNIT NOT SUPPORTED (SPC-4
§4.6.4).

Unit attentions (SAM-5 §5.14): a new LUN holds POWER ON, RESET; a LUN
reset, an I_T nexus loss, a change of the target's LUN list and a change of
capacity (:meth:`ScsiLun.resize`: CAPACITY DATA HAS CHANGED, 2Ah/09h) add
theirs.
The first command other than INQUIRY / REPORT LUNS / REQUEST SENSE receives
the oldest as CHECK CONDITION, UNIT ATTENTION; REQUEST SENSE
returns it as its data.

Outcomes: a command completes (data-in written, ``din_written`` /
``dout_used`` set), or raises :class:`~pyvirtio.errors.ScsiCheckCondition`
(an ordinary SCSI answer: the sense key / ASC / ASCQ to report) or
:class:`~pyvirtio.errors.ScsiOverrun` (the CDB asks for more data than the
buffers hold). Nothing from the initiator is trusted: every CDB field, LBA
range, parameter list and allocation length is checked against the LUN and
the buffers. A storage error (OSError) propagates: the framing reports it as
MEDIUM ERROR.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtio.backends.blk import Storage
from pyvirtio.backends.sglist import gather, scatter, take
from pyvirtio.errors import ScsiCheckCondition, ScsiOverrun
from pyvirtio.spec import t10 as T

log = logging.getLogger("pyvirtio.backends.scsi")

__all__ = ["SENSE_FORMATS", "ScsiCommand", "ScsiLun", "ScsiTarget"]

BE16, BE32, BE64 = T.BE16, T.BE32, T.BE64

#: Sense data formats a target can report in (SPC-4 §4.5): control mode page D_SENSE.
SENSE_FORMATS = ("fixed", "descriptor")
_RW_CHUNK = 1 << 20


def _illegal(code: tuple[int, int] = T.ASC_INVALID_FIELD_IN_CDB, why: str = "") -> ScsiCheckCondition:
    return ScsiCheckCondition(T.ILLEGAL_REQUEST, code, why)


def _ascii(text: str | None, width: int) -> bytes:
    raw = (text or "").encode("ascii", "replace")[:width]
    return raw.ljust(width, b" ")


class ScsiLun:
    """One logical unit: a Storage seen as ``num_blocks`` blocks of ``block_size`` bytes."""

    def __init__(
        self,
        storage: Storage,
        *,
        block_size: int = 512,
        vendor: str = "PYVIRTIO",
        product: str | None = None,
        revision: str = "0001",
        serial: str | None = None,
        readonly: bool | None = None,
        started: bool = True,
        unmap: bool = True,
        write_cache: bool | None = None,
        max_transfer_blocks: int | None = None,
        optimal_transfer_blocks: int = 0,
        max_unmap_blocks: int = 1 << 22,
        max_unmap_descriptors: int = 16,
        unmap_granularity: int = 1,
        max_write_same_blocks: int = 1 << 22,
    ) -> None:
        if block_size < 512 or block_size & (block_size - 1) or block_size > 1 << 16:
            raise ValueError(f"block size must be a power of two in 512..65536, got {block_size}")
        self.storage = storage
        self.block_size = block_size
        self.num_blocks = storage.size // block_size
        if self.num_blocks == 0:
            raise ValueError(f"storage of {storage.size} bytes holds no {block_size}-byte block")
        self.vendor = vendor
        self.product = product or ("FILE DISK" if storage.path else "RAM DISK")
        self.revision = revision
        self.serial = serial
        self.readonly = storage.readonly if readonly is None else readonly
        self.started = started
        self.unmap = unmap
        self.write_cache = storage.path is not None if write_cache is None else write_cache
        self.max_transfer_blocks = (4 << 20) // block_size if max_transfer_blocks is None else max_transfer_blocks
        self.optimal_transfer_blocks = optimal_transfer_blocks
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        self.unmap_granularity = unmap_granularity
        self.max_write_same_blocks = max_write_same_blocks
        #: Unit attention conditions not yet reported (oldest first).
        self.pending_ua: list[tuple[int, int]] = [T.ASC_POWER_ON_RESET]
        self.resets = 0
        self.commands = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    def resize(self, size: int) -> int:
        """Give the LUN ``size`` bytes (whole blocks); returns the new number of blocks.

        The storage follows (a RAM disk forgets what lies beyond the new end, a
        file is truncated or extended), and the LUN holds a CAPACITY DATA HAS
        CHANGED unit attention for its next command (SBC-3 §4.6). Telling the
        frontend at once (a PARAM_CHANGE event) is the host's business:
        :meth:`~pyvirtio.backends.scsi.ScsiBackend.resize_lun`.
        """
        blocks = size // self.block_size
        if blocks <= 0:
            raise ValueError(f"{size} bytes hold no {self.block_size}-byte block")
        self.storage.resize(blocks * self.block_size)
        self.num_blocks = blocks
        self.pending_ua.append(T.ASC_CAPACITY_CHANGED)
        return blocks

    def info(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity,
            "block_size": self.block_size,
            "file": self.storage.path,
            "readonly": self.readonly,
            "vendor": self.vendor,
            "product": self.product,
            "unmap": self.unmap,
        }


@dataclass
class ScsiCommand:
    """One command being executed: its CDB, its buffers, and what it moved."""

    target: int
    lun_id: int
    lun: ScsiLun | None
    cdb: bytes
    data_out: list[memoryview]
    dout_len: int
    data_in: list[memoryview]
    din_len: int
    din_written: int = 0
    dout_used: int = 0


class ScsiTarget:
    """T10 command emulation for the logical units of one SCSI host (see the module docstring).

    ``lun_ids(target)`` lists the LUNs present on a target, for REPORT LUNS;
    ``sense_format`` ("fixed" or "descriptor") is the format of the sense
    data reported (the control mode page's D_SENSE says which).
    """

    def __init__(self, lun_ids: Callable[[int], list[int]], *, sense_format: str = "fixed") -> None:
        if sense_format not in SENSE_FORMATS:
            raise ValueError("sense_format must be 'fixed' or 'descriptor'")
        self._lun_ids = lun_ids
        self.sense_format = sense_format

    def sense(self, key: int, code: tuple[int, int], fmt: str | None = None) -> bytes:
        """Sense data for ``key`` / (ASC, ASCQ), in ``fmt`` or the target's format."""
        if (fmt or self.sense_format) == "descriptor":
            return T.descriptor_sense(key, *code)
        return T.fixed_sense(key, *code)

    # -- command execution ---------------------------------------------------------------

    def execute(self, cmd: ScsiCommand) -> None:
        """Execute ``cmd``; raises ScsiCheckCondition / ScsiOverrun when it cannot complete with GOOD."""
        cdb = cmd.cdb
        op = cdb[0]
        unit = cmd.lun
        if op == T.INQUIRY:
            return self._inquiry(cmd)
        if op == T.REPORT_LUNS:
            return self._report_luns(cmd)
        if unit is None:
            if op == T.REQUEST_SENSE:
                return self._data_in(cmd, self.sense(T.ILLEGAL_REQUEST, T.ASC_LUN_NOT_SUPPORTED), cdb[4])
            raise _illegal(T.ASC_LUN_NOT_SUPPORTED, "no such LUN")
        unit.commands += 1
        if op == T.REQUEST_SENSE:
            fmt = "descriptor" if cdb[1] & 1 else "fixed"
            if unit.pending_ua:
                sense = self.sense(T.UNIT_ATTENTION, unit.pending_ua.pop(0), fmt)
            elif not unit.started:
                sense = self.sense(T.NOT_READY, T.ASC_LUN_NEEDS_START, fmt)
            else:
                sense = self.sense(T.NO_SENSE, T.ASC_NO_ADDITIONAL_SENSE, fmt)
            return self._data_in(cmd, sense, cdb[4])
        if unit.pending_ua:
            raise ScsiCheckCondition(T.UNIT_ATTENTION, unit.pending_ua.pop(0))
        handler = self._HANDLERS.get(op)
        if handler is None:
            raise _illegal(T.ASC_INVALID_OPCODE, f"unsupported opcode 0x{op:02x}")
        if op == T.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F != T.SAI_READ_CAPACITY_16:
            raise _illegal(T.ASC_INVALID_FIELD_IN_CDB, f"service action 0x{cdb[1] & 0x1F:02x}")
        if not unit.started and op not in (T.START_STOP_UNIT, T.MODE_SENSE_6, T.MODE_SENSE_10):
            raise ScsiCheckCondition(T.NOT_READY, T.ASC_LUN_NEEDS_START, "stopped")
        handler(self, cmd, unit)
        return None

    def _data_in(self, cmd: ScsiCommand, data: bytes, alloc: int) -> None:
        """Return ``data`` cut to the allocation length; more than the buffer holds is an overrun."""
        n = min(len(data), alloc)
        if n > cmd.din_len:
            raise ScsiOverrun(f"{n} bytes to return, data-in buffer of {cmd.din_len}")
        cmd.din_written = scatter(cmd.data_in, data[:n])

    def _inquiry(self, cmd: ScsiCommand) -> None:
        cdb = cmd.cdb
        evpd = cdb[1] & 1
        page = cdb[2]
        alloc = BE16.unpack_from(cdb, 3)[0]
        unit = cmd.lun
        if unit is None:
            # SPC-4 §6.6.2: peripheral qualifier 3, type 0x1F: no LUN here.
            first = T.QUALIFIER_NOT_SUPPORTED << 5 | T.TYPE_NO_LUN
            if evpd:
                raise _illegal(T.ASC_LUN_NOT_SUPPORTED, "VPD of a missing LUN")
            data = bytes([first, 0, 6, 0x12, T.STANDARD_INQUIRY_LEN - 5]) + bytes(T.STANDARD_INQUIRY_LEN - 5)
            return self._data_in(cmd, data, alloc)
        if not evpd:
            if page:
                raise _illegal(why="page code without EVPD")
            data = (
                bytes([T.TYPE_DISK, 0, 0x06, 0x12, T.STANDARD_INQUIRY_LEN - 5, 0, 0, 0x02])
                + _ascii(unit.vendor, 8)
                + _ascii(unit.product, 16)
                + _ascii(unit.revision, 4)
            )
            return self._data_in(cmd, data, alloc)
        return self._data_in(cmd, self._vpd(cmd, unit, page), alloc)

    def _serial(self, cmd: ScsiCommand, unit: ScsiLun) -> str:
        return unit.serial or f"PYV{cmd.target:03d}{cmd.lun_id:05d}"

    def _vpd(self, cmd: ScsiCommand, unit: ScsiLun, page: int) -> bytes:
        def page_of(body: bytes) -> bytes:
            return bytes([T.TYPE_DISK, page]) + BE16.pack(len(body)) + body

        if page == T.VPD_SUPPORTED_PAGES:
            pages = [
                T.VPD_SUPPORTED_PAGES,
                T.VPD_UNIT_SERIAL,
                T.VPD_DEVICE_ID,
                T.VPD_BLOCK_LIMITS,
                T.VPD_BLOCK_CHARACTERISTICS,
                T.VPD_LB_PROVISIONING,
            ]
            return page_of(bytes(pages))
        if page == T.VPD_UNIT_SERIAL:
            return page_of(self._serial(cmd, unit).encode())
        if page == T.VPD_DEVICE_ID:
            serial = self._serial(cmd, unit).encode()
            t10 = _ascii(unit.vendor, 8) + serial
            # T10 vendor ID designator (ASCII), then an NAA 6 one derived from the serial.
            desig = bytes([0x02, 0x01, 0x00, len(t10)]) + t10
            naa = (0x6 << 60) | (0x5_2549_56 << 24) | (zlib.crc32(serial) & 0xFFFFFF)
            desig += bytes([0x01, 0x03, 0x00, 16]) + BE64.pack(naa) + BE64.pack(zlib.crc32(t10))
            return page_of(desig)
        if page == T.VPD_BLOCK_LIMITS:
            body = bytearray(T.BLOCK_LIMITS_LEN - 4)
            body[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks is refused
            BE32.pack_into(body, T.BL_MAX_TRANSFER - 4, unit.max_transfer_blocks)
            BE32.pack_into(body, T.BL_OPTIMAL_TRANSFER - 4, unit.optimal_transfer_blocks)
            if unit.unmap:
                BE32.pack_into(body, T.BL_MAX_UNMAP_LBA_COUNT - 4, unit.max_unmap_blocks)
                BE32.pack_into(body, T.BL_MAX_UNMAP_DESCRIPTORS - 4, unit.max_unmap_descriptors)
                BE32.pack_into(body, T.BL_UNMAP_GRANULARITY - 4, unit.unmap_granularity)
                BE32.pack_into(body, T.BL_UNMAP_ALIGNMENT - 4, 0x80000000)  # UGAVALID, alignment 0
            BE64.pack_into(body, T.BL_MAX_WRITE_SAME - 4, unit.max_write_same_blocks)
            return page_of(bytes(body))
        if page == T.VPD_BLOCK_CHARACTERISTICS:
            body = bytearray(0x3C)
            BE16.pack_into(body, 0, 1)  # medium rotation rate 1: non-rotating
            return page_of(bytes(body))
        if page == T.VPD_LB_PROVISIONING:
            flags = (T.LBP_LBPU | T.LBP_LBPWS | 1 << T.LBP_LBPRZ_SHIFT) if unit.unmap else 0
            return page_of(bytes([0, flags, 0x02 if unit.unmap else 0, 0]))
        raise _illegal(why=f"VPD page 0x{page:02x} not supported")

    def _report_luns(self, cmd: ScsiCommand) -> None:
        cdb = cmd.cdb
        select = cdb[2]
        alloc = BE32.unpack_from(cdb, 6)[0]
        if select not in (0, 1, 2):
            raise _illegal(why=f"SELECT REPORT 0x{select:02x}")
        if alloc < 16:
            raise _illegal(why=f"allocation length {alloc} < 16")  # SPC-4 §6.33
        ids = self._lun_ids(cmd.target) if select != 1 else []
        body = b"".join(T.encode_lun(lun) for lun in ids)
        return self._data_in(cmd, BE32.pack(len(body)) + bytes(4) + body, alloc)

    def _tur(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        return None  # readiness and unit attentions were checked by _execute

    def _start_stop(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        if cdb[4] & 0xF0:  # a power condition: not supported
            raise _illegal(why="power condition")
        unit.started = bool(cdb[4] & 1)

    def _read_capacity_10(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        last = min(unit.num_blocks - 1, 0xFFFFFFFF)
        return self._data_in(cmd, BE32.pack(last) + BE32.pack(unit.block_size), 8)

    def _read_capacity_16(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        alloc = BE32.unpack_from(cmd.cdb, 10)[0]
        data = bytearray(32)
        BE64.pack_into(data, 0, unit.num_blocks - 1)
        BE32.pack_into(data, 8, unit.block_size)
        if unit.unmap:
            data[14] = 0xC0  # LBPME, LBPRZ
        return self._data_in(cmd, bytes(data), alloc)

    @staticmethod
    def _rw_fields(cdb: bytes) -> tuple[int, int]:
        """(LBA, blocks) of a READ / WRITE CDB of any size."""
        op = cdb[0]
        if op in (T.READ_6, T.WRITE_6):
            lba = (cdb[1] & 0x1F) << 16 | cdb[2] << 8 | cdb[3]
            return lba, cdb[4] or 256  # SBC-3 §5.15: 0 means 256 blocks
        if op in (T.READ_10, T.WRITE_10):
            return BE32.unpack_from(cdb, 2)[0], BE16.unpack_from(cdb, 7)[0]
        if op in (T.READ_12, T.WRITE_12):
            return BE32.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 6)[0]
        return BE64.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 10)[0]

    @staticmethod
    def _check_range(unit: ScsiLun, lba: int, blocks: int) -> None:
        if lba + blocks > unit.num_blocks:
            raise _illegal(T.ASC_LBA_OUT_OF_RANGE, f"blocks {lba}+{blocks} beyond {unit.num_blocks}")

    def _transfer(self, cmd: ScsiCommand, unit: ScsiLun) -> tuple[int, int]:
        """(byte offset, bytes) of a READ / WRITE, its range and length checked against the LUN."""
        lba, blocks = self._rw_fields(cmd.cdb)
        self._check_range(unit, lba, blocks)
        if unit.max_transfer_blocks and blocks > unit.max_transfer_blocks:
            raise _illegal(why=f"{blocks} blocks > maximum transfer {unit.max_transfer_blocks}")
        return lba * unit.block_size, blocks * unit.block_size

    def _read(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        offset, n = self._transfer(cmd, unit)
        if n > cmd.din_len:
            raise ScsiOverrun(f"{n} bytes to read, data-in buffer of {cmd.din_len}")
        if n:
            unit.storage.readinto(take(cmd.data_in, n), offset)
        cmd.din_written = n

    def _write(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        if unit.readonly:
            raise ScsiCheckCondition(T.DATA_PROTECT, T.ASC_WRITE_PROTECTED)
        offset, n = self._transfer(cmd, unit)
        if n > cmd.dout_len:
            raise ScsiOverrun(f"{n} bytes to write, data-out buffer of {cmd.dout_len}")
        cmd.dout_used = n
        if n:
            unit.storage.writefrom(take(cmd.data_out, n), offset)

    def _sync_cache(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        if cdb[0] == T.SYNCHRONIZE_CACHE_10:
            lba, blocks = BE32.unpack_from(cdb, 2)[0], BE16.unpack_from(cdb, 7)[0]
        else:
            lba, blocks = BE64.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 10)[0]
        self._check_range(unit, lba, blocks)  # 0 blocks: to the end of the medium
        unit.storage.flush()

    def _unmap(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        if not unit.unmap:
            raise _illegal(T.ASC_INVALID_OPCODE, "UNMAP on a LUN without logical block provisioning")
        if unit.readonly:
            raise ScsiCheckCondition(T.DATA_PROTECT, T.ASC_WRITE_PROTECTED)
        cdb = cmd.cdb
        plen = BE16.unpack_from(cdb, 7)[0]
        if plen == 0:
            return  # SBC-3 §5.28: not an error, nothing to do
        if plen > cmd.dout_len:
            raise ScsiOverrun(f"parameter list of {plen} bytes, data-out buffer of {cmd.dout_len}")
        if plen < 8:
            raise _illegal(T.ASC_PARAMETER_LIST_LENGTH_ERROR, f"parameter list of {plen} bytes")
        cmd.dout_used = plen
        params = gather(cmd.data_out, plen)
        desc_len = BE16.unpack_from(params, 2)[0]
        if desc_len % 16 or 8 + desc_len > plen:
            raise _illegal(T.ASC_PARAMETER_LIST_LENGTH_ERROR, f"block descriptor data length {desc_len}")
        count = desc_len // 16
        if count > unit.max_unmap_descriptors:
            raise _illegal(T.ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"{count} descriptors > {unit.max_unmap_descriptors}")
        ranges = []
        for i in range(count):
            lba = BE64.unpack_from(params, 8 + 16 * i)[0]
            n = BE32.unpack_from(params, 16 + 16 * i)[0]
            if n > unit.max_unmap_blocks:
                raise _illegal(T.ASC_INVALID_FIELD_IN_PARAMETER_LIST, f"{n} blocks > {unit.max_unmap_blocks}")
            self._check_range(unit, lba, n)
            ranges.append((lba, n))
        bs = unit.block_size
        for lba, n in ranges:
            if n:
                unit.storage.zero(lba * bs, n * bs)  # LBPRZ: unmapped blocks read as zeroes

    def _write_same_16(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        if unit.readonly:
            raise ScsiCheckCondition(T.DATA_PROTECT, T.ASC_WRITE_PROTECTED)
        unmap = bool(cdb[1] & 0x08)
        ndob = bool(cdb[1] & 0x01)
        lba, blocks = BE64.unpack_from(cdb, 2)[0], BE32.unpack_from(cdb, 10)[0]
        if blocks == 0 or blocks > unit.max_write_same_blocks:
            raise _illegal(why=f"WRITE SAME of {blocks} blocks (1..{unit.max_write_same_blocks})")
        if unmap and not unit.unmap:
            raise _illegal(why="UNMAP bit on a LUN without logical block provisioning")
        self._check_range(unit, lba, blocks)
        bs = unit.block_size
        if ndob:
            pattern = bytes(bs)
        else:
            if cmd.dout_len < bs:
                raise ScsiOverrun(f"one {bs}-byte block to write, data-out buffer of {cmd.dout_len}")
            pattern = gather(cmd.data_out, bs)
            cmd.dout_used = bs
        if not any(pattern):
            unit.storage.zero(lba * bs, blocks * bs)
            return
        per = max(1, _RW_CHUNK // bs)
        chunk = pattern * min(per, blocks)
        done = 0
        while done < blocks:
            n = min(per, blocks - done)
            unit.storage.writefrom([memoryview(chunk)[: n * bs]], (lba + done) * bs)
            done += n

    def _mode_pages(self, unit: ScsiLun, page: int, pc: int) -> bytes:
        caching = bytearray(20)
        caching[0:2] = b"\x08\x12"
        control = bytearray(12)
        control[0:2] = b"\x0a\x0a"
        if pc != 1:  # current / default values (pc 1 = changeable: nothing is)
            caching[2] = 0x04 if unit.write_cache else 0  # WCE
            control[2] = 0x04 if self.sense_format == "descriptor" else 0  # D_SENSE
        if pc == 3:
            raise _illegal(T.ASC_SAVING_PARAMETERS_NOT_SUPPORTED, "saved values")
        if page == 0x08:
            return bytes(caching)
        if page == 0x0A:
            return bytes(control)
        if page == 0x3F:
            return bytes(caching) + bytes(control)
        raise _illegal(why=f"mode page 0x{page:02x}")

    def _mode_sense(self, cmd: ScsiCommand, unit: ScsiLun) -> None:
        cdb = cmd.cdb
        six = cdb[0] == T.MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        llbaa = not six and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if subpage not in (0, 0xFF) or (subpage == 0xFF and page != 0x3F):
            raise _illegal(why=f"mode subpage 0x{subpage:02x}")
        pages = self._mode_pages(unit, page, pc)
        wp = 0x80 if unit.readonly else 0
        if dbd:
            desc = b""
        elif llbaa:
            desc = BE64.pack(unit.num_blocks) + bytes(4) + BE32.pack(unit.block_size)
        else:
            desc = BE32.pack(min(unit.num_blocks, 0xFFFFFFFF)) + b"\0" + BE32.pack(unit.block_size)[1:]
        if six:
            total = 4 + len(desc) + len(pages)
            head = bytes([total - 1, 0, wp, len(desc)])
            alloc = cdb[4]
        else:
            total = 8 + len(desc) + len(pages)
            head = BE16.pack(total - 2) + bytes([0, wp, 1 if llbaa else 0, 0]) + BE16.pack(len(desc))
            alloc = BE16.unpack_from(cdb, 7)[0]
        return self._data_in(cmd, head + desc + pages, alloc)

    _HANDLERS: dict[int, Callable[[ScsiTarget, ScsiCommand, ScsiLun], None]] = {
        T.TEST_UNIT_READY: _tur,
        T.START_STOP_UNIT: _start_stop,
        T.READ_CAPACITY_10: _read_capacity_10,
        T.SERVICE_ACTION_IN_16: _read_capacity_16,
        T.READ_6: _read,
        T.READ_10: _read,
        T.READ_12: _read,
        T.READ_16: _read,
        T.WRITE_6: _write,
        T.WRITE_10: _write,
        T.WRITE_12: _write,
        T.WRITE_16: _write,
        T.SYNCHRONIZE_CACHE_10: _sync_cache,
        T.SYNCHRONIZE_CACHE_16: _sync_cache,
        T.UNMAP: _unmap,
        T.WRITE_SAME_16: _write_same_16,
        T.MODE_SENSE_6: _mode_sense,
        T.MODE_SENSE_10: _mode_sense,
    }
