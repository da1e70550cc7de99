"""INFLIGHT_SHMFD on packed rings: the descriptor-level region of vhost-user.rst, crash anywhere, resubmit once.

* Layout: QueueRegionPacked's header (32 bytes with its alignment) and
  DescStatePacked (32 bytes), fields at the offsets of the C structures.
* A :class:`~pyvirtio.testing.PackedRingPair` whose device records every
  list it pops in the area (:class:`PackedQueueInflight`), completes out of
  order and "crashes" at any point: before publishing a batch, after the
  area moved ``used_idx`` but before the used descriptors were published,
  after publishing but before committing. A successor device recovers
  (commit or roll back), resumes at the base the area gives (the frontend
  only says where its used side is), resubmits what was in flight from the
  area's copies of the descriptors (the ring slots may be overwritten by
  used descriptors), and the driver (``restart_base(resubmit=False)``) sees
  every request complete exactly once, with its data. Hypothesis drives
  the order of submissions, pops, completions and crashes, with chains of
  1-3 descriptors and indirect tables, with and without IN_ORDER.
* A region the frontend scribbled on (a free list pointing outside the
  area, an entry claiming more descriptors than the ring) is refused with a
  DriverProtocolError, never an IndexError or a hang.
"""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.backends.inflight import (
    PACKED_ENTRY,
    PACKED_ENTRY_SIZE,
    PACKED_HEADER_SIZE,
    InflightArea,
    PackedQueueInflight,
    queue_region_size,
)
from pyvirtio.errors import DriverProtocolError
from pyvirtio.ring.device_side import PackedDeviceQueue
from pyvirtio.spec.ring import PACKED_BASE_EXACT
from pyvirtio.testing import PackedRingPair

# -- layout -------------------------------------------------------------------------------------


def test_layout_matches_vhost_user_rst() -> None:
    # QueueRegionPacked: u64 features, u16 version, desc_num, free_head, old_free_head, used_idx,
    # old_used_idx, u8 used_wrap_counter, old_used_wrap_counter, padding[7]; desc[] aligned as u64.
    assert struct.calcsize("QHHHHHHBB7x0Q") == 32 == PACKED_HEADER_SIZE  # 0Q: the array's u64 alignment
    # DescStatePacked: u8 inflight, padding, u16 next, last, num, u64 counter, u16 id, flags, u32 len, u64 addr.
    assert struct.calcsize("BBHHHQHHIQ") == 32 == PACKED_ENTRY_SIZE == PACKED_ENTRY.size
    assert queue_region_size(256, "packed") == 8256  # 32 + 32 * 256 = 8224, rounded up to 64
    assert queue_region_size(256) == 4160  # the split layout is unchanged


# -- a device that records in the area, crashes and is succeeded -----------------------------------


class Device:
    """A PackedDeviceQueue with its tracker over ``area``'s region 0."""

    def __init__(self, pair: PackedRingPair, area: InflightArea, base: int) -> None:
        d = pair.driver
        tracker = area.queue(0, "packed")
        assert isinstance(tracker, PackedQueueInflight)
        self.tracker = tracker
        self.ring = pair.pool.translate(d.desc_addr, 16 * d.size)
        self.base = tracker.recover(self.ring, d.size, base)
        self.queue = PackedDeviceQueue.from_addresses(
            pair.table, d.size, d.desc_addr, d.driver_addr, d.device_addr, indirect=True, in_order=pair.in_order,
            base=self.base,
        )
        tracker.start(self.queue, self.ring)
        self.held: list[int] = []  # ids popped (or resubmitted), not used
        for chain in tracker.resubmissions():
            self.held.append(chain.head)
        self.batch: list[int] = []

    def pop(self, n: int) -> None:
        for _ in range(n):
            chain = self.tracker.pop()
            if chain is None:
                return
            chain.write(b"\x5a" * chain.writable_len)
            self.held.append(chain.head)

    def use(self, rnd: random.Random, n: int) -> None:
        for _ in range(min(n, len(self.held))):
            k = 0 if self.queue.in_order else rnd.randrange(len(self.held))
            bid = self.held.pop(k)
            self.queue.add_used(bid, 0)
            self.batch.append(bid)

    def publish(self, crash_at: str | None = None) -> bool:
        """Publish the batch; stop (a crash) at ``crash_at``: "publishing", "flush" or "published"."""
        batch, self.batch = self.batch, []
        if crash_at == "publishing":
            return False
        self.tracker.publishing(batch)
        if crash_at == "flush":
            return False
        self.queue.flush_used()
        if crash_at == "published":
            return False
        self.tracker.published(batch)
        return True

    def release(self) -> None:
        self.tracker.detach()
        self.queue.release()
        self.ring.release()


OPS = st.lists(
    st.tuples(st.sampled_from(["submit", "pop", "use", "publish", "reap", "crash"]), st.integers(1, 6)),
    max_size=50,
)


@settings(max_examples=60)
@given(
    ops=OPS,
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([5, 8, 13]),
    in_order=st.booleans(),
    crash_at=st.sampled_from(["publishing", "flush", "published"]),
)
def test_every_request_completes_exactly_once_across_crashes(
    ops: list[tuple[str, int]], seed: int, size: int, in_order: bool, crash_at: str
) -> None:
    rnd = random.Random(seed)
    area = InflightArea.create(1, size, "packed")
    with PackedRingPair(size, indirect=True, indirect_threshold=3, in_order=in_order) as pair:
        d = pair.driver
        bufs = [pair.buffer(64) for _ in range(3)]
        dev = Device(pair, area, d.restart_base())
        submitted = 0
        delivered: Counter[object] = Counter()

        def reap() -> None:
            for token, written in d.reap():
                delivered[token] += 1
                assert written == 0

        for op, k in ops:
            if op == "submit":
                for _ in range(k):
                    n = rnd.randint(1, 3)  # 3 buffers go indirect
                    need = 1 if n >= 3 else n
                    if d.num_free < need:
                        break
                    d.submit(submitted, [(bufs[j].addr, 64, j > 0) for j in range(n)])
                    submitted += 1
                d.kick_prepare()
            elif op == "pop":
                dev.pop(k)
            elif op == "use":
                dev.use(rnd, k)
            elif op == "publish":
                dev.publish()
            elif op == "reap":
                reap()
            else:  # crash in the middle of publishing a batch, then a successor device
                dev.use(rnd, k)
                dev.publish(crash_at)
                dev.release()
                base = d.restart_base(resubmit=False)  # the back end resubmits itself
                dev = Device(pair, area, base)
        # Drain: the device completes everything, in the order it must.
        for _ in range(4 * size):
            dev.pop(size)
            dev.use(rnd, size)
            dev.publish()
            reap()
            if not d.outstanding and not d.pending():
                break
        assert sorted(delivered) == list(range(submitted)), "a request was lost"
        assert all(c == 1 for c in delivered.values()), "a request completed twice"
        d.check_ids()
        dev.release()
    area.close()


def test_resubmitted_lists_come_from_the_area_not_the_ring() -> None:
    """A buffer completed out of order overwrote the slot of one still in flight: the area has its copy."""
    area = InflightArea.create(1, 8, "packed")
    with PackedRingPair(8) as pair:
        d = pair.driver
        a, b = pair.buffer(16), pair.buffer(16)
        dev = Device(pair, area, d.restart_base())
        d.submit("A", [(a.addr, 16, True)])
        d.submit("B", [(b.addr, 16, True)])
        d.kick_prepare()
        dev.pop(2)
        dev.queue.add_used(dev.held.pop(1), 0)  # B first: its used descriptor lands in A's slot
        dev.batch.append(1)
        assert dev.publish()
        assert d.reap() == [("B", 0)]
        slot0 = bytes(pair.pool.translate(d.desc_addr, 16))
        assert struct.unpack_from("<H", slot0, 12)[0] == 1  # A's slot now holds B's used descriptor
        dev.release()
        successor = Device(pair, area, d.restart_base(resubmit=False))
        assert successor.held == [0]  # A, rebuilt from the area
        assert successor.base == 0x8001_8002 | PACKED_BASE_EXACT  # used side at 1; avail at 2, after A's one slot
        successor.use(random.Random(0), 1)
        assert successor.publish()
        assert d.reap() == [("A", 0)]
        successor.release()
    area.close()


def test_a_scribbled_region_is_refused() -> None:
    area = InflightArea.create(1, 8, "packed")
    with PackedRingPair(8) as pair:
        d = pair.driver
        dev = Device(pair, area, d.restart_base())
        buf = pair.buffer(16)
        d.submit(0, [(buf.addr, 16, True)])
        d.kick_prepare()
        dev.pop(1)
        dev.release()
        view = area.region.view
        struct.pack_into("<H", view, PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * 0 + 6, 9)  # num 9 > ring
        with pytest.raises(DriverProtocolError, match="holds 9 descriptors"):
            Device(pair, area, d.restart_base(resubmit=False))
        struct.pack_into("<H", view, PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * 0 + 6, 1)
        struct.pack_into("<H", view, PACKED_HEADER_SIZE + PACKED_ENTRY_SIZE * 1 + 2, 500)  # a free list link out
        with pytest.raises(DriverProtocolError, match="links to 500"):
            Device(pair, area, d.restart_base(resubmit=False))
    area.close()


def test_resume_with_the_used_side_at_slot_0_of_lap_0() -> None:
    """After one lap the used side is at slot 0 with wrap counter 0: the resume base's used half is all zeros.

    That base must not be read as "used = avail" (the reading of a base with an empty upper half,
    for frontends that send only the avail half): the successor would write its used descriptors
    over the lists still in flight.
    """
    size = 5
    area = InflightArea.create(1, size, "packed")
    with PackedRingPair(size) as pair:
        d = pair.driver
        buf = pair.buffer(64)
        dev = Device(pair, area, d.restart_base())
        rnd = random.Random(0)
        for token in range(size):  # one lap of single-slot requests, all completed
            d.submit(token, [(buf.addr, 64, True)])
            d.kick_prepare()
            dev.pop(1)
            dev.use(rnd, 1)
            assert dev.publish()
        assert [t for t, _ in d.reap()] == list(range(size))
        assert (d.next_used, d.used_wrap) == (0, 0)
        d.submit("A", [(buf.addr, 64, True)])
        d.submit("B", [(buf.addr, 64, True)])
        d.kick_prepare()
        dev.pop(2)
        dev.release()  # the device dies with A and B popped
        dev = Device(pair, area, d.restart_base(resubmit=False))
        assert dev.queue.used_pos == 0 and dev.queue.used_wrap == 0 and dev.queue.last_avail == 2
        assert len(dev.held) == 2  # A and B, resubmitted from the area
        dev.use(rnd, 2)
        assert dev.publish()
        assert sorted(t for t, _ in d.reap()) == ["A", "B"]  # type: ignore[type-var]
        d.check_ids()
        dev.release()
    area.close()
