"""virtio-scsi headers never cross a 4 KiB page: QEMU's virtio-scsi behind an IOMMU, modelled in process.

QEMU's virtio-scsi (7.2 and later), unless VIRTIO_F_ANY_LAYOUT is
negotiated, takes the first mapped piece of a command's device-readable
buffers as the request header and the first piece of its device-writable
buffers as the response ("old BIOS" workaround, kept for virtio 1.x
devices). Behind an IOMMU (vfio, ``iommu_platform=on``) it maps buffers
one 4 KiB IOMMU page at a time, so a response that crosses a page arrives
as two pieces: the data-in list then starts inside the response, the data
lands shifted, and the residual comes back as ``transfer - (data + spill)``,
a negative number (-104 for a 108-byte response cut 4 bytes in). Measured in
the guest stage (tests/test_guest_pci.py) before the fix; docs/testing.md.

:class:`QemuIommuLayout` is that device in process: the embedded scsi back
end behind a handler that splits every buffer at 4 KiB boundaries and
parses the pieces the way QEMU does. The driver's slots and the bench
engine's slots must keep every header inside one page, so that it changes
nothing; before the fix (192-byte slots at 64-byte alignment) the bench
counted errors on it and read shifted data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from pyvirtio import VirtioDevice
from pyvirtio.backends.scsi import ScsiBackend, loopback_scsi, ram_lun
from pyvirtio.backends.sglist import skip
from pyvirtio.bench.block import BlockEngine
from pyvirtio.bench.formats import ScsiFormat
from pyvirtio.drivers.scsi import HEADER_PAGE, VirtioScsi, slot_stride
from pyvirtio.errors import InvalidArgument
from pyvirtio.ring.chain import Chain
from pyvirtio.spec import scsi as S

pytestmark = pytest.mark.timeout(60)

PAGE = 4096


def address(view: memoryview) -> int:
    """The process address of a buffer (the loopback device sees the driver's pool at the same pages)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def pieces(bufs: list[memoryview]) -> list[memoryview]:
    """``bufs`` cut at every 4 KiB boundary, as QEMU's dma_memory_map through an IOMMU returns them."""
    out = []
    for b in bufs:
        start = address(b)
        pos = 0
        while pos < len(b):
            n = min(len(b) - pos, PAGE - (start + pos) % PAGE)
            out.append(b[pos : pos + n])
            pos += n
    return out


class QemuIommuLayout:
    """Requests on the embedded back end, parsed the way QEMU's virtio-scsi parses them behind an IOMMU."""

    def __init__(self, backend: ScsiBackend) -> None:
        self.backend = backend
        self.split_headers = 0

    def __call__(self, queue: int, chain: Chain) -> int:
        b = self.backend
        req_size, resp_size = 19 + b.cdb_size, 12 + b.sense_size
        readable, writable = pieces(chain.readable), pieces(chain.writable)
        first_out = len(readable[0]) if readable else 0
        first_in = len(writable[0]) if writable else 0
        if first_out >= req_size and first_in >= resp_size:
            return b.handle(queue, chain)
        self.split_headers += 1
        # QEMU reads the full header, but its data lists start after the first piece only.
        header = bytearray(b"".join(bytes(p) for p in readable))[:req_size]
        hdr = memoryview(header)
        resp = bytearray(resp_size)  # the back end answers here; copied over the real response below
        shadow = Chain(
            chain.head,
            [hdr, *readable[1:]] if first_out < req_size else readable,
            [memoryview(resp), *(writable[1:] if first_in < resp_size else skip(writable, resp_size))],
        )
        # The header's tail stays in the data lists (after the first piece): the device moves data
        # there, as QEMU does.
        b.handle(queue, shadow)
        spill = max(0, resp_size - first_in) + max(0, req_size - first_out)
        sense_len, resid, qual, status, response = S.CMD_RESP_HDR.unpack_from(resp)
        if response == S.S_OK and status == 0:
            resid = -spill & 0xFFFFFFFF  # QEMU: transfer length minus the (longer) data list
        S.CMD_RESP_HDR.pack_into(resp, 0, sense_len, resid, qual, status, response)
        pos = 0
        for p in writable:  # the response is written last, over whatever data went into its tail
            n = min(len(p), resp_size - pos)
            p[:n] = resp[pos : pos + n]
            pos += n
            if pos == resp_size:
                break
        return chain.writable_len


@contextlib.contextmanager
def qemu_like_scsi(depth: int = 256) -> Iterator[tuple[VirtioScsi, QemuIommuLayout]]:
    backend = ScsiBackend({(0, 0): ram_lun(4 << 20)}, max_target=1)
    transport = loopback_scsi(backend, queue_size=depth)
    scsi = VirtioScsi(VirtioDevice("loop-scsi", transport, pool_size=16 << 20))
    model = QemuIommuLayout(backend)
    for index in range(S.FIRST_REQUEST_QUEUE, S.FIRST_REQUEST_QUEUE + scsi.num_queues):
        transport.handlers[index] = lambda _i, chain, q=index: model(q, chain)
    try:
        yield scsi, model
    finally:
        scsi.close()
        backend.close()


def crosses(addr: int, size: int) -> bool:
    return addr // PAGE != (addr + size - 1) // PAGE


def test_slot_stride_is_a_power_of_two_that_fits_the_header() -> None:
    assert [slot_stride(n) for n in (1, 64, 65, 164, 168, 256, 552)] == [64, 64, 128, 256, 256, 256, 1024]
    assert slot_stride(HEADER_PAGE) == HEADER_PAGE
    with pytest.raises(InvalidArgument, match="cannot fit one 4096-byte page"):
        slot_stride(HEADER_PAGE + 1)


def command(scsi: VirtioScsi, write: bool, req_at: int, resp_at: int) -> tuple[int, int, int, bytes, bytes]:
    """One READ(16) / WRITE(16) of 4 KiB at LBA 0 with its headers where asked (offsets in a page-aligned block).

    Returns (response, status, residual, the data buffer, the LUN's first 4 KiB afterwards).
    """
    vq = scsi.thread_queue().vq
    block = scsi.allocate(3 * PAGE, PAGE)
    data = scsi.allocate(PAGE, PAGE)
    try:
        assert (block.addr - address(block.view)) % PAGE == 0  # device pages are process pages here
        req_size, resp_size = 19 + scsi.cdb_size, 12 + scsi.sense_size
        cdb = bytearray(scsi.cdb_size)
        cdb[0], cdb[10:14] = 0x8A if write else 0x88, (PAGE // 512).to_bytes(4, "big")
        S.CMD_REQ_HDR.pack_into(block.view, req_at, S.lun_address(0, 0), 1, S.S_SIMPLE, 0, 0)
        block.view[req_at + 19 : req_at + req_size] = cdb
        data.view[:] = OURS if write else bytes(PAGE)
        req, resp = (block.addr + req_at, req_size, False), (block.addr + resp_at, resp_size, True)
        vq.submit("c", [req, (data.addr, PAGE, False), resp] if write else [req, resp, (data.addr, PAGE, True)])
        vq.flush()
        assert vq.wait(5.0)
        _sl, resid, _q, status, response = S.CMD_RESP_HDR.unpack_from(block.view, resp_at)
        got = bytes(data.view)
    finally:
        scsi.free(block)
        scsi.free(data)
    return response, status, resid, got, scsi.disk(0, 0).read(0, PAGE)


THEIRS = bytes(range(256)) * 16
OURS = bytes(255 - i % 256 for i in range(PAGE))


def test_the_model_cuts_a_response_at_a_page_like_qemu() -> None:
    """As measured in the guest: a response 4 bytes before a page boundary, residual -104, data not in place."""
    with qemu_like_scsi() as (scsi, model):
        scsi.disk(0, 0).write(0, THEIRS)
        spill = 12 + scsi.sense_size - 4
        response, status, resid, got, _disk = command(scsi, False, 0, 2 * PAGE - 4)
        assert (response, status, resid) == (S.S_OK, 0, -spill & 0xFFFFFFFF)
        assert got != THEIRS and got[: PAGE - spill] == THEIRS[spill:]  # the head went into the response
        assert model.split_headers == 1
        assert command(scsi, False, 0, 2 * PAGE - 12 - scsi.sense_size)[2:4] == (0, THEIRS)  # fits: intact


def test_the_model_cuts_a_request_header_at_a_page_like_qemu() -> None:
    """As measured in the guest: a WRITE whose header is cut 20 bytes in, residual -31, wrong bytes written."""
    with qemu_like_scsi() as (scsi, model):
        spill = 19 + scsi.cdb_size - 20
        response, status, resid, _got, disk = command(scsi, True, 2 * PAGE - 20, 256)
        assert (response, status, resid) == (S.S_OK, 0, -spill & 0xFFFFFFFF)
        assert disk != OURS and disk[spill:] == OURS[: PAGE - spill]  # the header's tail was written first
        assert model.split_headers == 1


@pytest.mark.parametrize("depth", [1, 22, 64, 128])
def test_bench_slots_keep_each_header_inside_one_page(depth: int) -> None:
    with qemu_like_scsi() as (scsi, _model):
        fmt = ScsiFormat(scsi.disk(0, 0))
        fmt.layout(depth, 4096, False)
        try:
            for s in range(depth):
                base = fmt.slots.addr + fmt.stride * s
                assert not crosses(base, fmt.req_size), s
                assert not crosses(base + fmt.resp_off, fmt.resp_size), s
        finally:
            fmt.close()


def test_driver_slots_keep_each_header_inside_one_page() -> None:
    with qemu_like_scsi() as (scsi, _model):
        ctx = scsi.thread_queue()
        size = ctx.slot_size
        assert size & (size - 1) == 0 and ctx.slots.addr % size == 0
        req_size, resp_size = 19 + scsi.cdb_size, 12 + scsi.sense_size
        resp_off = (req_size + 7) // 8 * 8
        for s in range(ctx.vq.size):
            base = ctx.slots.addr + size * s
            assert not crosses(base, req_size) and not crosses(base + resp_off, resp_size), s


@pytest.mark.parametrize("mode", ["python", "numpy"])
def test_bench_on_the_qemu_like_device_counts_no_error_and_reads_the_right_data(mode: str) -> None:
    """64 slots (12 KiB) hold page boundaries: before the fix some responses crossed one (errors, shifted data)."""
    with qemu_like_scsi() as (scsi, model):
        disk = scsi.disk(0, 0)
        verify = mode == "python"  # (verify runs in the python loop only)
        engine = BlockEngine(disk, rw="randread", iodepth=64, mode=mode, verify=verify, seed=7, size=1 << 20)
        try:
            if verify:
                engine.prefill()
            st = engine.run(0.3)
        finally:
            engine.close()
    assert st.ios > 128 and st.errors == 0 and st.verify_errors == 0, st.error
    assert model.split_headers == 0


def test_driver_writes_and_reads_on_the_qemu_like_device() -> None:
    """The driver's own commands (scan, WRITE, READ) on that device: no header split, the data intact."""
    with qemu_like_scsi() as (scsi, model):
        disk = scsi.disk(0, 0)
        expect = bytes(i % 251 for i in range(1 << 20))
        disk.write(0, expect)
        assert disk.read(0, 1 << 20) == expect
    assert model.split_headers == 0
