"""The device's view of a packed ring (pyvirtio.ring.device_packed) against a raw driver.

:class:`pyvirtio.testing.RawPackedDriver` writes descriptors, indirect tables
and event structures verbatim, so every malformed list the spec forbids can
be built. Each must raise ChainError (never hang, never touch memory outside
the table) and say whether the ring moved (``head`` an id: consumed, the
back end may complete it; None: nothing consumed). Used descriptors and
notification decisions follow virtio 1.2 §2.8.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.errors import DriverProtocolError, InvalidArgument
from pyvirtio.memory import Buffer, MemoryPool
from pyvirtio.ring import device_packed, ordering
from pyvirtio.ring.device_side import ChainError, PackedDeviceQueue
from pyvirtio.spec.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    packed_base,
)
from pyvirtio.testing import RawPackedDriver

SIZE = 6
R, W, N, IND = 0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT
AVAIL, USED = PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED


@pytest.fixture
def raw(pool: MemoryPool) -> Iterator[RawPackedDriver]:
    r = RawPackedDriver(pool, SIZE)
    yield r
    r.close()


@pytest.fixture
def data(pool: MemoryPool) -> Iterator[Buffer]:
    buf = pool.allocate(4096)
    yield buf
    pool.free(buf)


@pytest.fixture
def dq(raw: RawPackedDriver) -> Iterator[PackedDeviceQueue]:
    q = raw.device_queue()
    yield q
    q.release()


# -- good lists --------------------------------------------------------------------------


def test_direct_list(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    data.view[:8] = b"01234567"
    assert dq.pop() is None and dq.avail_pending() == 0
    raw.publish(9, [(data.addr, 8, R), (data.addr + 8, 16, W), (data.addr + 24, 4, W)])
    assert dq.avail_pending() == 1
    c = dq.pop()
    assert c is not None and c.head == 9  # the buffer id, not the slot
    assert c.read_all() == b"01234567" and [len(b) for b in c.writable] == [16, 4]
    assert dq.last_avail == 3 and dq.in_flight == 1
    assert dq.pop() is None


def test_list_across_the_ring_end(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.publish(0, [(data.addr, 4, W)] * 4)
    c = dq.pop()
    assert c is not None
    dq.push_used(c.head, 0)
    raw.publish(1, [(data.addr, 1, R), (data.addr, 2, R), (data.addr, 3, W)])  # slots 4, 5, 0 (wrap 0)
    assert raw.read(0)[3] & (AVAIL | USED) == USED
    c = dq.pop()
    assert c is not None and c.head == 1 and [len(b) for b in c.readable + c.writable] == [1, 2, 3]
    assert dq.base == packed_base(1, 0, 4, 1)
    dq.push_used(1, 3)
    assert dq.base == packed_base(1, 0, 1, 0)
    assert raw.read(4)[1:] == (3, 1, AVAIL | USED | W)  # used in the lap of wrap 1: both bits set


def test_used_descriptor_format(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.publish(4, [(data.addr, 8, R), (data.addr, 8, W)])
    raw.publish(5, [(data.addr, 8, R)])
    a, b = dq.pop(), dq.pop()
    assert a is not None and b is not None
    dq.add_used(5, 0)  # out of order: its used descriptor goes to slot 0
    dq.add_used(4, 7)
    assert raw.read(0)[3] & (AVAIL | USED) == AVAIL  # not yet visible: flush_used writes
    dq.flush_used()
    assert raw.read(0)[1:] == (0, 5, AVAIL | USED)  # wrap 1: both bits set; no WRITE: nothing written
    assert raw.read(1)[1:] == (7, 4, AVAIL | USED | W)  # skipped one slot for list 5, then list 4 (2 slots)
    assert dq.base == packed_base(3, 1, 3, 1)


def test_batch_flags_first_descriptor_last(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch appears at once: the later descriptors whole, the first's id and length, then its flags (§2.8.9)."""
    for i in range(3):
        raw.publish(i, [(data.addr, 8, W)])
        c = dq.pop()
        assert c is not None
        dq.add_used(c.head, i + 1)
    states: list[list[tuple[int, int, int]]] = []
    # The barrier is a call only where stores may be reordered (ring/ordering.py): make it one here.
    monkeypatch.setattr(device_packed, "STRONGLY_ORDERED", False)
    monkeypatch.setattr(ordering, "write_barrier", lambda: states.append([raw.read(i)[1:] for i in range(3)]))
    dq.flush_used()
    used = AVAIL | USED | W
    assert len(states) == 1
    (first_len, first_id, first_flags), *later = states[0]
    assert (first_len, first_id) == (1, 0) and first_flags & used != used  # written, not yet used
    assert later == [(2, 1, used), (3, 2, used)]
    assert raw.read(0)[1:] == (1, 0, used)


# -- malformed lists: nothing consumed ----------------------------------------------------


def test_avail_and_used_equal_to_the_wrap_counter(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.desc(0, data.addr, 8, 0, AVAIL | USED)
    with pytest.raises(ChainError, match="AVAIL and USED equal the wrap counter") as info:
        dq.pop()
    assert info.value.head is None and dq.last_avail == 0


def test_unavailable_descriptor_inside_a_list(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.desc(1, data.addr, 8, 0, W)  # not available in this lap
    raw.desc(0, data.addr, 8, 0, AVAIL | N)
    with pytest.raises(ChainError, match="descriptor 1 in the list from 0 is not available") as info:
        dq.pop()
    assert info.value.head is None and dq.last_avail == 0 and dq.in_flight == 0


def test_list_longer_than_the_ring(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    for i in range(SIZE):
        raw.desc(i, data.addr, 8, 0, AVAIL | N)
    raw.desc(0, data.addr, 8, 0, USED | N)  # slot 0 again in the next lap: still "available", still NEXT
    raw.desc(0, data.addr, 8, 0, AVAIL | N)
    with pytest.raises(ChainError, match="longer than the ring") as info:
        dq.pop()
    assert info.value.head is None and dq.last_avail == 0


def test_id_already_in_flight(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.publish(3, [(data.addr, 8, W)])
    raw.publish(3, [(data.addr, 8, W)])
    assert dq.pop() is not None
    with pytest.raises(ChainError, match="buffer id 3 .* already in flight") as info:
        dq.pop()
    assert info.value.head is None and dq.last_avail == 1


# -- malformed lists: consumed, completable ----------------------------------------------


def _consumed(dq: PackedDeviceQueue, info: pytest.ExceptionInfo[ChainError], bid: int, slots: int) -> None:
    assert info.value.head == bid and isinstance(info.value, DriverProtocolError)
    assert dq.last_avail == slots and dq.in_flight == 1
    dq.push_used(bid, 0)  # the back end completes it with an error status
    assert dq.in_flight == 0 and dq.base == packed_base(slots, 1, slots, 1)


def test_address_outside_the_memory_table(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.publish(2, [(data.addr, 8, R), (0xDEAD0000000, 8, W), (data.addr, 1, W)])
    with pytest.raises(ChainError, match="descriptor 1: .*outside the memory table") as info:
        dq.pop()
    _consumed(dq, info, 2, 3)


def test_readable_after_writable(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.publish(1, [(data.addr, 8, W), (data.addr, 8, R)])
    with pytest.raises(ChainError, match="readable descriptor 1 after a writable one") as info:
        dq.pop()
    _consumed(dq, info, 1, 2)


def test_good_list_after_a_bad_one(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.publish(1, [(data.addr, 8, W), (data.addr, 8, R)])
    raw.publish(2, [(data.addr, 8, W)])
    with pytest.raises(ChainError):
        dq.pop()
    c = dq.pop()
    assert c is not None and c.head == 2


# -- indirect tables (§2.8.7) ---------------------------------------------------------------


def test_indirect_table(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    addr, n = raw.table([(data.addr, 4, R), (data.addr + 4, 4, W | N), (data.addr + 8, 4, W | IND)])
    raw.publish(7, [(addr, n, IND)])
    c = dq.pop()
    assert c is not None and c.head == 7
    # Only WRITE counts in a table; NEXT and INDIRECT there are reserved and ignored.
    assert [len(b) for b in c.readable] == [4] and [len(b) for b in c.writable] == [4, 4]
    assert dq.last_avail == 1


def test_indirect_without_the_feature(raw: RawPackedDriver, data: Buffer) -> None:
    q = raw.device_queue(indirect=False)
    try:
        addr, n = raw.table([(data.addr, 4, W)])
        raw.publish(1, [(addr, n, IND)])
        with pytest.raises(ChainError, match="without RING_INDIRECT_DESC") as info:
            q.pop()
        _consumed(q, info, 1, 1)
    finally:
        q.release()


@pytest.mark.parametrize(
    ("descs", "match", "slots"),
    [
        ([("T", IND), ("D", W)], "indirect descriptor 0 inside a list", 2),  # INDIRECT with NEXT
        ([("D", R), ("T", IND)], "indirect descriptor 1 inside a list", 2),  # INDIRECT after NEXT
    ],
)
def test_indirect_inside_a_list(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, descs: list[tuple[str, int]], match: str, slots: int
) -> None:
    addr, n = raw.table([(data.addr, 4, W)])
    raw.publish(4, [(addr, n, f) if kind == "T" else (data.addr, 4, f) for kind, f in descs])
    with pytest.raises(ChainError, match=match) as info:
        dq.pop()
    _consumed(dq, info, 4, slots)


@pytest.mark.parametrize("length", [0, 15, 17])
def test_indirect_table_length(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, length: int) -> None:
    addr, _ = raw.table([(data.addr, 4, W)] * 2)
    raw.publish(1, [(addr, length, IND)])
    with pytest.raises(ChainError, match=f"indirect table length {length} is invalid") as info:
        dq.pop()
    _consumed(dq, info, 1, 1)


def test_indirect_table_bounded_by_max_chain(raw: RawPackedDriver, data: Buffer) -> None:
    q = raw.device_queue(max_chain=3)
    try:
        addr, n = raw.table([(data.addr, 1, W)] * 4)
        raw.publish(1, [(addr, n, IND)])
        with pytest.raises(ChainError, match="indirect table of 4 > 3 descriptors") as info:
            q.pop()
        _consumed(q, info, 1, 1)
    finally:
        q.release()


def test_indirect_entry_outside_the_table(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    addr, n = raw.table([(data.addr, 4, R), (0xBAD000000000, 4, W)])
    raw.publish(1, [(addr, n, IND)])
    with pytest.raises(ChainError, match="indirect entry 1: .*outside") as info:
        dq.pop()
    _consumed(dq, info, 1, 1)
    raw.publish(2, [(0xBAD000000000, 32, IND)])  # the table itself
    with pytest.raises(ChainError, match="outside the memory table"):
        dq.pop()


# -- the back end's mistakes ------------------------------------------------------------------


def test_add_used_of_an_id_not_in_flight(dq: PackedDeviceQueue) -> None:
    with pytest.raises(InvalidArgument, match="no such buffer in flight"):
        dq.add_used(0, 0)


def test_bad_base(raw: RawPackedDriver) -> None:
    with pytest.raises(DriverProtocolError, match="points outside"):
        raw.device_queue(base=packed_base(SIZE, 1, 0, 1))
    q = raw.device_queue(base=packed_base(2, 0, 1, 0))
    assert q.base == packed_base(2, 0, 1, 0) and q.last_avail == 2
    q.release()


# -- chain cache -------------------------------------------------------------------------------


def test_cached_list_is_checked_again(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    """Reposting the same list in the same slots hits the cache; a changed descriptor is walked again."""
    for _lap in range(3):  # 3 lists of 2 in 6 slots: the same slots every lap, the wrap bits alternate
        for i in range(3):
            raw.publish(i, [(data.addr + 8 * i, 8, R), (data.addr + 64, 8, W)])
        for i in range(3):
            c = dq.pop()
            assert c is not None and c.head == i and c.readable[0].tobytes() == data.view[8 * i : 8 * i + 8].tobytes()
            dq.add_used(c.head, 8)
        dq.flush_used()
    raw.publish(0, [(data.addr, 8, R), (0xBAD000000000, 8, W)])
    with pytest.raises(ChainError, match="outside the memory table"):
        dq.pop()
    dq.push_used(0, 0)
    raw.publish(9, [(data.addr + 8, 8, R), (data.addr + 64, 8, W)])  # slot 2's cached list, a new id
    c = dq.pop()
    assert c is not None and c.head == 9 and c.readable[0].tobytes() == data.view[8:16].tobytes()


def test_remembered_list_found_wherever_it_lands(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list is remembered by its bytes, not its slot: moved, it is taken without a walk; changed
    after its first descriptor, or now across the end of the ring, it is walked with every check."""
    translated: list[int] = []
    gpa = dq.memory.gpa

    def counting(addr: int, length: int) -> memoryview:
        translated.append(addr)
        return gpa(addr, length)

    monkeypatch.setattr(dq.memory, "gpa", counting)
    a = [(data.addr, 8, R), (data.addr + 64, 8, W)]

    def take(id_: int, descs: list[tuple[int, int, int]]) -> int:
        translated.clear()
        raw.publish(id_, descs)
        c = dq.pop()
        assert c is not None and c.head == id_
        assert [bytes(b[:8]) for b in c.readable + c.writable] == [
            data.view[d - data.addr : d - data.addr + 8].tobytes() for d, _n, _f in descs
        ]
        dq.push_used(id_, 8)
        return len(translated)

    assert take(0, a) == 2  # slots 0-1, lap 1: walked, remembered
    assert take(1, [(data.addr + 128, 8, W)]) == 1  # slot 2
    assert take(0, a) == 0  # slots 3-4: the same bytes in other slots, not walked
    assert take(0, a) == 2  # slots 5 and 0, across the end: walked
    assert take(0, a) == 2  # slots 1-2, lap 0: the wrap bits differ, walked the first time
    assert take(7, a) == 0  # slots 3-4, lap 0: the same list but its ids, not walked
    assert take(1, [(data.addr + 128, 8, W)]) == 1  # slot 5
    raw.publish(0, [(data.addr, 8, R), (0xBAD000000000, 8, W)])  # slots 0-1, lap 1: the first descriptor as remembered
    with pytest.raises(ChainError, match="outside the memory table"):
        dq.pop()


# -- notifications (§2.8.10) --------------------------------------------------------------------


def test_notify_decision(raw: RawPackedDriver, data: Buffer) -> None:
    q = raw.device_queue(event_idx=True)
    try:

        def one() -> bool:
            raw.publish(one.n, [(data.addr, 8, W)])  # type: ignore[attr-defined]
            c = q.pop()
            assert c is not None
            one.n += 1  # type: ignore[attr-defined]
            return q.push_used(c.head, 0)

        one.n = 0  # type: ignore[attr-defined]
        raw.set_event(RING_EVENT_FLAGS_DISABLE)
        assert one() is False
        raw.set_event(RING_EVENT_FLAGS_ENABLE)
        assert one() is True
        raw.set_event(RING_EVENT_FLAGS_DESC, 3 | 1 << 15)  # used slot 3 in lap wrap 1
        assert one() is False  # slot 2
        assert one() is True  # slot 3
        assert one() is False  # slot 4
        raw.set_event(0x3)  # reserved: notify
        assert one() is True
        assert q.flush_used() is False  # nothing new
    finally:
        q.release()


def test_notify_desc_without_event_idx(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    raw.set_event(RING_EVENT_FLAGS_DESC, 5 | 1 << 15)
    raw.publish(0, [(data.addr, 8, W)])
    c = dq.pop()
    assert c is not None and dq.push_used(c.head, 0) is True


@pytest.mark.parametrize("event_idx", [False, True])
def test_kick_suppression_structure(raw: RawPackedDriver, data: Buffer, event_idx: bool) -> None:
    q = raw.device_queue(event_idx=event_idx)
    try:
        q.disable_notifications()
        assert raw.device_event[1] == RING_EVENT_FLAGS_DISABLE
        assert q.enable_notifications() is False
        if event_idx:
            assert raw.device_event == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)  # next avail: slot 0, wrap 1
        else:
            assert raw.device_event[1] == RING_EVENT_FLAGS_ENABLE
        raw.publish(0, [(data.addr, 8, W)])
        assert q.enable_notifications() is True
    finally:
        q.release()
