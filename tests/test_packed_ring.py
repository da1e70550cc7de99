"""The packed virtqueue (virtio 1.2 §2.8): the driver against the device side, and what lands in the ring.

Descriptors are read back raw from the ring to check the layout the spec
asks for (ids in the last descriptor of a list, NEXT on all but the last,
AVAIL/USED from the wrap counter, the head's flags written last); event
suppression decisions are checked in each mode; reconnect resubmits
exactly the requests not completed.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator

import pytest

from pyvirtio.errors import InvalidArgument
from pyvirtio.ring import ordering
from pyvirtio.ring.chain import Chain
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.spec.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_INITIAL_BASE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    packed_base,
)
from pyvirtio.testing import HostilePackedDevice, PackedRingPair

AVAIL, USED = PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED


@pytest.fixture
def pair() -> Iterator[PackedRingPair]:
    with PackedRingPair(8) as p:
        yield p


def raw(pair: PackedRingPair, pos: int) -> tuple[int, int, int, int]:
    a, n, i, f = PACKED_DESC.unpack_from(pair.pool.translate(pair.driver.desc_addr + 16 * pos, 16), 0)
    return int(a), int(n), int(i), int(f)


# -- sizes and wraps ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 100, 257])
def test_any_size_round_trips_data_across_many_wraps(size: int) -> None:
    """Requests of 1 or 2 descriptors, completed in bursts: each echoes its payload back, once."""
    rng = random.Random(size)
    with PackedRingPair(size) as p:
        out = p.buffer(8 * size)
        src = p.buffer(8 * size)
        expect: dict[int, bytes] = {}
        token = 0
        while token < 4 * size + 20:
            while p.driver.num_free and rng.random() < 0.8:
                slot = token % size
                payload = rng.randbytes(8)
                src.view[8 * slot : 8 * slot + 8] = payload
                if p.driver.num_free >= 2:
                    p.driver.submit(token, [(src.addr + 8 * slot, 8, False), (out.addr + 8 * slot, 8, True)])
                    expect[token] = payload
                else:
                    p.driver.submit(token, [(out.addr + 8 * slot, 8, True)])
                    expect[token] = b""  # nothing readable to echo
                token += 1
            p.driver.flush()
            p.serve(limit=rng.randint(1, size))
            for tok, length in p.driver.reap():
                want = expect.pop(tok)
                assert length == len(want)
                assert bytes(out.view[8 * (tok % size) : 8 * (tok % size) + length]) == want
            p.driver.check_ids()
        p.serve()
        for tok, length in p.driver.reap():
            assert length == len(expect.pop(tok))
        assert not expect and p.driver.outstanding == 0 and p.driver.num_free == size


def test_rejects_sizes_outside_the_spec() -> None:
    from pyvirtio.memory import MemoryPool
    from pyvirtio.ring.packed import PackedQueue

    with MemoryPool(1 << 20) as pool:
        for bad in (0, 32769):
            with pytest.raises(InvalidArgument, match="1..32768"):
                PackedQueue(bad, pool)
        PackedQueue(32768, pool).close()  # §2.8: up to 2^15


# -- what the driver writes ----------------------------------------------------------------


def test_chain_layout(pair: PackedRingPair) -> None:
    b = pair.buffer(64)
    pair.driver.submit("t", [(b.addr, 16, False), (b.addr + 16, 8, False), (b.addr + 32, 4, True)])
    d = [raw(pair, i) for i in range(3)]
    bid = d[2][2]
    assert [x[:2] for x in d] == [(b.addr, 16), (b.addr + 16, 8), (b.addr + 32, 4)]
    assert d[0][3] == AVAIL | DESC_F_NEXT  # wrap counter 1: AVAIL set, USED clear
    assert d[1][3] == AVAIL | DESC_F_NEXT
    assert d[2][3] == AVAIL | DESC_F_WRITE  # the last: no NEXT, buffer id in it (§2.8.6)
    assert all(x[2] == bid for x in d)
    assert raw(pair, 3)[3] == 0  # nothing beyond


def test_head_flags_are_written_last_behind_a_barrier(pair: PackedRingPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """§2.8.21.1: at the release barrier every descriptor but the head is complete, the head not yet available."""
    b = pair.buffer(64)
    seen: list[list[tuple[int, int, int, int]]] = []
    monkeypatch.setattr(ordering, "write_barrier", lambda: seen.append([raw(pair, i) for i in range(3)]))
    pair.driver.submit("t", [(b.addr, 16, False), (b.addr + 16, 8, True), (b.addr + 24, 1, True)])
    assert len(seen) == 1
    head, mid, last = seen[0]
    assert head[3] & (AVAIL | USED) == 0  # not yet available
    assert head[:2] == (b.addr, 16)
    assert mid[3] == AVAIL | DESC_F_WRITE | DESC_F_NEXT and last[3] == AVAIL | DESC_F_WRITE
    assert raw(pair, 0)[3] == AVAIL | DESC_F_NEXT  # published after the barrier


def test_chain_across_the_ring_end_flips_the_wrap_bits() -> None:
    with PackedRingPair(5) as p:
        b = p.buffer(64)
        for k in range(3):
            p.driver.submit(k, [(b.addr, 4, True)])
        p.driver.flush()
        p.serve()
        assert len(p.driver.reap()) == 3
        p.driver.submit("x", [(b.addr, 1, False), (b.addr, 2, False), (b.addr, 3, True)])  # slots 3, 4, 0
        flags = [raw(p, i)[3] for i in (3, 4, 0)]
        assert flags == [AVAIL | DESC_F_NEXT, AVAIL | DESC_F_NEXT, USED | DESC_F_WRITE]  # slot 0: next lap
        assert p.driver.avail_wrap == 0 and p.driver.next_avail == 1
        p.driver.flush()
        chain = p.device.pop()
        assert chain is not None and [len(v) for v in chain.readable + chain.writable] == [1, 2, 3]
        p.device.push_used(chain.head, 3)
        assert p.driver.reap() == [("x", 3)]
        assert raw(p, 3)[3] & (AVAIL | USED) == AVAIL | USED  # used with wrap 1
        assert p.driver.used_wrap == 0


def test_ids_are_not_slots(pair: PackedRingPair) -> None:
    """Ids come from a free list: after an out-of-order completion they no longer match ring slots."""
    b = pair.buffer(16)
    for k in range(3):
        pair.driver.submit(k, [(b.addr, 4, True)])
    pair.driver.flush()
    chains = [pair.device.pop() for _ in range(3)]
    assert [c.head for c in chains if c] == [0, 1, 2]
    pair.device.push_used(2, 0)  # the last one first: used descriptor at slot 0 names id 2
    assert pair.driver.reap() == [(2, 0)]
    pair.driver.submit("new", [(b.addr, 4, True)])  # slot 3, id 2 again (LIFO free ids)
    assert raw(pair, 3)[2] == 2
    pair.driver.flush()
    c = pair.device.pop()
    assert c is not None and c.head == 2
    for cid in (0, 1, 2):
        pair.device.add_used(cid, 1)
    pair.device.flush_used()
    assert pair.driver.reap() == [(0, 1), (1, 1), ("new", 1)]


def test_indirect_request_uses_one_slot_and_a_packed_table() -> None:
    with PackedRingPair(4, indirect=True, indirect_threshold=3) as p:
        b = p.buffer(64, bytes(range(64)))
        w = p.buffer(64)
        bufs = [(b.addr, 4, False), (b.addr + 4, 4, False), (w.addr, 8, True), (w.addr + 8, 8, True)]
        p.driver.submit("ind", bufs)
        assert p.driver.num_free == 3
        addr, length, bid, flags = raw(p, 0)
        assert flags == AVAIL | DESC_F_INDIRECT and length == 64
        table = p.pool.translate(addr, length)
        entries = [PACKED_DESC.unpack_from(table, 16 * k) for k in range(4)]
        assert [(e[0], e[1], e[3]) for e in entries] == [(a, n, DESC_F_WRITE if wr else 0) for a, n, wr in bufs]
        p.driver.flush()
        done, _ = p.serve()
        assert done == 1
        assert p.driver.reap() == [("ind", 8)]
        assert bytes(w.view[:8]) == bytes(range(8))
        assert p.driver.num_free == 4


def test_a_refused_buffer_leaves_nothing_available() -> None:
    """A bad buffer mid-chain: the slots written after the head are retracted, the device sees nothing."""
    with PackedRingPair(6) as p:
        b = p.buffer(64)
        with pytest.raises(InvalidArgument):
            p.driver.submit("bad", [(b.addr, 4, False), (b.addr, 4, False), (b.addr, -1, True)])
        assert p.driver.num_free == 6 and p.driver.outstanding == 0
        for pos in range(6):
            f = raw(p, pos)[3]
            assert not (f & AVAIL and not f & USED), f"slot {pos} looks available: 0x{f:04x}"
        p.driver.submit("ok", [(b.addr, 4, True)])  # shorter than the refused one
        p.driver.flush()
        assert p.serve()[0] == 1
        assert p.device.pop() is None  # the stale second slot is not taken for a head
        assert p.driver.reap() == [("ok", 0)]


def test_abort_and_start_add_path(pair: PackedRingPair) -> None:
    b = pair.buffer(64)
    pair.driver.start("a", 2)
    pair.driver.add(b.addr, 8)
    pair.driver.abort()
    assert raw(pair, 0)[3] == 0  # an open request is not in the ring at all
    pair.driver.start("b", 2)
    pair.driver.add_buffers([(b.addr, 8, False), (b.addr + 8, 8, True)])
    pair.driver.start("c", 1)  # publishes "b"
    pair.driver.add(b.addr + 16, 8, True)
    assert pair.driver.flush() is True
    assert pair.serve()[0] == 2
    assert pair.driver.reap() == [("b", 8), ("c", 0)]


# -- event suppression (§2.8.10) ----------------------------------------------------------


def test_kick_decision_follows_the_device_structure() -> None:
    with PackedRingPair(8, event_idx=True) as p:
        hd = HostilePackedDevice(p.driver)
        b = p.buffer(16)
        try:
            hd.set_event(RING_EVENT_FLAGS_DISABLE)
            p.driver.submit(0, [(b.addr, 4, True)])
            assert p.driver.flush() is False
            hd.set_event(RING_EVENT_FLAGS_ENABLE)
            p.driver.submit(1, [(b.addr, 4, True)])
            assert p.driver.flush() is True
            assert p.driver.flush() is False  # nothing new since the last decision
            # DESC: notify when the descriptor at slot 3, wrap 1 becomes available.
            hd.set_event(RING_EVENT_FLAGS_DESC, 3 | 1 << 15)
            p.driver.submit(2, [(b.addr, 4, True)])  # slot 2
            assert p.driver.flush() is False
            p.driver.submit(3, [(b.addr, 4, False), (b.addr, 4, True)])  # slots 3-4: includes slot 3
            assert p.driver.flush() is True
            hd.set_event(RING_EVENT_FLAGS_DESC, 5 | 0 << 15)  # slot 5 of the next lap: not yet
            p.driver.submit(4, [(b.addr, 4, True)])  # slot 5, lap 1
            assert p.driver.flush() is False
            hd.set_event(0x3)  # reserved value: notify (always safe)
            p.driver.submit(5, [(b.addr, 4, True)])
            assert p.driver.flush() is True
        finally:
            hd.release()


def test_desc_mode_without_event_idx_always_kicks(pair: PackedRingPair) -> None:
    hd = HostilePackedDevice(pair.driver)
    b = pair.buffer(16)
    hd.set_event(RING_EVENT_FLAGS_DESC, 7 | 1 << 15)
    pair.driver.submit(0, [(b.addr, 4, True)])
    assert pair.driver.flush() is True  # DESC "only valid if VIRTIO_F_RING_EVENT_IDX has been negotiated"
    hd.release()


def test_many_submissions_between_decisions_kick() -> None:
    """More than a ring's worth published since the last decision: the event was passed, kick."""
    with PackedRingPair(2, event_idx=True) as p:
        hd = HostilePackedDevice(p.driver)
        b = p.buffer(16)
        hd.set_event(RING_EVENT_FLAGS_DESC, 0 | 1 << 15)
        for k in range(3):
            p.driver.submit(k, [(b.addr, 4, True)])
            p.serve()
            p.driver.reap()
        assert p.driver.flush() is True
        hd.release()


@pytest.mark.parametrize("event_idx", [False, True])
def test_interrupt_suppression_is_what_the_device_reads(event_idx: bool) -> None:
    with PackedRingPair(4, event_idx=event_idx) as p:
        hd = HostilePackedDevice(p.driver)
        b = p.buffer(16)
        assert hd.driver_event[1] == RING_EVENT_FLAGS_DISABLE
        p.driver.submit(0, [(b.addr, 4, True)])
        p.driver.flush()
        assert p.serve() == (1, False)  # interrupts off: no signal
        assert p.driver.reap() == [(0, 0)]
        assert p.driver.enable_interrupts() is False
        off_wrap, flags = hd.driver_event
        if event_idx:
            assert (flags, off_wrap) == (RING_EVENT_FLAGS_DESC, 1 | 1 << 15)  # next used: slot 1, wrap 1
        else:
            assert flags == RING_EVENT_FLAGS_ENABLE
        for k in range(4):
            p.driver.submit(k, [(b.addr, 4, True)])
        p.driver.flush()
        assert p.serve(limit=1) == (1, True)  # slot 1 used: signal
        assert p.driver.reap() == [(0, 0)]
        if event_idx:
            assert hd.driver_event[0] == 2 | 1 << 15  # follows next_used while enabled
        assert p.serve(limit=1) == (1, True)  # slot 2: the one named
        p.driver.disable_interrupts()
        assert hd.driver_event[1] == RING_EVENT_FLAGS_DISABLE
        assert p.serve() == (2, False)
        assert [t for t, _ in p.driver.reap()] == [1, 2, 3]
        hd.release()


def test_device_kick_suppression(pair: PackedRingPair) -> None:
    from pyvirtio.testing import RawPackedDriver  # noqa: F401 - documented sibling

    hd = HostilePackedDevice(pair.driver)
    pair.device.disable_notifications()
    assert hd.driver_event is not None
    b = pair.buffer(16)
    pair.driver.submit(0, [(b.addr, 4, True)])
    assert pair.driver.flush() is False
    assert pair.device.enable_notifications() is True  # work already pending: don't sleep
    pair.serve()
    assert pair.device.enable_notifications() is False
    pair.driver.submit(1, [(b.addr, 4, True)])
    assert pair.driver.flush() is True
    hd.release()


# -- reconnect -------------------------------------------------------------------------------


@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("size", [5, 8])
def test_restart_resubmits_exactly_what_did_not_complete(size: int, in_order: bool) -> None:
    rng = random.Random(size * 2 + in_order)
    with PackedRingPair(size, indirect=True, indirect_threshold=3, in_order=in_order) as p:
        b = p.buffer(64)
        done: list[object] = []
        token = 0
        for _round in range(30):
            while p.driver.num_free:
                n = rng.randint(1, 4)
                if n < 3 and n > p.driver.num_free:
                    break
                p.driver.submit(token, [(b.addr, 4, False)] * (n - 1) + [(b.addr + 8, 4, True)])
                token += 1
            p.driver.flush()
            popped: list[Chain] = []
            while (c := p.device.pop()) is not None:
                popped.append(c)
            completed = popped[: rng.randint(0, len(popped))]
            if not in_order:
                rng.shuffle(completed)
            for c in completed:
                p.device.add_used(c.head, 4)
            p.device.flush_used()
            done += [t for t, _ in p.driver.reap(rng.randint(0, 2) or 1)]
            # The device dies with the rest in flight; a new one starts at the driver's base.
            base = p.driver.restart_base(resubmit=True)
            assert base == packed_base(p.driver.next_used, p.driver.used_wrap, p.driver.next_used, p.driver.used_wrap)
            p.reset_device(base)
            lost = {c.head for c in popped} - {c.head for c in completed}
            again = []
            while (c := p.device.pop()) is not None:
                again.append(c.head)
            assert set(again) >= lost  # every request not completed is offered again...
            assert len(again) == len(set(again))  # ...once...
            assert len(again) == p.driver.outstanding - p.driver.pending()  # ...and none that completed
            for h in again:
                p.device.add_used(h, 4)
            p.device.flush_used()
            done += [t for t, _ in p.driver.reap()]
            p.driver.check_ids()
        assert sorted(done) == list(range(token))  # type: ignore[type-var]


def test_restart_without_resubmit_keeps_completions_and_leaves_the_ring(pair: PackedRingPair) -> None:
    b = pair.buffer(16)
    for k in range(3):
        pair.driver.submit(k, [(b.addr, 4, True)])
    pair.driver.flush()
    c = [pair.device.pop() for _ in range(3)]
    assert all(c)
    pair.device.push_used(1, 2)
    before = [raw(pair, i) for i in range(8)]
    base = pair.driver.restart_base(resubmit=False)
    assert [raw(pair, i) for i in range(8)] == before
    assert base == packed_base(1, 1, 1, 1)
    assert pair.driver.pending() == 1 and pair.driver.enable_interrupts() is True
    assert sorted(pair.driver.in_flight_tokens()) == [0, 1, 2]  # type: ignore[type-var]
    assert pair.driver.reap() == [(1, 2)]


def test_fresh_ring_base() -> None:
    with PackedRingPair(3) as p:
        assert p.driver.restart_base() == PACKED_INITIAL_BASE == p.device.base


def test_many_wraps_random_order() -> None:
    """Tens of thousands of requests through a 7-slot ring: exactly-once, lengths, every slot accounted for."""
    rng = random.Random(7)
    size = 7
    with PackedRingPair(size, event_idx=True, indirect=True, indirect_threshold=4) as p:
        q, dev = p.driver, p.device
        rbuf = p.buffer(8 * size)
        wbuf = p.buffer(24 * size)
        completions: deque[tuple[int, int]] = deque()
        total = returned = 0
        while total < 20_000:
            for _ in range(rng.randint(1, size)):
                nr, nw = rng.randint(0, 2), rng.randint(0, 3)
                n = 1 + nr + nw
                if (n if n < 4 else 1) > q.num_free:
                    break
                slot = total % size
                rbuf.view[8 * slot : 8 * slot + 8] = total.to_bytes(8, "little")
                layout = [(rbuf.addr + 8 * slot, 8, False)] + [(rbuf.addr, 8, False)] * nr
                layout += [(wbuf.addr + 24 * slot + 8 * k, 8, True) for k in range(nw)]
                q.submit(total, layout)
                total += 1
            q.flush()
            chains = []
            while (chain := dev.pop()) is not None:
                chains.append(chain)
            rng.shuffle(chains)
            for chain in chains:
                token = int.from_bytes(chain.readable[0][:8], "little")
                length = rng.randint(0, chain.writable_len)
                dev.add_used(chain.head, length)
                completions.append((token, length))
            dev.flush_used()
            dev.enable_notifications()
            for token, length in q.reap():
                assert (token, length) == completions.popleft()
                returned += 1
            q.check_ids()
        assert returned == total and not completions
        assert q.num_free == size and q.outstanding == 0
        assert dev.base == packed_base(q.next_avail, q.avail_wrap, q.next_used, q.used_wrap)


# -- bases in lap 0 (zero_wrap: DPDK's vhost_blk example reads bit 15 as a position) ------------------


@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("size", [3, 8])
def test_zero_wrap_ring_starts_in_lap_0_and_serves_across_wraps(size: int, in_order: bool) -> None:
    with PackedRingPair(size, in_order=in_order) as p:
        p.driver.close()
        p.driver = PackedQueue(size, p.pool, in_order=in_order, zero_wrap=True)
        assert p.driver.initial_base == 0 and p.driver.restart_base() == 0
        assert all(raw(p, i)[3] & (AVAIL | USED) == AVAIL | USED for i in range(size))  # stale in lap 0
        p.reset_device(0)
        assert p.device.pop() is None  # nothing looks available
        b = p.buffer(64)
        done = []
        for token in range(5 * size):
            b.view[0:4] = token.to_bytes(4, "little")
            p.driver.submit(token, [(b.addr, 4, False), (b.addr + 8, 4, True)])
            p.driver.flush()
            p.serve()
            got = p.driver.reap()
            assert got == [(token, 4)] and bytes(b.view[8:12]) == token.to_bytes(4, "little")
            done.append(token)
            p.driver.check_ids()
        assert p.driver.avail_wrap in (0, 1)


@pytest.mark.parametrize("resubmit", [False, True])
@pytest.mark.parametrize("in_order", [False, True])
def test_zero_wrap_restart_moves_the_ring_to_lap_0(in_order: bool, resubmit: bool) -> None:
    """Whatever lap the used side is in, the base has wrap counters 0; a new device pops exactly what is in flight."""
    size = 5
    rng = random.Random(in_order * 2 + resubmit)
    with PackedRingPair(size, in_order=in_order) as p:
        p.driver.close()
        p.driver = PackedQueue(size, p.pool, in_order=in_order, zero_wrap=True)
        p.reset_device(p.driver.initial_base)
        b = p.buffer(64)
        token = 0
        done: list[object] = []
        laps_seen = set()
        for _round in range(40):
            while p.driver.num_free >= 2:
                p.driver.submit(token, [(b.addr, 4, False), (b.addr + 8, 4, True)])
                token += 1
            p.driver.flush()
            popped = []
            while (c := p.device.pop()) is not None:
                popped.append(c)
            k = rng.randint(0, len(popped))
            completed = popped[:k]
            for c in completed:
                p.device.add_used(c.head, 4)
            p.device.flush_used()
            laps_seen.add(p.driver.used_wrap)
            base = p.driver.restart_base(resubmit=resubmit)
            assert base == packed_base(p.driver.next_used, 0, p.driver.next_used, 0)
            assert p.driver.used_wrap == 0 and p.driver.avail_wrap in (0, 1)
            p.driver.check_ids()
            p.reset_device(base)
            again = []
            while (c := p.device.pop()) is not None:
                again.append(c.head)
            lost = {c.head for c in popped[k:]}
            assert set(again) == lost and len(again) == len(lost)  # exactly the buffers in flight, once
            for h in again:
                p.device.add_used(h, 4)
            p.device.flush_used()
            done += [t for t, _ in p.driver.reap()]
            p.driver.check_ids()
        assert sorted(done) == list(range(token))  # type: ignore[type-var]
        assert laps_seen == {0, 1}  # the restarts did happen in lap 1 too
