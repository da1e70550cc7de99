"""Unit tests of the driver-side split virtqueue (pyvirtio.ring.split).

Most tests join the driver ring to a real device ring over one pool
(:class:`pyvirtio.testing.RingPair`), so what the driver published is read
back the way a device reads it; kick and interrupt decisions are driven by
writing the device's suppression fields (:class:`pyvirtio.testing.HostileDevice`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

from pyvirtio.errors import (
    InvalidArgument,
    QueueFull,
    QueueStateError,
    RequestTooLarge,
)
from pyvirtio.memory import MemoryPool
from pyvirtio.ring.split import SplitQueue
from pyvirtio.spec.ring import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    split_layout,
)
from pyvirtio.testing import HostileDevice, RingPair

PairFactory = Callable[..., RingPair]


@pytest.fixture
def make_pair() -> Iterator[PairFactory]:
    pairs: list[RingPair] = []

    def make(size: int = 8, **kw: object) -> RingPair:
        p = RingPair(size, **kw)  # type: ignore[arg-type]
        pairs.append(p)
        return p

    yield make
    for p in pairs:
        p.close()


def desc_at(q: SplitQueue, i: int) -> tuple[int, int, int, int]:
    """(addr, len, flags, next) of ring descriptor ``i`` as the device sees it."""
    return DESC.unpack(bytes(q.pool.translate(q.desc_addr + DESC_SIZE * i, DESC_SIZE)))


def one(p: RingPair, token: object, readable: int = 0, writable: int = 8) -> None:
    """Submit (not flush) a request of one or two buffers."""
    bufs = []
    if readable:
        b = p.buffer(readable)
        bufs.append((b.addr, readable, False))
    if writable or not bufs:
        b = p.buffer(max(writable, 1))
        bufs.append((b.addr, writable, True))
    p.submit(token, bufs)


def singles(p: RingPair, tokens: list[object]) -> None:
    """Submit and flush one single-buffer request per token."""
    for t in tokens:
        one(p, t)
    p.driver.flush()


def popped_heads(p: RingPair) -> list[int]:
    heads = []
    while (chain := p.device.pop()) is not None:
        heads.append(chain.head)
    return heads


# -- construction -------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 8, 256, 4096])
def test_initial_state(make_pair: PairFactory, size: int) -> None:
    p = make_pair(size, region_size=4 << 20)
    q = p.driver
    assert (q.num_free, q.avail_idx, q.last_used, q.outstanding) == (size, 0, 0, 0)
    assert q.check_free_list() == size
    assert q.free_head == 0
    assert q.broken is None
    assert q.in_flight_tokens() == []
    assert not q.interrupts_enabled
    avail_off, used_off, _ = split_layout(size)
    assert q.desc_addr % 4096 == 0
    assert q.avail_addr == q.desc_addr + avail_off == q.desc_addr + 16 * size
    assert q.used_addr == q.desc_addr + used_off
    assert q.used_addr % 4096 == 0
    # The shared descriptor table is chained i -> i+1 like the seed's vring_desc_init.
    assert [desc_at(q, i)[3] for i in range(size - 1)] == list(range(1, size))
    dev = HostileDevice(q)
    assert (dev.avail_idx, dev.used_idx) == (0, 0)
    # Polling mode by default: no interrupts wanted.
    assert dev.avail_flags == AVAIL_F_NO_INTERRUPT
    dev.release()


def test_initial_state_event_idx(make_pair: PairFactory) -> None:
    p = make_pair(16, event_idx=True)
    dev = HostileDevice(p.driver)
    # A used_event the device can never reach (seed v18.07+: used_cons_idx - N - 1).
    assert dev.used_event == (0 - 16 - 1) & 0xFFFF
    assert dev.avail_flags == 0
    dev.release()


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, -8])
def test_bad_queue_size(pool: MemoryPool, size: int) -> None:
    with pytest.raises(InvalidArgument, match="power of two"):
        SplitQueue(size, pool)


# -- building requests --------------------------------------------------------


def test_round_trip(make_pair: PairFactory) -> None:
    p = make_pair(8)
    out = p.buffer(5, b"hello")
    inb = p.buffer(16)
    p.submit("tok", [(out.addr, 5, False), (inb.addr, 16, True)])
    assert p.driver.num_free == 6
    assert p.driver.flush() is True  # the device did not ask for quiet
    chain = p.device.pop()
    assert chain is not None and chain.head == 0
    assert chain.read_all() == b"hello"
    assert chain.writable_len == 16
    chain.write(b"world")
    assert p.device.push_used(chain.head, 5) is False  # interrupts are off (polling)
    assert p.driver.reap() == [("tok", 5)]
    assert bytes(inb.view[:5]) == b"world"
    assert p.driver.num_free == 8
    assert p.driver.check_free_list() == 8
    assert p.driver.outstanding == 0


def test_descriptors_as_written(make_pair: PairFactory) -> None:
    p = make_pair(8)
    p.submit("t", [(0x1000, 10, False), (0x2000, 20, False), (0x3000, 30, True)])
    p.driver.flush()
    assert desc_at(p.driver, 0) == (0x1000, 10, DESC_F_NEXT, 1)
    assert desc_at(p.driver, 1) == (0x2000, 20, DESC_F_NEXT, 2)
    addr, length, flags, _ = desc_at(p.driver, 2)
    assert (addr, length, flags) == (0x3000, 30, DESC_F_WRITE)  # NEXT cleared on the last one


def test_nothing_visible_before_flush(make_pair: PairFactory) -> None:
    p = make_pair(8)
    one(p, "a")
    assert p.device.avail_pending() == 0
    assert p.driver.outstanding == 0
    p.driver.flush()
    assert p.device.avail_pending() == 1
    assert p.driver.outstanding == 1
    assert p.driver.in_flight_tokens() == ["a"]


def test_free_list_is_lifo(make_pair: PairFactory) -> None:
    """Freed chains go to the head of the free list (as Linux's virtio_ring): the last freed is taken first."""
    p = make_pair(8)
    one(p, "A", readable=4, writable=4)  # descriptors 0, 1
    one(p, "B", readable=4, writable=4)  # descriptors 2, 3
    p.driver.flush()
    a, b = p.device.pop(), p.device.pop()
    assert a is not None and b is not None and (a.head, b.head) == (0, 2)
    p.device.add_used(b.head, 0)
    p.device.add_used(a.head, 0)
    p.device.flush_used()
    assert p.driver.reap() == [("B", 0), ("A", 0)]
    assert p.driver.check_free_list() == 8
    singles(p, list(range(8)))
    assert popped_heads(p) == [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_a_reap_while_a_request_is_open_leaves_its_descriptors_alone(make_pair: PairFactory, indirect: bool) -> None:
    """An open request takes its descriptors from the head of the free list as it is built (an indirect one its
    head when published): a chain reaped meanwhile goes to the tail, not in its way. (Hypothesis found this:
    with the head-first free list, the open request's chain ran into the reaped descriptors.)"""
    p = make_pair(8, indirect=indirect, indirect_threshold=3)
    one(p, "A", readable=4, writable=4)  # descriptors 0, 1
    p.driver.flush()
    a = p.device.pop()
    assert a is not None
    bufs = [p.buffer(8) for _ in range(3)]
    bufs[0].view[:] = b"\x01" * 8
    bufs[1].view[:] = b"\x02" * 8
    p.driver.start("B", 3)  # indirect: one descriptor, taken at publication; direct: 2, then 3 and 4
    p.driver.add(bufs[0].addr, 8, False)
    p.device.add_used(a.head, 4)
    p.device.flush_used()
    assert p.driver.reap() == [("A", 4)]  # while B is open
    p.driver.add(bufs[1].addr, 8, False)
    p.driver.add(bufs[2].addr, 8, True)
    p.driver.flush()
    assert p.driver.check_free_list() == p.driver.num_free == (7 if indirect else 5)
    chain = p.device.pop()
    assert chain is not None
    assert chain.read_all() == b"\x01" * 8 + b"\x02" * 8  # B's own buffers, in order
    assert [len(w) for w in chain.writable] == [8]
    p.device.add_used(chain.head, 8)
    p.device.flush_used()
    assert p.driver.reap() == [("B", 8)]
    assert p.driver.check_free_list() == p.driver.num_free == 8


def test_one_at_a_time_reuses_one_chain(make_pair: PairFactory) -> None:
    """Requests one at a time get the same descriptors each time (the device finds its checked chain again)."""
    p = make_pair(8)
    hdr, data, status = p.buffer(16), p.buffer(512), p.buffer(1)
    heads = []
    for k in range(5):
        p.driver.submit3(k, hdr.addr, 16, data.addr, 512, True, status.addr, 1)
        chain = p.device.pop()
        assert chain is not None
        heads.append(chain.head)
        p.device.add_used(chain.head, 513)
        p.device.flush_used()
        assert p.driver.reap() == [(k, 513)]
    assert heads == [0] * 5
    assert p.driver.check_free_list() == 8


def test_start_publishes_the_open_request(make_pair: PairFactory) -> None:
    """SPDK v18.04 cleared NEXT on an open request and never published it; here both complete."""
    p = make_pair(8)
    one(p, "first", readable=4, writable=4)
    one(p, "second", readable=4, writable=4)  # start() publishes "first"
    assert p.device.avail_pending() == 1
    assert p.driver.outstanding == 1
    p.driver.flush()
    assert p.device.avail_pending() == 2
    done, _ = p.serve()
    assert done == 2
    assert sorted(t for t, _ in p.driver.reap()) == ["first", "second"]
    assert p.driver.num_free == 8
    assert p.driver.check_free_list() == 8


def test_abort_returns_descriptors(make_pair: PairFactory) -> None:
    p = make_pair(8)
    p.driver.start("x", 3)
    p.driver.add(0x1000, 8)
    p.driver.add(0x2000, 8, writable=True)
    assert p.driver.num_free == 6
    p.driver.abort()
    assert p.driver.num_free == 8
    assert p.driver.check_free_list() == 8
    assert p.driver.flush() is False  # nothing to publish
    assert p.device.avail_pending() == 0
    assert p.driver.in_flight_tokens() == []
    # The aborted descriptors went back to the head of the free list (LIFO).
    singles(p, list(range(3)))
    assert popped_heads(p) == [0, 1, 2]


def test_abort_of_an_empty_request(make_pair: PairFactory) -> None:
    p = make_pair(8)
    p.driver.start("x", 2)
    p.driver.abort()
    assert p.driver.num_free == 8
    assert p.driver.check_free_list() == 8
    with pytest.raises(QueueStateError):
        p.driver.abort()


def test_misuse_is_the_callers_error(make_pair: PairFactory) -> None:
    q = make_pair(8).driver
    with pytest.raises(QueueStateError):
        q.abort()
    with pytest.raises(QueueStateError):
        q.add(0x1000, 8)
    with pytest.raises(InvalidArgument):
        q.start("t", 0)
    q.start("t", 1)
    with pytest.raises(InvalidArgument):
        q.add(0x1000, 1 << 32)
    with pytest.raises(InvalidArgument):
        q.add(-1, 8)
    q.add(0x1000, 8)
    with pytest.raises(InvalidArgument, match="more buffers"):
        q.add(0x1000, 8)
    q.flush()
    assert q.num_free == 7
    assert q.check_free_list() == 7


def test_flush_with_missing_buffers_drops_the_request(make_pair: PairFactory) -> None:
    p = make_pair(8)
    p.driver.start("short", 3)
    p.driver.add(0x1000, 8)
    with pytest.raises(InvalidArgument, match="missing"):
        p.driver.flush()
    assert p.driver.num_free == 8
    assert p.driver.check_free_list() == 8
    assert p.device.avail_pending() == 0
    singles(p, ["ok"])
    assert p.serve()[0] == 1
    assert p.driver.reap() == [("ok", 0)]


def test_queue_full_versus_request_too_large(make_pair: PairFactory) -> None:
    p = make_pair(8)
    q = p.driver
    with pytest.raises(RequestTooLarge, match="never fit") as too_large:
        q.start("big", 9)
    assert isinstance(too_large.value, InvalidArgument)
    assert "indirect" in str(too_large.value)
    for t in range(3):
        one(p, t, readable=4, writable=4)
    q.flush()
    assert q.num_free == 2
    with pytest.raises(QueueFull) as full:
        q.start("late", 3)
    assert not isinstance(full.value, InvalidArgument)  # retry later, not a bad argument
    assert q.num_free == 2
    assert q.check_free_list() == 2
    buf = p.buffer(2)
    q.start("fits", 2)
    q.add(buf.addr, 1)
    q.add(buf.addr + 1, 1, writable=True)
    q.flush()
    assert q.num_free == 0
    with pytest.raises(QueueFull):
        q.start("none", 1)
    assert p.serve()[0] == 4
    assert len(q.reap()) == 4
    assert q.num_free == 8


def test_reap_max_n(make_pair: PairFactory) -> None:
    p = make_pair(8)
    singles(p, list(range(5)))
    p.serve()
    assert p.driver.pending() == 5
    assert p.driver.reap(2) == [(0, 0), (1, 0)]
    assert p.driver.pending() == 3
    assert p.driver.reap() == [(2, 0), (3, 0), (4, 0)]
    assert p.driver.reap() == []


# -- kick decisions -----------------------------------------------------------


def test_kick_without_event_idx_follows_no_notify(make_pair: PairFactory) -> None:
    p = make_pair(8)
    singles(p, ["a"])  # first kick: nothing set yet
    p.device.disable_notifications()  # device is polling: VRING_USED_F_NO_NOTIFY
    one(p, "b")
    assert p.driver.flush() is False
    p.device.enable_notifications()
    one(p, "c")
    assert p.driver.flush() is True
    assert p.driver.flush() is False  # nothing new since the last decision
    dev = HostileDevice(p.driver)
    dev.set_no_notify(True)
    one(p, "d")
    assert p.driver.flush() is False
    dev.release()


@pytest.mark.parametrize("delta", [-1, 0, 1, 2, 3, 4])
def test_kick_with_event_idx_follows_the_avail_event_window(make_pair: PairFactory, delta: int) -> None:
    """virtio 1.2 §2.7.10: kick iff avail_event lies among the entries just published."""
    p = make_pair(8, event_idx=True)
    singles(p, ["warm-up"])
    p.serve()
    p.driver.reap()
    dev = HostileDevice(p.driver)
    old = p.driver.avail_idx
    dev.avail_event = old + delta
    for t in range(3):  # publish old, old+1, old+2 in one batch
        one(p, t)
    assert p.driver.flush() is (0 <= delta < 3)
    dev.release()


def test_kick_with_event_idx_from_a_real_device(make_pair: PairFactory) -> None:
    p = make_pair(8, event_idx=True)
    one(p, "a")
    assert p.driver.flush() is True  # avail_event starts at 0: the first entry is wanted
    one(p, "b")
    assert p.driver.flush() is False  # the device asked for entry 0 only and has not re-armed
    assert p.serve()[0] == 2
    assert p.device.enable_notifications() is False  # avail_event := 2
    one(p, "c")
    assert p.driver.flush() is True
    one(p, "d")
    assert p.driver.flush() is False


def test_kicks_count_requests_published_by_start(make_pair: PairFactory) -> None:
    """The kick window covers requests published by start(), not only the last one."""
    p = make_pair(8, event_idx=True)
    dev = HostileDevice(p.driver)
    dev.avail_event = 0
    one(p, "a")
    one(p, "b")  # publishes "a" (index 0) without a decision
    assert p.driver.flush() is True  # window [0, 2) includes avail_event 0
    dev.release()


# -- interrupt suppression ----------------------------------------------------


def test_interrupt_suppression_without_event_idx(make_pair: PairFactory) -> None:
    p = make_pair(8)
    dev = HostileDevice(p.driver)
    assert dev.avail_flags == AVAIL_F_NO_INTERRUPT
    singles(p, ["a"])
    assert p.serve() == (1, False)  # the device must not interrupt
    assert p.driver.enable_interrupts() is True  # "a" is waiting: do not sleep
    assert dev.avail_flags == 0
    assert p.driver.interrupts_enabled
    assert p.driver.reap() == [("a", 0)]
    assert p.driver.enable_interrupts() is False  # nothing pending now
    singles(p, ["b"])
    assert p.serve() == (1, True)
    p.driver.disable_interrupts()
    assert dev.avail_flags == AVAIL_F_NO_INTERRUPT
    assert not p.driver.interrupts_enabled
    p.driver.reap()
    singles(p, ["c"])
    assert p.serve() == (1, False)
    dev.release()


def test_interrupt_suppression_with_event_idx(make_pair: PairFactory) -> None:
    p = make_pair(8, event_idx=True)
    dev = HostileDevice(p.driver)
    singles(p, ["a", "b"])
    assert dev.used_event == (0 - 8 - 1) & 0xFFFF
    assert p.serve() == (2, False)
    assert p.driver.reap() == [("a", 0), ("b", 0)]
    assert p.driver.enable_interrupts() is False
    assert dev.used_event == 2  # interrupt me at the next used entry
    singles(p, ["c"])
    assert p.serve() == (1, True)
    assert p.driver.reap() == [("c", 0)]
    assert dev.used_event == 3  # reaping with interrupts on moves used_event along
    p.driver.disable_interrupts()
    assert dev.used_event == (3 - 8 - 1) & 0xFFFF
    singles(p, ["d"])
    assert dev.used_event == (3 - 8 - 1) & 0xFFFF  # flush keeps it out of reach
    assert p.serve() == (1, False)
    assert p.driver.enable_interrupts() is True  # "d" is already there
    dev.release()


# -- indirect descriptors -----------------------------------------------------


def test_indirect_request_larger_than_the_ring(make_pair: PairFactory) -> None:
    p = make_pair(4, indirect=True)
    bufs = [p.buffer(8, bytes([k]) * 8) for k in range(6)]
    layout = [(b.addr, 8, k >= 4) for k, b in enumerate(bufs)]
    p.submit("big", layout)
    p.driver.flush()
    assert p.driver.num_free == 3  # one ring descriptor for the whole table
    addr, length, flags, _ = desc_at(p.driver, 0)
    assert flags == DESC_F_INDIRECT
    assert length == 6 * DESC_SIZE
    table = bytes(p.pool.translate(addr, length))
    entries = [DESC.unpack_from(table, DESC_SIZE * k) for k in range(6)]
    assert [(e[0], e[1]) for e in entries] == [(b.addr, 8) for b in bufs]
    for k, (_, _, eflags, enext) in enumerate(entries):
        assert not eflags & DESC_F_INDIRECT  # nested tables are never produced
        assert bool(eflags & DESC_F_WRITE) == (k >= 4)
        assert bool(eflags & DESC_F_NEXT) == (k < 5)
        if k < 5:
            assert enext == k + 1
    chain = p.device.pop()
    assert chain is not None
    assert chain.read_all() == b"".join(bytes([k]) * 8 for k in range(4))
    assert chain.writable_len == 16
    p.device.push_used(chain.head, 16)
    assert p.driver.reap() == [("big", 16)]
    assert p.driver.num_free == 4
    assert p.driver.check_free_list() == 4


def test_indirect_when_free_descriptors_run_short(make_pair: PairFactory) -> None:
    p = make_pair(4, indirect=True)
    singles(p, [0, 1, 2])
    assert p.driver.num_free == 1
    p.submit("two", [(0x1000, 8, False), (0x2000, 8, True)])  # 2 > 1 free: indirect
    p.driver.flush()
    assert p.driver.num_free == 0
    assert desc_at(p.driver, 3)[2] == DESC_F_INDIRECT
    with pytest.raises(QueueFull):
        p.driver.start("more", 2)


def test_indirect_threshold(make_pair: PairFactory) -> None:
    p = make_pair(16, indirect=True, indirect_threshold=4)
    p.submit("three", [(0x1000, 8, False)] * 3)
    assert p.driver.num_free == 13  # below the threshold: direct
    p.submit("four", [(0x1000, 8, False)] * 4)
    p.driver.flush()
    assert p.driver.num_free == 12  # at the threshold: one indirect descriptor
    assert desc_at(p.driver, 3)[2] == DESC_F_INDIRECT
    assert desc_at(p.driver, 0)[2] == DESC_F_NEXT


def test_single_buffer_never_goes_indirect(make_pair: PairFactory) -> None:
    p = make_pair(4, indirect=True, indirect_threshold=1)
    singles(p, ["one"])
    assert desc_at(p.driver, 0)[2] == DESC_F_WRITE


def test_indirect_limits(make_pair: PairFactory) -> None:
    p = make_pair(8, indirect=True, indirect_max=4)
    with pytest.raises(RequestTooLarge):
        p.driver.start("huge", 9)  # neither one table nor the ring can hold it
    # Too many for one table but the ring holds them: plain descriptors.
    p.submit("six", [(0x1000, 8, False)] * 6)
    p.driver.flush()
    assert p.driver.num_free == 2
    assert desc_at(p.driver, 0)[2] == DESC_F_NEXT
    with pytest.raises(QueueFull):
        p.driver.start("six more", 6)


def test_indirect_tables_are_reused(make_pair: PairFactory) -> None:
    p = make_pair(4, indirect=True, region_size=64 << 10)
    buf = p.buffer(16)
    for round_ in range(200):
        p.submit(round_, [(buf.addr + k, 1, False) for k in range(16)])
        p.driver.flush()
        chain = p.device.pop()
        assert chain is not None and len(chain.readable) == 16
        p.device.push_used(chain.head, 0)
        assert p.driver.reap() == [(round_, 0)]
    assert len(p.pool.regions) == 1


def test_without_indirect_large_requests_are_refused(make_pair: PairFactory) -> None:
    p = make_pair(4)
    with pytest.raises(RequestTooLarge, match="no indirect"):
        p.driver.start("big", 5)
    singles(p, [0, 1, 2])
    with pytest.raises(QueueFull):
        p.driver.start("two", 2)


# -- reset and close ----------------------------------------------------------


def test_reset_returns_in_flight_tokens(make_pair: PairFactory) -> None:
    p = make_pair(8, event_idx=True)
    singles(p, ["a", "b", "c"])
    p.serve(limit=1)
    assert p.driver.reap() == [("a", 0)]
    one(p, "open")  # started, never published
    lost = p.driver.reset()
    assert sorted(map(str, lost)) == ["b", "c"]
    q = p.driver
    assert (q.num_free, q.avail_idx, q.last_used, q.outstanding) == (8, 0, 0, 0)
    assert q.check_free_list() == 8
    assert q.in_flight_tokens() == []
    dev = HostileDevice(q)
    assert (dev.avail_idx, dev.used_idx) == (0, 0)
    assert dev.used_event == (0 - 8 - 1) & 0xFFFF
    dev.release()
    # Works again against a fresh device.
    p.reset_device()
    singles(p, ["again"])
    p.serve()
    assert q.reap() == [("again", 0)]


def test_reset_with_an_open_indirect_request_frees_its_table() -> None:
    with MemoryPool(64 << 10, max_regions=1) as pool:
        q = SplitQueue(4, pool, indirect=True)
        for _ in range(50):
            q.start("open", 256)  # a 4 KiB table each time
            q.reset()
        big = pool.allocate(32 << 10)  # the tables did not eat the pool
        pool.free(big)
        q.close()


def test_close_gives_everything_back() -> None:
    with MemoryPool(64 << 10, max_regions=1) as pool:
        q = SplitQueue(8, pool, indirect=True)
        q.start("done", 20)
        for _ in range(20):
            q.add(0x1000, 8)
        q.flush()
        q.start("open", 30)
        q.close()
        whole = pool.allocate(64 << 10)
        assert whole.offset == 0
        pool.free(whole)


def test_layout_of_ring_in_pool(pool: MemoryPool) -> None:
    q = SplitQueue(256, pool)
    avail = bytes(pool.translate(q.avail_addr, 4))
    assert struct.unpack("<HH", avail) == (AVAIL_F_NO_INTERRUPT, 0)
    q.close()


# -- submit(): start + add + publish in one call ------------------------------


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_submit_matches_the_three_step_api(make_pair: PairFactory, indirect: bool, n: int) -> None:
    stepwise = make_pair(8, indirect=indirect)
    oneshot = make_pair(8, indirect=indirect)
    for p in (stepwise, oneshot):
        singles(p, ["skew"])  # the free list no longer starts at 0
        p.serve()
        p.driver.reap()
    layout = [(0x1000 * (k + 1), 16 + k, k >= n // 2) for k in range(n)]
    stepwise.submit("t", layout)
    kick = stepwise.driver.flush()
    oneshot.driver.submit("t", layout)
    assert oneshot.device.avail_pending() == 1  # published at once
    assert oneshot.driver.flush() is kick is True  # the kick decision is still flush()'s
    for field in ("num_free", "avail_idx", "outstanding", "free_head"):
        assert getattr(oneshot.driver, field) == getattr(stepwise.driver, field), field
    assert oneshot.driver.check_free_list() == stepwise.driver.check_free_list()
    head = 1  # after the skew request completed
    a, b = desc_at(stepwise.driver, head), desc_at(oneshot.driver, head)
    assert a[2] == b[2]
    if not a[2] & DESC_F_INDIRECT:
        for k in range(n):
            assert desc_at(stepwise.driver, head + k)[:3] == desc_at(oneshot.driver, head + k)[:3]


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("n", [2, 9])
def test_submit_with_a_bad_buffer_leaves_nothing_behind(
    make_pair: PairFactory, indirect: bool, n: int
) -> None:
    p = make_pair(8, indirect=indirect)
    layout = [(0x1000, 8, False)] * (n - 1) + [(0x1000, 1 << 32, True)]
    with pytest.raises(InvalidArgument):
        p.driver.submit("bad", layout)
    assert p.driver.num_free == 8
    assert p.driver.check_free_list() == 8
    assert p.device.avail_pending() == 0
    with pytest.raises(QueueStateError):
        p.driver.abort()  # no request was left open
    singles(p, ["good"])
    p.serve()
    assert p.driver.reap() == [("good", 0)]
