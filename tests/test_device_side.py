"""The device's view of a split ring (pyvirtio.ring.device_side) against a raw driver.

:class:`pyvirtio.testing.RawDriver` writes descriptors, indirect tables and
avail entries verbatim, so every malformed chain the spec forbids can be
built. Each must raise ChainError (never hang, never touch memory outside
the table); notification decisions must follow virtio 1.2 §2.7.7.2.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.errors import DriverProtocolError, InvalidArgument
from pyvirtio.memory import Buffer, MemoryPool, MemoryTable
from pyvirtio.ring.device_side import ChainError, DeviceQueue
from pyvirtio.spec.ring import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_F_NO_NOTIFY,
    avail_size,
    desc_table_size,
    used_size,
)
from pyvirtio.testing import RawDriver

SIZE = 8
R, W, N, IND = 0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT


@pytest.fixture
def raw(pool: MemoryPool) -> Iterator[RawDriver]:
    r = RawDriver(pool, SIZE)
    yield r
    r.close()


@pytest.fixture
def data(pool: MemoryPool) -> Iterator[Buffer]:
    buf = pool.allocate(4096)
    yield buf
    pool.free(buf)


@pytest.fixture
def dq(raw: RawDriver) -> Iterator[DeviceQueue]:
    q = raw.device_queue()
    yield q
    q.release()


# -- good chains ----------------------------------------------------------------


def test_direct_chain(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    data.view[:16] = b"0123456789abcdef"
    raw.desc(0, data.addr, 16, R | N, 1)
    raw.desc(1, data.addr + 16, 32, W | N, 2)
    raw.desc(2, data.addr + 48, 8, W)
    raw.publish(0)
    assert dq.avail_pending() == 1
    chain = dq.pop()
    assert chain is not None
    assert chain.head == 0
    assert chain.read_all() == b"0123456789abcdef"
    assert [len(b) for b in chain.writable] == [32, 8]
    assert chain.writable_len == 40
    chain.writable[1][:3] = b"xyz"  # zero copy: straight into the driver's buffer
    assert bytes(data.view[48:51]) == b"xyz"
    assert dq.pop() is None
    assert dq.avail_pending() == 0


def test_a_chain_posted_again_is_checked_again(raw: RawDriver, dq: DeviceQueue, data: Buffer, pool: MemoryPool) -> None:
    """The walk of a chain is reused only while its descriptors are unchanged."""
    data.view[:32] = bytes(range(32))
    raw.desc(0, data.addr, 16, R | N, 1)
    raw.desc(1, data.addr + 16, 8, W)
    for _ in range(3):  # the same chain again and again
        raw.publish(0)
        chain = dq.pop()
        assert chain is not None and chain.read_all() == bytes(range(16)) and chain.writable_len == 8
        chain.writable.append(memoryview(b""))  # a model may change its lists: not the device's copy
    raw.desc(0, data.addr + 4, 16, R | N, 1)  # another address
    raw.publish(0)
    chain = dq.pop()
    assert chain is not None and chain.read_all() == bytes(range(4, 20)) and chain.writable_len == 8
    raw.desc(1, data.addr + 16, 24, W)  # another length
    raw.publish(0)
    chain = dq.pop()
    assert chain is not None and chain.writable_len == 24
    raw.desc(1, data.addr + 16, 24, R)  # readable now
    raw.publish(0)
    chain = dq.pop()
    assert chain is not None and chain.readable_len == 40 and not chain.writable
    outside = pool.regions[0].guest_addr - 64
    raw.desc(1, outside, 8, W)  # and now outside the memory table
    raw.publish(0)
    with pytest.raises(ChainError, match="descriptor 1"):
        dq.pop()
    raw.desc(0, data.addr, 16, R | N, 0)  # a loop through the cached head
    raw.publish(0)
    with pytest.raises(ChainError, match="loops"):
        dq.pop()


def test_chain_of_exactly_size_descriptors(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    raw.chain(0, [(data.addr, 1, R)] * (SIZE - 1) + [(data.addr, 1, W)])
    raw.publish(0)
    chain = dq.pop()
    assert chain is not None
    assert (len(chain.readable), len(chain.writable)) == (SIZE - 1, 1)


def test_indirect_chain(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table(
        [(data.addr, 4, R | N, 1), (data.addr + 4, 4, R | N, 2), (data.addr + 8, 16, W, 0)]
    )
    raw.desc(3, addr, length, IND | W)  # WRITE on an indirect descriptor is ignored (§2.7.5.3.2)
    raw.publish(3)
    chain = dq.pop()
    assert chain is not None
    assert chain.head == 3
    assert [len(b) for b in chain.readable] == [4, 4]
    assert chain.writable_len == 16


def test_chain_write_scatters_from_an_offset(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    data.view[:16] = bytes(16)
    raw.chain(0, [(data.addr, 4, W), (data.addr + 4, 0, W), (data.addr + 8, 4, W)])
    raw.publish(0)
    chain = dq.pop()
    assert chain is not None
    assert chain.write(b"abcdefgh", offset=2) == 6
    assert bytes(data.view[:12]) == b"\0\0ab\0\0\0\0cdef"
    assert chain.write(b"Z" * 100) == 8


# -- malformed chains -----------------------------------------------------------


@pytest.mark.parametrize(
    "links, head",
    [
        ({0: 0}, 0),  # a descriptor pointing at itself
        ({0: 1, 1: 0}, 0),
        ({3: 5, 5: 6, 6: 3}, 3),  # a loop that does not pass through 0
        ({k: (k + 1) % SIZE for k in range(SIZE)}, 2),  # every descriptor, round and round
    ],
)
def test_loop_in_a_chain_is_an_error_not_a_hang(
    raw: RawDriver, dq: DeviceQueue, data: Buffer, links: dict[int, int], head: int
) -> None:
    for i, nxt in links.items():
        raw.desc(i, data.addr, 1, R | N, nxt)
    raw.publish(head)
    with pytest.raises(ChainError, match="loops or exceeds the ring") as info:
        dq.pop()
    assert info.value.head == head
    assert isinstance(info.value, DriverProtocolError)  # the frontend's fault
    assert dq.avail_pending() == 0  # consumed: the back end can complete it with an error


def test_next_index_out_of_range(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    raw.desc(0, data.addr, 1, R | N, SIZE)
    raw.publish(0)
    with pytest.raises(ChainError, match=f"next index {SIZE} out of range") as info:
        dq.pop()
    assert info.value.head == 0


@pytest.mark.parametrize(
    "where",
    ["zero", "before", "past_end", "straddles_end", "huge_length"],
)
def test_address_outside_the_memory_table(raw: RawDriver, pool: MemoryPool, where: str) -> None:
    region = pool.regions[0]
    start, end = region.guest_addr, region.guest_addr + region.size
    addr, length = {
        "zero": (0, 8),
        "before": (start - 8, 8),
        "past_end": (end, 1),
        "straddles_end": (end - 8, 9),
        "huge_length": (start, 0xFFFFFFFF),
    }[where]
    q = raw.device_queue()
    raw.desc(0, addr, length, R)
    raw.publish(0)
    with pytest.raises(ChainError, match="outside the memory table"):
        q.pop()
    q.release()


def test_address_in_a_region_the_device_was_not_given(raw: RawDriver, pool: MemoryPool) -> None:
    with MemoryPool(1 << 16, name="elsewhere") as other:
        foreign = other.allocate(64)
        q = raw.device_queue(MemoryTable.from_pool(pool))
        raw.desc(0, foreign.addr, 64, W)
        raw.publish(0)
        with pytest.raises(ChainError, match="outside the memory table"):
            q.pop()
        q.release()
        other.free(foreign)


def test_the_last_byte_of_a_region_is_reachable(raw: RawDriver, dq: DeviceQueue, pool: MemoryPool) -> None:
    region = pool.regions[0]
    raw.desc(0, region.guest_addr + region.size - 8, 8, W)
    raw.publish(0)
    chain = dq.pop()
    assert chain is not None and chain.writable_len == 8


def test_readable_after_writable(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    raw.desc(0, data.addr, 8, W | N, 1)
    raw.desc(1, data.addr + 8, 8, R)
    raw.publish(0)
    with pytest.raises(ChainError, match="readable descriptor 1 after a writable one"):
        dq.pop()


def test_indirect_with_next(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table([(data.addr, 8, R, 0)])
    raw.desc(0, addr, length, IND | N, 1)
    raw.desc(1, data.addr, 8, W)
    raw.publish(0)
    with pytest.raises(ChainError, match="indirect descriptor 0 inside a chain"):
        dq.pop()


def test_indirect_after_a_direct_descriptor(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table([(data.addr, 8, R, 0)])
    raw.desc(0, data.addr, 8, R | N, 1)
    raw.desc(1, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="indirect descriptor 1 inside a chain"):
        dq.pop()


def test_nested_indirect(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    inner, inner_len = raw.table([(data.addr, 8, R, 0)])
    outer, outer_len = raw.table([(data.addr, 8, R | N, 1), (inner, inner_len, IND, 0)])
    raw.desc(0, outer, outer_len, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="nested indirect"):
        dq.pop()


@pytest.mark.parametrize("length", [0, 8, 15, 17, 24, 40])
def test_indirect_table_length_not_a_multiple_of_16(
    raw: RawDriver, dq: DeviceQueue, data: Buffer, length: int
) -> None:
    addr, _ = raw.table([(data.addr, 8, R | N, 1), (data.addr, 8, R | N, 2), (data.addr, 8, R, 0)])
    raw.desc(0, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match=f"indirect table length {length} is invalid"):
        dq.pop()


def test_indirect_table_outside_memory(raw: RawDriver, dq: DeviceQueue) -> None:
    raw.desc(0, 0x10, 32, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="outside the memory table"):
        dq.pop()


def test_indirect_entry_outside_memory(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table([(data.addr, 8, R | N, 1), (0x10, 8, W, 0)])
    raw.desc(0, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="indirect entry 1: .*outside the memory table"):
        dq.pop()


def test_indirect_loop(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table([(data.addr, 8, R | N, 1), (data.addr, 8, R | N, 0)])
    raw.desc(0, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="loops"):
        dq.pop()


def test_indirect_next_out_of_range(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table([(data.addr, 8, R | N, 2), (data.addr, 8, R, 0)])
    raw.desc(0, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="indirect next 2 out of range"):
        dq.pop()


def test_indirect_readable_after_writable(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    addr, length = raw.table([(data.addr, 8, W | N, 1), (data.addr, 8, R, 0)])
    raw.desc(0, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="readable indirect entry 1 after a writable one"):
        dq.pop()


def test_indirect_when_not_negotiated(raw: RawDriver, data: Buffer) -> None:
    q = raw.device_queue(indirect=False)
    addr, length = raw.table([(data.addr, 8, R, 0)])
    raw.desc(0, addr, length, IND)
    raw.publish(0)
    with pytest.raises(ChainError, match="without RING_INDIRECT_DESC"):
        q.pop()
    q.release()


@pytest.mark.parametrize("jump", [SIZE + 1, 2 * SIZE, 0x8000, 0xFFFF])
def test_avail_idx_jumping_by_more_than_size(raw: RawDriver, dq: DeviceQueue, jump: int) -> None:
    raw.set_avail_idx(jump)
    for _ in range(3):  # nothing is consumed: it fails the same way every time
        with pytest.raises(ChainError, match=f"avail index moved {jump} > size") as info:
            dq.pop()
        assert info.value.head is None
    assert dq.last_avail == 0


def test_avail_idx_moving_by_exactly_size_is_fine(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    for i in range(SIZE):
        raw.desc(i, data.addr, 1, W)
    raw.publish(*range(SIZE))
    assert len([dq.pop() for _ in range(SIZE)]) == SIZE
    assert dq.pop() is None


def test_avail_head_out_of_range_is_consumed(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    raw.desc(1, data.addr, 8, W)
    raw.publish(SIZE, 0xFFFF, 1)
    for bad in (SIZE, 0xFFFF):
        with pytest.raises(ChainError, match=f"avail head {bad} out of range") as info:
            dq.pop()
        assert info.value.head is None
    chain = dq.pop()  # the queue goes on after a bad entry
    assert chain is not None and chain.head == 1


def test_a_bad_chain_does_not_stop_the_next_one(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    raw.desc(0, data.addr, 1, R | N, 0)  # self loop
    raw.desc(1, data.addr, 8, W)
    raw.publish(0, 1)
    with pytest.raises(ChainError):
        dq.pop()
    chain = dq.pop()
    assert chain is not None and chain.head == 1
    dq.push_used(0, 0)  # the back end may complete the bad one with an error
    dq.push_used(1, 8)
    assert raw.used_idx == 2
    assert (raw.used_entry(0), raw.used_entry(1)) == ((0, 0), (1, 8))


# -- used ring and notifications --------------------------------------------------


def test_push_used_without_event_idx(raw: RawDriver, dq: DeviceQueue) -> None:
    raw.set_no_interrupt(True)
    assert dq.push_used(3, 17) is False
    assert raw.used_idx == 1
    assert raw.used_entry(0) == (3, 17)
    raw.set_no_interrupt(False)
    assert dq.push_used(4, 0) is True
    assert dq.flush_used() is False  # nothing new
    dq.add_used(5, 1)
    assert raw.used_idx == 2  # not visible before flush_used
    assert dq.flush_used() is True
    assert raw.used_idx == 3


@pytest.mark.parametrize("delta", [-1, 0, 1, 2, 3, 4])
def test_push_used_with_event_idx_follows_used_event(raw: RawDriver, delta: int) -> None:
    """virtio 1.2 §2.7.7.2: signal iff used_event lies among the entries just published."""
    q = raw.device_queue(event_idx=True)
    raw.set_no_interrupt(True)  # ignored with EVENT_IDX
    q.push_used(0, 0)
    q.push_used(1, 0)
    old = q.used_idx
    raw.set_used_event(old + delta)
    for head in (2, 3, 4):
        q.add_used(head, 0)
    assert q.flush_used() is (0 <= delta < 3)
    assert raw.used_idx == old + 3
    q.release()


def test_event_idx_across_the_wrap(raw: RawDriver, data: Buffer) -> None:
    raw.set_used_idx(0xFFFE)  # a device resuming a ring finds its used index in memory
    q = raw.device_queue(event_idx=True)
    assert q.used_idx == 0xFFFE
    raw.set_used_event(0xFFFF)
    q.add_used(0, 0)
    q.add_used(1, 0)  # used index 0xFFFE -> 0x0000
    assert q.flush_used() is True
    assert raw.used_idx == 0
    assert raw.used_entry(0xFFFE) == (0, 0) and raw.used_entry(0xFFFF) == (1, 0)
    raw.set_used_event(5)
    assert q.push_used(2, 0) is False
    raw.set_used_event(1)
    assert q.push_used(3, 0) is True
    q.release()


def test_kick_suppression_without_event_idx(raw: RawDriver, dq: DeviceQueue, data: Buffer) -> None:
    dq.disable_notifications()
    assert raw.used_flags == USED_F_NO_NOTIFY
    assert dq.enable_notifications() is False
    assert raw.used_flags == 0
    raw.desc(0, data.addr, 1, W)
    raw.publish(0)
    dq.disable_notifications()
    assert dq.enable_notifications() is True  # work arrived: do not sleep


def test_kick_suppression_with_event_idx(raw: RawDriver, data: Buffer) -> None:
    q = raw.device_queue(event_idx=True)
    raw.desc(0, data.addr, 1, W)
    raw.publish(0, 0)
    q.pop()
    assert q.enable_notifications() is True  # one more is pending
    assert raw.avail_event == 1
    q.pop()
    assert q.enable_notifications() is False
    assert raw.avail_event == 2
    q.disable_notifications()
    assert raw.used_flags == 0  # EVENT_IDX: the flag is not used
    q.release()


# -- construction -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 12, 65536])
def test_bad_size(raw: RawDriver, size: int) -> None:
    with pytest.raises(InvalidArgument):
        DeviceQueue(
            size,
            MemoryTable(),
            memoryview(bytearray(1 << 20)),
            memoryview(bytearray(1 << 18)),
            memoryview(bytearray(1 << 20)),
        )


def test_ring_memory_too_small(pool: MemoryPool) -> None:
    mem = memoryview(bytearray(4096))
    with pytest.raises(InvalidArgument, match="smaller"):
        DeviceQueue(SIZE, MemoryTable(), mem[: desc_table_size(SIZE) - 1], mem, mem)
    with pytest.raises(InvalidArgument, match="smaller"):
        DeviceQueue(SIZE, MemoryTable(), mem, mem[: avail_size(SIZE) - 1], mem)
    with pytest.raises(InvalidArgument, match="smaller"):
        DeviceQueue(SIZE, MemoryTable(), mem, mem, mem[: used_size(SIZE) - 1])


def test_ring_outside_the_table_is_refused(raw: RawDriver) -> None:
    with pytest.raises(DriverProtocolError):
        DeviceQueue.from_addresses(MemoryTable(), SIZE, raw.desc_addr, raw.avail_addr, raw.used_addr)


def test_from_guest_physical_addresses(raw: RawDriver, pool: MemoryPool, data: Buffer) -> None:
    table = MemoryTable.from_pool(pool)
    q = DeviceQueue.from_addresses(
        table, SIZE, raw.desc_addr, raw.avail_addr, raw.used_addr, user_addresses=False
    )
    raw.desc(0, data.addr, 4, W)
    raw.publish(0)
    chain = q.pop()
    assert chain is not None and chain.writable_len == 4
    q.release()
