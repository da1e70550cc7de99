"""The one-request lane: ``readinto`` / ``read`` / ``write`` through the ring's ``submit3``, and its fallbacks.

The lane (drivers/requests.py ``run`` -> blk ``_publish_one`` -> the ring's
``submit3``: header, data, status published and the kick decided in one
call) must give the same results, checks and errors as the general way,
on both ring formats; anything it does not take (several buffers, a
buffer above size_max or outside the device's memory, a ring that would go
indirect, other request types) goes the general way. The per-queue spare
bounce buffer of ``read`` / ``write`` must never cost an allocation its
place in the device's memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from blk_checks import pattern
from pyvirtio.backends.blk import BlockBackend, Storage, loopback_blk
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.errors import (
    BlockIOError,
    DeviceProtocolError,
    InvalidArgument,
    QueueBroken,
    QueueFull,
)
from pyvirtio.ring.chain import Chain
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue
from pyvirtio.spec import blk as B
from pyvirtio.testing import PackedRingPair, RingPair

pytestmark = pytest.mark.timeout(60)

RINGS = ["split", "packed"]


class Rig:
    def __init__(self, ring: str, pool_size: int = 8 << 20) -> None:
        self.storage = Storage(size=16 << 20)
        self.backend = BlockBackend(self.storage)
        self.transport = loopback_blk(self.backend, queue_size=64)
        self.device = VirtioDevice("loopback", self.transport, pool_size=pool_size)
        self.blk = VirtioBlk(self.device, ring=ring)
        assert self.blk.device.queue(0).ring.format == ring

    def close(self) -> None:
        try:
            self.blk.close()
        finally:
            self.storage.close()


@pytest.fixture(params=RINGS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


def _ring_calls(blk: VirtioBlk, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the ring's submit3 / submit calls on the calling thread's queue."""
    ring = blk.thread_queue().vq.ring
    calls = {"submit3": 0, "submit": 0}
    for name in calls:
        real = getattr(type(ring), name)

        # On the class (a ring has slots, no instance dict), counting this ring's calls only.
        def counted(self: Any, *a: Any, _real: Any = real, _name: str = name) -> Any:
            if self is ring:
                calls[_name] += 1
            return _real(self, *a)

        monkeypatch.setattr(type(ring), name, counted)
    return calls


def _idle(blk: VirtioBlk) -> None:
    """Nothing in flight, every slot free, the ring empty: nothing acknowledged was lost."""
    ctx = blk.thread_queue()
    assert ctx.inflight == 0 and len(ctx.free_slots) == ctx.nslots
    assert ctx.vq.ring.in_flight_tokens() == []
    assert ctx.vq.ring.num_free == ctx.vq.ring.size


def test_readinto_read_write_go_through_submit3(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    blk = rig.blk
    calls = _ring_calls(blk, monkeypatch)
    data = pattern(0, 8192, 3)
    blk.write(4096, data)  # bytes: bounced
    assert blk.read(4096, 8192) == data  # bounced
    buf = blk.allocate(8192, align=4096)
    assert blk.readinto(4096, buf) == 8192  # zero copy
    assert bytes(buf.view) == data
    buf.view[:] = pattern(0, 8192, 9)
    blk.write(0, buf)  # zero copy
    assert blk.read(0, 8192) == pattern(0, 8192, 9)
    assert calls == {"submit3": 5, "submit": 0}
    blk.flush()  # two buffers: the general way
    assert calls == {"submit3": 5, "submit": 1}
    blk.free(buf)
    _idle(blk)


def test_many_requests_one_at_a_time_cross_the_ring_end(rig: Rig) -> None:
    """Packed rings move on by three slots per request and wrap; split ones reuse one chain."""
    blk = rig.blk
    buf = blk.allocate(512, align=512)
    for i in range(3 * blk.queue_size + 5):
        buf.view[:] = pattern(0, 512, i)
        blk.write(512 * i, buf)
        assert blk.read(512 * i, 512) == pattern(0, 512, i)
    _idle(blk)


def test_a_buffer_outside_the_devices_memory_is_refused_and_nothing_is_posted(rig: Rig) -> None:
    blk = rig.blk
    ring = blk.thread_queue().vq.ring
    outside = blk.pool.allocate(16 << 20)  # the pool grows a region the device was never told about
    try:
        assert not blk.in_device_memory(outside)
        kicks = blk.thread_queue().vq.kicks
        with pytest.raises(InvalidArgument, match="not in the shared memory the device knows"):
            blk.readinto(0, outside)
        with pytest.raises(InvalidArgument, match="not in the shared memory the device knows"):
            blk.write(0, outside)
        assert blk.thread_queue().vq.kicks == kicks
        assert ring.outstanding == 0
    finally:
        blk.pool.free(outside)
    _idle(blk)


def test_sizes_and_offsets_not_multiples_of_the_sector_are_refused(rig: Rig) -> None:
    blk = rig.blk
    buf = blk.allocate(1000, align=512)
    for call in (
        lambda: blk.readinto(0, buf),
        lambda: blk.read(0, 1000),
        lambda: blk.write(0, bytes(1000)),
        lambda: blk.read(100, 512),
        lambda: blk.write(-512, bytes(512)),
        lambda: blk.read(blk.capacity, 512),
    ):
        with pytest.raises(InvalidArgument):
            call()
    blk.free(buf)
    _idle(blk)


def test_a_buffer_above_size_max_goes_the_general_way(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    blk = rig.blk
    monkeypatch.setattr(blk, "size_max", 1024)  # as if the device had said so: 4 data descriptors
    calls = _ring_calls(blk, monkeypatch)
    data = pattern(0, 4096, 5)
    blk.write(0, data)
    assert blk.read(0, 4096) == data
    assert calls == {"submit3": 0, "submit": 2}
    _idle(blk)


@pytest.mark.parametrize(("status", "name"), [(B.S_IOERR, "IOERR"), (B.S_UNSUPP, "UNSUPP")])
def test_device_error_status_on_the_lane(rig: Rig, status: int, name: str) -> None:
    blk = rig.blk

    def failing(index: int, chain: Chain) -> int:
        last = chain.writable[-1]
        last[len(last) - 1] = status
        return 1

    rig.transport.default_handler = failing
    buf = blk.allocate(4096, align=4096)
    for op, call in (
        ("read", lambda: blk.readinto(8192, buf)),
        ("read", lambda: blk.read(8192, 4096)),
        ("write", lambda: blk.write(8192, bytes(4096))),
        ("write", lambda: blk.write(8192, buf)),
    ):
        with pytest.raises(BlockIOError, match=f"{op} at offset 8192 length 4096 failed: {name}"):
            call()
    rig.transport.default_handler = rig.backend.handle
    _idle(blk)
    blk.write(8192, buf)
    assert blk.read(8192, 4096) == bytes(buf.view)


def test_a_device_that_breaks_the_ring_fails_the_request_and_the_queue(rig: Rig) -> None:
    """A used length above what the request offered: DeviceProtocolError, then the queue refuses work."""
    blk = rig.blk

    def liar(index: int, chain: Chain) -> int:
        rig.backend.handle(index, chain)
        return 1 << 20

    rig.transport.default_handler = liar
    buf = blk.allocate(4096, align=4096)
    with pytest.raises(DeviceProtocolError, match="exceeds"):
        blk.readinto(0, buf)
    ctx = blk.thread_queue()
    assert ctx.vq.ring.broken is not None
    with pytest.raises(QueueBroken):
        blk.readinto(0, buf)
    with pytest.raises(QueueBroken):
        blk.write(0, bytes(512))
    # The refused requests took no slot and left no bounce buffer behind.
    assert len(ctx.free_slots) == ctx.nslots - ctx.inflight


def test_the_spare_bounce_buffer_is_reused_and_never_costs_device_memory() -> None:
    r = Rig("split", pool_size=4 << 20)
    try:
        blk = r.blk
        ctx = blk.thread_queue()
        hog_more: list[Any] = []
        blk.write(0, bytes(4096))
        spare = ctx.spare
        assert spare is not None and spare.size == 4096
        assert blk.read(0, 4096) == bytes(4096)
        assert ctx.spare is spare  # the same buffer again: nothing allocated
        blk.read(0, 8192)  # another size: the spare is replaced
        assert ctx.spare is not None and ctx.spare.size == 8192
        # An allocation that only fits where the spare is: the spare is given up for it.
        hog = blk.pool.allocate(blk.pool.regions[0].size - (64 << 10))
        assert blk.in_device_memory(hog)
        while True:  # the device's memory filled up, but for the spare
            extra = blk.pool.allocate(512, align=512)
            if not blk.in_device_memory(extra):
                blk.pool.free(extra)
                break
            hog_more.append(extra)
        assert ctx.spare is not None
        fits = blk.allocate(8192, align=512)
        assert blk.in_device_memory(fits)
        assert ctx.spare is None  # given up for it
        blk.free(fits)
        for b in hog_more:
            blk.pool.free(b)
        blk.pool.free(hog)
        assert blk.read(0, blk.max_transfer) == bytes(blk.max_transfer)
    finally:
        r.close()


def test_a_full_queue_still_says_so() -> None:
    """QueueFull from the lane names the queue, as the general way did."""
    r = Rig("split")
    try:
        blk = r.blk
        r.transport.auto = False  # the device never runs: requests stay in flight
        reqs = [blk.read_request(0, 512) for _ in range(blk.queue_size)]
        n = blk.submit(reqs)
        assert 0 < n < blk.queue_size  # the ring's descriptors ran out first
        with pytest.raises(QueueFull, match="queue 0"):
            blk.read(0, 512)
        r.transport.process(0)
        blk.wait(reqs[:n])
        r.transport.auto = True
        assert blk.read(0, 512) == bytes(512)
    finally:
        r.close()


# -- the ring's submit3 itself ---------------------------------------------------------


def _pair(fmt: str, size: int, **kw: Any) -> RingPair | PackedRingPair:
    return RingPair(size, **kw) if fmt == "split" else PackedRingPair(size, **kw)


@pytest.mark.parametrize("fmt", RINGS)
@pytest.mark.parametrize(
    ("bad", "match"),
    [((0, -1), "length=-1"), ((1 << 64, 8), "addr=0x10000000000000000"), ((0, 1 << 32), "length=4294967296")],
)
def test_submit3_refuses_a_bad_buffer_and_changes_nothing(fmt: str, bad: tuple[int, int], match: str) -> None:
    with _pair(fmt, 8) as p:
        hdr, data, status = p.buffer(16), p.buffer(512), p.buffer(1)
        q: SplitQueue | PackedQueue = p.driver
        before = (q.num_free, q.outstanding, q.in_flight_tokens())
        for args in (
            (bad[0], bad[1], data.addr, 512, True, status.addr, 1),
            (hdr.addr, 16, bad[0], bad[1], True, status.addr, 1),
            (hdr.addr, 16, data.addr, 512, False, bad[0], bad[1]),
        ):
            with pytest.raises(InvalidArgument, match=match):
                q.submit3("x", *args)
            assert (q.num_free, q.outstanding, q.in_flight_tokens()) == before
            assert p.device.pop() is None
        assert q.kick_prepare() is False  # nothing was published
        q.submit3("ok", hdr.addr, 16, data.addr, 512, False, status.addr, 1)
        chain = p.device.pop()
        assert chain is not None and [len(b) for b in chain.readable] == [16, 512]
        assert [len(b) for b in chain.writable] == [1]


@pytest.mark.parametrize("fmt", RINGS)
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("in_order", [False, True])
def test_submit3_is_submit_then_kick_prepare(fmt: str, event_idx: bool, in_order: bool) -> None:
    """Same chains, same completions, same kick decisions as the three-step way, across wraps."""
    size = 7 if fmt == "packed" else 8
    with _pair(fmt, size, event_idx=event_idx, in_order=in_order) as a, _pair(
        fmt, size, event_idx=event_idx, in_order=in_order
    ) as b:
        bufs = [(p.buffer(16), p.buffer(64), p.buffer(1)) for p in (a, b)]
        for k in range(40):
            w1 = bool(k % 2)
            (ha, da, sa), (hb, db, sb) = bufs
            kick_a = a.driver.submit3(k, ha.addr, 16, da.addr, 64, w1, sa.addr, 1)
            b.driver.submit(k, [(hb.addr, 16, False), (db.addr, 64, w1), (sb.addr, 1, True)])
            kick_b = b.driver.kick_prepare()
            assert kick_a == kick_b
            for p in (a, b):
                chain = p.device.pop()
                assert chain is not None
                assert [len(x) for x in chain.readable] == ([16] if w1 else [16, 64])
                assert [len(x) for x in chain.writable] == ([64, 1] if w1 else [1])
                p.device.add_used(chain.head, chain.writable_len)
                p.device.flush_used()
            assert a.driver.reap() == b.driver.reap() == [(k, 65 if w1 else 1)]


@pytest.mark.parametrize("fmt", RINGS)
def test_submit3_falls_back_when_the_ring_cannot_take_it_directly(fmt: str) -> None:
    # Indirect from three buffers: one ring slot.
    with _pair(fmt, 8, indirect=True, indirect_threshold=3) as p:
        h, d, s = p.buffer(16), p.buffer(64), p.buffer(1)
        p.driver.submit3("i", h.addr, 16, d.addr, 64, True, s.addr, 1)
        assert p.driver.num_free == 7
        chain = p.device.pop()
        assert chain is not None and [len(x) for x in chain.writable] == [64, 1]
        p.device.add_used(chain.head, 65)
        p.device.flush_used()
        assert p.driver.reap() == [("i", 65)]
    # Fewer than three free descriptors and no indirect: QueueFull, nothing posted.
    with _pair(fmt, 4) as p:
        h, d, s = p.buffer(16), p.buffer(64), p.buffer(1)
        p.driver.submit3("a", h.addr, 16, d.addr, 64, True, s.addr, 1)
        with pytest.raises(QueueFull):
            p.driver.submit3("b", h.addr, 16, d.addr, 64, True, s.addr, 1)
        assert p.driver.in_flight_tokens() == ["a"]
    # A broken queue refuses it.
    with _pair(fmt, 8) as p:
        h, d, s = p.buffer(16), p.buffer(64), p.buffer(1)
        p.driver.broken = "test"
        with pytest.raises(QueueBroken):
            p.driver.submit3("x", h.addr, 16, d.addr, 64, True, s.addr, 1)
