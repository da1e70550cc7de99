"""Layout tests: pyvirtio.spec against Linux's uapi headers, through a C probe.

A tiny C program is generated from the constants in :mod:`pyvirtio.spec`,
compiled with ``cc`` against /usr/include/linux/virtio_*.h and run; it
prints each macro value, ``sizeof`` and ``offsetof`` it was asked for, and
the split-ring layout from ``vring_init`` / ``vring_size`` for every queue
size. Every value must equal ours. A second build makes a shared library
around the header's own ``vring_need_event`` so that the Python version can
be compared call by call.

Macros that only newer headers define are probed under ``#ifdef``; the rest
must exist (a missing one is a compile error, so a failure). Without a C
compiler or the headers the module skips on a developer machine and fails
under CI=true (peers.missing_peer, the one rule for every missing peer).
"""

from __future__ import annotations

import ctypes
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peers import missing_peer
from pyvirtio.spec import blk, common, net, ring, scsi

NeedEvent = Callable[[int, int, int], int]
INCLUDE = Path("/usr/include/linux")
HEADERS = ("virtio_config.h", "virtio_ring.h", "virtio_blk.h", "virtio_scsi.h", "virtio_net.h")
HEADERS += ("virtio_ids.h",)


@dataclass(frozen=True)
class Probe:
    key: str  # what the probe prints it as
    expr: str  # a C integer expression
    expected: int  # pyvirtio's value
    guard: str | None = None  # only probed if this macro is defined


# Macros that headers older than Linux 6.1 may lack: probed only if defined. Every
# other macro must exist, so a misspelt name (or a renamed one) fails to compile.
NEWER_MACROS = {
    "VIRTIO_F_RING_RESET",
    "VIRTIO_F_NOTIFICATION_DATA",
    "VIRTIO_F_NOTIF_CONFIG_DATA",
    "VIRTIO_BLK_F_SECURE_ERASE",
    "VIRTIO_BLK_F_LIFETIME",
    "VIRTIO_BLK_T_SECURE_ERASE",
    "VIRTIO_BLK_T_GET_LIFETIME",
    "VIRTIO_NET_F_HOST_USO",
    "VIRTIO_NET_F_HASH_REPORT",
    "VIRTIO_NET_F_GUEST_HDRLEN",
    "VIRTIO_NET_F_RSS",
    "VIRTIO_NET_HDR_GSO_UDP_L4",
}


def const(macro: str, expected: int) -> Probe:
    return Probe(macro, macro, expected, macro if macro in NEWER_MACROS else None)


def size_of(ctype: str, expected: int) -> Probe:
    return Probe(f"sizeof({ctype})", f"sizeof({ctype})", expected)


def offset_of(ctype: str, member: str, expected: int) -> Probe:
    return Probe(f"offsetof({ctype}, {member})", f"offsetof({ctype}, {member})", expected)


def member_size(ctype: str, member: str, expected: int) -> Probe:
    return Probe(f"sizeof(({ctype} *)0)->{member}", f"sizeof((({ctype} *)0)->{member})", expected)


def struct_offsets(fmt: str) -> list[int]:
    """Byte offset of each field of a little-endian unpadded format: '<8sQBBB' -> [0, 8, 16, 17, 18]."""
    assert fmt[0] == "<"
    offsets: list[int] = []
    pos = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt[1:]):
        n = int(count or 1)
        if code in "sp":
            offsets.append(pos)
            pos += n
        else:
            for _ in range(n):
                offsets.append(pos)
                pos += struct.calcsize("<" + code)
    return offsets


def fields_probes(ctype: str, fmt: str, members: list[str]) -> list[Probe]:
    """offsetof every member == our struct format's field offsets, and sizeof == the format's size."""
    offs = struct_offsets(fmt)
    assert len(offs) == len(members), (fmt, members)
    probes = [offset_of(ctype, m, off) for m, off in zip(members, offs, strict=True)]
    probes.append(size_of(ctype, struct.calcsize(fmt)))
    return probes


def header_struct_fields(header: str, name: str) -> set[str]:
    """Field names declared in ``struct name { ... }`` of a uapi header (nested ones included)."""
    text = re.sub(r"/\*.*?\*/", "", (INCLUDE / header).read_text(), flags=re.S)
    m = re.search(r"struct\s+" + name + r"\s*\{", text)
    assert m, f"struct {name} not found in {header}"
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    body = text[m.end() : i - 1]
    return set(re.findall(r"(\w+)\s*(?:\[[^\]]*\])?\s*;", body))


# -- what is probed -----------------------------------------------------------


def named(macro_prefix: str, module: object, attr_prefix: str, table: dict[int, str]) -> list[Probe]:
    """For a {value: NAME} table: macro_prefix+NAME == value == module.<attr_prefix+NAME>."""
    probes: list[Probe] = []
    for value, name in table.items():
        probes.append(const(macro_prefix + name, value))
        probes.append(const(macro_prefix + name, getattr(module, attr_prefix + name)))
    return probes


BLK_GEOMETRY = {"cylinders", "heads", "sectors"}


ConfigFields = tuple[tuple[str, int, str], ...]


def config_probes(header: str, cstruct: str, fields: ConfigFields, nested: set[str]) -> list[Probe]:
    """Offset and size of every config field that this kernel's header declares."""
    declared = header_struct_fields(header, cstruct)
    probes: list[Probe] = []
    for name, off, fmt in fields:
        if name not in declared:
            continue
        path = f"geometry.{name}" if name in nested else name
        probes.append(offset_of(f"struct {cstruct}", path, off))
        probes.append(member_size(f"struct {cstruct}", path, struct.calcsize(fmt)))
    return probes


def _groups() -> dict[str, list[Probe]]:
    g: dict[str, list[Probe]] = {}
    g["status"] = [
        const("VIRTIO_CONFIG_S_ACKNOWLEDGE", common.STATUS_ACKNOWLEDGE),
        const("VIRTIO_CONFIG_S_DRIVER", common.STATUS_DRIVER),
        const("VIRTIO_CONFIG_S_DRIVER_OK", common.STATUS_DRIVER_OK),
        const("VIRTIO_CONFIG_S_FEATURES_OK", common.STATUS_FEATURES_OK),
        const("VIRTIO_CONFIG_S_NEEDS_RESET", common.STATUS_NEEDS_RESET),
        const("VIRTIO_CONFIG_S_FAILED", common.STATUS_FAILED),
    ]
    g["common_features"] = [
        const("VIRTIO_F_NOTIFY_ON_EMPTY", common.F_NOTIFY_ON_EMPTY),
        const("VIRTIO_F_ANY_LAYOUT", common.F_ANY_LAYOUT),
        const("VIRTIO_RING_F_INDIRECT_DESC", common.F_RING_INDIRECT_DESC),
        const("VIRTIO_RING_F_EVENT_IDX", common.F_RING_EVENT_IDX),
        const("VIRTIO_F_VERSION_1", common.F_VERSION_1),
        const("VIRTIO_F_ACCESS_PLATFORM", common.F_ACCESS_PLATFORM),
        const("VIRTIO_F_RING_PACKED", common.F_RING_PACKED),
        const("VIRTIO_F_IN_ORDER", common.F_IN_ORDER),
        const("VIRTIO_F_ORDER_PLATFORM", common.F_ORDER_PLATFORM),
        const("VIRTIO_F_SR_IOV", common.F_SR_IOV),
        const("VIRTIO_F_NOTIFICATION_DATA", common.F_NOTIFICATION_DATA),
        const("VIRTIO_F_NOTIF_CONFIG_DATA", common.F_NOTIF_CONFIG_DATA),
        const("VIRTIO_F_RING_RESET", common.F_RING_RESET),
        const("VIRTIO_TRANSPORT_F_START", common.TRANSPORT_F_START),
        const("VIRTIO_TRANSPORT_F_END", common.TRANSPORT_F_END),
    ]
    g["device_ids"] = [
        const("VIRTIO_ID_NET", common.DEVICE_ID_NET),
        const("VIRTIO_ID_BLOCK", common.DEVICE_ID_BLOCK),
        const("VIRTIO_ID_CONSOLE", common.DEVICE_ID_CONSOLE),
        const("VIRTIO_ID_RNG", common.DEVICE_ID_RNG),
        const("VIRTIO_ID_SCSI", common.DEVICE_ID_SCSI),
        const("VIRTIO_ID_FS", common.DEVICE_ID_FS),
    ]
    g["ring"] = [
        const("VRING_DESC_F_NEXT", ring.DESC_F_NEXT),
        const("VRING_DESC_F_WRITE", ring.DESC_F_WRITE),
        const("VRING_DESC_F_INDIRECT", ring.DESC_F_INDIRECT),
        const("VRING_AVAIL_F_NO_INTERRUPT", ring.AVAIL_F_NO_INTERRUPT),
        const("VRING_USED_F_NO_NOTIFY", ring.USED_F_NO_NOTIFY),
        const("VRING_DESC_ALIGN_SIZE", ring.DESC_ALIGN),
        const("VRING_AVAIL_ALIGN_SIZE", ring.AVAIL_ALIGN),
        const("VRING_USED_ALIGN_SIZE", ring.USED_ALIGN),
        size_of("struct vring_desc", ring.DESC_SIZE),
        size_of("struct vring_desc", ring.DESC.size),
        offset_of("struct vring_desc", "addr", ring.DESC_OFF_ADDR),
        offset_of("struct vring_desc", "len", ring.DESC_OFF_LEN),
        offset_of("struct vring_desc", "flags", ring.DESC_OFF_FLAGS),
        offset_of("struct vring_desc", "next", ring.DESC_OFF_NEXT),
        *fields_probes("struct vring_desc", "<QIHH", ["addr", "len", "flags", "next"]),
        size_of("struct vring_used_elem", ring.USED_ELEM_SIZE),
        *fields_probes("struct vring_used_elem", "<II", ["id", "len"]),
        offset_of("struct vring_avail", "flags", ring.AVAIL_OFF_FLAGS),
        offset_of("struct vring_avail", "idx", ring.AVAIL_OFF_IDX),
        offset_of("struct vring_avail", "ring", ring.AVAIL_OFF_RING),
        size_of("struct vring_avail", ring.AVAIL_OFF_RING),
        offset_of("struct vring_used", "flags", ring.USED_OFF_FLAGS),
        offset_of("struct vring_used", "idx", ring.USED_OFF_IDX),
        offset_of("struct vring_used", "ring", ring.USED_OFF_RING),
        size_of("struct vring_used", ring.USED_OFF_RING),
    ]
    g["packed_ring"] = [
        # Linux defines AVAIL/USED as bit shifts, pyvirtio as values (virtio 1.2 §2.8.1 writes (1 << 7)).
        Probe("1 << VRING_PACKED_DESC_F_AVAIL", "(1 << VRING_PACKED_DESC_F_AVAIL)", ring.PACKED_DESC_F_AVAIL),
        Probe("1 << VRING_PACKED_DESC_F_USED", "(1 << VRING_PACKED_DESC_F_USED)", ring.PACKED_DESC_F_USED),
        const("VRING_PACKED_EVENT_FLAG_ENABLE", ring.RING_EVENT_FLAGS_ENABLE),
        const("VRING_PACKED_EVENT_FLAG_DISABLE", ring.RING_EVENT_FLAGS_DISABLE),
        const("VRING_PACKED_EVENT_FLAG_DESC", ring.RING_EVENT_FLAGS_DESC),
        const("VRING_PACKED_EVENT_F_WRAP_CTR", ring.RING_EVENT_WRAP_SHIFT),
        *fields_probes("struct vring_packed_desc", ring.PACKED_DESC.format, ["addr", "len", "id", "flags"]),
        offset_of("struct vring_packed_desc", "addr", ring.PACKED_DESC_OFF_ADDR),
        offset_of("struct vring_packed_desc", "len", ring.PACKED_DESC_OFF_LEN),
        offset_of("struct vring_packed_desc", "id", ring.PACKED_DESC_OFF_ID),
        offset_of("struct vring_packed_desc", "flags", ring.PACKED_DESC_OFF_FLAGS),
        *fields_probes("struct vring_packed_desc_event", ring.EVENT_SUPPRESS.format, ["off_wrap", "flags"]),
        offset_of("struct vring_packed_desc_event", "off_wrap", ring.EVENT_OFF_OFF_WRAP),
        offset_of("struct vring_packed_desc_event", "flags", ring.EVENT_OFF_FLAGS),
        size_of("struct vring_packed_desc_event", ring.EVENT_SUPPRESS_SIZE),
    ]
    g["blk"] = [
        # Every feature bit pyvirtio names, under the header's name for it.
        *named("VIRTIO_BLK_F_", blk, "F_", {b: n.removeprefix("BLK_") for b, n in blk.FEATURE_NAMES.items()}),
        const("VIRTIO_BLK_F_SIZE_MAX", blk.F_SIZE_MAX),
        const("VIRTIO_BLK_F_FLUSH", blk.F_FLUSH),
        const("VIRTIO_BLK_F_DISCARD", blk.F_DISCARD),
        const("VIRTIO_BLK_F_WRITE_ZEROES", blk.F_WRITE_ZEROES),
        const("VIRTIO_BLK_F_SECURE_ERASE", blk.F_SECURE_ERASE),
        const("VIRTIO_BLK_F_LIFETIME", blk.F_LIFETIME),
        const("VIRTIO_BLK_T_IN", blk.T_IN),
        const("VIRTIO_BLK_T_OUT", blk.T_OUT),
        const("VIRTIO_BLK_T_FLUSH", blk.T_FLUSH),
        const("VIRTIO_BLK_T_GET_ID", blk.T_GET_ID),
        const("VIRTIO_BLK_T_GET_LIFETIME", blk.T_GET_LIFETIME),
        const("VIRTIO_BLK_T_DISCARD", blk.T_DISCARD),
        const("VIRTIO_BLK_T_WRITE_ZEROES", blk.T_WRITE_ZEROES),
        const("VIRTIO_BLK_T_SECURE_ERASE", blk.T_SECURE_ERASE),
        const("VIRTIO_BLK_S_OK", blk.S_OK),
        const("VIRTIO_BLK_S_IOERR", blk.S_IOERR),
        const("VIRTIO_BLK_S_UNSUPP", blk.S_UNSUPP),
        const("VIRTIO_BLK_ID_BYTES", blk.ID_BYTES),
        const("VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", blk.DWZ_F_UNMAP),
        size_of("struct virtio_blk_outhdr", blk.OUTHDR_SIZE),
        *fields_probes("struct virtio_blk_outhdr", "<IIQ", ["type", "ioprio", "sector"]),
        size_of("struct virtio_blk_discard_write_zeroes", blk.DISCARD_WZ_SIZE),
        *fields_probes("struct virtio_blk_discard_write_zeroes", "<QII", ["sector", "num_sectors", "flags"]),
        *config_probes("virtio_blk.h", "virtio_blk_config", blk.CONFIG_FIELDS, BLK_GEOMETRY),
    ]
    g["scsi"] = [
        const("VIRTIO_SCSI_F_INOUT", scsi.F_INOUT),
        const("VIRTIO_SCSI_F_HOTPLUG", scsi.F_HOTPLUG),
        const("VIRTIO_SCSI_F_CHANGE", scsi.F_CHANGE),
        const("VIRTIO_SCSI_F_T10_PI", scsi.F_T10_PI),
        const("VIRTIO_SCSI_CDB_SIZE", scsi.CDB_SIZE),
        const("VIRTIO_SCSI_SENSE_SIZE", scsi.SENSE_SIZE),
        *named("VIRTIO_SCSI_S_", scsi, "S_", scsi.RESPONSE_NAMES),
        const("VIRTIO_SCSI_S_SIMPLE", scsi.S_SIMPLE),
        const("VIRTIO_SCSI_S_ORDERED", scsi.S_ORDERED),
        const("VIRTIO_SCSI_S_HEAD", scsi.S_HEAD),
        const("VIRTIO_SCSI_S_ACA", scsi.S_ACA),
        const("VIRTIO_SCSI_T_TMF", scsi.T_TMF),
        const("VIRTIO_SCSI_T_AN_QUERY", scsi.T_AN_QUERY),
        const("VIRTIO_SCSI_T_AN_SUBSCRIBE", scsi.T_AN_SUBSCRIBE),
        const("VIRTIO_SCSI_T_TMF_ABORT_TASK", scsi.T_TMF_ABORT_TASK),
        const("VIRTIO_SCSI_T_TMF_ABORT_TASK_SET", scsi.T_TMF_ABORT_TASK_SET),
        const("VIRTIO_SCSI_T_TMF_CLEAR_ACA", scsi.T_TMF_CLEAR_ACA),
        const("VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET", scsi.T_TMF_CLEAR_TASK_SET),
        const("VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET", scsi.T_TMF_I_T_NEXUS_RESET),
        const("VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET", scsi.T_TMF_LOGICAL_UNIT_RESET),
        const("VIRTIO_SCSI_T_TMF_QUERY_TASK", scsi.T_TMF_QUERY_TASK),
        const("VIRTIO_SCSI_T_TMF_QUERY_TASK_SET", scsi.T_TMF_QUERY_TASK_SET),
        const("VIRTIO_SCSI_T_NO_EVENT", scsi.T_NO_EVENT),
        const("VIRTIO_SCSI_T_TRANSPORT_RESET", scsi.T_TRANSPORT_RESET),
        const("VIRTIO_SCSI_T_ASYNC_NOTIFY", scsi.T_ASYNC_NOTIFY),
        const("VIRTIO_SCSI_T_PARAM_CHANGE", scsi.T_PARAM_CHANGE),
        const("VIRTIO_SCSI_T_EVENTS_MISSED", scsi.T_EVENTS_MISSED),
        const("VIRTIO_SCSI_EVT_RESET_HARD", scsi.EVT_RESET_HARD),
        const("VIRTIO_SCSI_EVT_RESET_RESCAN", scsi.EVT_RESET_RESCAN),
        const("VIRTIO_SCSI_EVT_RESET_REMOVED", scsi.EVT_RESET_REMOVED),
        # The header struct ends in cdb[], ours (a header format) stops before it.
        *fields_probes("struct virtio_scsi_cmd_req", "<8sQBBB", ["lun", "tag", "task_attr", "prio", "crn"])[
            :-1
        ],
        offset_of("struct virtio_scsi_cmd_req", "cdb", scsi.CMD_REQ_HDR.size),
        size_of("struct virtio_scsi_cmd_req", scsi.CMD_REQ_SIZE),
        *fields_probes(
            "struct virtio_scsi_cmd_resp",
            "<IIHBB",
            ["sense_len", "resid", "status_qualifier", "status", "response"],
        )[:-1],
        offset_of("struct virtio_scsi_cmd_resp", "sense", scsi.CMD_RESP_HDR.size),
        size_of("struct virtio_scsi_cmd_resp", scsi.CMD_RESP_SIZE),
        *fields_probes("struct virtio_scsi_ctrl_tmf_req", "<II8sQ", ["type", "subtype", "lun", "tag"]),
        size_of("struct virtio_scsi_ctrl_tmf_resp", scsi.CTRL_TMF_RESP_SIZE),
        *fields_probes("struct virtio_scsi_ctrl_an_req", "<I8sI", ["type", "lun", "event_requested"]),
        *fields_probes("struct virtio_scsi_ctrl_an_resp", "<IB", ["event_actual", "response"]),
        *fields_probes("struct virtio_scsi_event", "<I8sI", ["event", "lun", "reason"]),
        *config_probes("virtio_scsi.h", "virtio_scsi_config", scsi.CONFIG_FIELDS, set()),
        size_of("struct virtio_scsi_config", scsi.CONFIG_SIZE),
    ]
    g["net"] = [
        *named("VIRTIO_NET_F_", net, "F_", {b: n.removeprefix("NET_") for b, n in net.FEATURE_NAMES.items()}),
        const("VIRTIO_NET_F_CSUM", net.F_CSUM),
        const("VIRTIO_NET_F_MRG_RXBUF", net.F_MRG_RXBUF),
        const("VIRTIO_NET_F_CTRL_VQ", net.F_CTRL_VQ),
        const("VIRTIO_NET_F_MQ", net.F_MQ),
        const("VIRTIO_NET_F_HOST_USO", net.F_HOST_USO),
        const("VIRTIO_NET_F_GUEST_HDRLEN", net.F_GUEST_HDRLEN),
        const("VIRTIO_NET_F_SPEED_DUPLEX", net.F_SPEED_DUPLEX),
        size_of("struct virtio_net_hdr_v1", net.HDR_SIZE),
        *fields_probes(
            "struct virtio_net_hdr_v1",
            "<BBHHHHH",
            ["flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset", "num_buffers"],
        ),
        const("VIRTIO_NET_HDR_F_NEEDS_CSUM", net.HDR_F_NEEDS_CSUM),
        const("VIRTIO_NET_HDR_F_DATA_VALID", net.HDR_F_DATA_VALID),
        const("VIRTIO_NET_HDR_F_RSC_INFO", net.HDR_F_RSC_INFO),
        const("VIRTIO_NET_HDR_GSO_NONE", net.GSO_NONE),
        const("VIRTIO_NET_HDR_GSO_TCPV4", net.GSO_TCPV4),
        const("VIRTIO_NET_HDR_GSO_UDP", net.GSO_UDP),
        const("VIRTIO_NET_HDR_GSO_TCPV6", net.GSO_TCPV6),
        const("VIRTIO_NET_HDR_GSO_UDP_L4", net.GSO_UDP_L4),
        const("VIRTIO_NET_HDR_GSO_ECN", net.GSO_ECN),
        const("VIRTIO_NET_S_LINK_UP", net.S_LINK_UP),
        const("VIRTIO_NET_S_ANNOUNCE", net.S_ANNOUNCE),
        *fields_probes("struct virtio_net_ctrl_hdr", "<BB", ["class", "cmd"]),
        const("VIRTIO_NET_OK", net.CTRL_OK),
        const("VIRTIO_NET_ERR", net.CTRL_ERR),
        const("VIRTIO_NET_CTRL_RX", net.CTRL_RX),
        const("VIRTIO_NET_CTRL_RX_PROMISC", net.CTRL_RX_PROMISC),
        const("VIRTIO_NET_CTRL_RX_ALLMULTI", net.CTRL_RX_ALLMULTI),
        const("VIRTIO_NET_CTRL_RX_ALLUNI", net.CTRL_RX_ALLUNI),
        const("VIRTIO_NET_CTRL_RX_NOMULTI", net.CTRL_RX_NOMULTI),
        const("VIRTIO_NET_CTRL_RX_NOUNI", net.CTRL_RX_NOUNI),
        const("VIRTIO_NET_CTRL_RX_NOBCAST", net.CTRL_RX_NOBCAST),
        const("VIRTIO_NET_CTRL_MAC", net.CTRL_MAC),
        const("VIRTIO_NET_CTRL_MAC_TABLE_SET", net.CTRL_MAC_TABLE_SET),
        const("VIRTIO_NET_CTRL_MAC_ADDR_SET", net.CTRL_MAC_ADDR_SET),
        const("VIRTIO_NET_CTRL_VLAN", net.CTRL_VLAN),
        const("VIRTIO_NET_CTRL_ANNOUNCE", net.CTRL_ANNOUNCE),
        const("VIRTIO_NET_CTRL_MQ", net.CTRL_MQ),
        const("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET", net.CTRL_MQ_VQ_PAIRS_SET),
        const("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN", net.CTRL_MQ_VQ_PAIRS_MIN),
        const("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX", net.CTRL_MQ_VQ_PAIRS_MAX),
        const("VIRTIO_NET_CTRL_GUEST_OFFLOADS", net.CTRL_GUEST_OFFLOADS),
        offset_of("struct virtio_net_config", "mac", net.CONFIG_OFF_MAC),
        member_size("struct virtio_net_config", "mac", 6),
        *config_probes("virtio_net.h", "virtio_net_config", net.CONFIG_FIELDS, set()),
    ]
    return g


GROUPS = _groups()
# Printed by the probe but judged by their own tests (they depend on which fields the header has).
EXTRA_EXPRS = ("sizeof(struct virtio_blk_config)", "sizeof(struct virtio_net_config)")
QUEUE_SIZES = [1 << e for e in range(16)]  # 1 .. 32768 (virtio 1.2 §2.7: the maximum)


# -- building and running the probe -------------------------------------------


def _require_cc() -> str:
    cc = shutil.which("cc")
    if cc is None:
        missing_peer("no C compiler (cc) on PATH (apt-get install gcc libc6-dev)")
    missing = [h for h in HEADERS if not (INCLUDE / h).is_file()]
    if missing:
        missing_peer(f"no {', '.join(missing)} in {INCLUDE} (apt-get install linux-libc-dev)")
    return cc


def _compile(cc: str, src: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run(
        [cc, "-std=gnu11", "-Wall", "-Werror", "-O1", *extra, "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"probe did not compile:\n{proc.stderr}"


def _probe_source() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <stdlib.h>",
        *(f"#include <linux/{h}>" for h in HEADERS),
        '#define P(key, value) printf("P %s %lld\\n", key, (long long)(value))',
        "int main(void) {",
    ]
    for probes in GROUPS.values():
        for p in probes:
            stmt = f'    P("{p.key}", {p.expr});'
            lines += [f"#ifdef {p.guard}", stmt, "#endif"] if p.guard else [stmt]
    lines += [f'    P("{expr}", {expr});' for expr in EXTRA_EXPRS]
    lines += [
        "    void *mem = NULL;",
        f"    if (posix_memalign(&mem, 4096, vring_size({QUEUE_SIZES[-1]}, 4096))) return 2;",
        f"    for (unsigned num = 1; num <= {QUEUE_SIZES[-1]}; num <<= 1) {{",
        "        struct vring vr;",
        "        char *base = mem;",
        "        vring_init(&vr, num, mem, 4096);",
        '        printf("L %u %lu %ld %ld %ld %ld\\n", num, (unsigned long)vring_size(num, 4096),',
        "               (long)((char *)vr.avail - base), (long)((char *)vr.used - base),",
        "               (long)((char *)&vring_used_event(&vr) - base),",
        "               (long)((char *)&vring_avail_event(&vr) - base));",
        "    }",
        "    free(mem);",
        "    return 0;",
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class ProbeResult:
    values: dict[str, int]
    layouts: dict[int, tuple[int, int, int, int, int]]  # num -> (total, avail, used, used_event, avail_event)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> ProbeResult:
    cc = _require_cc()
    tmp = tmp_path_factory.mktemp("probe")
    src = tmp / "probe.c"
    src.write_text(_probe_source())
    exe = tmp / "probe"
    _compile(cc, src, exe)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    values: dict[str, int] = {}
    layouts: dict[int, tuple[int, int, int, int, int]] = {}
    for line in proc.stdout.splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "P":
            key, value = rest.rsplit(" ", 1)
            values[key] = int(value)
        else:
            num, total, avail, used, uev, aev = map(int, rest.split())
            layouts[num] = (total, avail, used, uev, aev)
    return ProbeResult(values, layouts)


@pytest.fixture(scope="module")
def c_need_event(tmp_path_factory: pytest.TempPathFactory) -> NeedEvent:
    cc = _require_cc()
    tmp = tmp_path_factory.mktemp("need_event")
    src = tmp / "need_event.c"
    src.write_text(
        "#include <linux/virtio_ring.h>\n"
        "int c_vring_need_event(unsigned e, unsigned n, unsigned o)\n"
        "{ return vring_need_event((__u16)e, (__u16)n, (__u16)o); }\n"
    )
    lib = tmp / "libneed_event.so"
    _compile(cc, src, lib, "-shared", "-fPIC")
    fn = ctypes.CDLL(str(lib)).c_vring_need_event
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# -- the tests ----------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_constants_and_layouts_match_linux_headers(probe: ProbeResult, group: str) -> None:
    probes = GROUPS[group]
    mismatches = []
    checked = 0
    for p in probes:
        if p.key not in probe.values:
            # Only a guarded macro may be absent (an unguarded one would not compile).
            assert p.guard is not None, f"{p.key} missing from the probe output"
            continue
        checked += 1
        if probe.values[p.key] != p.expected:
            mismatches.append(f"{p.key}: header says {probe.values[p.key]}, pyvirtio has {p.expected}")
    assert not mismatches, "\n".join(mismatches)
    assert checked >= len([p for p in probes if p.guard is None])


def test_blk_config_covers_the_headers_fields(probe: ProbeResult) -> None:
    declared = header_struct_fields("virtio_blk.h", "virtio_blk_config") - {"geometry", "unused", "unused1"}
    ours = {name for name, _, _ in blk.CONFIG_FIELDS}
    # Every field up to secure erase is in every header that pyvirtio supports.
    assert {"capacity", "blk_size", "num_queues", "write_zeroes_may_unmap"} <= declared
    probed = [p for p in GROUPS["blk"] if "virtio_blk_config" in p.key and p.key.startswith("offsetof")]
    assert len(probed) == len(ours & declared)
    if declared == ours:
        assert probe.values["sizeof(struct virtio_blk_config)"] == blk.CONFIG_SIZE
    if "max_secure_erase_sectors" in declared:
        off = "offsetof(struct virtio_blk_config, max_secure_erase_sectors)"
        assert probe.values[off] == blk.CONFIG_SIZE_V11


def test_net_config_size(probe: ProbeResult) -> None:
    declared = header_struct_fields("virtio_net.h", "virtio_net_config")
    if declared == {"mac"} | {name for name, _, _ in net.CONFIG_FIELDS}:
        assert probe.values["sizeof(struct virtio_net_config)"] == net.CONFIG_SIZE


def test_config_sizes_are_consistent() -> None:
    for fields, size in ((blk.CONFIG_FIELDS, blk.CONFIG_SIZE), (scsi.CONFIG_FIELDS, scsi.CONFIG_SIZE)):
        name, off, fmt = fields[-1]
        assert off + struct.calcsize(fmt) == size, name
    assert blk.OUTHDR.size == blk.OUTHDR_SIZE
    assert blk.DISCARD_WZ.size == blk.DISCARD_WZ_SIZE
    assert net.HDR.size == net.HDR_SIZE
    assert scsi.CMD_REQ_HDR.size + scsi.CDB_SIZE == scsi.CMD_REQ_SIZE
    assert scsi.CMD_RESP_HDR.size + scsi.SENSE_SIZE == scsi.CMD_RESP_SIZE


@pytest.mark.parametrize("num", QUEUE_SIZES)
def test_split_layout_matches_vring_init(probe: ProbeResult, num: int) -> None:
    total, avail, used, used_event, avail_event = probe.layouts[num]
    ours_avail, ours_used, ours_total = ring.split_layout(num, ring.LEGACY_USED_ALIGN)
    assert (ours_avail, ours_used, ours_total) == (avail, used, total)
    assert ours_avail == ring.desc_table_size(num)
    assert ours_avail + ring.used_event_offset(num) == used_event
    assert ours_used + ring.avail_event_offset(num) == avail_event
    assert ours_avail + ring.avail_size(num) <= ours_used
    assert ours_used + ring.used_size(num) == total


def _interesting_u16() -> list[int]:
    return sorted({0, 1, 2, 3, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF, 255, 256, 4096})


def test_vring_need_event_matches_c_on_edges(c_need_event: NeedEvent) -> None:
    vals = _interesting_u16()
    mismatches = [
        (e, n, o)
        for e in vals
        for n in vals
        for o in vals
        if ring.vring_need_event(e, n, o) != bool(c_need_event(e, n, o))
    ]
    assert not mismatches


def test_vring_need_event_matches_c_around_windows(c_need_event: NeedEvent) -> None:
    """Every event index near every small window (old, new], at many origins including the wrap."""
    rng = random.Random(0x5EED)
    origins = [0, 1, 0x7FFF, 0x8000, 0xFFF0, 0xFFFF] + [rng.randrange(1 << 16) for _ in range(10)]
    seen_true = seen_false = 0
    for old in origins:
        for width in range(0, 34):
            new = (old + width) & 0xFFFF
            for d in range(-4, 40):
                event = (old + d) & 0xFFFF
                expected = bool(c_need_event(event, new, old))
                assert ring.vring_need_event(event, new, old) == expected, (event, new, old)
                # The rule in words: notify iff event lies in [old, new).
                assert expected == (0 <= d < width)
                seen_true += expected
                seen_false += not expected
    assert seen_true and seen_false


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_matches_c(c_need_event: NeedEvent, event: int, new: int, old: int) -> None:
    assert ring.vring_need_event(event, new, old) == bool(c_need_event(event, new, old))
