"""Write the seed corpora: valid messages, rings and requests, one directory per target.

``python -m fuzz.make_corpus`` (re)writes ``fuzz/corpus/<target>/<seed>``;
``--check`` only compares and exits 1 if a file is missing or differs (the
unit test :mod:`tests.test_fuzz_short` does the same). The seeds are what
the unit tests build: messages from :class:`~pyvirtio.protocol.vhost_user.FrontendCodec`,
:func:`~pyvirtio.protocol.vhost_user.encode_reply` and
:class:`~pyvirtio.protocol.vhost_user.BackendCodec`; rings laid out as
:class:`~pyvirtio.testing.RawDriver` does; virtio-blk / virtio-scsi
requests as the drivers and ``tests/hostile_frontend.py`` build them; whole
vhost-user sessions for the server target. Each is encoded in the target's
input format (:class:`~fuzz._input.Seed`), so a seed runs the valid path and
the fuzzer mutates from there. A few classic violations (a loop, an index
out of range, a lying used ring) are seeds too.

Everything here is deterministic: no addresses of this process, no time.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from fuzz import _packed, _packed_stream
from fuzz import _server as SV
from fuzz._input import Seed
from fuzz.targets import _DEV_GPA, _SENDERS, device_ring_layout
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.scsi import ScsiBackend
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.ring import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

CORPUS = Path(__file__).resolve().parent / "corpus"
_FD = 1 << 20  # stands for a real fd in encoded messages (only counted by the decoders)


def _record(s: Seed, data: bytes, nfds: int = 0) -> Seed:
    """One ``[u16 len % 1025][u8 nfds % 4][bytes]`` record of the codec targets."""
    return s.below(len(data), 1025).below(nfds, 4).raw(data)


# -- vhost-user codec --------------------------------------------------------------------


def _frontend_requests() -> list[tuple[str, vu.Outgoing]]:
    c = vu.FrontendCodec()
    region = vu.MemRegion(0x100000, 0x10000, 0x7F0000000000)
    return [
        ("get_features", c.get_features()),
        ("set_features", c.set_features((1 << 32) | (1 << 30), need_reply=True)),
        ("get_protocol_features", c.get_protocol_features()),
        ("set_protocol_features", c.set_protocol_features(0x8209)),
        ("set_owner", c.set_owner()),
        ("reset_owner", c.reset_owner()),
        ("reset_device", c.reset_device(need_reply=True)),
        ("get_queue_num", c.get_queue_num()),
        ("get_max_mem_slots", c.get_max_mem_slots()),
        ("set_status", c.set_status(0xF)),
        ("get_status", c.get_status()),
        ("check_device_state", c.check_device_state()),
        ("set_mem_table", c.set_mem_table([region], [_FD], need_reply=True)),
        ("set_mem_table_2", c.set_mem_table([region, vu.MemRegion(0x200000, 0x1000, 0x7F0000100000, 4096)], [_FD] * 2)),
        ("add_mem_reg", c.add_mem_reg(region, _FD)),
        ("rem_mem_reg", c.rem_mem_reg(region)),
        ("rem_mem_reg_fd", c.rem_mem_reg(region, _FD)),
        ("set_log_base", c.set_log_base(4096, 0, _FD)),
        ("set_log_fd", c.set_log_fd(_FD)),
        ("set_vring_num", c.set_vring_num(0, 256)),
        ("set_vring_base", c.set_vring_base(1, 0)),
        ("get_vring_base", c.get_vring_base(0)),
        ("set_vring_addr", c.set_vring_addr(vu.VringAddr(0, 0, 0x7F0000000000, 0x7F0000002000, 0x7F0000001000))),
        ("set_vring_kick", c.set_vring_kick(0, _FD)),
        ("set_vring_kick_nofd", c.set_vring_kick(0, None)),
        ("set_vring_call", c.set_vring_call(1, _FD)),
        ("set_vring_err", c.set_vring_err(0, _FD)),
        ("set_vring_enable", c.set_vring_enable(0, True, need_reply=True)),
        ("set_vring_endian", c.set_vring_endian(0, False)),
        ("vring_kick", c.vring_kick(0)),
        ("set_backend_req_fd", c.set_backend_req_fd(_FD)),
        ("get_inflight_fd", c.get_inflight_fd(1, 256)),
        ("set_inflight_fd", c.set_inflight_fd(vu.InflightInfo(4096, 0, 1, 256), _FD)),
        ("get_config", c.get_config(0, 60)),
        ("set_config", c.set_config(20, b"\x60\0\0\0")),
        ("send_rarp", c.send_rarp(b"\x52\x54\x00\x12\x34\x56")),
        ("net_set_mtu", c.net_set_mtu(1500)),
        ("close_crypto_session", c.close_crypto_session(7)),
        ("gpu_set_socket", c.gpu_set_socket(_FD)),
    ]


def seeds_vu_decode_request() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    reqs = _frontend_requests()
    for name, o in reqs:
        out[name] = _record(Seed(), o.data, len(o.fds)).bytes()
    # A whole QEMU-like start-up in one stream, and the same cut mid-message.
    session = Seed()
    whole = b""
    for name in ("get_features", "get_protocol_features", "set_protocol_features", "set_owner",
                 "set_features", "set_mem_table", "set_vring_num", "set_vring_base", "set_vring_addr",
                 "set_vring_kick", "set_vring_call", "set_vring_enable"):
        o = dict(reqs)[name]
        _record(session, o.data, len(o.fds))
        whole += o.data
    out["session"] = session.bytes()
    cut = Seed()
    _record(cut, whole[:17])
    _record(cut, whole[17:200], 1)
    _record(cut, whole[200:], 0)
    out["session_split"] = cut.bytes()
    return out


def seeds_vu_parse_reply() -> dict[str, bytes]:
    """Each reply FrontendCodec can expect, followed by the choice of the request it answers."""
    n = len(_SENDERS)

    def seed(sender: int, args: Callable[[Seed], Seed], reply: vu.Outgoing) -> bytes:
        s = _record(Seed(), reply.data, len(reply.fds))
        s.below(sender, n)
        return args(s).bytes()

    def none(s: Seed) -> Seed:
        return s

    out = {
        "get_features": seed(0, none, vu.encode_reply(vu.GET_FEATURES, (1 << 32) | (1 << 30) | (1 << 28))),
        "get_protocol_features": seed(1, none, vu.encode_reply(vu.GET_PROTOCOL_FEATURES, 0x1A209)),
        "get_queue_num": seed(2, none, vu.encode_reply(vu.GET_QUEUE_NUM, 4)),
        "get_max_mem_slots": seed(3, none, vu.encode_reply(vu.GET_MAX_MEM_SLOTS, 32)),
        "get_status": seed(4, none, vu.encode_reply(vu.GET_STATUS, 0xF)),
        "check_device_state": seed(5, none, vu.encode_reply(vu.CHECK_DEVICE_STATE, 0)),
        "get_vring_base": seed(6, lambda s: s.u8(1), vu.encode_reply(vu.GET_VRING_BASE, vu.VringState(1, 42))),
        "get_config": seed(
            7,
            lambda s: s.below(0, 256).below(59, 256),
            vu.encode_reply(vu.GET_CONFIG, vu.ConfigSpace(0, 60, 0, bytes(range(60)))),
        ),
        "get_config_refused": seed(7, lambda s: s.below(8, 256).below(3, 248), vu.encode_reply(vu.GET_CONFIG, None)),
        "get_inflight_fd": seed(
            8,
            lambda s: s.u16(1).u16(256),
            vu.encode_reply(vu.GET_INFLIGHT_FD, vu.InflightInfo(4096, 0, 1, 256), fds=[_FD]),
        ),
        "set_log_base": seed(9, lambda s: s.u16(4096), vu.encode_reply(vu.SET_LOG_BASE, 0)),
        "ack_set_features": seed(10, lambda s: s.u64(1 << 32), vu.encode_ack(vu.SET_FEATURES, True)),
        "nack_set_owner": seed(11, none, vu.encode_ack(vu.SET_OWNER, False)),
        "ack_set_mem_table": seed(12, none, vu.encode_ack(vu.SET_MEM_TABLE, True)),
        "ack_set_vring_kick": seed(14, lambda s: s.u8(0).flag(False), vu.encode_ack(vu.SET_VRING_KICK, True)),
        "ack_reset_device": seed(n - 1, none, vu.encode_ack(vu.RESET_DEVICE, True)),
    }
    return out


def seeds_vu_backend_channel() -> dict[str, bytes]:
    bc = vu.BackendCodec()
    codes = sorted(vu.BACKEND_REQUEST_NAMES) + [0, 9]
    out = {}
    for name, o, code in (
        ("config_change", bc.config_change(need_reply=True), vu.BACKEND_CONFIG_CHANGE_MSG),
        ("vring_call", bc.vring_call(1), vu.BACKEND_VRING_CALL),
        ("vring_err", bc.vring_err(0, need_reply=True), vu.BACKEND_VRING_ERR),
        ("ack", vu.encode_ack(vu.BACKEND_VRING_CALL, True), vu.BACKEND_VRING_CALL),
    ):
        out[name] = _record(Seed(), o.data, len(o.fds)).pick(code, codes).bytes()
    return out


# -- rings -----------------------------------------------------------------------------------


def _split(size_exp: int, flags: int, threshold: int, ops: Callable[[Seed], None]) -> bytes:
    s = Seed().below(size_exp, 6).u8(flags).below(threshold - 2, 8)
    ops(s)
    return s.bytes()


def _submit(s: Seed, readable: list[int], writable: list[int], fast: bool = True) -> None:
    s.below(0, 7).below(len(readable), 4).below(len(writable), 4)
    for n in readable + writable:
        s.u16(n)
    s.flag(fast)


def seeds_split_reap() -> dict[str, bytes]:
    def honest(s: Seed) -> None:
        _submit(s, [16], [8])
        _submit(s, [], [512, 512], fast=False)
        _submit(s, [16, 16], [1])
        s.below(1, 7).below(3, 8).u32(8).u32(1024).u32(0)  # complete all three, full lengths
        s.below(3, 7).u8(0)  # reap everything

    def wrap(s: Seed) -> None:
        for _ in range(12):  # round the ring of 4 several times
            _submit(s, [4], [4])
            s.below(1, 7).below(0, 4).u32(4)
            s.below(3, 7).u8(1)

    def lying(s: Seed) -> None:
        _submit(s, [16], [8])
        _submit(s, [], [8])
        s.below(2, 7).below(2, 9)  # two garbage entries: a good one, then a duplicate
        s.below(0, 2).u8(0).u32(3)
        s.below(0, 2).u8(0).u32(3)
        s.u16(2)
        s.below(3, 7).u8(0)
        s.below(4, 7)  # reset brings it back
        _submit(s, [1], [1])

    def indirect(s: Seed) -> None:
        _submit(s, [16, 16, 16], [64, 64, 1])
        _submit(s, [16], [1])
        s.below(5, 7).flag(True)  # interrupts on (event_idx)
        s.below(1, 7).below(1, 8).u32(129).u32(1)
        s.below(3, 7).u8(0)

    return {
        "honest": _split(3, 0, 8, honest),
        "wrap": _split(2, 0, 8, wrap),
        "lying_device": _split(3, 0, 8, lying),
        "indirect_event_idx": _split(3, 3, 2, indirect),
    }


def seeds_fixed_reap() -> dict[str, bytes]:
    def fixed(numpy: bool, ops: Callable[[Seed, bool], None]) -> bytes:
        s = Seed().below(3, 5)  # size 16
        s.below(3, 16)  # 4 slots
        for _ in range(4):  # blk shape: header, data, status
            s.below(2, 3).below(2, 3)
            for n in (16, 512, 512, 1):
                s.u16(n)
        s.flag(numpy)
        ops(s, numpy)
        return s.bytes()

    def reap(s: Seed, numpy: bool, how: int) -> None:
        s.below(3, 4).below(how, 3)
        if not numpy:
            s.u8(0)  # max_n: everything

    def honest(s: Seed, numpy: bool) -> None:
        for k in range(3):
            s.below(0, 4).u32(0xF)  # post all four slots
            s.below(1, 4).below(3, 16).u32(513).u32(1).u32(0).u32(100)
            reap(s, numpy, k % 2)

    def garbage(s: Seed, numpy: bool) -> None:
        s.below(0, 4).u32(0x3)
        s.below(2, 4).below(2, 17).below(0, 2).u8(0).u32(1).below(0, 2).u8(0).u32(1).u16(2)
        reap(s, numpy, 1)

    return {
        "python": fixed(False, honest),
        "numpy": fixed(True, honest),
        "python_garbage": fixed(False, garbage),
        "numpy_garbage": fixed(True, garbage),
    }


class _DeviceRing:
    """A ring in the device_pop region, laid out as the target maps it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mem = bytearray(4096)
        self.desc_off, self.avail_off, self.used_off = device_ring_layout(size)
        self.avail_idx = 0

    def desc(self, i: int, off: int, length: int, flags: int = 0, nxt: int = 0, *, raw_addr: int | None = None) -> None:
        addr = _DEV_GPA + off if raw_addr is None else raw_addr
        DESC.pack_into(self.mem, self.desc_off + 16 * i, addr, length, flags, nxt)

    def table(self, off: int, entries: list[tuple[int, int, int, int]]) -> None:
        for k, (doff, length, flags, nxt) in enumerate(entries):
            DESC.pack_into(self.mem, off + 16 * k, _DEV_GPA + doff, length, flags, nxt)

    def publish(self, *heads: int) -> None:
        for h in heads:
            struct.pack_into("<H", self.mem, self.avail_off + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, self.avail_off + 2, self.avail_idx)

    def seed(self, exp: int, flags: int = 1, last_avail: int = 0, max_chain: int = 0) -> bytes:
        return Seed().below(exp, 7).u8(flags).u16(last_avail).u16(max_chain).raw(bytes(self.mem)).bytes()


def seeds_device_pop() -> dict[str, bytes]:
    out = {}
    r = _DeviceRing(8)
    r.desc(0, 0x800, 16, DESC_F_NEXT, 1)
    r.desc(1, 0x810, 512, DESC_F_WRITE | DESC_F_NEXT, 2)
    r.desc(2, 0xA10, 1, DESC_F_WRITE)
    r.desc(3, 0xC00, 64)
    r.publish(0, 3)
    out["direct"] = r.seed(3)
    r = _DeviceRing(8)
    r.table(
        0x700,
        [(0x800, 16, DESC_F_NEXT, 1), (0x810, 256, DESC_F_WRITE | DESC_F_NEXT, 2), (0xA10, 1, DESC_F_WRITE, 0)],
    )
    r.desc(0, 0x700, 48, DESC_F_INDIRECT)
    r.publish(0)
    out["indirect"] = r.seed(3)
    r = _DeviceRing(4)
    r.desc(0, 0x800, 8, DESC_F_NEXT, 1)
    r.desc(1, 0x808, 8, DESC_F_NEXT, 0)  # loop
    r.desc(2, 0x800, 8, DESC_F_NEXT, 9)  # next out of range
    r.desc(3, 0, 8, raw_addr=0xFFFFFFFFFFFFFFF0)  # outside the table
    r.publish(0, 2, 3, 7)
    out["violations"] = r.seed(2)
    r = _DeviceRing(64)
    for i in range(64):
        r.desc(i, 0xC00 + 8 * i, 8, DESC_F_NEXT | (DESC_F_WRITE if i >= 32 else 0), i + 1)
    r.desc(63, 0xC00 + 8 * 63, 8, DESC_F_WRITE)
    r.publish(0)
    out["longest_chain"] = r.seed(6)
    r = _DeviceRing(2)
    r.avail_idx = 0xFFFF
    r.desc(0, 0x800, 1, DESC_F_WRITE)
    r.publish(0, 0)
    out["wrap"] = r.seed(1, flags=3, last_avail=0xFFFF)
    return out


# -- device models -------------------------------------------------------------------------


def _chain_bytes(readable: list[bytes], writable: list[int], head: int = 0) -> bytes:
    s = Seed().u16(head).below(len(readable), 5).below(len(writable), 5)
    for data in readable:
        s.u16(len(data)).raw(data)
    for n in writable:
        s.u16(n)
    return s.bytes()


def seeds_blk_handle() -> dict[str, bytes]:
    hdr = B.OUTHDR.pack

    def blk(storage: int, *chains: bytes) -> bytes:
        return Seed().below(storage, 3).u8(255).below(15, 32).raw(b"".join(chains)).bytes()

    read = _chain_bytes([hdr(B.T_IN, 0, 8)], [4096, 1])
    write = _chain_bytes([hdr(B.T_OUT, 0, 120), bytes(range(256)) * 4], [1])
    flush = _chain_bytes([hdr(B.T_FLUSH, 0, 0)], [1])
    get_id = _chain_bytes([hdr(B.T_GET_ID, 0, 0)], [20, 1])
    discard = _chain_bytes([hdr(B.T_DISCARD, 0, 0), B.DISCARD_WZ.pack(8, 16, 0)], [1])
    wz = _chain_bytes([hdr(B.T_WRITE_ZEROES, 0, 0), B.DISCARD_WZ.pack(100, 28, 1) * 2], [1])
    split = _chain_bytes([hdr(B.T_IN, 0, 1)[:5], hdr(B.T_IN, 0, 1)[5:]], [512, 513])
    return {
        "ram_all_ops": blk(0, write, read, flush, get_id, discard, wz),
        "readonly": blk(1, write, read, discard),
        "file": blk(2, write, read, flush, wz, read),
        "split_header": blk(0, split, _chain_bytes([hdr(0xFF, 0, 0)], [1]), _chain_bytes([], [])),
    }


def _cdb(*b: int) -> bytes:
    return bytes(b).ljust(32, b"\0")


def _scsi_cmd(lun: int, cdb: bytes, data_out: bytes = b"", data_in: int = 0, head: int = 0) -> bytes:
    req = S.CMD_REQ_HDR.pack(S.lun_address(0, lun), 1, 0, 0, 0) + cdb
    readable = [req] + ([data_out] if data_out else [])
    writable = [12 + 96] + ([data_in] if data_in else [])
    return _chain_bytes(readable, writable, head)


def seeds_scsi_handle() -> dict[str, bytes]:
    def scsi(opts: int, *ops: tuple[int, bytes]) -> bytes:
        s = Seed().u8(opts)
        for op, chain in ops:
            s.below(op, 5).raw(chain)
        return s.bytes()

    q = 2  # a request queue
    inquiry = _scsi_cmd(0, _cdb(T.INQUIRY, 0, 0, 0, 96, 0), data_in=96)
    vpd = _scsi_cmd(0, _cdb(T.INQUIRY, 1, 0xB0, 0, 64, 0), data_in=64)
    tur = _scsi_cmd(0, _cdb(T.TEST_UNIT_READY))
    cap = _scsi_cmd(0, _cdb(T.READ_CAPACITY_10), data_in=8)
    luns = _scsi_cmd(0, _cdb(T.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0), data_in=256)
    read = _scsi_cmd(0, _cdb(T.READ_10, 0, 0, 0, 0, 1, 0, 0, 2, 0), data_in=1024)
    write = _scsi_cmd(0, _cdb(T.WRITE_10, 0, 0, 0, 0, 3, 0, 0, 1, 0), data_out=b"\xab" * 512)
    tmf = _chain_bytes([S.CTRL_TMF_REQ.pack(S.T_TMF, S.T_TMF_LOGICAL_UNIT_RESET, S.lun_address(0, 0), 0)], [1])
    event = _chain_bytes([], [16])
    return {
        "scan": scsi(0, (q, luns), (q, inquiry), (q, tur), (q, tur), (q, vpd), (q, cap)),
        "io": scsi(1, (q, tur), (q, write), (q, read), (0, tmf), (q, read)),
        "hotplug_event": scsi(2, (4, b""), (1, event), (4, b""), (1, event)),
        "descriptor_sense": scsi(4, (q, _scsi_cmd(5, _cdb(T.READ_10))), (q, _scsi_cmd(0, _cdb(0xEE)))),
    }


def seeds_net_handle() -> dict[str, bytes]:
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(range(46))
    csum_hdr = N.HDR.pack(N.HDR_F_NEEDS_CSUM, 0, 0, 0, 14, 10, 0)

    def net(opts: int, features: int, *ops: tuple[int, bytes]) -> bytes:
        s = Seed().u8(opts).u32(features)
        for op, chain in ops:
            s.below(op, 5).raw(chain)
        return s.bytes()

    tx = _chain_bytes([bytes(12) + frame], [])
    tx_split = _chain_bytes([csum_hdr, frame], [])
    rx = _chain_bytes([], [2048])
    small = _chain_bytes([], [40])
    mrg = 1 << N.F_MRG_RXBUF
    return {
        "loopback": net(0, 0, (1, tx), (0, rx), (1, tx_split), (0, rx)),
        "mergeable": net(2, mrg | (1 << N.F_GUEST_CSUM), (1, tx), (0, small), (0, small), (0, rx), (4, b"")),
        "two_pairs": net(1, 0, (3, tx), (2, rx), (1, tx), (0, rx)),
    }


def seeds_spec_parsers() -> dict[str, bytes]:
    blk_cfg = BlockBackend(Storage(size=1 << 20)).config()
    scsi = ScsiBackend()
    scsi_cfg = scsi.config()
    scsi.close()
    net_cfg = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56]) + struct.pack("<HHHIBBHI", 1, 4, 1500, 10000, 1, 40, 128, 0x3F)
    return {
        "blk_config": Seed().below(0, 7).raw(blk_cfg).bytes(),
        "scsi_config": Seed().below(1, 7).raw(scsi_cfg).bytes(),
        "net_config": Seed().below(2, 7).raw(net_cfg[: N.CONFIG_SIZE]).bytes(),
        "fixed_sense": Seed().below(3, 7).raw(T.fixed_sense(T.UNIT_ATTENTION, 0x29, 0)).bytes(),
        "descriptor_sense": Seed().below(3, 7).raw(T.descriptor_sense(T.ILLEGAL_REQUEST, 0x25, 0)).bytes(),
        "lun_flat": Seed().below(4, 7).raw(T.encode_lun(300)).bytes(),
        "opcode": Seed().below(5, 7).raw(bytes([T.READ_16])).bytes(),
        "asc": Seed().below(6, 7).raw(bytes([0x04, 0x02])).bytes(),
    }


# -- drivers -----------------------------------------------------------------------------------


def seeds_blk_driver() -> dict[str, bytes]:
    backend = BlockBackend(Storage(size=1 << 20), num_queues=2)
    features = backend.features() & 0xFFFFFFFF
    config = backend.config()[: B.CONFIG_SIZE_V11]
    backend.storage.close()

    def blk(answers: bytes, ops: Callable[[Seed], None]) -> bytes:
        s = Seed().u32(features).take(config, B.CONFIG_SIZE_V11).below(1, 2).below(2, 5).blob(answers, 4096)
        ops(s)
        return s.bytes()

    def all_ops(s: Seed) -> None:
        s.below(1, 9).u8(2).below(1, 8).raw(bytes(range(256)) * 4)  # write 1 KiB at sector 2
        s.below(0, 9).u8(2).below(1, 8)  # read it back
        for op in (2, 3):  # flush, get_id
            s.below(op, 9).u8(0).below(0, 8)
        s.below(4, 9).u8(4).below(3, 8)  # discard
        s.below(5, 9).u8(8).below(0, 8).flag(True)  # write zeroes
        s.below(6, 9).u8(0).below(0, 8).below(1, 3).below(0, 2).below(1, 2)  # readv
        s.below(7, 9).u8(1).below(0, 8)  # batch
        s.below(8, 9).u8(0).below(0, 8)

    hostile = Seed()
    hostile.below(3, 4).u8(1)  # honest work, status forged to IOERR
    hostile.below(2, 4).take(b"\xff" * 64, 64).take(b"\x07", 1).flag(True).u32(0xFFFFFFFF)  # read: garbage
    return {
        "honest": blk(b"", all_ops),
        "hostile": blk(hostile.bytes(), all_ops),
    }


def seeds_net_driver() -> dict[str, bytes]:
    from pyvirtio.backends.net import NetBackend

    backend = NetBackend("loopback", pairs=2)
    extra = (1 << N.F_CTRL_VQ) | (1 << N.F_CTRL_RX) | (1 << N.F_CTRL_MAC_ADDR)
    features = (backend.features() | extra) & 0xFFFFFFFF
    config = backend.config()
    backend.close()

    def drv(opts: int, answers: bytes, ops: Callable[[Seed], None]) -> bytes:
        s = Seed().u32(features).take(config, N.CONFIG_SIZE).below(1, 2).below(3, 5).u8(opts)
        s.blob(answers, 4096)
        ops(s)
        return s.bytes()

    def traffic(s: Seed) -> None:
        s.below(0, 8).below(0, 2).flag(False)  # send a frame on pair 0
        s.below(1, 8).below(1, 2).below(2, 4).flag(False).flag(False).flag(False)  # three on pair 1
        s.below(3, 8).below(0, 2).below(1, 4).below(7, 8).flag(True)  # deliver 2 frames, receive
        s.below(6, 8).below(0, 2)  # release them
        s.below(5, 8).below(0, 2)  # reclaim tx
        s.below(4, 8).below(0, 2).below(0, 5).flag(True)  # promiscuous on
        s.below(4, 8).below(0, 2).below(4, 5).below(0, 2)  # one queue pair
        s.below(7, 8).below(0, 2)  # stats, info, link

    rx = Seed()
    for _ in range(2):  # two frames delivered by the device: a header, a 60-byte frame
        rx.take(bytes(10), 10).choose(0, (1, 0, 2)).flag(False).below(0, 8)
    merged = Seed()  # one frame over two 256-byte buffers (MRG_RXBUF, num_buffers 2)
    merged.take(bytes(10), 10).choose(2, (1, 0, 2)).flag(True).blob(b"\x02" * 244, 1600).below(0, 8)
    merged.take(b"", 10).choose(0, (1, 0, 2)).flag(True).blob(bytes(100), 1600).below(0, 8)
    return {
        "traffic": drv(1 | (1 << 2), rx.bytes(), traffic),
        "mergeable_small_buffers": drv(1 | (0 << 2), merged.bytes(), traffic),
        "control_refused": drv(3 << 2, Seed().choose(1, (0, 1)).below(0, 8).bytes(), traffic),
    }


def seeds_scsi_driver() -> dict[str, bytes]:
    scsi = ScsiBackend()
    features = scsi.features() & 0xFFFFFFFF
    config = scsi.config()
    scsi.close()

    def drv(answers: bytes, ops: Callable[[Seed], None], max_lun: int = 1) -> bytes:
        s = Seed().u32(features).take(config, S.CONFIG_SIZE).flag(False).below(0, 2).below(max_lun, 4)
        s.below(0, 2).below(3, 4).blob(answers, 4096)
        ops(s)
        return s.bytes()

    def io(s: Seed) -> None:
        s.below(2, 9).below(0, 2).below(0, 4).u8(3).below(1, 4).raw(b"\x5a" * 1024)  # write
        s.below(1, 9).below(0, 2).below(0, 4).u8(3).below(1, 4)  # read
        s.below(3, 9).below(0, 2).below(0, 4).u8(0).below(0, 4)  # flush
        s.below(4, 9).below(0, 2).below(0, 4).u8(0).below(3, 4)  # unmap
        s.below(6, 9).below(0, 2).below(0, 4)  # LUN reset
        s.below(7, 9).below(0, 2).below(0, 4).u64(5)  # abort
        s.below(8, 9).below(0, 2).below(1, 4)  # a raw command: INQUIRY VPD 0x80 on 0:1, 255 bytes in
        s.blob(bytes([T.INQUIRY, 1, 0x80, 0, 255, 0]), 16).below(255, 1024).flag(True)

    def events(s: Seed) -> None:
        s.below(5, 9).below(0, 2).below(0, 4)  # poll events
        s.below(0, 9).below(0, 2).below(0, 4)  # rescan

    ev = Seed()
    ev.below(1, 3)  # at init, one event buffer is completed right away:
    ev.take(S.EVENT.pack(S.T_TRANSPORT_RESET, S.lun_address(0, 1), S.EVT_RESET_RESCAN), S.EVENT.size).flag(False)
    return {
        "scan_io": drv(b"", io),
        "events": drv(ev.bytes(), events),
        "busy_then_ok": drv(
            Seed().below(0, 3).below(2, 4).u8(0).flag(False).u8(0).choose(0, (0, 2, 8, 0x28))
            .choose(2, (0, 3, 5, 12)).blob(b"", 96).blob(b"", 512).bytes(),
            io,
        ),
    }


# -- server -----------------------------------------------------------------------------------------

_OPS = 13
RAW, HANDSHAKE, MEM_TABLE, MEM_REG, RING, WRITE_MEM, DESC_OP, PUBLISH, KICK, SYNC, REQUEST, MISC, INFLIGHT = range(_OPS)


def _handshake(s: Seed, *, acks: bool = True, protocol: int = 0) -> None:
    """op_handshake: honest, features VERSION_1 | PROTOCOL_FEATURES | INDIRECT_DESC, REPLY_ACK if ``acks``."""
    feats = (1 << 32) | (1 << 30) | (1 << 28)
    protocol |= 1 << vu.PROTOCOL_F_REPLY_ACK if acks else 0
    s.below(HANDSHAKE, _OPS).flag(True).u64(feats).u64(protocol)
    s.flag(acks).flag(acks)  # need_reply on SET_OWNER / SET_FEATURES


def _mem_table(s: Seed) -> None:
    """op_mem_table: one region (pick index 0), honest fields, a memfd (fd kind 1), NEED_REPLY."""
    s.below(MEM_TABLE, _OPS).below(0, 5).flag(True).below(1, 4).flag(True)


def _ring(s: Seed, index: int, exp: int = 3) -> None:
    # index, honest, num exponent, "base" selector (not 0: base 0), need_reply,
    # kick kind 1 (eventfd), call with an eventfd, no err fd, enable 1.
    s.below(RING, _OPS).below(index, 4).flag(True).below(exp, 7).below(1, 4).flag(True)
    s.below(1, 4).flag(True).below(1, 4).flag(True).choose(0, (1, 0))


def _blk_request(s: Seed, rtype_index: int, first: int, *, slot: int = 0, sector: int = 0, dlen_units: int = 1) -> None:
    s.below(REQUEST, _OPS).below(0, 1).below(slot, 8).u16(first).choose(rtype_index, (0,) * 6).u16(sector)
    s.below(dlen_units, 5)


def _net_frame_echo(s: Seed) -> None:
    """With rx and tx rings set up: a frame sent, a receive buffer the loopback delivers it into."""
    # a frame on tx (ring key 1 of [0, 1]): no NEEDS_CSUM, the standard frame, one descriptor
    s.below(REQUEST, _OPS).below(1, 2).below(0, 8).u16(0).flag(False).choose(0, (0, 0)).u16(0).u16(0)
    s.flag(True).flag(False)
    s.below(KICK, _OPS).below(1, 2)
    # a 2048-byte receive buffer on rx: the loopback delivers the frame into it
    s.below(REQUEST, _OPS).below(0, 2).below(1, 8).u16(0).flag(True).choose(0, (0, 0, 0))
    s.below(KICK, _OPS).below(0, 2)
    s.below(SYNC, _OPS)


def _seed_server(model: int, build: Callable[[Seed], None], *, inflight: bool = False) -> bytes:
    s = Seed().below(model, 3).below(0, 2).flag(inflight)
    build(s)
    return s.bytes()


def seeds_server() -> dict[str, bytes]:
    def blk_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        s.below(SYNC, _OPS)
        _ring(s, 0)
        _blk_request(s, 3, 0)  # GET_ID
        s.below(KICK, _OPS).below(0, 1)
        _blk_request(s, 1, 3, slot=1, sector=4, dlen_units=2)  # write
        _blk_request(s, 0, 6, slot=2, sector=4, dlen_units=2)  # read it back
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)
        s.below(MISC, _OPS).below(0, 7).below(0, 256).below(59, 256)  # GET_CONFIG 60 bytes
        s.below(MISC, _OPS).below(2, 7).below(0, 4)  # GET_VRING_BASE (stops the ring)

    def scsi_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _ring(s, 2)
        s.below(REQUEST, _OPS).below(0, 1).below(0, 8).u16(0).choose(0, (0,) * 5)  # INQUIRY
        s.take(b"\0\0\0\x60", 15).below(0, 2).u64(1).below(1, 3).flag(True)
        s.below(KICK, _OPS).below(0, 1)
        s.below(REQUEST, _OPS).below(0, 1).below(1, 8).u16(3).choose(1, (0,) * 5)  # TEST UNIT READY
        s.take(b"", 15).below(0, 2).u64(2).below(0, 3).flag(False)
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    def hostile_ring(s: Seed) -> None:
        _handshake(s, acks=False)
        _mem_table(s)
        _ring(s, 0, exp=2)
        # descriptors 0 -> 1 -> 0: a loop
        for i, nxt in ((0, 1), (1, 0)):
            s.below(DESC_OP, _OPS).below(0, 1).u16(i).below(0, 3).u16(0).below(1, 4).u16(16)
            s.below(1, 4).u8(DESC_F_NEXT).below(1, 4).u16(nxt)
        s.below(PUBLISH, _OPS).below(0, 1).below(1, 4).flag(True).u16(0)
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    def raw_messages(s: Seed) -> None:
        _handshake(s)
        # An unknown request with NEED_REPLY (a failure ack), then SET_VRING_CALL with a pipe
        # instead of an eventfd (a violation).
        s.below(RAW, _OPS).u8(200).choose(1, (0, 0)).blob(b"", 300).below(1, 8).below(0, 4)
        s.below(SYNC, _OPS)
        s.below(RAW, _OPS).u8(vu.SET_VRING_CALL).choose(1, (0, 0)).blob(_U64(0), 300).below(1, 8)
        s.below(1, 4).below(2, 4)

    def mem_slots(s: Seed) -> None:
        _handshake(s, protocol=1 << vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS)
        s.below(MEM_REG, _OPS).flag(True).flag(True).below(1, 4).flag(True)  # ADD_MEM_REG, honest region
        _ring(s, 1)
        s.below(MEM_REG, _OPS).flag(False).flag(True).flag(False).flag(True)  # REM_MEM_REG
        s.below(SYNC, _OPS)
        s.below(MISC, _OPS).below(5, 7).flag(True)  # RESET_DEVICE

    def net_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _ring(s, 0)  # rx
        _ring(s, 1)  # tx
        _net_frame_echo(s)

    def inflight_session(s: Seed) -> None:
        _handshake(s, protocol=1 << vu.PROTOCOL_F_INFLIGHT_SHMFD)
        s.below(INFLIGHT, _OPS).below(0, 3).below(1, 4).below(3, 9)  # GET_INFLIGHT_FD: 2 queues of 8
        s.below(INFLIGHT, _OPS).below(1, 3).flag(True)  # SET_INFLIGHT_FD with that area
        _mem_table(s)
        _ring(s, 0)
        _blk_request(s, 3, 0)
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    def hostile_inflight(s: Seed) -> None:
        _handshake(s, protocol=1 << vu.PROTOCOL_F_INFLIGHT_SHMFD)
        # The harness's own area: version 1, 8 entries, used_idx 0; entries 2 and 5 in flight.
        header = struct.pack("<QHHHH", 0, 1, 8, 0, 0)
        s.below(WRITE_MEM, _OPS).flag(True).u16(0).blob(header, 256)
        for head, counter in ((2, 7), (5, 3)):
            s.below(WRITE_MEM, _OPS).flag(True).u16(16 + 16 * head).blob(b"\x01" + bytes(7) + _U64(counter), 256)
        # SET_INFLIGHT_FD with it: 64 KiB at 0, 1 queue of 8, the inflight memfd (kind 4), NEED_REPLY
        s.below(INFLIGHT, _OPS).below(2, 3).choose(0, (0, 0)).choose(0, (0,)).choose(0, (0, 0, 0))
        s.choose(0, (0, 0, 0)).choose(0, (0,)).flag(True)
        _mem_table(s)
        # The heads it left in flight are GET_ID requests, written straight into ring 0's table
        # (honest layout: the table at offset 0) and the data area, before the ring starts.
        gpa, data = SV.GPA_BASE, SV.DATA_OFF
        descs = b""
        for head, base in ((2, data), (5, data + 256)):
            descs += DESC.pack(gpa + base, 16, DESC_F_NEXT, head + 1)
            descs += DESC.pack(gpa + base + 64, B.ID_BYTES, DESC_F_WRITE | DESC_F_NEXT, head + 2)
            descs += DESC.pack(gpa + base + 128, 1, DESC_F_WRITE, 0)
        s.below(WRITE_MEM, _OPS).flag(False).u16(32).blob(descs, 256)
        for base in (data, data + 256):
            s.below(WRITE_MEM, _OPS).flag(False).u16(base).blob(B.OUTHDR.pack(B.T_GET_ID, 0, 0), 256)
        _ring(s, 0)  # starts (enabled): recovers heads 5 then 2 (by counter) and runs them first
        s.below(SYNC, _OPS)
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    return {
        "blk_session": _seed_server(0, blk_session),
        "scsi_session": _seed_server(1, scsi_session),
        "net_session": _seed_server(2, net_session),
        "hostile_ring": _seed_server(0, hostile_ring),
        "raw_messages": _seed_server(0, raw_messages),
        "mem_slots": _seed_server(0, mem_slots),
        "inflight_session": _seed_server(0, inflight_session, inflight=True),
        "hostile_inflight": _seed_server(0, hostile_inflight, inflight=True),
    }


def _packed_ring(s: Seed, index: int, num: int, which: int = 0) -> None:
    """PackedSession.op_ring: honest, ``num`` descriptors, base kind ``which`` (0 fresh, 1 lap 0), the _ring tail."""
    s.below(RING, _OPS).below(index, 4).flag(True).below(num - 1, SV.RING_SLOT // 16 - 1).below(which, 4)
    s.flag(True).below(1, 4).flag(True).below(1, 4).flag(True).choose(0, (1, 0))


def seeds_server_packed() -> dict[str, bytes]:
    """The server target on packed rings (fuzz._server_packed): sessions over odd sizes, laps, hostile flags."""

    def blk_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _packed_ring(s, 0, 7)  # 7 slots: the three-descriptor requests below wrap around it
        for k in range(5):
            _blk_request(s, (3, 1, 0, 0, 1)[k], 0, slot=k, sector=4, dlen_units=2)
            s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)
        s.below(MISC, _OPS).below(2, 7).below(0, 4)  # GET_VRING_BASE: the wrap counters in the answer

    def lap0_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _packed_ring(s, 0, 5, which=1)
        _blk_request(s, 3, 0)
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    def scsi_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _packed_ring(s, 2, 9)
        s.below(REQUEST, _OPS).below(0, 1).below(0, 8).u16(0).choose(0, (0,) * 5)  # INQUIRY
        s.take(b"\0\0\0\x60", 15).below(0, 2).u64(1).below(1, 3).flag(True)
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    def net_session(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _packed_ring(s, 0, 3)  # rx
        _packed_ring(s, 1, 3)  # tx
        _net_frame_echo(s)

    def hostile_flags(s: Seed) -> None:
        _handshake(s, acks=False)
        _mem_table(s)
        _packed_ring(s, 0, 4)
        # slot 0: NEXT, available; slots 1-3 too: a chain running round the whole ring
        for i in range(4):
            s.below(DESC_OP, _OPS).below(0, 1).u16(i).below(0, 3).u16(0).below(1, 4).u16(16)
            s.below(1, 4).u16(i).below(1, 4).u8(DESC_F_NEXT).below(1, 2)
        s.below(KICK, _OPS).below(0, 1)
        s.below(PUBLISH, _OPS).below(0, 1).below(1, 4).u8(0).below(0, 8)  # the next slot in the wrong lap
        s.below(KICK, _OPS).below(0, 1)
        s.below(SYNC, _OPS)

    return {
        "blk_session": _seed_server(0, blk_session),
        "lap0_session": _seed_server(0, lap0_session),
        "scsi_session": _seed_server(1, scsi_session),
        "net_session": _seed_server(2, net_session),
        "hostile_flags": _seed_server(0, hostile_flags),
        "inflight_session": _seed_server(0, blk_session, inflight=True),
    }


def known_inputs() -> dict[str, bytes]:
    """Inputs that reproduce the known issues (fuzz/known/<target>-<issue>), replayed by the tests."""

    def remap_leak(s: Seed) -> None:
        _handshake(s)
        _mem_table(s)
        _ring(s, 0)  # running
        # SET_MEM_TABLE with no regions (raw: VERSION, payload nregions 0, true size, no fds)
        s.below(RAW, _OPS).u8(vu.SET_MEM_TABLE).choose(0, (0, 0)).blob(bytes(8), 300).below(1, 8).below(0, 4)
        s.below(SYNC, _OPS)

    return {"server-remap-leak": _seed_server(0, remap_leak)}


def _U64(v: int) -> bytes:
    return struct.pack("=Q", v)


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "vu_decode_request": seeds_vu_decode_request,
    "vu_parse_reply": seeds_vu_parse_reply,
    "vu_backend_channel": seeds_vu_backend_channel,
    "split_reap": seeds_split_reap,
    "fixed_reap": seeds_fixed_reap,
    "device_pop": seeds_device_pop,
    "blk_handle": seeds_blk_handle,
    "scsi_handle": seeds_scsi_handle,
    "net_handle": seeds_net_handle,
    "spec_parsers": seeds_spec_parsers,
    "blk_driver": seeds_blk_driver,
    "scsi_driver": seeds_scsi_driver,
    "net_driver": seeds_net_driver,
    "server": seeds_server,
    "server_packed": seeds_server_packed,
    "packed_reap": _packed.seeds_packed_reap,
    "packed_device_pop": _packed.seeds_packed_device_pop,
    "packed_stream": _packed_stream.seeds_packed_stream,
}


def all_seeds() -> dict[str, dict[str, bytes]]:
    return {target: build() for target, build in SEEDS.items()}


KNOWN = CORPUS.parent / "known"


def _files(corpus: Path) -> dict[Path, bytes]:
    out = {
        corpus / target / f"seed-{name}": data for target, seeds in all_seeds().items() for name, data in seeds.items()
    }
    out.update({corpus.parent / "known" / name: data for name, data in known_inputs().items()})
    return out


def write(corpus: Path = CORPUS) -> int:
    """(Re)write every seed file (and fuzz/known/); returns how many changed. Other files are left alone."""
    changed = 0
    for path, data in _files(corpus).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            changed += 1
    return changed


def stale(corpus: Path = CORPUS) -> list[str]:
    """Seed files missing or different from what this module builds."""
    return [
        str(path.relative_to(corpus.parent))
        for path, data in _files(corpus).items()
        if not path.exists() or path.read_bytes() != data
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report seeds that are missing or out of date")
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"out of date: {name}")
        return 1 if bad else 0
    print(f"{write()} seed files written under {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
