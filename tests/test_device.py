"""VirtioDevice: negotiation, status, queues, ownership across threads, config, info, lifecycle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvirtio.device import VirtioDevice
from pyvirtio.errors import (
    InvalidArgument,
    NegotiationError,
    OwnershipError,
    QueueStateError,
)
from pyvirtio.memory import MemoryPool
from pyvirtio.spec.common import (
    DEVICE_ID_BLOCK,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
)
from pyvirtio.testing import open_fd_count
from pyvirtio.transport.loopback import LoopbackTransport

V1 = 1 << F_VERSION_1
EVENT_IDX = 1 << F_RING_EVENT_IDX
INDIRECT = 1 << F_RING_INDIRECT_DESC
POOL = 1 << 20


class RecordingLoopback(LoopbackTransport):
    """A loopback device that records every status write."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.status_writes: list[int] = []

    def set_status(self, status: int) -> None:
        self.status_writes.append(status)
        super().set_status(status)


DeviceFactory = Callable[..., tuple[VirtioDevice, RecordingLoopback]]


@pytest.fixture
def make_device() -> Iterator[DeviceFactory]:
    devices: list[VirtioDevice] = []

    def make(**kw: Any) -> tuple[VirtioDevice, RecordingLoopback]:
        transport = RecordingLoopback(**kw)
        dev = VirtioDevice("test", transport, pool_size=POOL)
        devices.append(dev)
        return dev, transport

    yield make
    for dev in devices:
        dev.close()


def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a new thread; return its result or re-raise its exception here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed back to the test thread
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return box.get("result")


# -- negotiation --------------------------------------------------------------


def test_negotiated_is_requested_and_offered(make_device: DeviceFactory) -> None:
    dev, tr = make_device(features=V1 | EVENT_IDX | 1 << 5 | 1 << 9)
    negotiated = dev.reset((1 << 5) | (1 << 7) | EVENT_IDX)
    assert negotiated == V1 | EVENT_IDX | 1 << 5  # VERSION_1 added; bit 7 not offered; bit 9 not asked
    assert tr.driver_features == negotiated == dev.negotiated_features
    assert dev.offered_features == V1 | EVENT_IDX | 1 << 5 | 1 << 9
    assert dev.has_feature(5) and not dev.has_feature(9)
    assert dev.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK


def test_version_1_is_always_requested(make_device: DeviceFactory) -> None:
    dev, tr = make_device(features=V1 | INDIRECT)
    assert dev.reset(0) == V1
    assert tr.driver_features == V1


def test_device_without_version_1(make_device: DeviceFactory) -> None:
    dev, tr = make_device(features=EVENT_IDX | INDIRECT)
    with pytest.raises(NegotiationError, match="VERSION_1"):
        dev.reset(EVENT_IDX)
    assert tr.status & STATUS_FAILED
    assert not tr.status & STATUS_FEATURES_OK


@pytest.mark.parametrize(
    "refused, step",
    [(STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"), (STATUS_DRIVER, "DRIVER"), (STATUS_FEATURES_OK, "FEATURES_OK")],
)
def test_status_bit_that_does_not_stick_fails_reset(
    make_device: DeviceFactory, refused: int, step: str
) -> None:
    dev, tr = make_device()
    tr.refuse_status = refused
    with pytest.raises(NegotiationError, match=f"did not accept status {step}"):
        dev.reset(0)
    assert tr.status_writes[-1] & STATUS_FAILED  # virtio 1.2 §3.1.1: the driver gives up loudly
    assert tr.status & STATUS_FAILED
    with pytest.raises(QueueStateError):
        dev.start(1)  # FEATURES_OK was never reached


def test_driver_ok_that_does_not_stick_fails_start(make_device: DeviceFactory) -> None:
    dev, tr = make_device(num_queues=2)
    dev.reset(0)
    tr.refuse_status = STATUS_DRIVER_OK
    with pytest.raises(NegotiationError, match="DRIVER_OK"):
        dev.start(2)
    assert tr.status & STATUS_FAILED
    assert dev.num_queues == 0  # nothing half-started is left behind
    assert tr.queues == {} and tr.queue_fd(0) is None and tr.queue_fd(1) is None
    # A new attempt works once the device behaves.
    tr.refuse_status = 0
    dev.reset(0)
    dev.start(2)
    assert dev.status & STATUS_DRIVER_OK


def test_feature_that_was_not_offered_makes_features_ok_fail() -> None:
    tr = LoopbackTransport(features=V1)
    tr.set_features(V1 | EVENT_IDX)
    tr.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not tr.get_status() & STATUS_FEATURES_OK
    tr.close()


def test_status_bits_accumulate(make_device: DeviceFactory) -> None:
    dev, tr = make_device()
    dev.reset(0)
    dev.start(1)
    ack, drv, fok, dok = STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK
    assert tr.status_writes == [0, ack, ack | drv, ack | drv | fok, ack | drv | fok | dok]
    assert dev.status == ack | drv | fok | dok
    dev.set_status(0x20)  # any non-zero write is OR-ed in (seed semantics)
    assert dev.status == ack | drv | fok | dok | 0x20
    dev.stop()
    assert dev.status == 0
    assert dev.num_queues == 0


def test_reset_renegotiates(make_device: DeviceFactory) -> None:
    dev, tr = make_device(features=V1 | EVENT_IDX | INDIRECT)
    dev.reset(EVENT_IDX)
    dev.start(1)
    dev.reset(INDIRECT)  # resets the device and drops the queues
    assert dev.num_queues == 0
    assert dev.negotiated_features == V1 | INDIRECT
    assert tr.status_writes[-4:] == [0, 1, 3, 11]


# -- queues -------------------------------------------------------------------


def test_start_sets_up_the_queues(make_device: DeviceFactory) -> None:
    dev, tr = make_device(num_queues=4, queue_size=64, features=V1 | EVENT_IDX | INDIRECT)
    dev.reset(EVENT_IDX | INDIRECT)
    dev.start(2, fixed_queues=1)
    assert dev.num_queues == 3 and dev.fixed_queues == 1
    assert sorted(tr.queues) == [0, 1, 2]
    for i in range(3):
        vq = dev.queue(i)
        assert vq.index == i and vq.size == 64
        assert vq.ring.event_idx and vq.ring.indirect
        assert tr.queues[i].event_idx and tr.queues[i].indirect
        assert vq.fd == tr.queue_fd(i) is not None
    with pytest.raises(InvalidArgument):
        dev.queue(3)
    with pytest.raises(QueueStateError, match="already started"):
        dev.start(1)


def test_start_with_more_queues_than_the_device_has(make_device: DeviceFactory) -> None:
    dev, _ = make_device(num_queues=2)
    dev.reset(0)
    with pytest.raises(InvalidArgument, match="3 queues requested, the device has 2"):
        dev.start(2, fixed_queues=1)
    with pytest.raises(InvalidArgument):
        dev.start(-1)
    dev.start(2)
    assert dev.num_queues == 2


def test_device_queue_size_zero(make_device: DeviceFactory) -> None:
    dev, tr = make_device(queue_size=0)
    dev.reset(0)
    with pytest.raises(InvalidArgument, match="does not exist"):
        dev.start(1)
    assert dev.num_queues == 0 and tr.queues == {}


def test_device_queue_size_not_a_power_of_two(make_device: DeviceFactory) -> None:
    dev, tr = make_device(queue_size=100)
    dev.reset(0)
    with pytest.raises(NegotiationError, match="not a power of two"):
        dev.start(1)
    assert dev.num_queues == 0 and tr.queues == {}


@pytest.mark.parametrize("size", [0, 3, 100])
def test_requested_queue_size_must_be_a_power_of_two(make_device: DeviceFactory, size: int) -> None:
    dev, _ = make_device()
    dev.reset(0)
    with pytest.raises(InvalidArgument, match="power of two"):
        dev.start(1, queue_size=size)


def test_requested_queue_size_caps_the_device_size(make_device: DeviceFactory) -> None:
    dev, tr = make_device(queue_size=256)
    dev.reset(0)
    dev.start(1, queue_size=32)
    assert dev.queue(0).size == 32 == tr.queues[0].size


# -- ownership, with real threads ------------------------------------------------


def test_data_path_belongs_to_the_acquiring_thread(make_device: DeviceFactory) -> None:
    dev, tr = make_device(num_queues=2)
    dev.reset(0)
    dev.start(2)
    vq = run_in_thread(lambda: dev.acquire(0))  # thread A owns queue 0
    assert dev.is_acquired(0) and not dev.is_acquired(1)
    assert dev.owner(0) not in (None, threading.get_ident())
    buf = dev.pool.allocate(8)
    for call in (
        lambda: vq.start("t", 1),
        lambda: vq.submit("t", [(buf.addr, 8, True)]),
        vq.flush,
        vq.reap,
        vq.abort,
        lambda: vq.wait(0),
    ):
        with pytest.raises(OwnershipError, match="owned by thread"):
            call()
    with pytest.raises(OwnershipError, match="released by its owner"):
        dev.release(0)  # not the owner
    with pytest.raises(OwnershipError, match="already owned"):
        dev.acquire(0)
    assert tr.kicks == {}  # nothing reached the device
    # take_over: only from the owner the caller names.
    with pytest.raises(OwnershipError, match="no longer owned"):
        dev.take_over(0, threading.get_ident())
    previous = dev.owner(0)
    assert dev.take_over(0, previous) is vq and dev.owner(0) == threading.get_ident()
    vq.start("t", 1)  # the new owner may use it
    vq.abort()


def test_acquire_use_release_from_another_thread(make_device: DeviceFactory) -> None:
    dev, _ = make_device()
    dev.reset(0)
    dev.start(1)
    buf = dev.pool.allocate(8, align=8)
    buf.view[:] = b"12345678"
    out = dev.pool.allocate(8)

    def worker() -> list[tuple[object, int]]:
        vq = dev.acquire(0)
        vq.submit("echo", [(buf.addr, 8, False), (out.addr, 8, True)])
        vq.flush()
        done = vq.reap()
        dev.release(0)
        return done

    assert run_in_thread(worker) == [("echo", 8)]
    assert bytes(out.view) == b"12345678"
    assert not dev.is_acquired(0)
    vq = dev.acquire(0)  # free again: this thread can have it
    with pytest.raises(OwnershipError):
        run_in_thread(lambda: vq.reap())
    dev.release(0)
    with pytest.raises(OwnershipError, match="not acquired"):
        vq.reap()
    with pytest.raises(OwnershipError, match="nobody"):
        dev.release(0)


def test_find_and_acquire_from_two_threads_gets_distinct_queues(make_device: DeviceFactory) -> None:
    dev, _ = make_device(num_queues=4)
    dev.reset(0)
    dev.start(3, fixed_queues=1)
    barrier = threading.Barrier(2)
    got: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(5)
            for _ in range(200):  # many rounds, to give a race every chance
                vq = dev.find_and_acquire(dev.fixed_queues)
                got.append(vq.index)
                assert vq.owner == threading.get_ident()
                dev.release(vq.index)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert set(got) <= {1, 2, 3}

    # Held at the same time: two threads, two different queues.
    hold = threading.Event()
    picked: list[int] = []

    def holder() -> None:
        index = dev.find_and_acquire(1).index
        picked.append(index)
        hold.wait(5)
        dev.release(index)

    ts = [threading.Thread(target=holder) for _ in range(2)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + 5
    while len(picked) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(set(picked)) == 2 and set(picked) <= {1, 2, 3}
    mine = dev.find_and_acquire(1)
    assert mine.index not in picked
    with pytest.raises(OwnershipError, match="no free queue"):
        dev.find_and_acquire(1)
    hold.set()
    for t in ts:
        t.join(5)
    dev.release(mine.index)


# -- config and info ------------------------------------------------------------


def test_read_and_write_config(make_device: DeviceFactory) -> None:
    dev, tr = make_device(config=bytes(range(16)))
    assert dev.read_config(4, 4) == bytes([4, 5, 6, 7])
    dev.write_config(2, b"\xaa\xbb")
    assert bytes(tr.config[:5]) == bytes([0, 1, 0xAA, 0xBB, 4])
    assert dev.read_config(0, 16)[2:4] == b"\xaa\xbb"
    with pytest.raises(InvalidArgument):
        dev.read_config(-1, 2)
    with pytest.raises(InvalidArgument):
        dev.read_config(0, -2)
    with pytest.raises(InvalidArgument):
        dev.write_config(-1, b"x")
    with pytest.raises(InvalidArgument):
        dev.read_config(15, 2)  # past the device's config space


def test_info(make_device: DeviceFactory) -> None:
    dev, _ = make_device(
        device_id=DEVICE_ID_BLOCK, num_queues=3, queue_size=128, features=V1 | EVENT_IDX | 1 << 9
    )
    before = dev.info()
    assert before["virtio"] == {"vq_count": 0, "vq_size": 128, "type": "loopback", "ring": "split", "in_order": False}
    dev.reset(EVENT_IDX | 1 << 9)
    dev.start(2)
    info = dev.info()
    assert info["virtio"] == {"vq_count": 2, "vq_size": 128, "type": "loopback", "ring": "split", "in_order": False}
    assert info["name"] == "test"
    assert info["device_type"] == "blk"
    assert info["status"] == ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]
    assert info["negotiated_features"] == ["BLK_FLUSH", "RING_EVENT_IDX", "VERSION_1"]
    assert "BLK_FLUSH" in info["offered_features"]
    assert dev.feature_names() == info["negotiated_features"]


# -- lifecycle ------------------------------------------------------------------


def test_close_is_idempotent_and_a_context_manager() -> None:
    tr = LoopbackTransport()
    with VirtioDevice("cm", tr, pool_size=POOL) as dev:
        dev.reset(0)
        dev.start(1)
        fd = dev.queue(0).fd
        assert fd is not None
    assert dev.closed and tr.closed
    assert dev.pool.regions == []  # its own pool is freed
    assert tr.queue_fd(0) is None
    dev.close()
    dev.close()
    with pytest.raises(QueueStateError, match="closed"):
        dev.reset(0)
    with pytest.raises(QueueStateError, match="closed"):
        dev.start(1)


def test_a_pool_passed_in_is_not_closed() -> None:
    with MemoryPool(POOL) as pool:
        dev = VirtioDevice("shared", LoopbackTransport(), pool=pool)
        dev.reset(0)
        dev.start(1)
        dev.close()
        assert pool.regions and not pool.regions[0].closed
        assert len(pool.allocate(POOL // 2)) == POOL // 2  # the rings were given back


def test_fd_count_is_stable_over_many_devices() -> None:
    def cycle() -> None:
        with VirtioDevice("cycle", LoopbackTransport(num_queues=2), pool_size=POOL) as dev:
            dev.reset(EVENT_IDX)
            dev.start(2)
            vq = dev.acquire(0)
            buf = dev.pool.allocate(16)
            vq.submit("t", [(buf.addr, 16, True)])
            vq.flush()
            assert vq.reap() == [("t", 0)]
            dev.release(0)

    cycle()  # warm-up
    before = open_fd_count()
    for _ in range(200):
        cycle()
    assert open_fd_count() == before


# -- blocking wait ----------------------------------------------------------------


@pytest.mark.parametrize("features", [V1, V1 | EVENT_IDX])
def test_wait_wakes_up_when_another_thread_completes(make_device: DeviceFactory, features: int) -> None:
    dev, tr = make_device(auto=False, features=features)
    dev.reset(EVENT_IDX)
    dev.start(1)
    vq = dev.acquire(0)
    out = dev.pool.allocate(16)
    vq.submit("slow", [(out.addr, 16, True)])
    vq.flush()
    assert vq.reap() == []  # auto=False: the device has not run

    def device() -> None:
        time.sleep(0.1)
        tr.process(0)

    t = threading.Thread(target=device)
    t.start()
    started = time.monotonic()
    done = vq.wait(timeout=10)
    elapsed = time.monotonic() - started
    t.join(5)
    assert done == [("slow", 0)]
    assert 0.05 < elapsed < 5  # it blocked, and the interrupt woke it
    assert not vq.ring.interrupts_enabled  # back to polling


def test_wait_times_out_with_nothing(make_device: DeviceFactory) -> None:
    dev, _ = make_device(auto=False)
    dev.reset(0)
    dev.start(1)
    vq = dev.acquire(0)
    started = time.monotonic()
    assert vq.wait(timeout=0.05) == []
    assert 0.04 < time.monotonic() - started < 2
    assert vq.wait(timeout=0) == []


def test_wait_returns_at_once_when_completions_are_there(make_device: DeviceFactory) -> None:
    dev, tr = make_device(auto=False)
    dev.reset(0)
    dev.start(1)
    vq = dev.acquire(0)
    out = dev.pool.allocate(8)
    vq.submit("ready", [(out.addr, 8, True)])
    vq.flush()
    tr.process(0)  # completed with interrupts off: no signal at all
    started = time.monotonic()
    assert vq.wait(timeout=5) == [("ready", 0)]
    assert time.monotonic() - started < 1
