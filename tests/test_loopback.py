"""The in-process loopback device: a real device ring over the driver's memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyvirtio.device import VirtioDevice, Virtqueue
from pyvirtio.errors import ConnectionLost, InvalidArgument, QueueStateError
from pyvirtio.memory import MemoryPool
from pyvirtio.ring.device_side import Chain, ChainError
from pyvirtio.spec.common import F_RING_EVENT_IDX, F_VERSION_1, STATUS_DRIVER, STATUS_FEATURES_OK
from pyvirtio.testing import open_fd_count
from pyvirtio.transport.base import QueueSetup, Transport
from pyvirtio.transport.loopback import LoopbackTransport

EVENT_IDX = 1 << F_RING_EVENT_IDX


class Harness:
    def __init__(self, features: int = 0, **kw: Any) -> None:
        self.tr = LoopbackTransport(**kw)
        self.dev = VirtioDevice("loop", self.tr, pool_size=1 << 20)
        self.dev.reset(features)
        self.dev.start(self.tr.num_queues)

    def vq(self, index: int = 0) -> Virtqueue:
        return self.dev.acquire(index)

    def buf(self, data: bytes | int) -> tuple[int, int]:
        size = data if isinstance(data, int) else len(data)
        b = self.dev.pool.allocate(max(size, 1))
        if not isinstance(data, int):
            b.view[:] = data
        return b.addr, size


@pytest.fixture
def harness() -> Iterator[type[Harness]]:
    made: list[Harness] = []

    class Tracked(Harness):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    yield Tracked
    for h in made:
        h.dev.close()


def test_is_a_transport() -> None:
    tr = LoopbackTransport()
    assert isinstance(tr, Transport)
    assert tr.info() == {"type": "loopback"}
    tr.close()


def test_echo_round_trip(harness: type[Harness]) -> None:
    h = harness()
    vq = h.vq()
    src = h.buf(b"ping pong")
    dst_addr, _ = h.buf(32)
    vq.submit("echo", [(src[0], src[1], False), (dst_addr, 32, True)])
    assert vq.flush() is True
    assert vq.reap() == [("echo", 9)]
    assert bytes(h.dev.pool.translate(dst_addr, 9)) == b"ping pong"
    assert h.tr.kicks == {0: 1}


def test_handlers_per_queue(harness: type[Harness]) -> None:
    seen: list[tuple[int, int]] = []

    def fill(index: int, chain: Chain) -> int:
        seen.append((index, chain.readable_len))
        return chain.write(b"Q%d" % index)

    h = harness(num_queues=3, handlers={1: fill}, default_handler=lambda i, c: 0)
    for i in range(3):
        vq = h.vq(i)
        addr, _ = h.buf(8)
        vq.submit(i, [(addr, 8, True)])
        vq.flush()
        assert vq.reap() == [(i, 2 if i == 1 else 0)]
    assert seen == [(1, 0)]


def test_auto_false_runs_the_device_when_told(harness: type[Harness]) -> None:
    h = harness(features=EVENT_IDX, auto=False)
    vq = h.vq()
    for k in range(5):
        addr, _ = h.buf(4)
        vq.submit(k, [(addr, 4, True)])
    assert vq.flush() is True
    assert vq.reap() == []
    assert h.tr.process(0, limit=2) == 2
    assert [t for t, _ in vq.reap()] == [0, 1]
    assert h.tr.process(0) == 3
    assert [t for t, _ in vq.reap()] == [2, 3, 4]
    assert h.tr.process(0) == 0


def test_kicks_follow_the_device_event_index(harness: type[Harness]) -> None:
    h = harness(features=EVENT_IDX, auto=False)
    vq = h.vq()
    addr, _ = h.buf(4)
    vq.submit("a", [(addr, 4, True)])
    assert vq.flush() is True
    vq.submit("b", [(addr, 4, True)])
    assert vq.flush() is False  # the device has not run, so it has not re-armed
    assert h.tr.kicks == {0: 1} and vq.kicks == 1
    h.tr.process(0)  # pops both, then asks for a kick at the next entry
    vq.submit("c", [(addr, 4, True)])
    assert vq.flush() is True
    assert h.tr.kicks == {0: 2}


def test_interrupt_only_when_the_driver_wants_it(harness: type[Harness]) -> None:
    h = harness(auto=False)
    vq = h.vq()
    addr, _ = h.buf(4)
    vq.submit("polled", [(addr, 4, True)])
    vq.flush()
    h.tr.process(0)
    assert h.tr.wait_queue(0, 0) is False  # polling mode: no signal
    vq.reap()
    assert vq.ring.enable_interrupts() is False
    vq.submit("irq", [(addr, 4, True)])
    vq.flush()
    h.tr.process(0)
    assert h.tr.wait_queue(0, 0) is True
    assert h.tr.wait_queue(0, 0) is False  # the eventfd was drained


def test_signal_and_wait_queue() -> None:
    tr = LoopbackTransport()
    with MemoryPool(1 << 16) as pool:
        tr.set_memory(pool)
        ring = pool.allocate(4096, align=4096)
        tr.setup_queue(QueueSetup(0, 8, ring.addr, ring.addr + 128, ring.addr + 2048))
        fd = tr.queue_fd(0)
        assert fd is not None
        assert tr.wait_queue(0, 0.01) is False
        tr.signal(0)
        tr.signal(0)
        assert tr.wait_queue(0, 1) is True
        assert tr.wait_queue(0, 0) is False  # two signals, one wake-up: an eventfd counter
        tr.signal(5)  # no such queue: nothing happens
        with pytest.raises(QueueStateError):
            tr.wait_queue(5, 0)
        with pytest.raises(QueueStateError):
            tr.process(5)
        tr.close()


def test_setup_before_set_memory_is_refused() -> None:
    tr = LoopbackTransport()
    with pytest.raises(QueueStateError, match="set_memory"):
        tr.setup_queue(QueueSetup(0, 8, 0, 0, 0))
    tr.close()


def test_config_space_bounds() -> None:
    tr = LoopbackTransport(config=bytes(8))
    assert tr.read_config(0, 8) == bytes(8)
    tr.write_config(7, b"\x01")
    assert tr.read_config(7, 1) == b"\x01"
    for off, n in ((0, 9), (8, 1), (-1, 1)):
        with pytest.raises(InvalidArgument):
            tr.read_config(off, n)
    with pytest.raises(InvalidArgument):
        tr.write_config(7, b"\x01\x02")
    tr.close()


def test_status_register() -> None:
    tr = LoopbackTransport(features=1 << F_VERSION_1)
    tr.set_features(1 << F_VERSION_1)
    tr.set_status(STATUS_DRIVER | STATUS_FEATURES_OK)
    assert tr.get_status() == STATUS_DRIVER | STATUS_FEATURES_OK
    tr.refuse_status = STATUS_DRIVER
    tr.set_status(STATUS_DRIVER | STATUS_FEATURES_OK)
    assert tr.get_status() == STATUS_FEATURES_OK
    tr.set_status(0)
    assert tr.get_status() == 0 and tr.driver_features == 0
    tr.close()


def test_reset_drops_the_device_queues(harness: type[Harness]) -> None:
    h = harness(num_queues=2)
    assert sorted(h.tr.queues) == [0, 1]
    h.tr.set_status(0)
    assert h.tr.queues == {}
    with pytest.raises(QueueStateError):
        h.tr.process(0)


def test_a_malformed_request_surfaces_as_a_chain_error(harness: type[Harness]) -> None:
    h = harness()
    vq = h.vq()
    vq.submit("bad", [(0x10, 8, True)])  # not memory the device was given
    with pytest.raises(ChainError, match="outside the memory table"):
        vq.flush()


def test_close_releases_everything() -> None:
    LoopbackTransport().close()
    before = open_fd_count()
    tr = LoopbackTransport(num_queues=3)
    dev = VirtioDevice("x", tr, pool_size=1 << 20)
    dev.reset(0)
    dev.start(3)
    # The memfd, mmap's private duplicate of it, and one call eventfd per queue.
    assert open_fd_count() == before + 2 + 3
    tr.check_alive()
    dev.close()
    assert open_fd_count() == before
    assert tr.closed
    with pytest.raises(ConnectionLost):
        tr.check_alive()


def test_ack_queue_consumes_the_signal(harness: type[Harness]) -> None:
    import select

    h = harness(num_queues=2)
    fd = h.tr.queue_fd(1)
    assert fd is not None
    h.tr.signal(1)
    h.tr.signal(1)
    assert select.select([fd], [], [], 0)[0] == [fd]
    h.tr.ack_queue(1)  # both signals taken at once (an eventfd counter)
    assert select.select([fd], [], [], 0)[0] == []
    h.tr.ack_queue(1)  # nothing to acknowledge: not an error
    h.tr.ack_queue(7)  # nor a queue that does not exist
    h.tr.signal(1)
    assert select.select([fd], [], [], 0)[0] == [fd]  # the next signal is seen again
    assert h.tr.has_config()
