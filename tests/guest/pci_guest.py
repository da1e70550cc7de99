"""Run inside the guest: pyvirtio's PCI transport against QEMU's emulated virtio devices.

Theory of operation. tests/test_guest_pci*.py boot a guest with the host's
root shared over 9p (:mod:`guest.harness`) and run this file there with this
checkout's Python (``host_python tests/guest/pci_guest.py JOB...``). Each
job drives one PCI function through ``pci:ADDR`` targets with the same
drivers a vhost-user user gets, and reports what it saw as ``RESULT
TAG_key=value`` console lines; the host test then checks those and, after
the guest has exited, the disks' backing files. Jobs (``kind:tag:target``):

``blk``
    VirtioBlk on the target: capacity; the SHA-256 of the region the host
    wrote (:func:`host_data`); guest patterns (:func:`pattern`) written at
    the start (3 MiB: several DMA segments and chunks), at an odd sector and
    at the end, flushed and read back; then the device is reset under the
    driver (its status register written 0, as a function reset would) and
    the next write must fail with DeviceNeedsReset, not hang; a new driver
    on the same function writes :data:`AFTER_RESET` and reads it back. With
    an ``irq`` target the reads also run through asyncio (the queue's
    interrupt fd).
``packed``
    ``packed:TAG:IMAGE:TARGET``: VirtioBlk with a packed ring on a function
    (QEMU's ``packed=on``) that a ``blk`` job drove with a split ring: the
    host's data read (through asyncio too with ``irq``), 2 MiB written at
    :data:`PACKED_OFF` and read back; the host finds it in IMAGE's file.
``scsi``
    VirtioScsi: the LUNs found with their sizes; per LUN the host's region
    read and a pattern written at the start.
``net``
    VirtioNet: :data:`NET_FRAMES` frames sent (a QEMU ``-netdev socket``
    carries them to a UDP peer on the host, which sends each back with the
    MACs swapped); every frame received is compared with what was sent.
``hostile``
    The transport on a real function whose config space is forged so that
    the notify capability points outside its BAR: DeviceProtocolError, and
    its message, are reported. Then the same function with its common
    config seen through a window whose ``queue_size`` reads 0: starting a
    queue must fail with DeviceProtocolError and FAILED written to the
    real device.

This file is run as a script (not imported as ``guest.pci_guest`` in the
guest: that would import pytest there); the host test imports it for the
constants and the pattern generators, so both sides agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
import sys
import time
import traceback
from typing import Any

MiB = 1 << 20
DISK_SIZE = 64 * MiB
HOST_OFF, HOST_LEN = 8 * MiB, 1 * MiB  # written by the host, read by the guest
START_LEN = 3 * MiB  # written by the guest at 0
SMALL_SECTOR, SMALL_LEN = 20001, 1536
END_LEN = 64 << 10  # written by the guest at the end of the disk
AFTER_RESET, AFTER_RESET_LEN = 16 * MiB, 128 << 10
PACKED_OFF, PACKED_LEN = 32 * MiB, 2 * MiB  # the packed job's pattern, clear of the blk job's regions
LUN_LEN = 256 << 10  # scsi: the guest's pattern at the start of each LUN
NET_FRAMES, NET_SIZE = 32, 256
GUEST_MAC = bytes.fromhex("525400707900")
PEER_MAC = bytes.fromhex("020000000002")
ETHERTYPE = 0x88B5  # local experimental


def pattern(tag: str, what: str, length: int) -> bytes:
    """The deterministic bytes ``what`` of disk ``tag``."""
    return random.Random(f"{tag}/{what}").randbytes(length)


def host_data(tag: str) -> bytes:
    return pattern(tag, "host", HOST_LEN)


def frame(i: int) -> bytes:
    """Frame ``i`` the guest sends: to the peer, from the guest, its index and a pattern."""
    body = struct.pack("<I", i) + pattern("net", str(i), NET_SIZE - 18)
    return PEER_MAC + GUEST_MAC + struct.pack(">H", ETHERTYPE) + body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result(key: str, value: object) -> None:
    print(f"RESULT {key}={value}", flush=True)


def blk_job(tag: str, target: str) -> None:
    from pyvirtio.drivers.blk import VirtioBlk
    from pyvirtio.errors import DeviceNeedsReset

    irq = ",irq" in target
    poll = "wait" if irq else "hybrid"
    blk = VirtioBlk.open(target, timeout=30.0, poll=poll)
    try:
        info = blk.info()["virtio"]
        result(f"{tag}_interface", info["interface"])
        result(f"{tag}_dma", info["dma"])
        result(f"{tag}_interrupts", info["interrupts"])
        result(f"{tag}_capacity", blk.capacity)
        result(f"{tag}_host_sha", sha(blk.read(HOST_OFF, HOST_LEN)))
        if irq:
            result(f"{tag}_async_sha", sha(asyncio.run(blk.aread(HOST_OFF, HOST_LEN))))
        start = pattern(tag, "start", START_LEN)
        for off in range(0, START_LEN, MiB):  # 1 MiB requests, as the CLI makes: a bounce buffer per request
            blk.write(off, start[off : off + MiB])
        blk.write(SMALL_SECTOR * 512, pattern(tag, "small", SMALL_LEN))
        blk.write(blk.capacity - END_LEN, pattern(tag, "end", END_LEN))
        blk.flush()
        # Read back in 1 MiB requests too: uio DMA memory is 2 MiB hugepages, not one contiguous run.
        back = b"".join(blk.read(off, MiB) for off in range(0, START_LEN, MiB)) == start
        back &= blk.read(SMALL_SECTOR * 512, SMALL_LEN) == pattern(tag, "small", SMALL_LEN)
        result(f"{tag}_readback", "ok" if back else "bad")
        # The device is reset under the driver: the next request must fail, not hang.
        blk.device.transport.regs.set_status(0)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        try:
            blk.write(AFTER_RESET, pattern(tag, "lost", 4096))
            result(f"{tag}_reset_error", "none")
        except DeviceNeedsReset as exc:
            result(f"{tag}_reset_error", type(exc).__name__)
        result(f"{tag}_reset_seconds", f"{time.monotonic() - t0:.1f}")
    finally:
        blk.close()
    blk = VirtioBlk.open(target, timeout=30.0, poll=poll)
    try:
        blk.write(AFTER_RESET, pattern(tag, "after-reset", AFTER_RESET_LEN))
        blk.flush()
        ok = blk.read(AFTER_RESET, AFTER_RESET_LEN) == pattern(tag, "after-reset", AFTER_RESET_LEN)
        result(f"{tag}_after_reset", "ok" if ok else "bad")
    finally:
        blk.close()


def packed_job(tag: str, target: str) -> None:
    """VirtioBlk with a packed ring (virtio 1.2 §2.8) on a function another job drove with a split one."""
    from pyvirtio.drivers.blk import VirtioBlk

    image, _, tgt = target.partition(":")  # IMAGE_TAG:pci:ADDR...
    irq = ",irq" in tgt
    with VirtioBlk.open(tgt, timeout=30.0, poll="wait" if irq else "hybrid", ring="packed") as blk:
        result(f"{tag}_ring", blk.info()["virtio"]["ring"])
        result(f"{tag}_host_sha", sha(blk.read(HOST_OFF, HOST_LEN)))
        if irq:
            result(f"{tag}_async_sha", sha(asyncio.run(blk.aread(HOST_OFF, HOST_LEN))))
        data = pattern(tag, "packed", PACKED_LEN)
        for off in range(0, PACKED_LEN, MiB):
            blk.write(PACKED_OFF + off, data[off : off + MiB])
        blk.flush()
        back = b"".join(blk.read(PACKED_OFF + off, MiB) for off in range(0, PACKED_LEN, MiB))
        result(f"{tag}_readback", "ok" if back == data else "bad")
        result(f"{tag}_image", image)


def scsi_job(tag: str, target: str) -> None:
    from pyvirtio.drivers.scsi import VirtioScsi

    scsi = VirtioScsi.open(target, timeout=30.0)
    try:
        result(f"{tag}_interface", scsi.device.transport.info()["interface"])
        luns = scsi.scan()
        result(f"{tag}_luns", " ".join(f"{lun.target}:{lun.lun}" for lun in luns))
        for lun in luns:
            name = f"{tag}_lun{lun.lun}"
            disk = scsi.disk(lun.target, lun.lun)
            result(f"{name}_capacity", disk.capacity)
            result(f"{name}_host_sha", sha(disk.read(HOST_OFF, HOST_LEN)))
            disk.write(0, pattern(name, "start", LUN_LEN))
            disk.flush()
            result(f"{name}_readback", "ok" if disk.read(0, LUN_LEN) == pattern(name, "start", LUN_LEN) else "bad")
    finally:
        scsi.close()


def net_job(tag: str, target: str) -> None:
    from pyvirtio.drivers.net import VirtioNet

    net = VirtioNet.open(target, timeout=10.0, mac=GUEST_MAC.hex(":"))
    try:
        result(f"{tag}_interface", net.device.transport.info()["interface"])
        result(f"{tag}_link", net.link_status)
        sent = [frame(i) for i in range(NET_FRAMES)]
        got: list[bytes] = []
        for f in sent:
            net.send(f)
            got.append(net.recv(timeout=10.0))
        want = [f[6:12] + f[:6] + f[12:] for f in sent]  # the peer swaps the MACs
        result(f"{tag}_sent", len(sent))
        result(f"{tag}_received", len(got))
        result(f"{tag}_echo", "ok" if [g[: len(w)] for g, w in zip(got, want, strict=False)] == want else "bad")
    finally:
        net.close()


def hostile_job(tag: str, target: str) -> None:
    """The notify capability made to point past the end of its BAR (module docstring)."""
    from pyvirtio.errors import DeviceProtocolError
    from pyvirtio.spec import pci as P
    from pyvirtio.transport.pci import PciTransport, open_binding, parse_pci_target
    from pyvirtio.transport.pci_caps import walk_capabilities
    from pyvirtio.transport.pci_sysfs import PciFunction

    address, _kw = parse_pci_target(target.removeprefix("pci:"))
    binding = open_binding(PciFunction(address), None)
    real = binding.config_read

    def forged(offset: int, length: int) -> bytes:
        data = bytearray(real(0, P.CFG_SPACE_SIZE))
        for pos, cap_id in walk_capabilities(bytes(data)):
            if cap_id == P.CAP_ID_VNDR and data[pos + P.CAP_CFG_TYPE] == P.CAP_NOTIFY_CFG:
                bar = data[pos + P.CAP_BAR]
                size = binding.bars()[bar].size
                struct.pack_into("<I", data, pos + P.CAP_OFFSET, size - 0x100)  # length 0x1000 runs past the end
        return bytes(data[offset : offset + length])

    binding.config_read = forged  # type: ignore[method-assign]
    try:
        PciTransport(address, binding=binding).close()
        result(f"{tag}_error", "none")
    except DeviceProtocolError as exc:
        result(f"{tag}_error", type(exc).__name__)
        result(f"{tag}_message", str(exc).replace("=", ":"))
    finally:
        binding.close()
    zero_queue(tag, address)


def zero_queue(tag: str, address: str) -> None:
    """The real device's common config seen through a window whose queue_size reads 0."""
    from pyvirtio.device import VirtioDevice
    from pyvirtio.errors import DeviceProtocolError
    from pyvirtio.spec import pci as P
    from pyvirtio.spec.common import F_VERSION_1, STATUS_FAILED
    from pyvirtio.transport.pci import PciTransport
    from pyvirtio.transport.pci_caps import CapWindow

    size_reg, status_reg = P.COMMON_FIELDS["queue_size"][0], P.COMMON_FIELDS["device_status"][0]

    class ZeroQueues:
        def __init__(self, inner: Any) -> None:
            self.inner, self.length, self.failed = inner, inner.length, False

        def read(self, offset: int, width: int) -> int:
            value = self.inner.read(offset, width)
            return 0 if offset == size_reg else int(value)

        def write(self, offset: int, width: int, value: int) -> None:
            if offset == status_reg and value & STATUS_FAILED:
                self.failed = True
            self.inner.write(offset, width, value)

        def close(self) -> None:
            self.inner.close()

    common: list[ZeroQueues] = []

    class Forged(PciTransport):
        def map_window(self, window: CapWindow) -> Any:
            real = super().map_window(window)
            if window.cfg_type != P.CAP_COMMON_CFG:
                return real
            common.append(ZeroQueues(real))
            return common[-1]

    transport = Forged(address)
    dev = VirtioDevice("zero-queue", transport, pool=transport.pool)
    try:
        dev.reset(1 << F_VERSION_1)
        dev.start(1)
        result(f"{tag}_zero_queue_error", "none")
    except DeviceProtocolError as exc:
        result(f"{tag}_zero_queue_error", type(exc).__name__)
        result(f"{tag}_zero_queue_message", str(exc).replace("=", ":"))
    finally:
        dev.close()
        transport.close()
    result(f"{tag}_zero_queue_failed_written", common[0].failed)


JOBS = {"blk": blk_job, "packed": packed_job, "scsi": scsi_job, "net": net_job, "hostile": hostile_job}


def main(argv: list[str]) -> int:
    status = 0
    for job in argv:
        kind, tag, target = job.split(":", 2)
        t0 = time.monotonic()
        try:
            JOBS[kind](tag, target)
            result(f"{tag}_job", "ok")
        except Exception as exc:  # reported, and the next job still runs
            traceback.print_exc()
            result(f"{tag}_job", f"{type(exc).__name__}: {exc}".replace("=", ":").replace("\n", " ")[:300])
            status = 1
        result(f"{tag}_seconds", f"{time.monotonic() - t0:.1f}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__: list[Any] = []
