"""Command formats: what one block request of the benchmark looks like on the ring.

Theory of operation. The block engine (:mod:`pyvirtio.bench.block`) keeps
``iodepth`` requests of one shape in flight: a device-readable header, ``bs``
bytes of data and a device-writable status, pre-linked once per *slot*
(:class:`~pyvirtio.ring.fixed.FixedChains`). Per request it only stores an
address into the slot's header, resets the slot's status, and at completion
tests that status; for mixed workloads it also flips a slot between read and
write. A :class:`CommandFormat` is the device-specific part of that, chosen
once per run, so the engine's loops never ask which device they drive:

* **virtio-blk** (:class:`BlkFormat`, virtio 1.2 §5.2.6): a 16-byte header
  ``{le32 type, le32 ioprio, le64 sector}``, the data, one status byte. The
  address is the sector (512 bytes); a request is good if its status is
  VIRTIO_BLK_S_OK. Read = [header, data(W), status(W)], write = [header,
  data, status(W)].
* **virtio-scsi** (:class:`ScsiFormat`, virtio 1.2 §5.6.6): a
  ``virtio_scsi_cmd_req`` (LUN, tag, task attribute, a READ(16) / WRITE(16)
  CDB with a big-endian LBA in the LUN's blocks), the data, a
  ``virtio_scsi_cmd_resp``. Device-readable parts come first (§2.7.4.2), so
  the order differs by direction: read = [req, resp(W), data(W)], write =
  [req, data, resp(W)]. A command is good if the virtio response is OK, the
  SCSI status GOOD and the residual 0 (the status qualifier is not looked at).

What the loops use, per format (set up by :meth:`CommandFormat.layout`,
:meth:`~CommandFormat.chains` and :meth:`~CommandFormat.bind`). A slot's
chain has two shapes, a read and a write, given to the FixedChains once
(``chains`` and ``alternate``); turning a slot around is the ring's
:meth:`~pyvirtio.ring.fixed.FixedChains.use_alternate`:

``lba[lba_k * s + lba_o] = address``
    stores slot ``s``'s address (``lba_size`` bytes per unit). For blk
    ``lba`` is a memoryview of the headers (the sector word); for scsi an
    object whose ``__setitem__`` writes the big-endian LBA.
``status[s]`` / ``status[s] = unset``
    nonzero if slot ``s``'s last request failed (or was never completed);
    ``unset`` marks a request in flight. For blk a memoryview of the status
    bytes; for scsi an object reading the response word.
``set_direction(s, write)``
    turns slot ``s`` into a read or a write (header, descriptors, the bytes
    the device may write).
:meth:`CommandFormat.numpy_views`
    the same as NumPy arrays and vector operations for the NumPy loop.

A device whose status test needs Python code (scsi) pays for a Python
``__getitem__`` per request; blk's loops run as before, with memoryviews.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.drivers.scsi import ScsiDisk, slot_stride
from pyvirtio.errors import InvalidArgument
from pyvirtio.memory import Buffer
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.spec import blk as B
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

Chain = list[tuple[int, int, bool]]

@dataclass
class NumpyViews:
    """A format's per-slot fields as NumPy arrays (one element per slot) and vector operations."""

    #: Slot addresses (store ``address``: sectors for blk, LBAs for scsi).
    lba: Any
    #: Per-slot status (nonzero: failed), reset to ``unset`` when a request is posted.
    status: Any
    unset: int
    #: ``count_bad(status[slots])``: how many of those slots failed.
    count_bad: Callable[[Any], Any]
    #: ``set_directions(slots, write_mask)``: turn slots into reads / writes (mixed workloads).
    set_directions: Callable[[Any, Any], None]


class CommandFormat(ABC):
    """One device's block request format, bound to the calling thread's queue (see the module docstring)."""

    kind: str
    device: VirtioDevice
    vq: Virtqueue
    block_size: int
    capacity: int
    readonly: bool
    max_transfer: int
    #: Bytes per address unit in a request header.
    lba_size: int
    # Set by layout():
    lba: Any
    lba_k: int
    lba_o: int
    status: Any
    unset: int

    def __init__(self) -> None:
        self._bufs: list[Buffer] = []
        self.bs = 0
        self.nslots = 0
        self._write = False  # the direction of layout(): the first shape of every slot
        self.data_addr = 0

    # -- memory ---------------------------------------------------------------

    @abstractmethod
    def allocate(self, size: int, align: int) -> Buffer:
        """A buffer in the device's shared memory (thread-safe)."""

    @abstractmethod
    def free(self, buf: Buffer) -> None:
        """Give back a buffer from :meth:`allocate`."""

    def _own(self, size: int, align: int) -> Buffer:
        buf = self.allocate(size, align)
        self._bufs.append(buf)
        return buf

    def close(self) -> None:
        """Free the headers and statuses (the chains must have been detached)."""
        bufs, self._bufs = self._bufs, []
        for buf in bufs:
            self.free(buf)

    # -- requests -------------------------------------------------------------

    @abstractmethod
    def layout(self, nslots: int, bs: int, write: bool) -> None:
        """Allocate and fill ``nslots`` headers and statuses of ``bs``-byte requests, all reads or all writes."""

    def chains(self, data_addr: int) -> tuple[list[Chain], list[Chain]]:
        """Every slot's chain in the direction of :meth:`layout`, and in the other (after :meth:`layout`).

        Slot s moves the bytes at ``data_addr + bs * s``.
        """
        self.data_addr = data_addr
        write = self._write
        slots = range(self.nslots)
        return [self._chain(s, write) for s in slots], [self._chain(s, not write) for s in slots]

    @abstractmethod
    def _chain(self, s: int, write: bool) -> Chain:
        """Slot s's chain for a write (True) or a read."""

    def bind(self, fixed: FixedChains) -> None:
        """Learn the FixedChains holding :meth:`chains` (its alternate shape is the other direction)."""
        self._fixed = fixed

    @abstractmethod
    def set_direction(self, s: int, write: bool) -> None:
        """Make slot s a write (True) or a read: header, descriptors, writable bytes."""

    @abstractmethod
    def numpy_views(self) -> NumpyViews:
        """The per-slot fields as NumPy arrays, for the NumPy loop (after :meth:`bind`)."""

    @abstractmethod
    def describe(self, s: int) -> str:
        """Why slot s's last request failed, in words (slow path: first error of a run)."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Read through the driver's general API (verify's read-back)."""


# -- virtio-blk ----------------------------------------------------------------------------


class BlkFormat(CommandFormat):
    """virtio-blk requests on the calling thread's queue of a :class:`VirtioBlk`."""

    kind = "blk"
    lba_size = B.SECTOR_SIZE

    def __init__(self, blk: VirtioBlk) -> None:
        super().__init__()
        self.blk = blk
        self.device = blk.device
        self.vq = blk.thread_queue().vq
        self.block_size = blk.block_size
        self.capacity = blk.capacity
        self.readonly = blk.readonly
        # One data descriptor per request: at most size_max bytes.
        self.max_transfer = min(blk.max_transfer, blk.size_max) if blk.size_max else blk.max_transfer

    def allocate(self, size: int, align: int) -> Buffer:
        return self.blk.allocate(size, align=align)

    def free(self, buf: Buffer) -> None:
        self.blk.free(buf)

    def layout(self, nslots: int, bs: int, write: bool) -> None:
        self.bs, self.nslots, self._write = bs, nslots, write
        self.hdrs = self._own(16 * nslots, 64)
        self.status_buf = self._own(nslots, 64)
        h32 = self.hdrs.view.cast("I")
        for s in range(nslots):
            h32[4 * s] = B.T_OUT if write else B.T_IN
        self._h32 = h32
        self.lba, self.lba_k, self.lba_o = self.hdrs.view.cast("Q"), 2, 1  # the sector: le64 at offset 8
        self.status, self.unset = self.status_buf.view, 0xFF

    def _chain(self, s: int, write: bool) -> Chain:
        return [
            (self.hdrs.addr + 16 * s, 16, False),
            (self.data_addr + self.bs * s, self.bs, not write),
            (self.status_buf.addr + s, 1, True),
        ]

    def set_direction(self, s: int, write: bool) -> None:
        self._fixed.use_alternate(s, write != self._write)
        self._h32[4 * s] = B.T_OUT if write else B.T_IN

    def numpy_views(self) -> NumpyViews:
        import numpy as np

        nslots = self.nslots
        hdr_type = np.frombuffer(self.hdrs.view, dtype="<u4").reshape(nslots, 4)[:, 0]
        where = np.where
        flip = self._fixed.use_alternate_many
        first_write = self._write

        def set_directions(slots: Any, w: Any) -> None:
            hdr_type[slots] = where(w, B.T_OUT, B.T_IN)
            flip(slots, ~w if first_write else w, check=False)

        return NumpyViews(
            lba=np.frombuffer(self.hdrs.view, dtype="<u8").reshape(nslots, 2)[:, 1],
            status=np.frombuffer(self.status_buf.view, dtype=np.uint8),
            unset=0xFF,
            count_bad=np.count_nonzero,
            set_directions=set_directions,
        )

    def describe(self, s: int) -> str:
        kind, _prio, sector = B.OUTHDR.unpack_from(self.hdrs.view, 16 * s)
        st = self.status[s]
        name = "never written" if st == 0xFF else B.STATUS_NAMES.get(st, f"unknown status {st}")
        return f"{B.REQUEST_TYPE_NAMES.get(kind, str(kind))} at sector {sector}: {name}"

    def read(self, offset: int, length: int) -> bytes:
        return self.blk.read(offset, length)


# -- virtio-scsi ---------------------------------------------------------------------------

_BE64 = struct.Struct(">Q")
#: The response word (resid, status qualifier, status, response as one le64) without the qualifier.
_RESP_MASK = 0xFFFF_0000_FFFF_FFFF
#: Response byte 0xFF: "in flight" (no virtio-scsi response code is 0xFF).
_RESP_UNSET = 0xFF << 56
_CDB_OFF = 19  # offset of the CDB in virtio_scsi_cmd_req
_LBA_OFF = _CDB_OFF + 2  # READ(16) / WRITE(16): big-endian LBA in CDB bytes 2..9 (SBC-4 §5.16, §5.44)


class _BigEndianSlots:
    """``lba[s] = v``: the big-endian 64-bit field of slot s (scsi's LBA in the CDB)."""

    __slots__ = ("_view", "_base", "_stride", "_pack")

    def __init__(self, view: memoryview, base: int, stride: int) -> None:
        self._view, self._base, self._stride, self._pack = view, base, stride, _BE64.pack_into

    def __setitem__(self, s: int, value: int) -> None:
        self._pack(self._view, self._base + self._stride * s, value)

    def __getitem__(self, s: int) -> int:
        return int(_BE64.unpack_from(self._view, self._base + self._stride * s)[0])


class _ResponseSlots:
    """``status[s]``: slot s's response word without the qualifier (0: good); ``status[s] = v`` sets it."""

    __slots__ = ("_words", "_k", "_o")

    def __init__(self, words: memoryview, k: int, o: int) -> None:
        self._words, self._k, self._o = words, k, o

    def __getitem__(self, s: int) -> int:
        return int(self._words[self._k * s + self._o]) & _RESP_MASK

    def __setitem__(self, s: int, value: int) -> None:
        self._words[self._k * s + self._o] = value


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class ScsiFormat(CommandFormat):
    """READ(16) / WRITE(16) commands to one LUN, on the calling thread's request queue."""

    kind = "scsi"

    def __init__(self, disk: ScsiDisk) -> None:
        super().__init__()
        scsi = disk.scsi
        self.disk = disk
        self.scsi = scsi
        self.device = scsi.device
        self.vq = scsi.thread_queue().vq
        self.block_size = self.lba_size = disk.block_size
        self.capacity = disk.capacity
        self.readonly = disk.readonly
        self.max_transfer = disk.max_transfer
        self.req_size = 19 + scsi.cdb_size
        self.resp_size = 12 + scsi.sense_size
        # Slot layout: the request, then the response at 4 mod 8, so that its
        # resid / qualifier / status / response bytes are one aligned le64. The
        # stride is a power of two and the slots are aligned to it, so neither
        # header crosses a 4 KiB page in device address space (slot_stride: a
        # response split there makes QEMU's virtio-scsi put data into it).
        self.resp_off = _align(self.req_size, 8) + 4
        self.stride = slot_stride(self.resp_off + self.resp_size)

    def allocate(self, size: int, align: int) -> Buffer:
        return self.scsi.allocate(size, align)  # thread-safe: several bench threads share the pool

    def free(self, buf: Buffer) -> None:
        self.scsi.free(buf)

    def _resp_word(self, s: int) -> int:
        return self.stride * s + self.resp_off + 4

    def layout(self, nslots: int, bs: int, write: bool) -> None:
        if bs // self.block_size > 0xFFFFFFFF:
            raise InvalidArgument(f"bs {bs} is more blocks than one READ(16) moves")
        self.bs, self.nslots, self._write = bs, nslots, write
        stride = self.stride
        self.slots = self._own(stride * nslots, stride)
        view = self.slots.view
        self._view = view
        lun8 = S.lun_address(self.disk.target, self.disk.lun)
        cdb = bytearray(self.scsi.cdb_size)
        cdb[0] = T.WRITE_16 if write else T.READ_16
        cdb[10:14] = (bs // self.block_size).to_bytes(4, "big")  # transfer length, in blocks
        tag_base = (self.vq.index << 48) | (0xBE << 40)  # apart from the driver's tags (index << 48 | n)
        for s in range(nslots):
            base = stride * s
            S.CMD_REQ_HDR.pack_into(view, base, lun8, tag_base | s, S.S_SIMPLE, 0, 0)
            view[base + _CDB_OFF : base + self.req_size] = cdb
            S.CMD_RESP_HDR.pack_into(view, base + self.resp_off, 0, 0, 0, 0, 0xFF)
        self.lba, self.lba_k, self.lba_o = _BigEndianSlots(view, _LBA_OFF, stride), 1, 0
        self.status = _ResponseSlots(view.cast("Q"), stride // 8, self._resp_word(0) // 8)
        self.unset = _RESP_UNSET

    def _chain(self, s: int, write: bool) -> Chain:
        req = self.slots.addr + self.stride * s
        resp = (req + self.resp_off, self.resp_size, True)
        data = (self.data_addr + self.bs * s, self.bs, not write)
        return [(req, self.req_size, False), data, resp] if write else [(req, self.req_size, False), resp, data]

    def set_direction(self, s: int, write: bool) -> None:
        self._fixed.use_alternate(s, write != self._write)
        self._view[self.stride * s + _CDB_OFF] = T.WRITE_16 if write else T.READ_16

    def numpy_views(self) -> NumpyViews:
        import numpy as np

        nslots, stride = self.nslots, self.stride
        view = self._view
        opcode = np.ndarray((nslots,), dtype=np.uint8, buffer=view, offset=_CDB_OFF, strides=(stride,))
        where = np.where
        mask = np.uint64(_RESP_MASK)
        count_nonzero = np.count_nonzero
        flip = self._fixed.use_alternate_many
        first_write = self._write

        def set_directions(slots: Any, w: Any) -> None:
            flip(slots, ~w if first_write else w, check=False)
            opcode[slots] = where(w, T.WRITE_16, T.READ_16)

        def count_bad(words: Any) -> Any:
            return count_nonzero(words & mask)

        return NumpyViews(
            lba=np.ndarray((nslots,), dtype=">u8", buffer=view, offset=_LBA_OFF, strides=(stride,)),
            status=np.ndarray((nslots,), dtype="<u8", buffer=view, offset=self._resp_word(0), strides=(stride,)),
            unset=_RESP_UNSET,
            count_bad=count_bad,
            set_directions=set_directions,
        )

    def describe(self, s: int) -> str:
        base = self.stride * s
        view = self._view
        op = "WRITE(16)" if view[base + _CDB_OFF] == T.WRITE_16 else "READ(16)"
        lba = _BE64.unpack_from(view, base + _LBA_OFF)[0]
        sense_len, resid, _qual, status, response = S.CMD_RESP_HDR.unpack_from(view, base + self.resp_off)
        where = f"{op} at LBA {lba} of LUN {self.disk.target}:{self.disk.lun}"
        if response == 0xFF:
            return f"{where}: the device wrote no response"
        if response != S.S_OK:
            return f"{where}: response {S.RESPONSE_NAMES.get(response, str(response))}"
        if status != T.GOOD:
            start = base + self.resp_off + 12
            sense = T.parse_sense(view[start : start + min(sense_len, self.scsi.sense_size)])
            why = T.STATUS_NAMES.get(status, f"status 0x{status:02x}")
            return f"{where}: {why}" + (f" ({sense})" if sense is not None else "")
        return f"{where}: short transfer, residual {resid} bytes"

    def read(self, offset: int, length: int) -> bytes:
        return self.disk.read(offset, length)


def command_format(target: VirtioBlk | ScsiDisk | CommandFormat) -> CommandFormat:
    """The format for ``target``: a VirtioBlk, one LUN (``scsi.disk(t, l)``), or a format already."""
    if isinstance(target, CommandFormat):
        return target
    if isinstance(target, VirtioBlk):
        return BlkFormat(target)
    if isinstance(target, ScsiDisk):
        return ScsiFormat(target)
    raise InvalidArgument(f"cannot benchmark a {type(target).__name__}: a VirtioBlk or a ScsiDisk")


__all__ = ["BlkFormat", "CommandFormat", "NumpyViews", "ScsiFormat", "command_format"]
