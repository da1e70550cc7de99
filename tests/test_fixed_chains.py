"""FixedChains: the descriptor layout it carves on a free queue, and giving the descriptors back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.errors import DeviceProtocolError
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.testing import RingPair


@pytest.fixture
def pair() -> Iterator[RingPair]:
    p = RingPair(64, event_idx=True)
    yield p
    p.close()


def chains(p: RingPair, n: int) -> list[list[tuple[int, int, bool]]]:
    out = []
    for _ in range(n):
        hdr, data, st = p.buffer(16), p.buffer(512), p.buffer(1)
        out.append([(hdr.addr, 16, False), (data.addr, 512, True), (st.addr, 1, True)])
    return out


def round_trip(p: RingPair, fc: FixedChains, slots: list[int]) -> list[int]:
    fc.post(slots)
    while (chain := p.device.pop()) is not None:
        p.device.add_used(chain.head, 1)
    p.device.flush_used()
    return fc.reap_slots()


def test_on_a_free_queue_slot_s_is_headed_by_descriptor_s(pair: RingPair) -> None:
    q = pair.driver
    fc = FixedChains(q, chains(pair, 10))
    assert fc.heads == list(range(10)) and fc.heads_are_slots
    assert q.num_free == 64 - 30  # nothing taken twice, nothing beyond (the rest is still free, below)
    assert q.num_free == 64 - 30 == q.check_free_list()
    assert sorted(round_trip(pair, fc, [3, 0, 9])) == [0, 3, 9]
    # The device walked each chain: header, data, status.
    fc.post([5])
    chain = pair.device.pop()
    assert chain is not None and chain.head == 5
    assert [len(b) for b in chain.readable] == [16] and [len(b) for b in chain.writable] == [512, 1]


def test_descriptors_given_back_make_a_working_queue(pair: RingPair) -> None:
    q = pair.driver
    fc = FixedChains(q, chains(pair, 21))
    assert q.num_free == 1 == q.check_free_list()
    round_trip(pair, fc, list(range(21)))
    fc.detach()
    assert q.num_free == 64 == q.check_free_list()
    # The general path still works, and a second FixedChains carves again.
    b = pair.buffer(8)
    pair.submit("tok", [(b.addr, 8, True)])
    q.flush()
    chain = pair.device.pop()
    assert chain is not None
    pair.device.add_used(chain.head, 8)
    pair.device.flush_used()
    assert q.reap() == [("tok", 8)]
    fc2 = FixedChains(q, chains(pair, 4))
    assert fc2.heads_are_slots


def test_a_second_set_on_the_same_queue_takes_from_the_free_list(pair: RingPair) -> None:
    q = pair.driver
    first = FixedChains(q, chains(pair, 4))
    second = FixedChains(q, chains(pair, 4))
    assert first.heads_are_slots and not second.heads_are_slots
    assert not set(second.heads) & set(range(4 + 8))  # first: heads 0..3, their other descriptors 4..11
    assert sorted(round_trip(pair, second, [0, 1, 2, 3])) == [0, 1, 2, 3]


def test_an_id_naming_a_slot_not_posted_is_rejected(pair: RingPair) -> None:
    fc = FixedChains(pair.driver, chains(pair, 4))
    fc.post([0])
    assert pair.device.pop() is not None
    pair.device.add_used(1, 1)  # slot 1's head: a real head, never posted
    pair.device.flush_used()
    with pytest.raises(DeviceProtocolError, match="not the head of an in-flight request"):
        fc.reap_slots()
