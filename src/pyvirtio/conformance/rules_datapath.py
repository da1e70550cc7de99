"""The ``blk``, ``scsi``, ``net`` and ``fs`` rules: each device type's data path.

Theory of operation
-------------------
Each rule starts the device's rings and sends requests built by
:mod:`pyvirtio.conformance.devices`, then
judges the completion: the status the device section demands and the used
length, which is the number of bytes the device wrote into the chain
(virtio 1.2 §2.7.8.2: a read's data plus its status byte, a write's status
byte alone, nothing for a transmitted frame).

* virtio-blk (virtio 1.2 §5.2.6): read, write (read back), FLUSH, GET_ID,
  DISCARD and WRITE_ZEROES with their flags (§5.2.6.2: UNSUPP for the unmap
  flag of DISCARD and for an unknown flag), an unknown type, a read-only
  device, a read past the capacity; any layout (§2.7.4.1: a header split
  over two descriptors, data and status in one), indirect tables
  (§2.7.5.3), 16 requests in flight (§2.7.8), a second queue with MQ.
  Rules that write skip a read-only device.
* virtio-scsi (virtio 1.2 §5.6.6; the commands by SPC-4 and SBC-3):
  INQUIRY, TEST UNIT READY, READ CAPACITY(10), REPORT LUNS, WRITE(10) then
  READ(10), an unknown opcode (CHECK CONDITION, ILLEGAL REQUEST), a target
  that does not exist (BAD_TARGET), a task management function on the
  control queue (§5.6.6.2).
* virtio-net (virtio 1.2 §5.1.6): transmit, with the header in a
  descriptor of its own (§2.7.4.1); receive (§5.1.6.4.1: the header's
  num_buffers, flags and gso_type; with MRG_RXBUF a frame over several
  buffers). The receive rules need a back end that echoes what it is sent
  (a loopback) and are skipped when nothing comes back.
* virtio-fs (virtio 1.2 §5.11.6): FUSE_INIT is answered without error.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from pyvirtio.conformance.catalogue import CONFIG, MUST, SHOULD, rule
from pyvirtio.conformance.devices import Device, blk_request, net_frame, net_tx, scsi_command, scsi_ready
from pyvirtio.conformance.harness import Probe
from pyvirtio.errors import RuleFailed
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import F_RING_INDIRECT_DESC

__all__: list[str] = []  # importing the module adds its rules to the catalogue; it exports nothing


def _writable(h: Probe) -> None:
    if h.info is not None and h.info.offers(B.F_RO):
        raise h.skip("read-only device (VIRTIO_BLK_F_RO offered)")


@rule("blk.read", "a read completes with status OK and used length = data + status byte",
      "virtio 1.2 §5.2.6, §2.7.8.2", MUST, devices="blk")
def _blk_read(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=4096)
    h.expect(status == B.S_OK and used == 4097, "status OK, used length 4097", f"status {status}, used {used}")


@rule("blk.write", "a write completes with status OK and used length 1, and reads back",
      "virtio 1.2 §5.2.6, §2.7.8.2", MUST, devices="blk")
def _blk_write(h: Probe, dev: Device) -> None:
    _writable(h)
    ring = dev.start(h)
    data = os.urandom(4096)
    status, used, _ = blk_request(h, ring, B.T_OUT, 16, out=data)
    h.expect(status == B.S_OK and used == 1, "status OK, used length 1 (only the status byte is writable)",
             f"status {status}, used {used}")
    _s, _u, back = blk_request(h, ring, B.T_IN, 16, in_len=4096)
    h.expect(back == data, "the data written", "different bytes")


@rule("blk.flush", "FLUSH completes with status OK and used length 1", "virtio 1.2 §5.2.6", MUST, devices="blk",
      features=(B.F_FLUSH,))
def _blk_flush(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << B.F_FLUSH)
    status, used, _ = blk_request(h, ring, B.T_FLUSH)
    h.expect(status == B.S_OK and used == 1, "status OK, used length 1", f"status {status}, used {used}")


@rule("blk.get-id", "GET_ID completes (OK or UNSUPP) with a used length of at most 21 (20 id bytes + status)",
      "virtio 1.2 §5.2.6, §2.7.8.2", MUST, devices="blk")
def _blk_get_id(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_GET_ID, in_len=B.ID_BYTES)
    h.expect(status in (B.S_OK, B.S_UNSUPP) and 1 <= used <= B.ID_BYTES + 1,
             "status OK or UNSUPP, used length 1..21", f"status {status}, used {used}")


def _dwz(h: Probe, dev: Device, rtype: int, feature: int, flags: int) -> tuple[int, int]:
    _writable(h)
    ring = dev.start(h, 1 << feature)
    status, used, _ = blk_request(h, ring, rtype, out=B.DISCARD_WZ.pack(32, 8, flags))
    return status, used


@rule("blk.discard", "DISCARD of one segment completes with status OK", "virtio 1.2 §5.2.6", MUST, devices="blk",
      features=(B.F_DISCARD,))
def _blk_discard(h: Probe, dev: Device) -> None:
    status, used = _dwz(h, dev, B.T_DISCARD, B.F_DISCARD, 0)
    h.expect(status == B.S_OK and used == 1, "status OK, used length 1", f"status {status}, used {used}")


@rule("blk.discard.unmap-flag", "DISCARD with the unmap flag completes with status UNSUPP", "virtio 1.2 §5.2.6.2",
      MUST, devices="blk", features=(B.F_DISCARD,))
def _blk_discard_unmap(h: Probe, dev: Device) -> None:
    status, _used = _dwz(h, dev, B.T_DISCARD, B.F_DISCARD, B.DWZ_F_UNMAP)
    h.expect(status == B.S_UNSUPP, "status UNSUPP (2)", f"status {status}")


@rule("blk.write-zeroes", "WRITE_ZEROES completes with status OK and the range reads back as zeroes",
      "virtio 1.2 §5.2.6.2", MUST, devices="blk", features=(B.F_WRITE_ZEROES,))
def _blk_wz(h: Probe, dev: Device) -> None:
    _writable(h)
    ring = dev.start(h, 1 << B.F_WRITE_ZEROES)
    blk_request(h, ring, B.T_OUT, 32, out=b"\xa5" * 4096)
    status, _used, _ = blk_request(h, ring, B.T_WRITE_ZEROES, out=B.DISCARD_WZ.pack(32, 8, 0))
    h.expect(status == B.S_OK, "status OK", f"status {status}")
    _s, _u, back = blk_request(h, ring, B.T_IN, 32, in_len=4096)
    h.expect(back == bytes(4096), "4096 zero bytes", f"{sum(1 for b in back if b)} non-zero bytes")


@rule("blk.write-zeroes.unknown-flag", "WRITE_ZEROES with an unknown flag completes with status UNSUPP",
      "virtio 1.2 §5.2.6.2", MUST, devices="blk", features=(B.F_WRITE_ZEROES,))
def _blk_wz_flag(h: Probe, dev: Device) -> None:
    status, _used = _dwz(h, dev, B.T_WRITE_ZEROES, B.F_WRITE_ZEROES, 0x2)
    h.expect(status == B.S_UNSUPP, "status UNSUPP (2)", f"status {status}")


@rule("blk.unknown-type", "a request of an unknown type completes with status UNSUPP", "virtio 1.2 §5.2.6", SHOULD,
      devices="blk")
def _blk_unknown(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, 0x55, in_len=512)
    h.expect(status == B.S_UNSUPP, "status UNSUPP (2)", f"status {status}, used {used}")


@rule("blk.read-only", "a read-only device (RO offered) fails a write with IOERR and writes nothing",
      "virtio 1.2 §5.2.6.2", MUST, devices="blk", features=(B.F_RO,))
def _blk_ro(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << B.F_RO)
    _s, _u, before = blk_request(h, ring, B.T_IN, 0, in_len=512)
    status, _used, _ = blk_request(h, ring, B.T_OUT, 0, out=bytes(b ^ 0xFF for b in before))
    h.expect(status == B.S_IOERR, "status IOERR (1)", f"status {status}")
    _s, _u, after = blk_request(h, ring, B.T_IN, 0, in_len=512)
    h.expect(after == before, "the sector unchanged", "it changed")


@rule("blk.beyond-capacity", "a read past the capacity fails (status not OK)", "virtio 1.2 §5.2.6", SHOULD,
      devices="blk", protocol=CONFIG)
def _blk_capacity(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    config = h.call(h.codec.get_config(0, 8))
    assert isinstance(config, vu.ConfigSpace)
    capacity = struct.unpack("<Q", config.data)[0]
    status, _used, _ = blk_request(h, ring, B.T_IN, capacity, in_len=512)
    h.expect(status != B.S_OK, f"an error status for sector {capacity} (the capacity)", "status OK")


@rule("blk.any-layout.header", "a request header split over two descriptors is understood",
      "virtio 1.2 §2.7.4.1", MUST, devices="blk")
def _blk_split_header(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=512, layout="split-header")
    h.expect(status == B.S_OK and used == 513, "status OK, used length 513", f"status {status}, used {used}")


@rule("blk.any-layout.status", "data-in and the status byte in one descriptor are understood",
      "virtio 1.2 §2.7.4.1", MUST, devices="blk")
def _blk_merged_status(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=512, layout="merged-status")
    h.expect(status == B.S_OK and used == 513, "status OK, used length 513", f"status {status}, used {used}")


@rule("blk.indirect", "a request in an indirect descriptor table completes", "virtio 1.2 §2.7.5.3", MUST,
      devices="blk", features=(F_RING_INDIRECT_DESC,))
def _blk_indirect(h: Probe, dev: Device) -> None:
    ring = dev.start(h, 1 << F_RING_INDIRECT_DESC)
    status, used, _ = blk_request(h, ring, B.T_IN, 0, in_len=1024, indirect=True)
    h.expect(status == B.S_OK and used == 1025, "status OK, used length 1025", f"status {status}, used {used}")


@rule("blk.queue-depth", "16 requests in flight complete, each head once, each with its used length",
      "virtio 1.2 §2.7.8", MUST, devices="blk")
def _blk_depth(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    heads = {}
    for i in range(16):
        parts = [(h.buf(B.OUTHDR.pack(B.T_IN, 0, i)), 16, False), (h.buf(512 * (1 + i % 4)), 512 * (1 + i % 4), True),
                 (h.buf(b"\xee"), 1, True)]
        heads[ring.post(parts, kick=False)] = 512 * (1 + i % 4) + 1
    ring.kick()
    done = ring.wait(16)
    got = {u.id: u.length for u in done}
    h.expect(len(got) == 16 and got == heads, f"heads {sorted(heads)} once each with their lengths",
             f"{[(u.id, u.length) for u in done]}")


@rule("blk.multiqueue", "with MQ, a request on queue 1 is served", "virtio 1.2 §5.2.6", MUST, devices="blk",
      features=(B.F_MQ,))
def _blk_mq(h: Probe, dev: Device) -> None:
    config = h.info.config if h.info is not None else None
    if not config or struct.unpack_from("<H", config, 34)[0] < 2:
        raise h.skip("fewer than 2 queues in the config")
    h.start(1 << B.F_MQ, queues=(0, 1))
    status, used, _ = blk_request(h, h.rings[1], B.T_IN, 0, in_len=512)
    h.expect(status == B.S_OK and used == 513, "status OK, used length 513", f"status {status}, used {used}")


# -- virtio-scsi data path (virtio 1.2 §5.6) ------------------------------------------------------


def _scsi_good(h: Probe, cdb: bytes, **kw: object) -> bytes:
    ring = h.rings[S.FIRST_REQUEST_QUEUE]
    response, status, sense, data = scsi_ready(h, ring, cdb, **kw)
    h.expect(response == S.S_OK and status == T.GOOD, f"{T.opcode_name(cdb)}: response OK, status GOOD",
             f"response {response}, status 0x{status:02x}, sense {sense}")
    return data


@rule("scsi.inquiry", "INQUIRY on LUN 0:0 returns standard data with a connected peripheral",
      "virtio 1.2 §5.6.6.1; SPC-4 INQUIRY", MUST, devices="scsi")
def _scsi_inquiry(h: Probe, dev: Device) -> None:
    dev.start(h)
    data = _scsi_good(h, bytes([T.INQUIRY, 0, 0, 0, 96, 0]), data_in=96)
    h.expect(data[0] >> 5 == 0 and data[4] + 5 >= 36, "peripheral qualifier 0, at least 36 bytes",
             f"byte 0 0x{data[0]:02x}, additional length {data[4]}")


@rule("scsi.test-unit-ready", "TEST UNIT READY on LUN 0:0 answers GOOD", "virtio 1.2 §5.6.6.1", MUST, devices="scsi")
def _scsi_tur(h: Probe, dev: Device) -> None:
    dev.start(h)
    _scsi_good(h, bytes([T.TEST_UNIT_READY]))


@rule("scsi.read-capacity", "READ CAPACITY(10) returns a non-zero block length", "SBC-3 READ CAPACITY (10)", MUST,
      devices="scsi")
def _scsi_capacity(h: Probe, dev: Device) -> None:
    dev.start(h)
    data = _scsi_good(h, bytes([T.READ_CAPACITY_10]) + bytes(9), data_in=8)
    h.expect(struct.unpack(">I", data[4:8])[0] > 0, "a block length > 0", data.hex())


@rule("scsi.report-luns", "REPORT LUNS lists LUN 0", "SPC-4 REPORT LUNS", MUST, devices="scsi")
def _scsi_report_luns(h: Probe, dev: Device) -> None:
    dev.start(h)
    data = _scsi_good(h, bytes([T.REPORT_LUNS, 0, 0, 0, 0, 0]) + struct.pack(">I", 256) + bytes(2), data_in=256)
    count = struct.unpack(">I", data[:4])[0] // 8
    luns = [data[8 + 8 * i : 16 + 8 * i] for i in range(min(count, 31))]
    h.expect(bytes(8) in luns, "LUN 0 in the list", f"{[x.hex() for x in luns]}")


@rule("scsi.bad-target", "a command to a target that does not exist gets response BAD_TARGET",
      "virtio 1.2 §5.6.6.1.1", MUST, devices="scsi")
def _scsi_bad_target(h: Probe, dev: Device) -> None:
    dev.start(h)
    config = h.info.config if h.info is not None else None
    target = struct.unpack_from("<H", config, 30)[0] + 1 if config else 255
    if target > 255:
        raise h.skip("the config announces every target")
    response, status, _sense, _ = scsi_command(h, h.rings[S.FIRST_REQUEST_QUEUE], bytes([T.TEST_UNIT_READY]),
                                               target=target)
    h.expect(response == S.S_BAD_TARGET, f"response BAD_TARGET ({S.S_BAD_TARGET}) for target {target}",
             f"response {response}, status 0x{status:02x}")


@rule("scsi.tmf", "a LOGICAL UNIT RESET on the control queue completes with FUNCTION_COMPLETE or "
      "FUNCTION_SUCCEEDED", "virtio 1.2 §5.6.6.2", MUST, devices="scsi")
def _scsi_tmf(h: Probe, dev: Device) -> None:
    dev.start(h)
    ring = h.rings[S.CONTROL_QUEUE]
    req = h.buf(S.CTRL_TMF_REQ.pack(S.T_TMF, S.T_TMF_LOGICAL_UNIT_RESET, S.lun_address(0, 0), 0))
    resp = h.buf(b"\xee")
    ring.post([(req, S.CTRL_TMF_REQ.size, False), (resp, 1, True)])
    ring.wait()
    h.expect(resp.view[0] in (S.S_OK, S.S_FUNCTION_SUCCEEDED), "response FUNCTION_COMPLETE (0) or "
             "FUNCTION_SUCCEEDED (10)", f"response {resp.view[0]}")


@rule("scsi.read-write", "WRITE(10) then READ(10) of 8 blocks returns the data", "SBC-3", MUST, devices="scsi")
def _scsi_rw(h: Probe, dev: Device) -> None:
    dev.start(h)
    cap = _scsi_good(h, bytes([T.READ_CAPACITY_10]) + bytes(9), data_in=8)
    block = struct.unpack(">I", cap[4:8])[0]
    data = os.urandom(8 * block)
    cdb = T.BE32.pack(16) + b"\0" + T.BE16.pack(8) + b"\0"
    _scsi_good(h, bytes([T.WRITE_10, 0]) + cdb, data_out=data)
    back = _scsi_good(h, bytes([T.READ_10, 0]) + cdb, data_in=len(data))
    h.expect(back == data, "the data written", "different bytes")


@rule("scsi.unknown-opcode", "an unknown opcode ends in CHECK CONDITION, ILLEGAL REQUEST", "SPC-4 §4.5.6", SHOULD,
      devices="scsi")
def _scsi_unknown(h: Probe, dev: Device) -> None:
    dev.start(h)
    response, status, sense, _ = scsi_ready(h, h.rings[S.FIRST_REQUEST_QUEUE], bytes([0xC7]) + bytes(9))
    h.expect(response == S.S_OK and status == T.CHECK_CONDITION and sense is not None
             and sense.key == T.ILLEGAL_REQUEST, "CHECK CONDITION with sense key ILLEGAL REQUEST",
             f"response {response}, status 0x{status:02x}, sense {sense}")


# -- virtio-net data path (virtio 1.2 §5.1) -------------------------------------------------------


@rule("net.tx", "a transmitted frame completes with used length 0 (nothing device-writable)",
      "virtio 1.2 §2.7.8.2, §5.1.6.2", MUST, devices="net")
def _net_tx(h: Probe, dev: Device) -> None:
    dev.start(h)
    used = net_tx(h, h.rings[1], net_frame())
    h.expect(used == 0, "used length 0", f"{used}")


@rule("net.tx.split-header", "a frame with its header in a descriptor of its own is transmitted",
      "virtio 1.2 §2.7.4.1", MUST, devices="net")
def _net_split(h: Probe, dev: Device) -> None:
    dev.start(h)
    net_tx(h, h.rings[1], net_frame(), split_header=True)


def _echo(h: Probe, sizes: Sequence[int], frame: bytes, mrg: bool) -> list[tuple[bytes, int]]:
    """Post receive buffers of ``sizes``, send ``frame``; the (buffer bytes, used length) that came back."""
    h.start((1 << N.F_MRG_RXBUF) if mrg else 0, queues=(0, 1))
    rx = h.rings[0]
    bufs = [h.buf(n) for n in sizes]
    heads = {rx.post([(b, n, True)], kick=False): b for b, n in zip(bufs, sizes, strict=True)}
    rx.kick()
    net_tx(h, h.rings[1], frame)
    try:
        first = rx.wait(1, timeout=h.settings.quiet * 5)
    except RuleFailed:  # no echo is not the back end's fault: the rule does not apply
        raise h.skip("nothing came back: not a loopback/echo back end") from None
    got = first + rx.quiet(h.settings.quiet)
    return [(bytes(heads[u.id].view[: u.length]), u.length) for u in got if u.id in heads]


@rule("net.rx.header", "without MRG_RXBUF a received frame has num_buffers 1, flags 0, GSO_NONE, and used "
      "length = 12 + frame", "virtio 1.2 §5.1.6.4.1", MUST, devices="net")
def _net_rx(h: Probe, dev: Device) -> None:
    frame = net_frame(128)
    got = _echo(h, [2048] * 4, frame, mrg=False)
    data, used = got[0]
    flags, gso, _hl, _gs, _cs, _co, nbuf = N.HDR.unpack_from(data)
    h.expect(used == N.HDR_SIZE + len(frame) and nbuf == 1 and flags == 0 and gso == N.GSO_NONE,
             f"used {N.HDR_SIZE + len(frame)}, num_buffers 1, flags 0, gso_type 0",
             f"used {used}, num_buffers {nbuf}, flags {flags}, gso_type {gso}")


@rule("net.rx.mrg-rxbuf", "with MRG_RXBUF a 1514-byte frame over 256-byte buffers: num_buffers = buffers used, "
      "all but the last full", "virtio 1.2 §5.1.6.4.1", MUST, devices="net", features=(N.F_MRG_RXBUF,))
def _net_mrg(h: Probe, dev: Device) -> None:
    frame = net_frame(1514)
    got = _echo(h, [256] * 16, frame, mrg=True)
    nbuf = N.HDR.unpack_from(got[0][0])[6]
    lengths = [used for _data, used in got[:nbuf]]
    h.expect(len(got) >= nbuf and all(n == 256 for n in lengths[:-1])
             and sum(lengths) == N.HDR_SIZE + len(frame),
             f"num_buffers ({nbuf}) buffers, all but the last full, {N.HDR_SIZE + len(frame)} bytes in all",
             f"lengths {[u for _d, u in got]}")


# -- virtio-fs (virtio 1.2 §5.11) -------------------------------------------------------------


@rule("fs.init", "FUSE_INIT on the first request queue is answered without error", "virtio 1.2 §5.11.6", MUST,
      devices="fs")
def _fs_init(h: Probe, dev: Device) -> None:
    dev.start(h)
    dev.io(h)
