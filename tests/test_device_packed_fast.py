"""The packed device side's fast paths (pyvirtio.ring.device_packed) and their fallbacks.

A list popped once is remembered by head slot and wrap counter with the
bytes it had when it was checked and translated; the next lap's list there
is taken without a walk when its bytes are the same (one struct read), or
when only its id differs (a word-by-word compare of everything else); any
other difference walks it again with every check (§2.8.6, §2.8.7, §2.8.17).
A list across the end of the ring is never matched by bytes. Used
descriptors are written at ``flush_used``: the later ones whole, the first's
id and length, then its flags (§2.8.9, §2.8.21). The notification decision
is :func:`~pyvirtio.spec.ring.packed_need_event`, inlined (§2.8.10).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pyvirtio.memory import Buffer, MemoryPool, MemoryTable
from pyvirtio.ring.device_side import ChainError, PackedDeviceQueue
from pyvirtio.spec.ring import (
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    packed_need_event,
)
from pyvirtio.testing import RawPackedDriver

SIZE = 6
R, W = 0, DESC_F_WRITE
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
def table(pool: MemoryPool) -> MemoryTable:
    return MemoryTable.from_pool(pool)


@pytest.fixture
def translations(table: MemoryTable, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every address the device translates (a walk translates; a remembered list does not)."""
    seen: list[tuple[int, int]] = []
    gpa = table.gpa

    def counting(addr: int, length: int) -> memoryview:
        seen.append((addr, length))
        return gpa(addr, length)

    monkeypatch.setattr(table, "gpa", counting)
    return seen


@pytest.fixture
def dq(raw: RawPackedDriver, table: MemoryTable) -> Iterator[PackedDeviceQueue]:
    q = raw.device_queue(table)
    yield q
    q.release()


def lap(raw: RawPackedDriver, dq: PackedDeviceQueue, make: Callable[[int], tuple[int, list[tuple[int, int, int]]]]
        ) -> list[tuple[int, list[int], list[int]]]:
    """Publish, pop and use ``SIZE // 2`` two-descriptor lists: (id, readable and writable lengths) of each."""
    out = []
    for k in range(SIZE // 2):
        bid, descs = make(k)
        raw.publish(bid, descs)
        c = dq.pop()
        assert c is not None
        out.append((c.head, [len(b) for b in c.readable], [len(b) for b in c.writable]))
        dq.push_used(c.head, 1)
    return out


def blk_like(data: Buffer) -> Callable[[int], tuple[int, list[tuple[int, int, int]]]]:
    return lambda k: (k, [(data.addr + 64 * k, 16, R), (data.addr + 1024 + 64 * k, 8 + k, W)])


def test_same_bytes_next_lap_are_not_walked(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, translations: list[tuple[int, int]]
) -> None:
    first = lap(raw, dq, blk_like(data))  # wrap 1
    assert len(translations) == SIZE
    assert lap(raw, dq, blk_like(data)) == first  # wrap 0: other keys, walked
    assert len(translations) == 2 * SIZE
    data.view[64:80] = b"header of list 1"
    for _ in range(3):  # wrap 1, 0, 1: the same bytes at the same slots
        assert lap(raw, dq, blk_like(data)) == first
    assert len(translations) == 2 * SIZE  # nothing translated again
    raw.publish(0, [(data.addr + 64, 16, R), (data.addr + 1024, 8, W)])
    c = dq.pop()
    assert c is not None and bytes(c.readable[0]) == b"header of list 1"  # views into the same memory


def test_another_id_same_descriptors(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, translations: list[tuple[int, int]]
) -> None:
    lap(raw, dq, blk_like(data))
    lap(raw, dq, blk_like(data))
    n = len(translations)
    ids = [h for h, _r, _w in lap(raw, dq, lambda k: (40 + k, blk_like(data)(k)[1]))]
    assert ids == [40, 41, 42] and len(translations) == n  # the id is read from the ring, no walk


def test_another_address_or_length_is_walked(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, translations: list[tuple[int, int]]
) -> None:
    lap(raw, dq, blk_like(data))
    lap(raw, dq, blk_like(data))
    n = len(translations)
    got = lap(raw, dq, lambda k: (k, [(data.addr + 64 * k, 16, R), (data.addr + 2048, 100 + k, W)]))
    assert [w for _h, _r, w in got] == [[100], [101], [102]]
    assert translations[n:] == [a for k in range(3) for a in ((data.addr + 64 * k, 16), (data.addr + 2048, 100 + k))]


def test_remembered_slot_with_a_bad_list_is_refused(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    lap(raw, dq, blk_like(data))
    lap(raw, dq, blk_like(data))
    raw.publish(0, [(data.addr, 8, W), (data.addr, 8, R)])  # readable after writable (§2.8.17)
    with pytest.raises(ChainError, match="readable descriptor") as ei:
        dq.pop()
    assert ei.value.head == 0  # consumed: the back end may complete it with an error


def test_remembered_slot_outside_the_memory_table(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    lap(raw, dq, blk_like(data))
    lap(raw, dq, blk_like(data))
    raw.publish(0, [(data.addr, 16, R), (1 << 60, 8, W)])
    with pytest.raises(ChainError, match="descriptor 1"):
        dq.pop()


def test_remembered_list_with_an_unavailable_descriptor(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer
) -> None:
    lap(raw, dq, blk_like(data))
    lap(raw, dq, blk_like(data))
    # The bytes of lap 0's list at slot 0 but its second descriptor left as the device used it.
    raw.publish(0, blk_like(data)(0)[1])
    raw.desc(1, data.addr + 1024, 8, 0, W | AVAIL | USED)
    with pytest.raises(ChainError, match="not available") as ei:
        dq.pop()
    assert ei.value.head is None and dq.last_avail == 0  # nothing consumed


def test_remembered_list_whose_id_is_in_flight(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    lap(raw, dq, blk_like(data))
    lap(raw, dq, blk_like(data))
    raw.publish(7, [(data.addr, 16, R), (data.addr + 1024, 8, W)])  # slot 0, another id, kept in flight
    c = dq.pop()
    assert c is not None and c.head == 7
    raw.publish(7, [(data.addr + 64, 16, R), (data.addr + 1088, 9, W)])  # slot 2: remembered, but id 7 again
    with pytest.raises(ChainError, match="already in flight") as ei:
        dq.pop()
    assert ei.value.head is None


def test_lists_across_the_ring_end_every_lap(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    # Three-descriptor lists in a ring of 6: every other one crosses the end.
    for round_ in range(8):
        for k in range(2):
            raw.publish(k, [(data.addr, 16, R), (data.addr + 100, 4096 - 100 - k, W), (data.addr + 4095, 1, W)])
            c = dq.pop()
            assert c is not None and c.head == k
            assert [len(b) for b in c.writable] == [3996 - k, 1], round_
            dq.push_used(k, 1)
    assert dq.pop() is None


def test_indirect_lists_are_walked_every_time(
    raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer, translations: list[tuple[int, int]]
) -> None:
    addr, length = raw.table([(data.addr, 16, R), (data.addr + 16, 8, W)])
    for k in range(2 * SIZE + 1):
        raw.publish(k, [(addr, length, 0x4)])  # VIRTQ_DESC_F_INDIRECT
        c = dq.pop()
        assert c is not None and [len(b) for b in c.readable + c.writable] == [16, 8]
        dq.push_used(c.head, 0)
    assert len(translations) == 3 * (2 * SIZE + 1)  # the table and its two entries, every time


def test_batch_across_the_ring_end(raw: RawPackedDriver, dq: PackedDeviceQueue, data: Buffer) -> None:
    """Used descriptors of one flush in two laps carry each lap's wrap bits; the first is the batch's head."""
    for k in range(4):
        raw.publish(k, [(data.addr, 8, W)])
        c = dq.pop()
        assert c is not None
        dq.push_used(c.head, 1)  # slots 0..3 used (wrap 1)
    for k in range(4, 8):
        raw.publish(k, [(data.addr, 8, W)])  # slots 4, 5 (wrap 1), 0, 1 (wrap 0)
    chains = [dq.pop() for _ in range(4)]
    for c in chains:
        assert c is not None
        dq.add_used(c.head, 0 if c.head == 5 else 2)
    assert dq.flush_used() is True
    assert [raw.read(i)[1:] for i in (4, 5, 0, 1)] == [
        (2, 4, AVAIL | USED | W),
        (0, 5, AVAIL | USED),  # nothing written: no WRITE flag
        (2, 6, W),  # lap of wrap 0: both bits clear
        (2, 7, W),
    ]
    assert dq.used_wrap == 0 and dq.base & 0xFFFF0000 == 2 << 16


@pytest.mark.parametrize("n", [1, 2, 5])
def test_notify_decision_is_packed_need_event(raw: RawPackedDriver, data: Buffer, n: int) -> None:
    """flush_used's inlined decision against spec.ring.packed_need_event, for every event position."""
    for off_wrap in [p | w << 15 for w in (0, 1) for p in range(SIZE)]:
        q = raw.device_queue(event_idx=True, base=raw.pos | raw.wrap << 15 | raw.pos << 16 | raw.wrap << 31)
        try:
            raw.set_event(RING_EVENT_FLAGS_DESC, off_wrap)
            for k in range(n):
                raw.publish(k, [(data.addr, 8, W)])
            for _ in range(n):
                c = q.pop()
                assert c is not None
                q.add_used(c.head, 1)
            expect = packed_need_event(off_wrap, q.used_pos, q.used_wrap, n, SIZE)
            assert q.flush_used() is expect, off_wrap
        finally:
            q.release()


@pytest.mark.parametrize("off", [4 * SIZE, 0x7FFF])
def test_an_event_offset_far_outside_the_ring_notifies(raw: RawPackedDriver, data: Buffer, off: int) -> None:
    """A driver's event naming no descriptor of the two laps (its error): notify, which is always safe."""
    for wrap in (0, 1):
        q = raw.device_queue(event_idx=True, base=raw.pos | raw.wrap << 15 | raw.pos << 16 | raw.wrap << 31)
        try:
            raw.set_event(RING_EVENT_FLAGS_DESC, off | wrap << 15)
            raw.publish(0, [(data.addr, 8, W)])
            c = q.pop()
            assert c is not None
            q.add_used(c.head, 1)
            assert q.flush_used() is True
            assert q.flush_used() is False  # nothing used since: nothing to signal
        finally:
            q.release()
