"""The virtio-blk device model of the embedded back end (virtio 1.2 §5.2).

:class:`BlockBackend` executes virtio-blk requests read from a
:class:`~pyvirtio.ring.device_side.Chain` against a storage object: a RAM
buffer or a file (``preadv``/``pwritev`` on the fd). It knows nothing of
sockets: the vhost-user server (:mod:`pyvirtio.backends.server`) and the
loopback transport both feed it chains.

Nothing from the driver is trusted: the header must be exactly the
16-byte ``virtio_blk_outhdr`` in the readable part, the status byte the
last writable byte, sector ranges inside the capacity, data lengths
multiples of 512, discard / write-zeroes segments well formed. A bad
request completes with ``VIRTIO_BLK_S_IOERR`` (or ``UNSUPP`` for an unknown
type) and a log line, and the device goes on; a chain so malformed that it
has no status byte is completed with length 0.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

from pyvirtio.backends.model import RING_FEATURES
from pyvirtio.backends.sglist import skip
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import blk as B
from pyvirtio.spec.common import DEVICE_ID_BLOCK
from pyvirtio.transport.loopback import LoopbackTransport

log = logging.getLogger("pyvirtio.backends.blk")

SECTOR = B.SECTOR_SIZE


CHUNK = 1 << 16  # RAM disk allocation unit


class Storage:
    """Byte-addressed storage: a sparse RAM disk or a file.

    The RAM disk holds only what was written, in 64 KiB chunks allocated on
    first write; unwritten ranges read as zeroes. A 1 GiB disk costs nothing
    up front, and a random read does not fault a fresh page in (measured:
    first-touch page faults of a flat anonymous mapping were most of the
    back end's time under a random-read benchmark).
    """

    def __init__(self, size: int | None = None, path: str | None = None, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.fd = -1
        self.chunks: dict[int, bytearray] | None = None
        if path is not None:
            flags = os.O_RDONLY if readonly else os.O_RDWR
            if size is not None and not readonly:
                flags |= os.O_CREAT
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
            if size is not None and not readonly and os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            self.size = os.fstat(self.fd).st_size
        else:
            if not size or size <= 0:
                raise ValueError("a RAM disk needs a positive size")
            self.size = size
            self.chunks = {}
        self.size -= self.size % SECTOR

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(chunk index, offset in chunk, bytes) covering offset..offset+length."""
        out = []
        while length > 0:
            idx, off = divmod(offset, CHUNK)
            n = min(CHUNK - off, length)
            out.append((idx, off, n))
            offset += n
            length -= n
        return out

    def readinto(self, bufs: list[memoryview], offset: int) -> None:
        chunks = self.chunks
        if chunks is not None:
            for b in bufs:
                n = len(b)
                idx, off = divmod(offset, CHUNK)
                if off + n <= CHUNK:  # the common case: one chunk
                    c = chunks.get(idx)
                    if c is None:
                        b[:] = _ZEROES[:n] if n <= CHUNK else bytes(n)
                    else:
                        b[:] = memoryview(c)[off : off + n]
                else:
                    pos = 0
                    for idx, off, k in self._pieces(offset, n):
                        c = chunks.get(idx)
                        b[pos : pos + k] = _ZEROES[:k] if c is None else memoryview(c)[off : off + k]
                        pos += k
                offset += n
        else:
            want = sum(len(b) for b in bufs)
            got = os.preadv(self.fd, bufs, offset)
            if got != want:
                # Short read (file shorter than its size said): zero-fill the rest.
                pos = 0
                for b in bufs:
                    n = len(b)
                    if pos + n > got:
                        start = max(0, got - pos)
                        b[start:] = bytes(n - start)
                    pos += n

    def writefrom(self, bufs: list[memoryview], offset: int) -> None:
        chunks = self.chunks
        if chunks is not None:
            for b in bufs:
                pos = 0
                for idx, off, k in self._pieces(offset, len(b)):
                    c = chunks.get(idx)
                    if c is None:
                        c = chunks[idx] = bytearray(CHUNK)
                    c[off : off + k] = b[pos : pos + k]
                    pos += k
                offset += len(b)
        else:
            want = sum(len(b) for b in bufs)
            done = 0
            while done < want:
                n = os.pwritev(self.fd, skip(bufs, done), offset + done)
                if n <= 0:
                    raise OSError("short write")
                done += n

    def zero(self, offset: int, length: int) -> None:
        chunks = self.chunks
        if chunks is not None:
            for idx, off, k in self._pieces(offset, length):
                if k == CHUNK:
                    chunks.pop(idx, None)  # a whole chunk: give the memory back
                elif idx in chunks:
                    chunks[idx][off : off + k] = _ZEROES[:k]
        else:
            chunk = bytes(min(length, 1 << 20))
            pos = 0
            while pos < length:
                n = min(len(chunk), length - pos)
                os.pwrite(self.fd, chunk[:n], offset + pos)
                pos += n

    def resize(self, size: int) -> None:
        """Change the size to ``size`` bytes (whole sectors); what lies beyond a new, smaller end is gone.

        A RAM disk drops (zeroes) the bytes past the end, so a later growth reads
        zeroes there; a file is truncated or extended. A read-only storage cannot
        change. The models built over it keep their own view of the size (the
        scsi LUN resizes through :meth:`~pyvirtio.backends.scsi_target.ScsiLun.resize`).
        """
        size -= size % SECTOR
        if size <= 0:
            raise ValueError(f"a storage needs at least one {SECTOR}-byte sector, got {size} bytes")
        if self.readonly:
            raise ValueError("a read-only storage cannot be resized")
        if self.chunks is not None:
            if size < self.size:
                self.zero(size, self.size - size)
        else:
            os.ftruncate(self.fd, size)
        self.size = size

    def flush(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.chunks is not None:
            self.chunks.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ZEROES = memoryview(bytes(CHUNK))


class BlockBackend:
    """virtio-blk request execution over a :class:`Storage`."""

    def __init__(
        self,
        storage: Storage,
        *,
        num_queues: int = 1,
        seg_max: int = 126,
        serial: str = "pyvirtio",
        max_discard_sectors: int = 1 << 22,
        max_write_zeroes_sectors: int = 1 << 22,
        max_discard_seg: int = 16,
    ) -> None:
        self.storage = storage
        self.num_queues = num_queues
        self.seg_max = seg_max
        self.serial = serial.encode()[: B.ID_BYTES]
        self.max_discard_sectors = max_discard_sectors
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_discard_seg = max_discard_seg
        self.capacity = storage.size // SECTOR
        self.errors = 0

    @property
    def readonly(self) -> bool:
        return self.storage.readonly

    def features(self) -> int:
        f = (
            RING_FEATURES
            | (1 << B.F_SEG_MAX)
            | (1 << B.F_BLK_SIZE)
            | (1 << B.F_FLUSH)
            | (1 << B.F_MQ)
            | (1 << B.F_DISCARD)
            | (1 << B.F_WRITE_ZEROES)
        )
        if self.readonly:
            f |= 1 << B.F_RO
        return f

    def config(self) -> bytes:
        cfg = bytearray(B.CONFIG_SIZE_V11)
        struct.pack_into("<Q", cfg, 0, self.capacity)
        struct.pack_into("<I", cfg, 12, self.seg_max)
        struct.pack_into("<I", cfg, 20, SECTOR)
        struct.pack_into("<H", cfg, 34, self.num_queues)
        struct.pack_into("<III", cfg, 36, self.max_discard_sectors, self.max_discard_seg, 1)
        struct.pack_into("<II", cfg, 48, self.max_write_zeroes_sectors, self.max_discard_seg)
        cfg[56] = 1  # write_zeroes_may_unmap
        return bytes(cfg)

    def info(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity * SECTOR,
            "readonly": self.readonly,
            "file": self.storage.path,
            "num_queues": self.num_queues,
        }

    # -- requests ---------------------------------------------------------------

    def handle(self, queue: int, chain: Chain) -> int:
        """Execute one request; returns the number of bytes written into the chain."""
        writable = chain.writable
        if not writable or len(writable[-1]) < 1:
            self._bad(queue, chain.head, "no status byte")
            return 0
        last = writable[-1]
        status_at = len(last) - 1
        data_in = writable[:-1]  # (a new list: the chain's own is not touched)
        if status_at:
            data_in.append(last[:status_at])
        readable = chain.readable
        hdr = readable[0] if readable else None
        raw: bytes | memoryview
        if hdr is None or len(hdr) < B.OUTHDR_SIZE:
            # A header split over several descriptors is allowed (ANY_LAYOUT), gather it.
            raw = chain.read_all()[: B.OUTHDR_SIZE]
            if len(raw) < B.OUTHDR_SIZE:
                last[status_at] = B.S_IOERR
                self._bad(queue, chain.head, f"header of {len(raw)} bytes, need 16")
                return 1
            data_out = skip(list(readable), B.OUTHDR_SIZE)
        else:
            raw = hdr
            data_out = readable[1:]
            if len(hdr) > B.OUTHDR_SIZE:
                data_out.insert(0, hdr[B.OUTHDR_SIZE :])
        rtype, _ioprio, sector = B.OUTHDR.unpack_from(raw, 0)
        try:
            status, written = self._execute(queue, chain.head, rtype, sector, data_out, data_in)
        except OSError as exc:
            # The storage failed (EIO, ENOSPC...): the request fails, the device goes on.
            self._bad(queue, chain.head, f"request type {rtype} at sector {sector}: {exc}")
            status, written = B.S_IOERR, 0
        last[status_at] = status
        return written + 1

    def _bad(self, queue: int, head: int, why: str) -> None:
        self.errors += 1
        log.warning("queue %d request %d rejected: %s", queue, head, why)

    def _execute(
        self,
        queue: int,
        head: int,
        rtype: int,
        sector: int,
        data_out: list[memoryview],
        data_in: list[memoryview],
    ) -> tuple[int, int]:
        if rtype == B.T_IN:
            length = sum(map(len, data_in))
            if not self._range_ok(queue, head, "read", sector, length):
                return B.S_IOERR, 0
            self.storage.readinto(data_in, sector * SECTOR)
            return B.S_OK, length
        if rtype == B.T_OUT:
            length = sum(map(len, data_out))
            if self.readonly:
                self._bad(queue, head, "write to a read-only device")
                return B.S_IOERR, 0
            if not self._range_ok(queue, head, "write", sector, length):
                return B.S_IOERR, 0
            self.storage.writefrom(data_out, sector * SECTOR)
            return B.S_OK, 0
        if rtype == B.T_FLUSH:
            self.storage.flush()
            return B.S_OK, 0
        if rtype == B.T_GET_ID:
            ident = self.serial.ljust(B.ID_BYTES, b"\0")
            n = 0
            for b in data_in:
                take = min(len(b), len(ident) - n)
                b[:take] = ident[n : n + take]
                n += take
            return B.S_OK, n
        if rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
            return self._discard_wz(queue, head, rtype, data_out), 0
        self._bad(queue, head, f"unsupported request type {rtype}")
        return B.S_UNSUPP, 0

    def _range_ok(self, queue: int, head: int, op: str, sector: int, length: int) -> bool:
        if length % SECTOR:
            self._bad(queue, head, f"{op} length {length} is not a multiple of 512")
            return False
        if sector + length // SECTOR > self.capacity:
            end = f"{sector}+{length // SECTOR}"
            self._bad(queue, head, f"{op} of sectors {end} beyond capacity {self.capacity}")
            return False
        return True

    def _discard_wz(self, queue: int, head: int, rtype: int, data_out: list[memoryview]) -> int:
        op = "discard" if rtype == B.T_DISCARD else "write-zeroes"
        if self.readonly:
            self._bad(queue, head, f"{op} on a read-only device")
            return B.S_IOERR
        raw = b"".join(data_out)
        if not raw or len(raw) % B.DISCARD_WZ_SIZE:
            self._bad(queue, head, f"{op} payload of {len(raw)} bytes")
            return B.S_IOERR
        nseg = len(raw) // B.DISCARD_WZ_SIZE
        if nseg > self.max_discard_seg:
            self._bad(queue, head, f"{op} with {nseg} segments > {self.max_discard_seg}")
            return B.S_IOERR
        limit = self.max_discard_sectors if rtype == B.T_DISCARD else self.max_write_zeroes_sectors
        segs = [B.DISCARD_WZ.unpack_from(raw, i * B.DISCARD_WZ_SIZE) for i in range(nseg)]
        for sector, num, flags in segs:
            if num > limit or sector + num > self.capacity:
                self._bad(queue, head, f"{op} segment {sector}+{num} out of range")
                return B.S_IOERR
            if flags & ~B.DWZ_F_UNMAP or (rtype == B.T_DISCARD and flags):
                self._bad(queue, head, f"{op} segment flags 0x{flags:x} invalid")
                return B.S_UNSUPP
        for sector, num, _flags in segs:
            # Discard of RAM or a file: the data reads back as zeroes afterwards.
            self.storage.zero(sector * SECTOR, num * SECTOR)
        return B.S_OK


def loopback_blk(
    backend: BlockBackend, *, queue_size: int = 256, auto: bool = True
) -> LoopbackTransport:
    """An in-process virtio-blk device over ``backend`` (tests, examples, ring benchmarks)."""
    return LoopbackTransport(
        device_id=DEVICE_ID_BLOCK,
        features=backend.features(),
        config=backend.config(),
        num_queues=backend.num_queues,
        queue_size=queue_size,
        default_handler=backend.handle,
        auto=auto,
    )
