"""INFLIGHT_SHMFD: the shared area, the embedded back end's use of it, the frontend's handling of the fd.

* Layout: header and entry sizes and offsets of vhost-user.rst's split-ring
  structures, regions 64-byte aligned.
* QueueInflight on a real ring pair: a fresh area has nothing in flight;
  popped and not used heads are resubmitted oldest first (by counter); a
  back end that died between publishing used entries and clearing their
  flags does not resubmit them; a flag outside the ring is ignored.
* SET_INFLIGHT_FD sizes are checked against the file (a frontend cannot make
  the back end map past it).
* The embedded back end restarted in process over the same area: requests
  it had popped are completed by its successor (the frontend resubmits
  nothing), and the ring goes on.
* The frontend: GET then SET at start, the fd kept (one fd), a reset drops
  it, a back end without the feature gets neither message.
"""

from __future__ import annotations

import logging
import os
import struct
import time

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.inflight import ENTRY_SIZE, HEADER_SIZE, InflightArea, queue_region_size
from pyvirtio.backends.server import ProtocolViolation, VhostUserServer
from pyvirtio.drivers.blk import VirtioBlk, pack_pattern
from pyvirtio.protocol.vhost_user import InflightInfo
from pyvirtio.ring.device_side import DeviceQueue
from pyvirtio.testing import RingPair, open_fd_count

# -- layout -----------------------------------------------------------------------------


def test_layout_matches_vhost_user_rst() -> None:
    # QueueRegionSplit: u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx
    assert HEADER_SIZE == struct.calcsize("<QHHHH") == 16
    # DescStateSplit: u8 inflight, u8 padding[5], u16 next, u64 counter
    assert ENTRY_SIZE == struct.calcsize("<B5xHQ") == 16
    assert queue_region_size(256) == 4160  # 16 + 16 * 256 = 4112, rounded up to 64
    assert queue_region_size(1) == 64
    assert queue_region_size(128) % 64 == 0


# -- one queue's region on a ring pair ----------------------------------------------------


def _area_and_pair(size: int = 8) -> tuple[InflightArea, RingPair]:
    return InflightArea.create(1, size), RingPair(size)


def _restart(pair: RingPair, base: int) -> DeviceQueue:
    d = pair.driver
    return DeviceQueue.from_addresses(pair.table, d.size, d.desc_addr, d.avail_addr, d.used_addr, last_avail=base)


def test_fresh_area_has_nothing_in_flight() -> None:
    area, pair = _area_and_pair()
    with pair:
        q = area.queue(0)
        assert q is not None and area.queue(1) is None
        assert q.recover(pair.device) == []
        assert q._h16[4] == 1 and q._h16[5] == 8  # version, desc_num
    area.close()


def test_popped_heads_are_resubmitted_oldest_first() -> None:
    area, pair = _area_and_pair()
    with pair:
        d, q = pair.driver, area.queue(0)
        assert q is not None
        q.recover(pair.device)
        buf = pair.buffer(8)
        for t in range(6):
            d.submit(t, [(buf.addr, 8, True)])
        d.kick_prepare()
        chains = [pair.device.pop() for _ in range(5)]
        order = [2, 0, 4, 1, 3]  # popped order
        for i in order:
            q.begin(chains[i].head)  # type: ignore[union-attr]
        pair.device.add_used(chains[0].head, 0)  # type: ignore[union-attr]
        pair.device.flush_used()
        q.end([chains[0].head], pair.device.used_idx)  # type: ignore[union-attr]
        # Crash. The successor starts at the used index and recovers.
        dev = _restart(pair, pair.device.used_idx)
        heads = q.recover(dev)
        assert heads == [chains[i].head for i in (2, 4, 1, 3)]  # type: ignore[union-attr]
        assert q.counter == 5
        dev.release()
    area.close()


def test_died_between_publishing_and_clearing() -> None:
    area, pair = _area_and_pair()
    with pair:
        d, q = pair.driver, area.queue(0)
        assert q is not None
        q.recover(pair.device)
        buf = pair.buffer(8)
        for t in range(3):
            d.submit(t, [(buf.addr, 8, True)])
        d.kick_prepare()
        chains = [pair.device.pop() for _ in range(3)]
        for c in chains:
            q.begin(c.head)  # type: ignore[union-attr]
        pair.device.add_used(chains[0].head, 0)  # type: ignore[union-attr]
        pair.device.add_used(chains[1].head, 0)  # type: ignore[union-attr]
        pair.device.flush_used()  # published ... and the process dies before end()
        dev = _restart(pair, pair.device.used_idx)
        assert q.recover(dev) == [chains[2].head]  # type: ignore[union-attr]
        assert q.used_idx == 2
        dev.release()
    area.close()


def test_a_flag_outside_the_ring_is_ignored() -> None:
    area = InflightArea.create(1, 64)
    with RingPair(8) as pair:
        q = area.queue(0)
        assert q is not None
        q.recover(pair.device)
        q.begin(40)  # the frontend's process scribbled a head the ring does not have
        assert q.recover(pair.device) == []
    area.close()


def test_set_inflight_fd_sizes_are_checked() -> None:
    area = InflightArea.create(2, 128)
    size = area.region.size
    bad = [
        InflightInfo(size, 0, 4, 128),  # more queues than the area (2 pages) holds
        InflightInfo(size, 0, 1, 100000),  # queue size beyond 32768
        InflightInfo(size * 2, 0, 1, 128),  # beyond the file
        InflightInfo(size - 4096, 4096 + 1, 1, 16),  # offset not page aligned
    ]
    for info in bad:
        with pytest.raises(ProtocolViolation):
            InflightArea.attach(os.dup(area.fd), info, ProtocolViolation)
    ok = InflightArea.attach(os.dup(area.fd), InflightInfo(size, 0, 2, 128), ProtocolViolation)
    assert ok.queue(1) is not None
    ok.close()
    area.close()


# -- the embedded back end and the frontend -------------------------------------------------


class _Crash:
    """A blk model that drops the connection at request ``at`` (counted from 1)."""

    def __init__(self, model: BlockBackend) -> None:
        self.model = model
        self.num_queues = model.num_queues
        self.at = 0
        self.seen = 0
        self.features = model.features
        self.config = model.config

    def handle(self, queue: int, chain: object) -> int:
        self.seen += 1
        if self.seen == self.at:
            raise ProtocolViolation("injected crash")
        result: int = self.model.handle(queue, chain)  # type: ignore[arg-type]
        return result


@pytest.mark.timeout(30)
def test_backend_successor_completes_what_was_popped(sockdir: str) -> None:
    logging.getLogger("pyvirtio.backends").setLevel(logging.ERROR)
    path = os.path.join(sockdir, "s.sock")
    storage = Storage(size=4 << 20)
    model = _Crash(BlockBackend(storage))
    try:
        with VhostUserServer(path, model, inflight=True), VirtioBlk.open(path, reconnect=5.0) as blk:
            t = blk.device.transport
            info = t.inflight_info
            assert info is not None and info.num_queues == 1 and info.queue_size == 256
            model.at = model.seen + 10
            reqs = [blk.write_request(b * 4096, pack_pattern(b, 3, 4096)) for b in range(24)]
            assert blk.submit(reqs) == 24
            blk.wait(reqs)
            assert t.reconnects == 1 and t.device_resubmits
            for b in range(24):
                assert blk.read(b * 4096, 4096) == pack_pattern(b, 3, 4096)
            assert t.inflight_info == info  # the same area was handed to the successor
            assert blk.info()["virtio"]["inflight_fd"] is True
    finally:
        storage.close()


@pytest.mark.timeout(30)
def test_frontend_keeps_one_fd_and_a_reset_drops_it(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    storage = Storage(size=1 << 20)
    try:
        with VhostUserServer(path, BlockBackend(storage), inflight=True):
            fds = open_fd_count()
            blk = VirtioBlk.open(path)
            t = blk.device.transport
            assert t.inflight_info is not None
            kept = t._inflight[1]  # type: ignore[index]
            assert os.readlink(f"/proc/self/fd/{kept}").startswith("/memfd:pyvirtio-inflight")
            blk.device.stop()  # status 0: a reset abandons what was in flight
            assert t.inflight_info is None
            blk.close()
            deadline = time.monotonic() + 5  # the server thread closes its side after us
            while open_fd_count() != fds and time.monotonic() < deadline:
                time.sleep(0.01)
            assert open_fd_count() == fds
        with VhostUserServer(path, BlockBackend(storage)), VirtioBlk.open(path) as blk:
            assert blk.device.transport.inflight_info is None  # not offered: not used
            assert "INFLIGHT_SHMFD" not in blk.info()["virtio"]["protocol_features"]
    finally:
        storage.close()
