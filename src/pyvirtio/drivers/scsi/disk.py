"""One virtio-scsi LUN as a disk: the block facade over SCSI commands (SBC-3).

Theory of operation. :class:`ScsiDisk` (``scsi.disk(target, lun)``) is a
:class:`~pyvirtio.drivers.block.BlockDevice`, so it has the checks and the
sync / async calls of a virtio-blk device, run on its host adapter's request
queues. Its requests: READ / WRITE (10), or (16) when the LBA or length needs
it, at most ``max_transfer`` bytes each (the LUN's block limits, the
device's max_sectors and half the shared memory); UNMAP split by the block
limits (blocks per descriptor, descriptors per command); SYNCHRONIZE CACHE
(10), or (16) on a LUN beyond 2^32 blocks or one that refuses (10) (SPDK
advertises flush and fails it); ``write_zeroes`` is WRITE SAME(16) of a zero
block, with the UNMAP bit when asked and the LUN reports LBPWS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvirtio.drivers.block import BlockDevice
from pyvirtio.drivers.scsi.requests import ScsiRequest
from pyvirtio.drivers.scsi.scan import LunInfo
from pyvirtio.errors import InvalidArgument
from pyvirtio.memory import Buffer
from pyvirtio.spec import t10 as T
from pyvirtio.spec import t10_cdb as C

if TYPE_CHECKING:
    from pyvirtio.drivers.scsi.driver import VirtioScsi


class ScsiDisk(BlockDevice[ScsiRequest]):
    """Block I/O on one LUN of a :class:`~pyvirtio.drivers.scsi.VirtioScsi` (byte offsets, block-aligned)."""

    what = "LUN"

    def __init__(self, scsi: VirtioScsi, info: LunInfo) -> None:
        self.scsi = scsi
        self.engine = scsi
        self.info = info
        self.target = info.target
        self.lun = info.lun
        self.block_size = info.block_size
        self.capacity = info.capacity
        self.readonly = info.readonly
        self.readonly_why = f"LUN {self.target}:{self.lun} is write-protected"
        limit = scsi.max_transfer_bytes
        if info.max_transfer_blocks:
            limit = min(limit, info.max_transfer_blocks * info.block_size)
        #: The largest single READ / WRITE, in bytes.
        self.max_transfer = max(limit // info.block_size, 1) * info.block_size
        self.can_flush = True
        self.can_unmap = info.unmap
        self.can_discard = info.unmap
        self.can_write_zeroes = True
        self._sync16 = info.num_blocks > 1 << 32

    def __repr__(self) -> str:
        return f"ScsiDisk({self.target}:{self.lun}, {self.capacity} bytes, block {self.block_size})"

    # -- request builders (one command each)

    def read_request(self, offset: int, length: int, into: Buffer | None = None) -> ScsiRequest:
        self.check_data("read", offset, length)
        if into is not None and len(into) < length:
            raise InvalidArgument(f"read: buffer of {len(into)} bytes for {length}")
        bs = self.block_size
        cdb = C.rw_cdb(False, offset // bs, length // bs)
        return ScsiRequest(
            self.target, self.lun, cdb, data_in=length, into=into, offset=offset, length=length, full_transfer=True
        )

    def write_request(self, offset: int, data: bytes | memoryview | Buffer) -> ScsiRequest:
        self.check_writable("write")
        self.check_data("write", offset, len(data))
        bs = self.block_size
        cdb = C.rw_cdb(True, offset // bs, len(data) // bs)
        return ScsiRequest(
            self.target, self.lun, cdb, data_out=data, offset=offset, length=len(data), full_transfer=True
        )

    def flush_request(self) -> ScsiRequest:
        cdb = C.SYNCHRONIZE_CACHE_16_CDB if self._sync16 else C.SYNCHRONIZE_CACHE_10_CDB
        return ScsiRequest(self.target, self.lun, cdb)

    def unmap_requests(self, offset: int, length: int) -> list[ScsiRequest]:
        """UNMAP commands covering the range, split by the block limits."""
        self.check_writable("unmap")
        self._check_op("unmap", offset, length)
        info = self.info
        if not self.can_unmap:
            raise InvalidArgument(f"unmap: LUN {self.target}:{self.lun} does not support UNMAP (no LBPU in VPD 0xB2)")
        bs = self.block_size
        per_desc = min(info.max_unmap_blocks or 0xFFFFFFFF, 0xFFFFFFFF)
        per_cmd = info.max_unmap_descriptors if info.max_unmap_descriptors not in (0, 0xFFFFFFFF) else 1
        per_cmd = min(per_cmd, C.MAX_UNMAP_DESCRIPTORS)
        lba, blocks = offset // bs, length // bs
        extents: list[tuple[int, int]] = []
        while blocks:
            n = min(blocks, per_desc)
            extents.append((lba, n))
            lba += n
            blocks -= n
        out = []
        for i in range(0, len(extents), per_cmd):
            group = extents[i : i + per_cmd]
            cdb, params = C.unmap_command(group)
            first, total = group[0][0] * bs, sum(n for _a, n in group) * bs
            out.append(ScsiRequest(self.target, self.lun, cdb, data_out=params, offset=first, length=total))
        return out

    def discard_requests(self, offset: int, length: int) -> list[ScsiRequest]:
        return self.unmap_requests(offset, length)

    def write_zeroes_requests(self, offset: int, length: int, unmap: bool = False) -> list[ScsiRequest]:
        """WRITE SAME(16) of a zero block over the range (UNMAP bit when asked and supported)."""
        self.check_writable("write-zeroes")
        self._check_op("write-zeroes", offset, length)
        bs = self.block_size
        per = min(self.info.max_write_same_blocks or 0xFFFFFFFF, 0xFFFFFFFF)
        with_unmap = unmap and self.info.write_same_unmap
        lba, blocks = offset // bs, length // bs
        zero = bytes(bs)
        out = []
        while blocks:
            n = min(blocks, per)
            cdb = C.write_same_16_cdb(lba, n, with_unmap)
            out.append(ScsiRequest(self.target, self.lun, cdb, data_out=zero, offset=lba * bs, length=n * bs))
            lba += n
            blocks -= n
        return out

    def _read_result(self, req: ScsiRequest) -> bytes:
        return req.data or b""

    # -- what differs from the facade

    def flush(self) -> None:
        """SYNCHRONIZE CACHE; (16) after a LUN refuses (10) with INVALID COMMAND OPERATION CODE."""
        req = self.flush_request()
        self.scsi.execute(req)
        sense = req.sense_data
        if not self._sync16 and sense is not None and (sense.key, sense.asc) == (T.ILLEGAL_REQUEST, 0x20):
            self._sync16 = True  # no SYNCHRONIZE CACHE(10): try (16)
            req = self.scsi.run(self.flush_request())
        req.check()

    def unmap(self, offset: int, length: int) -> None:
        """UNMAP the range (the facade's :meth:`discard`)."""
        self.discard(offset, length)

    async def aunmap(self, offset: int, length: int) -> None:
        await self.adiscard(offset, length)


__all__ = ["ScsiDisk"]
