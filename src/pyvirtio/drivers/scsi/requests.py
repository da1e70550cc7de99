"""virtio-scsi commands on the request queues (virtio 1.2 §5.6.6.1): the request engine's hooks.

Theory of operation. A request is ``virtio_scsi_cmd_req`` (LUN, tag, task
attribute, CDB padded to ``cdb_size``), data-out, then
``virtio_scsi_cmd_resp`` (sense_len, resid, status, response, ``sense_size``
bytes of sense) and data-in. Header and response live in the request's slot
(:class:`~pyvirtio.drivers.requests.QueueContext`: the response at an 8-byte
boundary after the header; slots of a power-of-two size aligned to it, so
that neither header crosses a 4 KiB page, see :data:`HEADER_PAGE`); data is
bounced through the shared pool unless a :class:`~pyvirtio.memory.Buffer`
from the pool is given. Each queue hands
out its own tags (queue index in the top 16 bits).

Every completion is checked: a response the device never wrote (a sentinel
stays in place), an unknown response code, a sense length beyond
``sense_size`` or a residual beyond the buffer are device faults
(:class:`~pyvirtio.errors.DeviceProtocolError` on that request). Then the
virtio response code (BAD_TARGET and INCORRECT_LUN: :class:`LunNotFound`;
any other non-OK code is an error, where SPDK ignores it) and the SCSI
status: CHECK CONDITION sense, fixed or descriptor format, becomes a
:class:`ScsiError` carrying key, ASC, ASCQ and their names. A READ / WRITE
that moved fewer bytes than asked is an error, never silent success. A
command that meets UNIT ATTENTION is sent again, with a fresh tag and the
same slot, at most ``ua_retries`` times (after a reset or a LUN change
every initiator sees one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.requests import Chain, QueueContext, RequestEngine
from pyvirtio.errors import DeviceProtocolError, InvalidArgument, LunNotFound, QueueFull, ScsiError
from pyvirtio.memory import Buffer
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

#: Times an I/O command is sent again after UNIT ATTENTION.
UA_RETRIES = 3
#: Largest CDB and sense buffer sizes accepted from the config (a hostile device cannot make slots huge).
MAX_CDB_SIZE = 256
MAX_SENSE_SIZE = 256

#: A response code no device writes: "the response was never written".
RESP_SENTINEL = 0xFF

#: No request header or response may cross a boundary of this many bytes in device address space.
#: QEMU's virtio-scsi, unless VIRTIO_F_ANY_LAYOUT (a legacy bit, virtio 1.2 §6.3) is negotiated, takes
#: the first mapped piece of the device-writable buffers as the whole response (and of the readable
#: ones as the whole request): its "old BIOS padding" workaround, kept for virtio 1.x devices too. Behind
#: an IOMMU (vfio, ``iommu_platform=on``) QEMU maps a buffer one IOMMU page at a time, so a response
#: that crosses a 4 KiB page arrives as two pieces: the device then moves data into the response's
#: tail, the data buffer gets the rest shifted, and the residual comes back negative (-104 for a
#: 108-byte response cut 4 bytes in). Keeping each header inside one page avoids that on every device.
HEADER_PAGE = 4096


def slot_stride(nbytes: int) -> int:
    """The size of a header slot holding ``nbytes``: a power of two, at least 64, at most :data:`HEADER_PAGE`.

    Slots of this size in a block aligned to it never cross a :data:`HEADER_PAGE`
    boundary, whatever the block's address.
    """
    stride = 64
    while stride < nbytes:
        stride *= 2
    if stride > HEADER_PAGE:
        raise InvalidArgument(f"a {nbytes}-byte SCSI header slot cannot fit one {HEADER_PAGE}-byte page")
    return stride


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(eq=False)
class ScsiRequest:
    """One SCSI command: build with :class:`~pyvirtio.drivers.scsi.ScsiDisk` helpers or directly, then ``run``."""

    target: int
    lun: int
    cdb: bytes
    data_out: bytes | memoryview | Buffer | None = None
    data_in: int = 0  # bytes of data-in buffer
    into: Buffer | None = None  # zero copy data-in
    offset: int = 0  # for error messages: the byte range on the LUN
    length: int = 0
    task_attr: int = S.S_SIMPLE
    ua_retries: int = UA_RETRIES
    full_transfer: bool = False  # a residual is an error (READ / WRITE)
    # Filled in by the driver:
    tag: int = 0
    response: int | None = None
    status: int | None = None
    sense: bytes = b""
    resid: int = 0
    data: bytes | None = None
    written: int = 0
    attempts: int = 0
    done: bool = False
    error: BaseException | None = None
    slot: int = field(default=-1, repr=False)  # the engine's (drivers/requests.py)
    waiter: Any = field(default=None, repr=False)
    _bounce: list[Buffer] = field(default_factory=list, repr=False)
    _segs: Chain = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return T.opcode_name(self.cdb)

    @property
    def sense_data(self) -> T.Sense | None:
        return T.parse_sense(self.sense)

    @property
    def ok(self) -> bool:
        return self.done and self.exception() is None

    @property
    def transferred(self) -> int:
        """Data-in bytes the device says it moved (buffer length minus residual)."""
        return max(0, self.data_in - self.resid) if self.data_in else 0

    def exception(self) -> BaseException | None:
        """The error this request completed with, or None."""
        if self.error is not None:
            return self.error
        if self.response is None:
            return None
        kw: dict[str, Any] = {"offset": self.offset, "length": self.length}
        if self.response in (S.S_BAD_TARGET, S.S_INCORRECT_LUN):
            return LunNotFound(self.name, self.target, self.lun, response=self.response, **kw)
        if self.response != S.S_OK:
            return ScsiError(self.name, self.target, self.lun, response=self.response, **kw)
        if self.status != T.GOOD:
            sense = self.sense_data
            cls = ScsiError
            if sense is not None and (sense.key, sense.asc, sense.ascq) == (T.ILLEGAL_REQUEST, 0x25, 0x00):
                cls = LunNotFound  # LOGICAL UNIT NOT SUPPORTED
            return cls(self.name, self.target, self.lun, status=self.status or 0, sense=sense, **kw)
        if self.full_transfer and self.resid:
            return ScsiError(
                self.name,
                self.target,
                self.lun,
                detail=f"short transfer: the device left {self.resid} of {self.length} bytes",
                **kw,
            )
        return None

    def check(self) -> None:
        """Raise the request's error (ScsiError / LunNotFound / transport error) if it failed."""
        exc = self.exception()
        if exc is not None:
            raise exc


class ScsiRequestQueues(RequestEngine[ScsiRequest]):
    """The request queues of a virtio-scsi device: slot layout, building and completing commands."""

    request_noun = "SCSI requests"
    __slots__ = ("_req_size", "_resp_off", "_resp_size", "cdb_size", "sense_size", "slot_size")

    def __init__(
        self, device: VirtioDevice, *, poll: str, timeout: float | None, cdb_size: int, sense_size: int
    ) -> None:
        super().__init__(device, poll=poll, timeout=timeout, request_type=ScsiRequest)
        self.cdb_size = cdb_size
        self.sense_size = sense_size
        # Slot layout: request header, then the response at an 8-byte boundary; slots of a power-of-two
        # size, which the request engine aligns to their size: no header crosses a page (HEADER_PAGE).
        self._req_size = 19 + cdb_size
        self._resp_size = 12 + sense_size
        self._resp_off = _align(self._req_size, 8)
        self.slot_size = slot_stride(self._resp_off + self._resp_size)

    # -- sending -----------------------------------------------------------------------

    def execute(self, req: ScsiRequest) -> ScsiRequest:
        """Submit one request and wait for it; the caller inspects response / status / sense.

        Raises only what keeps the request from completing (transport and
        device-protocol errors), not its SCSI status.
        """
        self.run(req, check=False)
        if req.error is not None:
            raise req.error
        return req

    def _bounce(self, req: ScsiRequest, size: int) -> Buffer:
        buf = self.allocate(max(size, 1), align=512 if size >= 512 else 8)
        if not self.in_device_memory(buf):
            self.free(buf)
            raise QueueFull(
                f"{req.name}: no room for a {size}-byte buffer in the device's shared memory now; "
                "reap requests in flight or use smaller ones"
            )
        req._bounce.append(buf)
        return buf

    def _check_user_buffer(self, req: ScsiRequest, buf: Buffer) -> None:
        if not self.in_device_memory(buf):
            raise InvalidArgument(
                f"{req.name}: {buf!r} is not in the shared memory the device knows (the pool grew after start)"
            )

    def _build(self, ctx: QueueContext, req: ScsiRequest, slot: int) -> Chain:
        if len(req.cdb) > self.cdb_size:
            raise InvalidArgument(f"{req.name}: CDB of {len(req.cdb)} bytes, the device takes {self.cdb_size}")
        out_segs: Chain = []
        in_segs: Chain = []
        dout = req.data_out
        if isinstance(dout, Buffer):
            self._check_user_buffer(req, dout)
            out_segs.append((dout.addr, len(dout), False))
        elif dout is not None and len(dout):
            buf = self._bounce(req, len(dout))
            buf.view[: len(dout)] = dout
            out_segs.append((buf.addr, len(dout), False))
        if req.data_in:
            if req.into is not None:
                self._check_user_buffer(req, req.into)
                in_segs.append((req.into.addr, req.data_in, True))
            else:
                buf = self._bounce(req, req.data_in)
                in_segs.append((buf.addr, req.data_in, True))
        base = self.slot_size * slot
        addr = ctx.slots.addr + base
        ctx.slot_view[base + 19 : base + self._req_size] = req.cdb.ljust(self.cdb_size, b"\0")
        req._segs = [(addr, self._req_size, False), *out_segs, (addr + self._resp_off, self._resp_size, True), *in_segs]
        self._header(ctx, req, slot)
        return req._segs

    def _header(self, ctx: QueueContext, req: ScsiRequest, slot: int) -> None:
        """Write the header (a fresh tag) and the response sentinel of ``slot``."""
        base = self.slot_size * slot
        sv = ctx.slot_view
        tag = ctx.next_tag
        ctx.next_tag = tag + 1
        req.tag = tag
        S.CMD_REQ_HDR.pack_into(sv, base, S.lun_address(req.target, req.lun), tag, req.task_attr, 0, 0)
        S.CMD_RESP_HDR.pack_into(sv, base + self._resp_off, 0, 0, 0, 0, RESP_SENTINEL)

    def _drop_bounce(self, req: ScsiRequest) -> None:
        for buf in req._bounce:
            self.free(buf)
        req._bounce = []

    def _complete(self, ctx: QueueContext, req: ScsiRequest, written: int) -> bool:
        base = self.slot_size * req.slot + self._resp_off
        sv = ctx.slot_view
        sense_len, resid, _qual, status, response = S.CMD_RESP_HDR.unpack_from(sv, base)
        req.written = written
        req.attempts += 1  # one more time the device answered it
        where = f"{req.name} on {req.target}:{req.lun}"
        error: BaseException | None = None
        if response == RESP_SENTINEL:
            error = DeviceProtocolError(f"{where}: the device did not write a response")
        elif response not in S.RESPONSE_NAMES:
            error = DeviceProtocolError(f"{where}: invalid virtio-scsi response {response}")
        elif sense_len > self.sense_size:
            error = DeviceProtocolError(f"{where}: sense_len {sense_len} exceeds sense_size {self.sense_size}")
        else:
            limit = req.data_in if req.data_in else (len(req.data_out) if req.data_out is not None else 0)
            if resid > limit:
                error = DeviceProtocolError(f"{where}: residual {resid} exceeds the {limit}-byte buffer")
        if error is None:
            req.response = response
            req.status = status
            req.resid = resid
            req.sense = bytes(sv[base + 12 : base + 12 + sense_len]) if sense_len else b""
            if (
                response == S.S_OK
                and status == T.CHECK_CONDITION
                and req.attempts <= req.ua_retries
                and (sense := T.parse_sense(req.sense)) is not None
                and sense.key == T.UNIT_ATTENTION
            ):
                try:
                    self._header(ctx, req, req.slot)
                    self._add_chain(ctx, req, req._segs)
                    return False
                except QueueFull:
                    pass  # reported as the UNIT ATTENTION it is
        else:
            req.error = error
            req.response = response
        if req._bounce:
            if req.data_in and req.into is None and error is None and response == S.S_OK:
                req.data = bytes(req._bounce[-1].view[: req.transferred])
            self._drop_bounce(req)
        return True

    def _describe(self, req: ScsiRequest) -> str:
        return f"{req.name} on {req.target}:{req.lun}"


__all__ = [
    "HEADER_PAGE",
    "MAX_CDB_SIZE",
    "MAX_SENSE_SIZE",
    "RESP_SENTINEL",
    "UA_RETRIES",
    "ScsiRequest",
    "ScsiRequestQueues",
    "slot_stride",
]
