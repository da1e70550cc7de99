"""The packed ring's stream (ring/stream_packed.py ``PackedStream``; issue 12): batches in bulk, same rules.

The stream re-posts a batch with two stores (bodies, then flags) and checks a batch with one comparison
of ids and flags. These tests hold it to what the plain path does: the ring memory it leaves is byte for
byte what ``post`` / ``reap_slots`` leave after the same device work (over many wraps of odd sizes); each
rule a used descriptor can break (§2.8.1 wrap bits, §2.8.4 length, §2.8.6 id) turns the batch away
(``peek`` -1) and the exact path then judges it as it always does (DeviceProtocolError with the
completions validated before it, or the legal batch accepted); its kicks follow the device's event
suppression structure (§2.8.10).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueBroken
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.ring.fixed_packed import PackedFixedChains
from pyvirtio.spec.ring import DESC_F_WRITE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE
from pyvirtio.testing import HostilePackedDevice, PackedRingPair
from pyvirtio.testing.hostile import packed_used_flags

np = pytest.importorskip("numpy")

BUF = 64


@pytest.fixture(params=[16, 37], ids=["size16", "size37"])
def pair(request: pytest.FixtureRequest) -> Iterator[PackedRingPair]:
    p = PackedRingPair(request.param, event_idx=True)
    yield p
    p.close()


def slots(p: PackedRingPair, writable: bool) -> FixedChains:
    bufs = [p.buffer(BUF) for _ in range(p.driver.size)]
    fc = FixedChains(p.driver, [[(b.addr, BUF if writable else 20 + i, writable)] for i, b in enumerate(bufs)])
    assert isinstance(fc, PackedFixedChains)
    return fc


def ring_state(p: PackedRingPair) -> list[tuple[int, int, int, int]]:
    """Every descriptor as (address - the first slot's buffer, length, id, flags): the pools differ."""
    dev = HostilePackedDevice(p.driver, p.pool)
    out = [dev.read(pos) for pos in range(p.driver.size)]
    dev.release()
    base = min(d[0] for d in out)
    return [(a - base, n, i, f) for a, n, i, f in out]


def serve(p: PackedRingPair, k: int, length: int) -> list[int]:
    """The honest device side: use the next ``k`` available chains in order with ``length`` bytes."""
    ids = []
    for _ in range(k):
        chain = p.device.pop()
        assert chain is not None
        ids.append(chain.head)
        p.device.add_used(chain.head, length)
    p.device.flush_used()
    return ids


@settings(max_examples=30, deadline=None)
@given(
    size=st.sampled_from([7, 16, 37]),
    writable=st.booleans(),
    batches=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    numpy_peek=st.booleans(),
)
def test_the_stream_leaves_the_ring_as_the_plain_path_does(
    size: int, writable: bool, batches: list[int], numpy_peek: bool
) -> None:
    """Same device work on two rings, one streamed and one driven by post / reap_slots: same bytes."""
    length = 30 if writable else 0
    with PackedRingPair(size, event_idx=True) as a, PackedRingPair(size, event_idx=True) as b:
        fa, fb = slots(a, writable), slots(b, writable)
        stream = fa.stream(lambda: None, min_len=14 if writable else 0)
        stream.advance(0)
        fb.post(list(range(size)))
        assert ring_state(a) == ring_state(b)
        for k in batches:
            k = min(k, size)
            ids = serve(a, k, length)
            assert serve(b, k, length) == ids
            if numpy_peek:
                got = stream.peek_many()
                assert got is not None and len(got) == 2
                assert list(got[0]) == ids and (got[1] == length).all()
            else:
                assert stream.peek() == k
            stream.advance(k)
            lens: list[int] = []
            done = fb.reap_slots(lengths=lens)
            assert done == ids and lens == [length] * k
            fb.post(done)
            assert ring_state(a) == ring_state(b)
            assert (fa.ring.next_avail, fa.ring.avail_bits, fa.ring.next_used, fa.ring.used_bits) == (
                fb.ring.next_avail, fb.ring.avail_bits, fb.ring.next_used, fb.ring.used_bits)
        stream.close()
        assert fa.n_inflight == size and sorted(fa.in_flight()) == list(range(size))
        fa.ring.check_ids()


def test_a_batch_across_the_end_of_the_ring_is_one_peek(pair: PackedRingPair) -> None:
    size = pair.driver.size
    fc = slots(pair, True)
    stream = fc.stream(lambda: None)
    stream.advance(0)
    serve(pair, size - 3, 40)
    assert stream.peek() == size - 3
    stream.advance(size - 3)
    ids = serve(pair, 6, 40)  # three before the end, three after it
    got = stream.peek_many()
    assert got is not None and len(got) == 2
    assert list(got[0]) == ids and list(got[1]) == [40] * 6
    stream.advance(6)
    assert stream.peek() == 0
    stream.close()


def test_a_stream_started_with_every_slot_in_flight_finds_them_where_the_ring_put_them(
    pair: PackedRingPair,
) -> None:
    size = pair.driver.size
    fc = slots(pair, True)
    order = list(range(size))
    random.Random(5).shuffle(order)
    fc.post(order)  # slot order[k] at position k
    first = serve(pair, 5, 50)  # used before the stream starts
    assert first == order[:5]
    stream = fc.stream(lambda: None, min_len=14)
    got = stream.peek_many()
    assert got is not None and len(got) == 2 and list(got[0]) == order[:5]
    stream.advance(5)
    for _ in range(3 * size // 4):
        ids = serve(pair, 4, 50)
        assert stream.peek() == 4
        stream.advance(4)
        assert ids == [order[(fc.ring.next_used - 4 + i) % size] for i in range(4)]
    stream.close()
    assert sorted(fc.in_flight()) == list(range(size))


def test_an_out_of_order_completion_goes_to_the_exact_path_which_accepts_it(pair: PackedRingPair) -> None:
    size = pair.driver.size
    fc = slots(pair, True)
    stream = fc.stream(lambda: None)
    stream.advance(0)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    dev.available()
    dev.use(1, 33)
    dev.use(0, 34)  # legal (no IN_ORDER), not what the stream expects at these positions
    assert stream.peek() == -1 and stream.peek_many() == ()
    with pytest.raises(InvalidArgument):
        stream.advance(1)  # nothing was accepted
    stream.close()
    lens: list[int] = []
    assert fc.reap_slots(lengths=lens) == [1, 0] and lens == [33, 34]
    assert fc.n_inflight == size - 2
    dev.release()


def test_a_started_stream_whose_used_ids_repeat_a_slot_leaves_every_batch_to_the_exact_path(
    pair: PackedRingPair,
) -> None:
    size = pair.driver.size
    fc = slots(pair, True)
    fc.post(list(range(size)))
    dev = HostilePackedDevice(pair.driver, pair.pool)
    dev.available()
    dev.use(1, 33)  # position 0 now says 1, position 1 still says 1: no slot map to trust
    stream = fc.stream(lambda: None)
    assert stream.peek() == -1
    stream.close()
    assert fc.reap_slots() == [1]
    dev.release()


#: Every slot is in flight while streaming, so "not in flight" is no lie the stream can meet; a slot
#: completed out of order is legal (no IN_ORDER) and the exact path takes it.
LIES = ["out_of_range", "too_long", "wrong_wrap", "no_write_flag", "short", "out_of_order"]


@pytest.mark.parametrize("lie", LIES)
@pytest.mark.parametrize("vectorised", [False, True], ids=["peek", "peek_many"])
def test_a_lie_is_turned_away_and_the_exact_path_judges_it(pair: PackedRingPair, lie: str, vectorised: bool) -> None:
    fc = slots(pair, True)
    stream = fc.stream(lambda: None, min_len=14)
    stream.advance(0)
    serve(pair, 3, 40)
    assert stream.peek() == 3
    stream.advance(3)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    dev.used_pos = dev.avail_pos = 3
    dev.used_wrap = dev.avail_wrap = 1
    dev.use(3, 40)  # a good one first: the exact path's DeviceProtocolError carries it
    w = dev.used_wrap
    bad = {
        "out_of_range": (0xFFF0, 40, packed_used_flags(w) | DESC_F_WRITE),
        "out_of_order": (9, 40, packed_used_flags(w) | DESC_F_WRITE),  # slot 9 before slot 4: legal
        "too_long": (4, BUF + 1, packed_used_flags(w) | DESC_F_WRITE),
        "wrong_wrap": (4, 40, packed_used_flags(w) ^ 0x80),  # AVAIL and USED differ: neither used nor free
        "no_write_flag": (4, 40, packed_used_flags(w)),  # length reserved: 0 bytes (§2.8.4), below min_len
        "short": (4, 5, packed_used_flags(w) | DESC_F_WRITE),
    }[lie]
    dev.write_used(4, *bad)
    first = [3]  # the good one, in DeviceProtocolError's completed
    if lie not in ("too_long", "short"):
        # Its id or flags are not the expected ones: the batch ends before it (a descriptor may still be on
        # its way, §2.8), the good one is taken, and the next peek turns the lie away.
        assert (stream.peek_many()[0].tolist() if vectorised else stream.peek()) in ([3], 1)  # type: ignore[index]
        stream.advance(1)
        first = []
    got = stream.peek_many() if vectorised else stream.peek()
    assert got == (() if vectorised else -1)
    stream.close()
    if lie in ("no_write_flag", "short", "out_of_order"):
        lens: list[int] = []
        assert fc.reap_slots(lengths=lens) == first + [9 if lie == "out_of_order" else 4]
        assert lens == [40] * len(first) + [{"no_write_flag": 0, "short": 5, "out_of_order": 40}[lie]]
        return
    with pytest.raises(DeviceProtocolError) as info:
        fc.reap_slots()
    assert [s for s, _n in info.value.completed] == first
    with pytest.raises(QueueBroken):
        fc.reap_slots()
    dev.release()


def test_a_batch_whose_first_flags_are_still_on_their_way_ends_before_them(pair: PackedRingPair) -> None:
    """A device may write a batch's used flags in any order (§2.8): a hole is not a lie, the batch stops there."""
    fc = slots(pair, True)
    stream = fc.stream(lambda: None)
    stream.advance(0)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    dev.available()
    for i in range(6):
        dev.use(i, 30)
    before = dev.read(2)
    dev.write_used(2, 2, 30, before[3] ^ 0x8000)  # position 2's flags not written yet: still "available"
    assert stream.peek() == 2
    stream.advance(2)
    assert stream.peek() == 0
    dev.write_used(2, before[2], before[1], before[3])  # the flags land
    got = stream.peek_many()
    assert got is not None and len(got) == 2 and got[0].tolist() == [2, 3, 4, 5]
    stream.advance(4)
    stream.close()
    dev.release()


def test_a_wrong_wrap_counter_at_the_used_position_is_turned_away(pair: PackedRingPair) -> None:
    fc = slots(pair, True)
    stream = fc.stream(lambda: None)
    stream.advance(0)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    dev.write_used(0, 0, 40, 0)  # AVAIL 0, USED 0 in the lap of wrap 1: neither used nor available (§2.8.1)
    assert stream.peek() == -1 and stream.peek_many() == ()
    stream.close()
    with pytest.raises(DeviceProtocolError):
        fc.reap_slots()
    dev.release()


def test_kicks_follow_the_device_s_event_suppression() -> None:
    with PackedRingPair(16, event_idx=False) as p:
        fc = slots(p, False)
        kicks: list[int] = []
        stream = fc.stream(lambda: kicks.append(1))
        dev = HostilePackedDevice(p.driver, p.pool)
        dev.set_event(RING_EVENT_FLAGS_DISABLE)
        stream.advance(0)
        assert kicks == [] and stream.kicks == 0
        serve(p, 4, 0)
        assert stream.peek() == 4
        stream.advance(4)
        assert kicks == []
        dev.set_event(RING_EVENT_FLAGS_ENABLE)
        serve(p, 2, 0)
        assert stream.peek() == 2
        stream.advance(2)
        assert kicks == [1] and stream.kicks == 1
        stream.close()
        dev.release()


def test_device_readable_slots_ignore_the_reserved_length() -> None:
    """tx: without VIRTQ_DESC_F_WRITE the used length is reserved (§2.8.4); whatever it holds, the batch is fine."""
    with PackedRingPair(16, event_idx=True) as p:
        fc = slots(p, False)
        stream = fc.stream(lambda: None)
        stream.advance(0)
        dev = HostilePackedDevice(p.driver, p.pool)
        dev.available()
        for i in range(5):
            dev.use(i, 1 << 20, write=False)
        assert stream.peek() == 5
        stream.advance(5)
        assert dev.available() == [(i, 1) for i in range(5)]  # re-posted in the next lap
        assert [dev.read(i)[1] for i in range(5)] == [20 + i for i in range(5)]  # with their own lengths again
        stream.close()
        dev.release()


def test_misuse_is_refused(pair: PackedRingPair) -> None:
    size = pair.driver.size
    bufs = [pair.buffer(BUF) for _ in range(size - 1)]
    few = FixedChains(pair.driver, [[(b.addr, BUF, True)] for b in bufs])
    with pytest.raises(InvalidArgument):
        few.stream(lambda: None)  # one slot per ring descriptor
    few.detach()
    fc = slots(pair, True)
    stream = fc.stream(lambda: None)
    stream.advance(0)
    serve(pair, 2, 20)
    assert stream.peek() == 2
    with pytest.raises(InvalidArgument):
        stream.advance(3)
    stream.advance(2)
    stream.close()
