"""Device types for the checker: which rings a minimal frontend starts, and one request of each kind.

vhost-user has no message that says what device a back end is; the user
says (``--device``) or :func:`detect` guesses from the feature bits and the
config space (documented heuristics, printed with the result). Each
:class:`Device` names its rings (virtio 1.2 §5.2.2, §5.6.2, §5.1.2, §5.11.2)
and provides ``io``: one ordinary request that must succeed, used by the
data, hostile and lifecycle rules as "the back end still works". The
request builders here lay requests out in the probe's memory and read what
came back; the rules judge it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.conformance.harness import BackendInfo, PackedRing, Part, Probe, SplitRing
from pyvirtio.errors import UsageError
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import DEVICE_ID_BLOCK, DEVICE_ID_FS, DEVICE_ID_NET, DEVICE_ID_SCSI

__all__ = [
    "DEVICES",
    "Device",
    "FUSE_INIT",
    "blk_request",
    "detect",
    "fuse_init",
    "fuse_post",
    "net_frame",
    "net_tx",
    "scsi_command",
]

Ring = SplitRing | PackedRing

#: FUSE opcode of INIT (the first request on a virtio-fs request queue, virtio 1.2 §5.11.6).
FUSE_INIT = 26
_FUSE_IN = struct.Struct("<IIQQIIIHH")  # fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_FUSE_OUT = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
_FUSE_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (then flags2 and reserved)
_FUSE_INIT_IN_SIZE = 64


@dataclass(frozen=True, slots=True)
class Device:
    """One device type as the checker drives it."""

    name: str
    device_id: int
    queues: tuple[int, ...]  # rings a minimal frontend starts
    request_queue: int
    config_size: int  # what QEMU 7.2 reads (its struct size)
    io: Callable[[Probe], None]

    def start(self, h: Probe, features: int = 0, size: int = 64) -> Ring:
        """A ready device (hello, memory, the rings); returns the request ring."""
        h.start(features, queues=self.queues, size=size)
        return h.rings[self.request_queue]


# -- virtio-blk (virtio 1.2 §5.2) ----------------------------------------------------------


def blk_request(
    h: Probe,
    ring: Ring,
    rtype: int,
    sector: int = 0,
    *,
    out: bytes = b"",
    in_len: int = 0,
    layout: str = "normal",
    indirect: bool = False,
    pool: int = 0,
    status_writable: bool = True,
) -> tuple[int, int, bytes]:
    """One request: (status byte, used length, data read). ``layout``:

    ``normal``: header | data-out | data-in | status, each its own descriptor;
    ``split-header``: the 16-byte header over two descriptors of 8;
    ``merged-status``: data-in and the status byte in one writable descriptor;
    ``zero-length``: a zero-length readable descriptor after the header.
    The status byte starts as 0xEE: a byte the device must overwrite.
    """
    hdr = h.buf(B.OUTHDR.pack(rtype, 0, sector), pool=pool)
    parts: list[Part] = []
    if layout == "split-header":
        lo, hi = h.buf(bytes(hdr.view[:8]), pool=pool), h.buf(bytes(hdr.view[8:16]), pool=pool)
        parts += [(lo, 8, False), (hi, 8, False)]
    else:
        parts.append((hdr, B.OUTHDR_SIZE, False))
    if layout == "zero-length":
        parts.append((h.buf(16, pool=pool), 0, False))
    if out:
        parts.append((h.buf(out, pool=pool), len(out), False))
    data = h.buf(in_len + 1, pool=pool)
    data.view[in_len] = 0xEE
    if layout == "merged-status":
        parts.append((data, in_len + 1, True))
        status_at = (data, in_len)
    else:
        if in_len:
            parts.append((data, in_len, True))
        status = h.buf(b"\xee", pool=pool)
        parts.append((status, 1, status_writable))
        status_at = (status, 0)
    ring.post(parts, indirect=indirect)
    (used,) = ring.wait()
    buf, off = status_at
    return buf.view[off], used.length, bytes(data.view[:in_len])


def blk_io(h: Probe) -> None:
    """Write 4 KiB at sector 8 and read it back (only the read on a read-only device)."""
    ring = h.rings[0]
    data = os.urandom(4096)
    if not (h.info is not None and h.info.offers(B.F_RO)):
        status, _len, _ = blk_request(h, ring, B.T_OUT, 8, out=data)
        h.expect(status == B.S_OK, "write status OK (0)", f"status {status}")
    status, used, back = blk_request(h, ring, B.T_IN, 8, in_len=4096)
    h.expect(status == B.S_OK, "read status OK (0)", f"status {status}")
    h.expect(used == 4097, "used length 4097 for a 4096-byte read", f"{used}")
    if not (h.info is not None and h.info.offers(B.F_RO)):
        h.expect(back == data, "the data written read back", "different bytes")


# -- virtio-scsi (virtio 1.2 §5.6) -----------------------------------------------------------


def scsi_command(
    h: Probe,
    ring: Ring,
    cdb: bytes,
    *,
    target: int = 0,
    lun: int = 0,
    data_out: bytes = b"",
    data_in: int = 0,
    lun8: bytes | None = None,
) -> tuple[int, int, T.Sense | None, bytes]:
    """One command: (virtio response, SCSI status, sense, data-in)."""
    address = S.lun_address(target, lun) if lun8 is None else lun8
    req = h.buf(S.CMD_REQ_HDR.pack(address, 0x1234, 0, 0, 0) + cdb.ljust(S.CDB_SIZE, b"\0"))
    parts: list[Part] = [(req, S.CMD_REQ_SIZE, False)]
    if data_out:
        parts.append((h.buf(data_out), len(data_out), False))
    resp = h.buf(S.CMD_RESP_SIZE)
    resp.view[S.CMD_RESP_HDR.size - 1] = 0xEE  # response byte the device must write
    parts.append((resp, S.CMD_RESP_SIZE, True))
    din = h.buf(data_in) if data_in else None
    if din is not None:
        parts.append((din, data_in, True))
    ring.post(parts)
    ring.wait()
    sense_len, _resid, _q, status, response = S.CMD_RESP_HDR.unpack_from(resp.view)
    sense = T.parse_sense(bytes(resp.view[12 : 12 + min(sense_len, S.SENSE_SIZE)])) if sense_len else None
    return response, status, sense, bytes(din.view) if din is not None else b""


def scsi_ready(h: Probe, ring: Ring, cdb: bytes, **kw: object) -> tuple[int, int, T.Sense | None, bytes]:
    """:func:`scsi_command`, once more after a UNIT ATTENTION (a fresh LUN reports POWER ON, RESET)."""
    result = scsi_command(h, ring, cdb, **kw)  # type: ignore[arg-type]
    _response, status, sense, _ = result
    if status == T.CHECK_CONDITION and sense is not None and sense.key == T.UNIT_ATTENTION:
        result = scsi_command(h, ring, cdb, **kw)  # type: ignore[arg-type]
    return result


def scsi_io(h: Probe) -> None:
    """TEST UNIT READY on LUN 0:0 answers GOOD."""
    response, status, sense, _ = scsi_ready(h, h.rings[S.FIRST_REQUEST_QUEUE], bytes([T.TEST_UNIT_READY]))
    h.expect(response == S.S_OK and status == T.GOOD, "TEST UNIT READY: response OK, status GOOD",
             f"response {response}, status 0x{status:02x}, sense {sense}")


# -- virtio-net (virtio 1.2 §5.1) ------------------------------------------------------------


def net_frame(size: int = 74) -> bytes:
    """A broadcast-free test frame: locally administered MACs, ethertype 0x88B5 (local experimental)."""
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + os.urandom(size - 14)


def net_tx(h: Probe, ring: Ring, frame: bytes, *, split_header: bool = False) -> int:
    """Transmit ``frame`` with a zeroed 12-byte header; the used length."""
    hdr = bytes(N.HDR_SIZE)
    if split_header:
        ring.post([(h.buf(hdr), N.HDR_SIZE, False), (h.buf(frame), len(frame), False)])
    else:
        ring.post([(h.buf(hdr + frame), N.HDR_SIZE + len(frame), False)])
    (used,) = ring.wait()
    return used.length


def net_io(h: Probe) -> None:
    """One frame transmitted on ring 1 comes back used."""
    net_tx(h, h.rings[1], net_frame())


# -- virtio-fs (virtio 1.2 §5.11) ------------------------------------------------------------


def fuse_post(h: Probe, ring: Ring, *, kick: bool = True) -> int:
    """Post FUSE_INIT 7.31 (not waited for); its head. The reply lands in ``h.fuse_out``."""
    body = _FUSE_INIT_IN.pack(7, 31, 0, 0).ljust(_FUSE_INIT_IN_SIZE, b"\0")
    head = _FUSE_IN.pack(_FUSE_IN.size + len(body), FUSE_INIT, 1, 0, 0, 0, 0, 0, 0)
    out = h.buf(_FUSE_OUT.size + 256)
    h.last_out = out
    return ring.post([(h.buf(head + body), len(head) + len(body), False), (out, _FUSE_OUT.size + 256, True)],
                     kick=kick)


def fuse_init(h: Probe, ring: Ring) -> tuple[int, int, int, bytes]:
    """FUSE_INIT 7.31 on a request queue: (used length, out.len, out.error, init_out bytes)."""
    fuse_post(h, ring)
    out = h.last_out
    assert out is not None
    (used,) = ring.wait()
    length, error, _unique = _FUSE_OUT.unpack_from(out.view)
    return used.length, length, error, bytes(out.view[_FUSE_OUT.size : _FUSE_OUT.size + 8])


def fs_io(h: Probe) -> None:
    """FUSE_INIT on the first request queue answers without error."""
    used, length, error, _ = fuse_init(h, h.rings[1])
    h.expect(error == 0 and length >= _FUSE_OUT.size and used >= length,
             "FUSE_INIT answered: error 0, used length >= out.len >= 16", f"error {error}, len {length}, used {used}")


DEVICES: dict[str, Device] = {
    "blk": Device("blk", DEVICE_ID_BLOCK, (0,), 0, B.CONFIG_SIZE_V11, blk_io),
    "scsi": Device("scsi", DEVICE_ID_SCSI, (0, 1, 2), S.FIRST_REQUEST_QUEUE, S.CONFIG_SIZE, scsi_io),
    "net": Device("net", DEVICE_ID_NET, (0, 1), 1, N.CONFIG_SIZE, net_io),
    "fs": Device("fs", DEVICE_ID_FS, (0, 1), 1, 40, fs_io),
}


def detect(info: BackendInfo) -> tuple[Device, str]:
    """Guess the device type from what the back end offered; (device, why). UsageError if it cannot tell.

    Heuristics, in order: device feature bits 17-23 exist only for net;
    MAC (5) with STATUS (16) or MRG_RXBUF (15) is net; a config whose
    sense_size/cdb_size read 96/32 is scsi; a config with a non-zero
    capacity is blk; only scsi bits (0-3) and no config is scsi; no device
    bit and no config (virtiofsd) is fs.
    """
    device_bits = info.features & ((1 << 24) - 1)
    if device_bits & (0x7F << 17):
        return DEVICES["net"], "device feature bits 17-23 (net only)"
    if device_bits >> N.F_MAC & 1 and device_bits & (1 << N.F_STATUS | 1 << N.F_MRG_RXBUF):
        return DEVICES["net"], "MAC with STATUS or MRG_RXBUF offered"
    config = info.config or b""
    if len(config) >= 28 and struct.unpack_from("<II", config, 20) == (S.SENSE_SIZE, S.CDB_SIZE):
        return DEVICES["scsi"], "config sense_size 96, cdb_size 32"
    if len(config) >= 8 and struct.unpack_from("<Q", config, 0)[0]:
        return DEVICES["blk"], "config capacity non-zero"
    if info.config is None and device_bits and not device_bits & ~0xF:
        return DEVICES["scsi"], "only scsi feature bits (0-3), no config"
    if info.config is None and not device_bits and not info.offers_protocol(vu.PROTOCOL_F_CONFIG):
        return DEVICES["fs"], "no device feature bits and no config (virtiofsd)"
    raise UsageError("cannot tell the device type from features and config: give --device blk|scsi|net|fs")
