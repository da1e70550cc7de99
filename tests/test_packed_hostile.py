"""A device that breaks the packed-ring rules: the driver validates every used descriptor.

virtio 1.2 §2.8: a used descriptor carries the device's wrap counter in
both AVAIL and USED (§2.8.1), the id of a buffer the driver made available
(§2.8.21.1) and, with VIRTQ_DESC_F_WRITE, the bytes written (§2.8.4). The
device is not trusted: each rule gets a test in which
:class:`pyvirtio.testing.HostilePackedDevice` writes the bad descriptor
straight into the ring. Each violation must raise DeviceProtocolError
naming it, mark the queue broken (later work refused with QueueBroken),
keep the id bookkeeping whole, deliver the completions validated before
the bad descriptor (and nothing twice), and never hang.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import DeviceProtocolError, QueueBroken
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.spec.ring import DESC_F_WRITE, PACKED_DESC_F_USED
from pyvirtio.testing import HostilePackedDevice, PackedRingPair
from pyvirtio.testing.hostile import packed_avail_flags, packed_used_flags

SIZE = 7


@pytest.fixture
def pair() -> Iterator[PackedRingPair]:
    with PackedRingPair(SIZE) as p:
        yield p


@pytest.fixture
def dev(pair: PackedRingPair) -> Iterator[HostilePackedDevice]:
    d = HostilePackedDevice(pair.driver)
    yield d
    d.release()


def submit(pair: PackedRingPair, token: object, writable: int = 8, readable: int = 0) -> None:
    bufs = []
    if readable:
        bufs.append((pair.buffer(readable).addr, readable, False))
    bufs.append((pair.buffer(max(writable, 1)).addr, writable, True))
    pair.driver.submit(token, bufs)
    pair.driver.flush()


def assert_broken(q: PackedQueue, exc: DeviceProtocolError, in_flight: list[object]) -> None:
    assert not isinstance(exc, QueueBroken)  # the first report is the violation itself
    assert str(exc).startswith(f"queue {q.index}: ")
    assert q.broken is not None and q.broken in str(exc)
    q.check_ids()
    assert sorted(q.in_flight_tokens(), key=str) == sorted(in_flight, key=str)
    with pytest.raises(QueueBroken, match="broken"):
        q.submit("after", [(0x1000, 1, False)])
    with pytest.raises(QueueBroken):
        q.flush()
    with pytest.raises(QueueBroken):
        q.reap()
    with pytest.raises(QueueBroken):
        q.restart_base()
    assert sorted(q.reset(), key=str) == sorted(in_flight, key=str)
    assert q.broken is None and q.num_free == q.size and q.check_ids() == q.size


@pytest.mark.parametrize("bad_id", [SIZE, SIZE + 1, 0x7FFF, 0xFFFF])
def test_used_id_out_of_range(pair: PackedRingPair, dev: HostilePackedDevice, bad_id: int) -> None:
    submit(pair, "a")
    submit(pair, "b")
    dev.use(0, 8)  # "a" honestly
    dev.use(bad_id, 0)
    with pytest.raises(DeviceProtocolError, match=f"used id {bad_id} is out of range") as info:
        pair.driver.reap()
    assert info.value.completed == [("a", 8)]
    assert_broken(pair.driver, info.value, ["b"])


def test_used_id_never_made_available(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    submit(pair, "a")
    dev.use(3, 0)  # id 3 is in range but was never handed out
    with pytest.raises(DeviceProtocolError, match="used id 3 is not in flight") as info:
        pair.driver.reap()
    assert info.value.completed == []
    assert_broken(pair.driver, info.value, ["a"])


def test_used_id_returned_twice(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    submit(pair, "a")
    submit(pair, "b")
    dev.use(0, 1)
    dev.use(0, 1)  # "a" again
    with pytest.raises(DeviceProtocolError, match="used id 0 is not in flight") as info:
        pair.driver.reap()
    assert info.value.completed == [("a", 1)]  # once
    assert_broken(pair.driver, info.value, ["b"])


def test_length_above_the_writable_bytes(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    submit(pair, "a", writable=8, readable=100)  # readable bytes do not count
    dev.use(0, 9)
    with pytest.raises(DeviceProtocolError, match="used length 9 for id 0 exceeds the 8 device-writable") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, ["a"])


def test_length_without_the_write_flag_is_ignored(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    """§2.8.4: "Element Length is reserved for used descriptors without the VIRTQ_DESC_F_WRITE flag"."""
    submit(pair, "a", writable=8)
    dev.use(0, 0xFFFFFFFF, write=False)
    assert pair.driver.reap() == [("a", 0)]
    assert pair.driver.broken is None


def test_used_descriptor_with_the_wrong_wrap_counter(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    """Both wrap bits, but the previous lap's value: a device whose wrap counter went wrong."""
    submit(pair, "a")
    dev.write_used(0, 0, 4, packed_used_flags(0) | DESC_F_WRITE)
    with pytest.raises(DeviceProtocolError, match="neither available nor used with the current wrap counter 1") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, ["a"])


@pytest.mark.parametrize("flags", [PACKED_DESC_F_USED, 0x0])
def test_used_descriptor_with_malformed_flags(pair: PackedRingPair, dev: HostilePackedDevice, flags: int) -> None:
    """AVAIL differing from USED where the driver left an available descriptor (or both cleared)."""
    submit(pair, "a")
    dev.write_used(0, 0, 4, flags)
    with pytest.raises(DeviceProtocolError, match="neither available nor used") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, ["a"])


def test_malformed_flags_after_a_good_completion(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    submit(pair, "a")
    submit(pair, "b")
    dev.use(0, 2)
    dev.write_used(1, 1, 2, PACKED_DESC_F_USED)  # the available flags of the *other* lap (wrap 0)
    with pytest.raises(DeviceProtocolError, match="descriptor at 1 has flags 0x8000") as info:
        pair.driver.reap()
    assert info.value.completed == [("a", 2)]
    assert_broken(pair.driver, info.value, ["b"])


def test_more_used_descriptors_than_in_flight(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    submit(pair, "a")
    dev.use(0, 1)
    dev.use(0, 1)  # a second used descriptor with nothing left in flight
    with pytest.raises(DeviceProtocolError, match="used descriptor at 1 with no request in flight") as info:
        pair.driver.reap()
    assert info.value.completed == [("a", 1)]
    assert_broken(pair.driver, info.value, [])


def test_used_descriptor_on_an_idle_ring(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    dev.use(0, 0)
    with pytest.raises(DeviceProtocolError, match="no request in flight") as info:
        pair.driver.reap()
    assert_broken(pair.driver, info.value, [])


def test_stale_slots_of_earlier_laps_are_not_used(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    """With nothing in flight the next slot may hold anything of an earlier lap: not an error, not a completion."""
    dev.write_used(0, 0, 0, packed_avail_flags(0))  # a previous lap's available descriptor
    assert pair.driver.reap() == []
    dev.write_used(0, 0, 0, packed_used_flags(0))  # a previous lap's used descriptor
    assert pair.driver.reap() == [] and pair.driver.broken is None


def test_max_n_then_the_bad_descriptor(pair: PackedRingPair, dev: HostilePackedDevice) -> None:
    """A reap bounded by max_n stops before the violation; the next reap reports it."""
    for t in "abc":
        submit(pair, t)
    dev.use(0, 1)
    dev.use(1, 1)
    dev.use(5, 1)
    assert pair.driver.reap(2) == [("a", 1), ("b", 1)]
    with pytest.raises(DeviceProtocolError, match="used id 5 is not in flight") as info:
        pair.driver.reap()
    assert info.value.completed == []
    assert_broken(pair.driver, info.value, ["c"])


@settings(max_examples=150)
@given(
    entries=st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF)), max_size=2 * SIZE
    ),
    ntok=st.integers(0, 5),
)
def test_garbage_never_hangs_or_duplicates(entries: list[tuple[int, int, int]], ntok: int) -> None:
    """Arbitrary (id, len, flags) over the whole ring: reap ends, delivers each token at most once."""
    with PackedRingPair(SIZE) as p:
        w = p.buffer(64)
        for t in range(ntok):
            p.driver.submit(t, [(w.addr, 8, True)])
        dev = HostilePackedDevice(p.driver)
        try:
            for pos, (id_, length, flags) in enumerate(entries[:SIZE]):
                dev.write_used(pos, id_, length, flags)
            seen: list[object] = []
            for _ in range(3):
                try:
                    got = p.driver.reap()
                except DeviceProtocolError as exc:
                    seen += [t for t, _ in exc.completed]
                    assert p.driver.broken is not None
                    break
                seen += [t for t, _ in got]
                assert all(0 <= n <= 8 for _, n in got)
            assert len(seen) == len(set(seen)) and set(seen) <= set(range(ntok))
            p.driver.check_ids()
            assert sorted(seen + p.driver.in_flight_tokens()) == list(range(ntok))  # type: ignore[type-var]
        finally:
            dev.release()
