"""VIRTIO_F_IN_ORDER on both ring formats, driver and device side (virtio 1.2 §2.7.9, §2.8.8).

The spec text relied on: "If negotiated, this knowledge allows devices to
notify the use of a batch of buffers to the driver by only writing out a
single used ring entry with the id corresponding to the head entry of the
descriptor chain describing the last buffer in the batch. The device then
skips forward in the ring according to the size of the batch. Accordingly,
it increments the used idx by the size of the batch." (split; the packed
text says the same of "a single used descriptor with the Buffer ID
corresponding to the last descriptor in the batch"), and "The skipped
buffers (for which no used ring entry was written) are assumed to have been
used (read or written) by the device completely." For split, §2.7.5 adds
that the driver "uses descriptors in ring order: starting from offset 0 in
the table, and wrapping around at the end of the table", with ``next`` = x + 1
(0 for the last descriptor of the table).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from pyvirtio.errors import DeviceProtocolError, InvalidArgument
from pyvirtio.ring.chain import Chain
from pyvirtio.spec.ring import DESC_F_NEXT, USED_ELEM, USED_OFF_IDX, USED_OFF_RING
from pyvirtio.testing import HostileDevice, HostilePackedDevice, PackedRingPair, RingPair

Pair = RingPair | PackedRingPair


def make(fmt: str, size: int = 8, **kw: bool | int) -> Pair:
    cls = RingPair if fmt == "split" else PackedRingPair
    return cls(size, in_order=True, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["split", "packed"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    with make(request.param) as p:
        yield p


def publish(p: Pair, n: int, length: int = 4) -> None:
    """Requests 0 .. n-1 of one device-writable buffer of ``length`` bytes each, published."""
    w = p.buffer(length * n)
    for t in range(n):
        p.driver.submit(t, [(w.addr + length * t, length, True)])
    p.driver.flush()


def pop_all(p: Pair) -> list[Chain]:
    out = []
    while (c := p.device.pop()) is not None:
        out.append(c)
    return out


def split_used(p: RingPair) -> tuple[int, list[tuple[int, int]]]:
    """(used.idx, the used ring's entries) read raw."""
    view = p.pool.translate(p.driver.used_addr, 4 + 8 * p.size)
    idx = struct.unpack_from("<H", view, USED_OFF_IDX)[0]
    return idx, [USED_ELEM.unpack_from(view, USED_OFF_RING + 8 * k) for k in range(p.size)]


# -- device batching, driver un-batching ------------------------------------------------------


def test_a_batch_used_completely_is_one_used_entry(pair: Pair) -> None:
    w = pair.buffer(64)
    for t in range(4):
        pair.driver.submit(t, [(w.addr + 8 * t, 8, True)])
    pair.driver.flush()
    for c in pop_all(pair):
        pair.device.add_used(c.head, 8 if c.head != 3 else 5)  # all full but the last
    pair.device.flush_used()
    if isinstance(pair, RingPair):
        idx, entries = split_used(pair)
        assert idx == 4  # moved by the batch size...
        assert entries[0] == (3, 5) and entries[1] == (0, 0)  # ...one entry, at the batch's first slot
    else:
        hd = HostilePackedDevice(pair.driver)
        assert hd.read(0)[1:3] == (5, 3)  # id 3 (the last), its length, at slot 0
        assert hd.read(1)[3] & 0x8080 != 0x8080  # slots 1-3 skipped: not written as used
        hd.release()
    assert pair.driver.pending() == 4
    assert pair.driver.reap() == [(0, 8), (1, 8), (2, 8), (3, 5)]  # skipped ones: all their writable bytes
    assert pair.driver.num_free == 8 and pair.driver.outstanding == 0


def test_a_partial_length_ends_a_batch(pair: Pair) -> None:
    w = pair.buffer(64)
    for t in range(5):
        pair.driver.submit(t, [(w.addr + 8 * t, 8, True)])
    pair.driver.flush()
    lengths = {0: 8, 1: 3, 2: 8, 3: 8, 4: 8}  # buffer 1 was not used completely: it must be named
    for c in pop_all(pair):
        pair.device.add_used(c.head, lengths[c.head])
    pair.device.flush_used()
    if isinstance(pair, RingPair):
        idx, entries = split_used(pair)
        assert idx == 5 and entries[0] == (1, 3) and entries[2] == (4, 8)  # batches {0,1} and {2,3,4}
    assert pair.driver.reap() == [(t, n) for t, n in lengths.items()]


def test_batch_larger_than_max_n_is_kept_for_the_next_reap(pair: Pair) -> None:
    w = pair.buffer(64)
    for t in range(6):
        pair.driver.submit(t, [(w.addr, 4, True)])
    pair.driver.flush()
    for c in pop_all(pair):
        pair.device.add_used(c.head, 4)
    pair.device.flush_used()
    assert pair.driver.reap(2) == [(0, 4), (1, 4)]
    assert pair.driver.pending() == 4 and pair.driver.outstanding == 4
    assert sorted(pair.driver.in_flight_tokens()) == [2, 3, 4, 5]  # type: ignore[type-var]
    assert pair.driver.enable_interrupts() is True
    pair.driver.disable_interrupts()
    assert pair.driver.reap(3) == [(2, 4), (3, 4), (4, 4)]
    assert sorted(pair.driver.reset()) == [5]  # type: ignore[type-var]


def test_chains_of_several_descriptors_and_indirect() -> None:
    for fmt in ("split", "packed"):
        with make(fmt, 8, indirect=True, indirect_threshold=3) as p:
            r, w = p.buffer(64, bytes(range(64))), p.buffer(64)
            for round_ in range(20):
                for t in range(3):
                    n = 1 + (round_ + t) % 4  # 1, 2 direct; 3, 4 indirect
                    p.driver.submit((round_, t), [(r.addr, 2, False)] * (n - 1) + [(w.addr + 16 * t, 16, True)])
                p.driver.flush()
                for c in pop_all(p):
                    p.device.add_used(c.head, c.writable_len)
                assert p.device.flush_used() is False
                assert p.driver.reap() == [((round_, t), 16) for t in range(3)]
            assert p.driver.num_free == 8


def test_device_refuses_to_use_out_of_order(pair: Pair) -> None:
    w = pair.buffer(16)
    for t in range(2):
        pair.driver.submit(t, [(w.addr, 4, True)])
    pair.driver.flush()
    a, b = pop_all(pair)
    with pytest.raises(InvalidArgument, match="in order: add_used"):
        pair.device.add_used(b.head, 0)
    pair.device.add_used(a.head, 0)  # the refused call changed nothing
    pair.device.add_used(b.head, 0)
    pair.device.flush_used()
    assert pair.driver.reap() == [(0, 0), (1, 0)]


# -- the split driver's ring order (§2.7.5) --------------------------------------------------


def test_split_descriptors_are_used_in_ring_order() -> None:
    with make("split", 8) as p:
        assert isinstance(p, RingPair)
        b = p.buffer(64)
        table = p.pool.translate(p.driver.desc_addr, 16 * 8)
        heads = []
        for k in range(12):
            n = 1 + k % 3
            if k == 5:  # an aborted request gives its descriptors back to the front
                p.driver.start("x", 2)
                p.driver.add(b.addr, 1)
                p.driver.abort()
            heads.append(p.driver.free_head)
            p.driver.submit(k, [(b.addr, 1, False)] * (n - 1) + [(b.addr, 1, True)])
            for i in range(n - 1):
                d = (heads[-1] + i) % 8
                flags, nxt = struct.unpack_from("<HH", table, 16 * d + 12)
                assert flags & DESC_F_NEXT and nxt == (d + 1) % 8  # next = x + 1, 0 after the last
            p.driver.flush()
            for c in pop_all(p):
                p.device.add_used(c.head, 1)
            p.device.flush_used()
            assert p.driver.reap() == [(k, 1)]
        expect = [0]
        for k in range(11):
            expect.append((expect[-1] + 1 + k % 3) % 8)
        assert heads == expect


# -- a device that skips or reorders -----------------------------------------------------------


def test_split_entry_whose_batch_exceeds_the_used_index() -> None:
    with make("split") as p:
        assert isinstance(p, RingPair)
        publish(p, 3)
        h = HostileDevice(p.driver)
        h.complete((0, 4), (2, 4))  # head 2 after head 0: a batch {1, 2}, but the index moved by 1 for it
        with pytest.raises(DeviceProtocolError, match="used id 2 completes 2\\+ requests in order") as info:
            p.driver.reap()
        assert info.value.completed == [(0, 4)]
        assert sorted(p.driver.in_flight_tokens()) == [1, 2]  # type: ignore[type-var]
        h.release()


def test_split_reordering_device_is_caught() -> None:
    """Head 1 reported alone (one entry, index + 1) before head 0: the batch {0, 1} does not fit."""
    with make("split") as p:
        assert isinstance(p, RingPair)
        publish(p, 2)
        h = HostileDevice(p.driver)
        h.complete((1, 4))
        with pytest.raises(DeviceProtocolError, match="used id 1 completes 2\\+ requests"):
            p.driver.reap()
        h.release()


def test_split_batch_entry_in_the_right_place_is_accepted() -> None:
    with make("split") as p:
        assert isinstance(p, RingPair)
        publish(p, 3)
        h = HostileDevice(p.driver)
        h.write_garbage(0, [(2, 1), (0xDEAD, 0xBEEF), (0xDEAD, 0xBEEF)])  # stale slots after the entry
        h.used_idx = 3
        assert p.driver.reap() == [(0, 4), (1, 4), (2, 1)]
        h.release()


def test_packed_reordering_device_is_caught_when_it_reports_the_earlier() -> None:
    with make("packed") as p:
        assert isinstance(p, PackedRingPair)
        publish(p, 3)
        h = HostilePackedDevice(p.driver)
        h.use(1, 2, ndescs=2)  # names id 1: buffers 0 and 1 are done (0 "completely")
        h.use(0, 2)  # ...then reports 0 as well
        with pytest.raises(DeviceProtocolError, match="used id 0 is not in flight") as info:
            p.driver.reap()
        assert info.value.completed == [(0, 4), (1, 2)]
        assert p.driver.in_flight_tokens() == [2]
        h.release()


def test_packed_id_not_in_flight_in_order() -> None:
    with make("packed") as p:
        assert isinstance(p, PackedRingPair)
        w = p.buffer(16)
        p.driver.submit(0, [(w.addr, 4, True)])
        p.driver.flush()
        h = HostilePackedDevice(p.driver)
        h.use(5, 0)
        with pytest.raises(DeviceProtocolError, match="used id 5 is not in flight"):
            p.driver.reap()
        h.release()


def test_split_restart_takes_batched_completions_first() -> None:
    with make("split") as p:
        assert isinstance(p, RingPair)
        publish(p, 4)
        chains = pop_all(p)
        for c in chains[:3]:
            p.device.add_used(c.head, 4)
        p.device.flush_used()  # one entry for three
        base = p.driver.restart_base(resubmit=True)
        assert base == 3
        p.reset_device()
        p.device.last_avail = base
        again = pop_all(p)
        assert [c.head for c in again] == [chains[3].head]
        p.device.add_used(again[0].head, 1)
        p.device.flush_used()
        assert p.driver.reap() == [(0, 4), (1, 4), (2, 4), (3, 1)]
