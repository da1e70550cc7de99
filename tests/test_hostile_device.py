"""A device that breaks the rules: the driver validates every used entry.

virtio 1.2 §2.7.8: a used element holds the head id of a chain the driver
made available and the number of bytes the device wrote into it. The
device is not trusted (docs/architecture.md), so each rule gets a test in which
:class:`pyvirtio.testing.HostileDevice` writes the bad entry straight into
the used ring. Each violation must raise DeviceProtocolError with a clear
message, mark the queue broken (all later work refused with QueueBroken),
leave the free list intact, lose none of the completions validated before
the bad entry, and never hang. reset() brings the queue back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import DeviceProtocolError, QueueBroken
from pyvirtio.ring.split import SplitQueue
from pyvirtio.testing import HostileDevice, RingPair
from pyvirtio.testing.strategies import used_entries

SIZE = 8


@pytest.fixture
def pair() -> Iterator[RingPair]:
    with RingPair(SIZE) as p:
        yield p


@pytest.fixture
def dev(pair: RingPair) -> Iterator[HostileDevice]:
    d = HostileDevice(pair.driver)
    yield d
    d.release()


def submit(pair: RingPair, token: object, readable: int = 16, writable: int = 8) -> int:
    """Publish a request of one readable and one writable buffer; returns its head."""
    bufs = []
    if readable:
        bufs.append((pair.buffer(readable).addr, readable, False))
    if writable:
        bufs.append((pair.buffer(writable).addr, writable, True))
    head = pair.driver.free_head
    pair.submit(token, bufs)
    pair.driver.flush()
    return head


def assert_broken(q: SplitQueue, exc: DeviceProtocolError, held: int) -> None:
    """The queue refuses work, and its free list holds exactly the descriptors nobody holds."""
    assert not isinstance(exc, QueueBroken)  # the first report is the violation itself
    assert str(exc).startswith(f"queue {q.index}: ")
    assert q.broken is not None and q.broken in str(exc)
    assert q.check_free_list() == q.num_free == SIZE - held
    with pytest.raises(QueueBroken, match="broken"):
        q.start("after", 1)
    with pytest.raises(QueueBroken):
        q.flush()
    with pytest.raises(QueueBroken):
        q.reap()
    assert q.check_free_list() == q.num_free == SIZE - held


@pytest.mark.parametrize("bad_id", [SIZE, SIZE + 1, 0xFFFF, 0x10000, 0xFFFFFFFF])
def test_used_id_out_of_range(pair: RingPair, dev: HostileDevice, bad_id: int) -> None:
    submit(pair, "a")
    dev.complete((bad_id, 0))
    with pytest.raises(DeviceProtocolError, match=f"used id {bad_id} is out of range") as info:
        pair.driver.reap()
    assert info.value.completed == []
    assert_broken(pair.driver, info.value, held=2)
    assert pair.driver.in_flight_tokens() == ["a"]


def test_used_id_is_a_non_head_descriptor_of_a_chain(pair: RingPair, dev: HostileDevice) -> None:
    head = submit(pair, "a")  # descriptors head, head+1
    dev.complete((head + 1, 0))
    with pytest.raises(DeviceProtocolError, match=f"used id {head + 1} is not the head") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, held=2)


def test_used_id_is_a_free_descriptor(pair: RingPair, dev: HostileDevice) -> None:
    submit(pair, "a")
    dev.complete((5, 0))  # never handed out
    with pytest.raises(DeviceProtocolError, match="not the head of an in-flight request") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, held=2)


def test_duplicate_completion_in_one_batch(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a")
    submit(pair, "b")
    dev.complete((a, 3), (a, 3))
    with pytest.raises(DeviceProtocolError, match=f"used id {a} is not the head") as info:
        pair.driver.reap()
    assert info.value.completed == [("a", 3)]  # the valid one is not lost
    assert pair.driver.in_flight_tokens() == ["b"]
    assert pair.driver.outstanding == 1
    assert_broken(pair.driver, info.value, held=2)


def test_duplicate_completion_after_reap(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a")
    submit(pair, "b")
    dev.complete((a, 0))
    assert pair.driver.reap() == [("a", 0)]
    dev.complete((a, 0))  # "a" again, while "b" is still in flight
    with pytest.raises(DeviceProtocolError, match=f"used id {a} is not the head") as info:
        pair.driver.reap()
    assert info.value.completed == []
    assert_broken(pair.driver, info.value, held=2)


def test_used_length_above_writable_bytes(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a", readable=16, writable=8)
    dev.complete((a, 9))  # 16 readable bytes do not count: only 8 were offered for writing
    with pytest.raises(
        DeviceProtocolError, match="used length 9 for id .* exceeds the 8 device-writable"
    ) as info:
        pair.driver.reap()
    assert info.value.completed == []
    assert_broken(pair.driver, info.value, held=2)


def test_used_length_on_a_read_only_request(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "ro", readable=16, writable=0)
    dev.complete((a, 1))
    with pytest.raises(DeviceProtocolError, match="exceeds the 0 device-writable") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, held=1)


def test_used_length_at_the_limit_is_fine(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a", readable=16, writable=8)
    b = submit(pair, "b", readable=0, writable=0x10000)
    dev.complete((b, 0x10000), (a, 8))
    assert pair.driver.reap() == [("b", 0x10000), ("a", 8)]
    assert pair.driver.broken is None


@pytest.mark.parametrize("jump", [2, 3, SIZE, SIZE + 1, 0x8000, 0xFFFF])
def test_used_idx_moves_by_more_than_in_flight(pair: RingPair, dev: HostileDevice, jump: int) -> None:
    a = submit(pair, "a")
    dev.write_entry(0, a, 0)  # a valid entry sits in the first slot...
    dev.used_idx = jump  # ...but the index claims more
    with pytest.raises(DeviceProtocolError, match=f"used index moved by {jump} with only 1") as info:
        pair.driver.reap()
    assert info.value.completed == []  # nothing is believed once the index is impossible
    assert pair.driver.in_flight_tokens() == ["a"]
    assert_broken(pair.driver, info.value, held=2)


def test_used_idx_moving_backwards(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a")
    dev.complete((a, 0))
    assert pair.driver.reap() == [("a", 0)]
    dev.used_idx = 0  # back by one: 0xFFFF entries "new"
    with pytest.raises(DeviceProtocolError, match="used index moved by 65535 with only 0"):
        pair.driver.reap()
    assert pair.driver.broken is not None


def test_completions_before_the_bad_entry_are_kept(pair: RingPair, dev: HostileDevice) -> None:
    heads = [submit(pair, t, readable=0, writable=8) for t in ("a", "b", "c")]
    dev.complete((heads[1], 5), (heads[0], 8), (99, 0))
    with pytest.raises(DeviceProtocolError, match="used id 99") as info:
        pair.driver.reap()
    assert info.value.completed == [("b", 5), ("a", 8)]
    assert pair.driver.in_flight_tokens() == ["c"]
    assert pair.driver.last_used == 2  # consumed up to, not including, the bad entry
    assert_broken(pair.driver, info.value, held=1)


def test_max_n_stops_before_a_bad_entry(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a")
    submit(pair, "b")
    dev.complete((a, 0), (SIZE, 0))
    assert pair.driver.reap(1) == [("a", 0)]  # the bad entry was not looked at yet
    with pytest.raises(DeviceProtocolError):
        pair.driver.reap(1)


def test_reset_after_a_violation_brings_the_queue_back(pair: RingPair, dev: HostileDevice) -> None:
    a = submit(pair, "a")
    submit(pair, "b")
    dev.complete((a, 100))
    with pytest.raises(DeviceProtocolError):
        pair.driver.reap()
    assert sorted(map(str, pair.driver.reset())) == ["a", "b"]
    q = pair.driver
    assert q.broken is None
    assert q.num_free == q.check_free_list() == SIZE
    assert (q.avail_idx, q.last_used, q.outstanding) == (0, 0, 0)
    pair.reset_device()  # the device starts again from the zeroed ring
    for k in range(3 * SIZE):  # round the ring a few times
        submit(pair, k, readable=4, writable=4)
        assert pair.serve()[0] == 1
        assert pair.driver.reap() == [(k, 4)]
    assert q.num_free == SIZE


# -- anything at all ------------------------------------------------------------


@settings(max_examples=150)
@given(
    layouts=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=SIZE // 2),
    reaped_first=st.integers(0, SIZE),
    entries=used_entries(SIZE + 4),
    idx_delta=st.one_of(st.integers(0, SIZE + 2), st.integers(0, 0xFFFF)),
    max_n=st.one_of(st.just(1 << 16), st.integers(1, SIZE)),
)
def test_garbage_in_the_used_ring(
    layouts: list[tuple[int, int]],
    reaped_first: int,
    entries: list[tuple[int, int]],
    idx_delta: int,
    max_n: int,
) -> None:
    """Whatever the device writes, reap() returns valid completions or raises DeviceProtocolError."""
    with RingPair(SIZE) as pair:
        dev = HostileDevice(pair.driver)
        wlen: dict[int, int] = {}
        ndescs: dict[int, int] = {}
        for token, (nr, nw) in enumerate(layouts):
            if nr + nw == 0:
                nw = 1
            if sum(ndescs.values()) + nr + nw > SIZE:
                break
            bufs = [(pair.buffer(8).addr, 8, False)] * nr + [(pair.buffer(8).addr, 8, True)] * nw
            pair.submit(token, bufs)
            wlen[token], ndescs[token] = 8 * nw, nr + nw
        pair.driver.flush()
        # Some honest completions first, so the used index is not always at 0.
        honest = dev.available_heads()[:reaped_first]
        dev.complete(*((h, 0) for h in honest))
        for token, length in pair.driver.reap():
            assert length == 0
            del wlen[token]
        dev.write_garbage(dev.used_idx + idx_delta, entries)
        q = pair.driver
        try:
            got = q.reap(max_n)
        except DeviceProtocolError as exc:
            assert not isinstance(exc, QueueBroken)
            assert q.broken is not None
            got = list(exc.completed)  # type: ignore[arg-type]
        else:
            assert q.broken is None
        seen = set()
        for token, length in got:
            assert token in wlen and token not in seen
            assert 0 <= length <= wlen[token]
            seen.add(token)
        assert set(map(int, q.in_flight_tokens())) == set(wlen) - seen  # type: ignore[call-overload]
        held = sum(ndescs[t] for t in set(wlen) - seen)
        assert q.check_free_list() == q.num_free == SIZE - held
        dev.release()
