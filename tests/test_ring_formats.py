"""pyvirtio's drivers on packed rings and with VIRTIO_F_IN_ORDER, against the embedded back ends (issue 12).

Each driver runs on every ring variant the embedded back ends serve:
packed, packed + IN_ORDER, split + IN_ORDER (split alone is what every
other test runs). Data is checked end to end:

* blk over vhost-user: every operation (blk_checks), a batch of 300
  requests, asyncio, two queues from two threads, and ``fixed_io``, which
  takes the ring protocol path on these rings; over the in-process loopback
  device too, at a ring size that is not a power of two (packed only);
* scsi: scan, write/read back on two LUNs, unmap, a hot-plug event through
  the event queue (device-initiated buffers on a gated ring);
* net: swapped echo byte-exact on two queue pairs, mergeable and not, the
  control queue (its device side runs in the frontend, in the negotiated
  format) and the asyncio API;
* vhost-user: a packed ring's SET_VRING_ADDR fields and its bases, with
  the wrap counters, as the back end received them;
* negotiation: ``ring=`` / ``in_order=`` choose the features, ``auto`` is
  :data:`~pyvirtio.device.AUTO_RING` / ``AUTO_IN_ORDER``, and asking for
  what a device does not offer is a NegotiationError naming it; ``info()``
  says the format.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("blk_checks", "testpmd")

from blk_checks import check_all_ops, check_asyncio, check_batch, check_two_queues  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk  # noqa: E402
from pyvirtio.backends.net import NetBackend  # noqa: E402
from pyvirtio.backends.scsi import ScsiBackend, ram_lun  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.device import AUTO_IN_ORDER, AUTO_RING, VirtioDevice  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.drivers.net import VirtioNet  # noqa: E402
from pyvirtio.drivers.scsi import VirtioScsi  # noqa: E402
from pyvirtio.errors import InvalidArgument, NegotiationError  # noqa: E402
from pyvirtio.ring.packed import PackedQueue  # noqa: E402
from pyvirtio.spec.common import DEVICE_ID_BLOCK, F_IN_ORDER, F_RING_PACKED, F_VERSION_1  # noqa: E402
from pyvirtio.spec.ring import PACKED_INITIAL_BASE, packed_base  # noqa: E402
from pyvirtio.transport.loopback import LoopbackTransport  # noqa: E402
from testpmd import assert_swapped_echo, echo_frames, payload_frames  # noqa: E402

pytestmark = pytest.mark.timeout(60)

#: (ring, in_order) variants beyond plain split.
VARIANTS = [("packed", False), ("packed", True), ("split", True)]
IDS = ["packed", "packed-in-order", "split-in-order"]


def _check_format(info: dict[str, object], ring: str, in_order: bool) -> None:
    virtio = info["virtio"]
    assert isinstance(virtio, dict)
    assert (virtio["ring"], virtio["in_order"]) == (ring, in_order)


# -- blk ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserServer]:
    storage = Storage(size=16 << 20)
    server = VhostUserServer(str(tmp_path_factory.mktemp("rf") / "blk.sock"), BlockBackend(storage, num_queues=2))
    server.start()
    yield server
    server.stop()
    assert server.wait(10)
    storage.close()


@pytest.mark.parametrize("ring, in_order", VARIANTS, ids=IDS)
def test_blk_on_the_embedded_back_end(blk_server: VhostUserServer, ring: str, in_order: bool) -> None:
    with VirtioBlk.open(blk_server.path, ring=ring, in_order=in_order) as blk:
        _check_format(blk.info(), ring, in_order)
        check_all_ops(blk, stores=True)
        check_batch(blk, stores=True)
        check_asyncio(blk, stores=True)
        model = bytearray(blk.capacity)
        for b in range(0, 1 << 20, 4096):
            model[b : b + 4096] = blk.read(b, 4096)
        blk.release_queue()  # both queues for the two threads
        check_two_queues(blk, model)
        buf = blk.allocate(8192, align=4096)
        with blk.fixed_io(buf) as fixed:
            for i in range(40):
                buf.view[:] = bytes([i]) * 8192
                fixed.write(8192 * i)
            for i in range(40):
                fixed.read(8192 * i)
                assert bytes(buf.view) == bytes([i]) * 8192
        blk.free(buf)
        assert blk_server.backend is not None
        rings = blk_server.backend.info()["rings"]
        assert {r["format"] for r in rings if r["running"]} == {ring}
        assert all(r["in_order"] is in_order for r in rings if r["running"])


@pytest.mark.parametrize("in_order", [False, True])
def test_blk_loopback_packed_ring_of_odd_size(in_order: bool) -> None:
    storage = Storage(size=4 << 20)
    device = VirtioDevice("loop", loopback_blk(BlockBackend(storage), queue_size=100), pool_size=8 << 20)
    try:
        with VirtioBlk(device, ring="packed", in_order=in_order) as blk:
            assert blk.queue_size == 100
            _check_format(blk.info(), "packed", in_order)
            check_all_ops(blk, stores=True)
            check_batch(blk, stores=True, count=500)  # five laps of the ring
    finally:
        storage.close()


# -- scsi -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ring, in_order", VARIANTS, ids=IDS)
def test_scsi_on_the_embedded_back_end(sockdir: str, ring: str, in_order: bool) -> None:
    backend = ScsiBackend({(0, 0): ram_lun(4 << 20), (0, 1): ram_lun(2 << 20, block_size=4096)}, max_target=3)
    server = VhostUserServer(os.path.join(sockdir, "scsi.sock"), backend)
    server.start()
    try:
        with VirtioScsi.open(server.path, ring=ring, in_order=in_order, num_queues=1) as scsi:
            _check_format(scsi.info(), ring, in_order)
            assert sorted(scsi.luns) == [(0, 0), (0, 1)]
            for where in ((0, 0), (0, 1)):
                disk = scsi.disk(*where)
                data = os.urandom(16 * disk.block_size)
                disk.write(disk.block_size, data)
                assert disk.read(disk.block_size, len(data)) == data
            disk = scsi.disk(0, 0)
            disk.unmap(0, 8 * 512)
            assert disk.read(0, 8 * 512) == bytes(8 * 512)
            backend.add_lun(1, 2, ram_lun(1 << 20))
            deadline = time.monotonic() + 10
            kinds: list[str] = []
            while "added" not in kinds:
                assert time.monotonic() < deadline, kinds
                kinds += [e.kind for e in scsi.poll_events(0.1)]
            new = scsi.disk(1, 2)
            new.write(0, b"n" * 512)
            assert new.read(0, 512) == b"n" * 512
    finally:
        server.stop()
        assert server.wait(10)
        backend.close()


# -- net ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring, in_order", VARIANTS, ids=IDS)
def test_net_echo_on_the_embedded_back_end(sockdir: str, ring: str, in_order: bool) -> None:
    path = os.path.join(sockdir, "n.sock")
    model = NetBackend("loopback", pairs=2, swap_mac=True)
    server = VhostUserServer(path, model, poll_us=50)
    server.start()
    try:
        with VirtioNet.open(path, queue_pairs=2, ring=ring, in_order=in_order) as net:
            _check_format(net.info(), ring, in_order)
            net.set_promisc(True)  # the control queue, in the negotiated format
            for pair in (0, 1):
                frames = payload_frames(net.mac, pair, [60, 64, 100, 256, 1000, 1514] * 30)
                assert_swapped_echo(frames, echo_frames(net, pair, frames))

            async def main() -> list[bytes]:
                frames = payload_frames(net.mac, 0, [64, 300, 1514] * 10)
                assert await net.asend(frames) == len(frames)
                out: list[bytes] = []
                while len(out) < len(frames):
                    out += [bytes(f) for f in await asyncio.wait_for(net.arecv(64), 10)]
                assert_swapped_echo(frames, out)
                return out

            asyncio.run(main())
        with VirtioNet.open(path, ring=ring, in_order=in_order, rx_buf_size=512) as net:  # merged frames
            frames = payload_frames(net.mac, 0, [1514, 64, 1000, 501] * 10)
            assert_swapped_echo(frames, echo_frames(net, 0, frames))
            assert net.stats()["rx_merged"] >= 20
    finally:
        server.stop()
        server.wait(10)
        model.close()


# -- negotiation ------------------------------------------------------------------------------


def _device(features: int) -> VirtioDevice:
    return VirtioDevice("loop", LoopbackTransport(device_id=DEVICE_ID_BLOCK, features=features, num_queues=1))


def test_ring_and_in_order_choose_the_features() -> None:
    ring_bits = (1 << F_RING_PACKED) | (1 << F_IN_ORDER)
    with _device((1 << F_VERSION_1) | ring_bits) as dev:
        assert dev.reset(0, ring="packed", in_order=True) >> F_RING_PACKED & 1
        assert dev.ring_format == "packed" and dev.has_feature(F_IN_ORDER)
        assert dev.reset(ring_bits, ring="split", in_order=False) & ring_bits == 0  # the bits asked are ignored
        assert dev.ring_format == "split"
        dev.reset(0)  # auto
        assert dev.ring_format == AUTO_RING and dev.has_feature(F_IN_ORDER) is AUTO_IN_ORDER
        with pytest.raises(InvalidArgument):
            dev.reset(0, ring="ring")
        with pytest.raises(InvalidArgument):
            dev.reset(0, in_order="yes")
    with _device(1 << F_VERSION_1) as dev:
        with pytest.raises(NegotiationError, match="VIRTIO_F_RING_PACKED"):
            dev.reset(0, ring="packed")
        with pytest.raises(NegotiationError, match="VIRTIO_F_IN_ORDER"):
            dev.reset(0, in_order=True)
        dev.reset(0, ring="auto", in_order="auto")
        assert dev.ring_format == "split"


def test_packed_queue_sizes_need_not_be_powers_of_two() -> None:
    features = (1 << F_VERSION_1) | (1 << F_RING_PACKED)
    with VirtioDevice("loop", LoopbackTransport(features=features, queue_size=300)) as dev:
        dev.reset(0, ring="packed")
        with pytest.raises(InvalidArgument, match="1..32768"):
            dev.start(1, queue_size=0)
        dev.start(1, queue_size=77)
        assert dev.queue(0).size == 77
    with VirtioDevice("loop", LoopbackTransport(features=1 << F_VERSION_1, queue_size=300)) as dev:
        dev.reset(0)
        with pytest.raises(NegotiationError, match="power of two"):
            dev.start(1)


# -- vhost-user: ring addresses and bases of a packed ring ----------------------------------------


def test_vhost_user_packed_addresses_and_bases(blk_server: VhostUserServer) -> None:
    """SET_VRING_ADDR carries desc / device area / driver area; the bases carry both wrap counters."""
    with VirtioBlk.open(blk_server.path, ring="packed", queue_size=8, num_queues=1) as blk:
        ring = blk.thread_queue().vq.ring
        assert isinstance(ring, PackedQueue)
        backend = blk_server.backend
        assert backend is not None
        state = backend.control.rings[0]
        a = ring.addresses()
        assert state.addr is not None and (state.addr.desc, state.addr.avail, state.addr.used) == (
            a.desc, a.driver, a.device
        )
        assert state.base == PACKED_INITIAL_BASE  # SET_VRING_BASE of a fresh packed ring
        for i in range(20):  # 3 descriptors each: 60 slots, the ring of 8 wraps 7 times
            blk.write(4096 * i, bytes([i]) * 4096)
        assert (ring.avail_wrap, ring.used_wrap) == (0, 0) and ring.next_avail == 60 % 8
        with pytest.raises(InvalidArgument, match="does not fit"):
            blk.device.transport.restart_queue(0, 1 << 32)  # type: ignore[attr-defined]
        expected = packed_base(ring.next_avail, ring.avail_wrap, ring.next_used, ring.used_wrap)
        blk.device.stop()  # GET_VRING_BASE
        assert state.base == expected and expected >> 15 & 1 == 0 and expected >> 31 == 0
