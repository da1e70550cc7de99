"""SplitQueue.restart_base: a new device behind the same ring gets exactly what did not complete.

A driver ring and a device ring share memory (RingPair). The device pops,
completes out of order, publishes some of it, then "crashes" (its
unpublished used entries are lost). A new device is started at the base
``restart_base`` returns; it must pop exactly the requests that did not
complete, and the driver must see every request complete exactly once,
oldest resubmissions first. Also: the base without resubmission (inflight
tracking), a lying used ring, and FixedChains slots.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtio.errors import DeviceProtocolError, QueueBroken
from pyvirtio.ring.device_side import DeviceQueue
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.testing import RingPair


def _new_device(pair: RingPair, base: int) -> DeviceQueue:
    d = pair.driver
    return DeviceQueue.from_addresses(
        pair.table, d.size, d.desc_addr, d.avail_addr, d.used_addr, event_idx=pair.event_idx, last_avail=base
    )


def _oldest_first(tokens: list[int], recent_from: int) -> bool:
    """restart_base's order: requests published before the last ring-full first (any order), then ascending."""
    old = [t for t in tokens if t < recent_from]
    recent = tokens[len(old) :]
    return all(t < recent_from for t in tokens[: len(old)]) and recent == sorted(recent)


OPS = st.lists(
    st.tuples(st.sampled_from(["submit", "pop", "complete", "publish", "reap"]), st.integers(1, 9)),
    max_size=60,
)


@given(ops=OPS, seed=st.integers(0, 2**32 - 1), size=st.sampled_from([4, 8, 16]), event_idx=st.booleans())
def test_every_request_completes_exactly_once_across_a_device_restart(
    ops: list[tuple[str, int]], seed: int, size: int, event_idx: bool
) -> None:
    rnd = random.Random(seed)
    with RingPair(size, event_idx=event_idx) as pair:
        d = pair.driver
        buf = pair.buffer(8)
        submitted = 0
        popped: list[int] = []  # heads the device holds (popped, not completed)
        delivered: Counter[object] = Counter()
        for op, k in ops:
            if op == "submit":
                for _ in range(k):
                    if d.num_free:
                        d.submit(submitted, [(buf.addr, 8, True)])
                        submitted += 1
                d.kick_prepare()
            elif op == "pop":
                for _ in range(k):
                    chain = pair.device.pop()
                    if chain is None:
                        break
                    popped.append(chain.head)
            elif op == "complete":
                for _ in range(min(k, len(popped))):
                    pair.device.add_used(popped.pop(rnd.randrange(len(popped))), 0)
            elif op == "publish":
                pair.device.flush_used()
            else:
                for token, _ in d.reap(k):
                    delivered[token] += 1
        # Crash: what the device added but did not publish is lost with it.
        avail_before = d.avail_idx
        used_published = pair.device._used16[1]
        left = (avail_before - used_published) & 0xFFFF
        base = d.restart_base()
        assert base == used_published
        assert d.avail_idx == avail_before
        dev = _new_device(pair, base)
        resubmitted = []
        while (chain := dev.pop()) is not None:
            resubmitted.append(d._tokens[chain.head])
            dev.add_used(chain.head, 0)
        dev.flush_used()
        dev.release()
        assert len(resubmitted) == left
        assert len(set(resubmitted)) == left
        assert _oldest_first(resubmitted, submitted - size)  # type: ignore[arg-type]
        for token, _ in d.reap():
            delivered[token] += 1
        assert delivered == Counter(range(submitted))
        assert d.outstanding == 0 and d.num_free == size and d.check_free_list() == size


def test_restart_twice_in_a_row_and_carry_on() -> None:
    with RingPair(8) as pair:
        d = pair.driver
        buf = pair.buffer(8)
        for t in range(6):
            d.submit(t, [(buf.addr, 8, True)])
        d.kick_prepare()
        first = pair.device.pop()
        assert first is not None
        pair.device.push_used(first.head, 3)
        # Two restarts before any new device did anything: the same base, the same resubmission.
        assert d.restart_base() == 1
        assert d.restart_base() == 1
        dev = _new_device(pair, 1)
        heads = []
        while (chain := dev.pop()) is not None:
            heads.append(chain.head)
        assert [d._tokens[h] for h in heads] == [1, 2, 3, 4, 5]
        for h in heads:
            dev.add_used(h, 0)
        dev.flush_used()
        dev.release()
        assert [t for t, _ in d.reap()] == [0, 1, 2, 3, 4, 5]
        # The ring goes on normally afterwards.
        d.submit("next", [(buf.addr, 8, True)])
        d.flush()
        dev = _new_device(pair, d.avail_idx - 1)
        chain = dev.pop()
        assert chain is not None
        dev.push_used(chain.head, 1)
        dev.release()
        assert d.reap() == [("next", 1)]


def test_without_resubmit_the_avail_ring_is_left_alone() -> None:
    with RingPair(8) as pair:
        d = pair.driver
        buf = pair.buffer(8)
        for t in range(5):
            d.submit(t, [(buf.addr, 8, True)])
        d.kick_prepare()
        chain = pair.device.pop()
        assert chain is not None
        pair.device.push_used(chain.head, 0)
        before = bytes(d._avail16.cast("B"))
        assert d.restart_base(resubmit=False) == 1
        assert bytes(d._avail16.cast("B")) == before


def test_a_used_entry_for_a_request_not_in_flight_breaks_the_queue() -> None:
    with RingPair(8) as pair:
        d = pair.driver
        buf = pair.buffer(8)
        d.submit("a", [(buf.addr, 8, True)])
        d.kick_prepare()
        # A dying device published a head that is not in flight.
        d._used32[1] = 5
        d._used32[2] = 0
        d._used16[1] = 1
        with pytest.raises(DeviceProtocolError, match="not the head of an in-flight request"):
            d.restart_base()
        with pytest.raises(QueueBroken):
            d.restart_base()


def test_a_used_index_beyond_what_is_in_flight_breaks_the_queue() -> None:
    with RingPair(8) as pair:
        d = pair.driver
        d._used16[1] = 3
        with pytest.raises(DeviceProtocolError, match="used index moved by 3"):
            d.restart_base()


def test_fixed_chains_slots() -> None:
    with RingPair(16) as pair:
        d = pair.driver
        bufs = [pair.buffer(8) for _ in range(4)]
        fixed = FixedChains(d, [[(b.addr, 8, True)] for b in bufs])
        fixed.post([0, 1, 2, 3])
        got = [pair.device.pop() for _ in range(3)]
        assert all(c is not None for c in got)
        pair.device.push_used(got[1].head, 0)  # type: ignore[union-attr]
        in_flight = [h for h in fixed.heads if fixed.hw1[h]]
        base = d.restart_base(in_flight=in_flight)
        assert base == 1
        dev = _new_device(pair, base)
        heads = []
        while (chain := dev.pop()) is not None:
            heads.append(chain.head)
            dev.add_used(chain.head, 0)
        dev.flush_used()
        dev.release()
        assert [fixed.slot_of[h] for h in heads] == [0, 2, 3]
        assert sorted(fixed.reap_slots()) == [0, 1, 2, 3]
        assert fixed.n_inflight == 0
        fixed.detach()
