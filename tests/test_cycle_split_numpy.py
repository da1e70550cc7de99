"""The NumPy cycle of a split ring (ring/cycle_split.py: SplitManyCycle) on batches that straddle the ring's end.

A batch that does not wrap is read through strided views of the used ring, one that wraps through the
doubled position table: both must give the same completions and catch the same lies, with the queue
broken and the completions validated before the bad entry reported (virtio 1.2 §2.7.8).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.errors import DeviceProtocolError
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.testing import HostileDevice, RingPair

pytest.importorskip("numpy")

SIZE = 32
DEPTH = 6


@pytest.fixture()
def pair() -> Iterator[RingPair]:
    p = RingPair(SIZE, event_idx=True)
    yield p
    p.close()


def fixed(p: RingPair) -> FixedChains:
    shapes = []
    for _ in range(DEPTH + 2):
        hdr, data, st = p.buffer(16), p.buffer(512), p.buffer(1)
        shapes.append([(hdr.addr, 16, False), (data.addr, 512, True), (st.addr, 1, True)])
    return FixedChains(p.driver, shapes)


def advance_to(p: RingPair, cyc: object, used_pos: int) -> None:
    """Complete requests one by one (honestly) until the used index sits at ``used_pos`` mod SIZE."""
    turn = cyc.turn  # type: ignore[attr-defined]
    while p.driver.last_used % SIZE != used_pos:
        chain = p.device.pop()
        assert chain is not None
        p.device.add_used(chain.head, 3)
        p.device.flush_used()
        assert turn() is not None


@pytest.mark.parametrize("start", [SIZE - 2, 3], ids=["wrapping", "not-wrapping"])
def test_an_honest_batch_gives_each_slot_once_wherever_it_lies_in_the_ring(
    pair: RingPair, start: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fc = fixed(pair)
    cyc = fc.cycle(DEPTH, lambda: None, vectorised=True)
    cyc.turn()
    advance_to(pair, cyc, start)

    def slow_path(*_a: object) -> None:
        raise AssertionError("an honest batch went to the entry-by-entry path")

    monkeypatch.setattr(fc, "take_exact", slow_path)  # the array check alone must accept it
    monkeypatch.setattr(fc, "reap_exact", slow_path)
    inflight = set(fc.in_flight())
    heads = []
    for _ in range(4):
        chain = pair.device.pop()
        assert chain is not None
        heads.append(chain.head)
        pair.device.add_used(chain.head, 7)
    pair.device.flush_used()
    done = cyc.turn()
    assert done is not None
    got = sorted(int(s) for s in done)
    assert len(got) == 4 and set(got) <= inflight
    assert not set(got) & set(fc.in_flight())


@pytest.mark.parametrize("start", [SIZE - 2, 3], ids=["wrapping", "not-wrapping"])
@pytest.mark.parametrize("lie", ["duplicate", "too_long", "out_of_range"])
def test_a_lie_in_a_batch_is_caught_wherever_the_batch_lies(pair: RingPair, start: int, lie: str) -> None:
    fc = fixed(pair)
    cyc = fc.cycle(DEPTH, lambda: None, vectorised=True)
    cyc.turn()
    advance_to(pair, cyc, start)
    before = set(fc.in_flight())
    liar = HostileDevice(pair.driver, pair.pool)
    heads = liar.available_heads()[-DEPTH:]  # what is in flight now, oldest first
    good = [(h, 5) for h in heads[:3]]
    bad = {"duplicate": (heads[2], 5), "too_long": (heads[3], 512 + 2), "out_of_range": (70000, 1)}[lie]
    liar.complete(*good, bad)
    with pytest.raises(DeviceProtocolError) as ei:
        cyc.turn()
    assert fc.ring.broken is not None
    completed = [(int(s), n) for s, n in ei.value.completed]
    assert len(completed) == 3 and all(n == 5 for _s, n in completed)
    slots = {s for s, _n in completed}
    assert slots <= before and not slots & set(fc.in_flight())
    assert before - slots <= set(fc.in_flight())  # nothing lost


def test_the_stepper_is_turn_and_after_a_lie_turn_reports_the_broken_queue(pair: RingPair) -> None:
    from pyvirtio.errors import QueueBroken

    fc = fixed(pair)
    cyc = fc.cycle(DEPTH, lambda: None)  # the plain-Python cycle: its stepper is its loop's send
    step = cyc.stepper()
    first = step(1)
    assert first is not None and len(first) == 0 and len(cyc.posted) == DEPTH
    # Passes through the stepper and through turn() share one state, interleaved.
    for k in range(40):
        chain = pair.device.pop()
        assert chain is not None
        pair.device.add_used(chain.head, 3)
        pair.device.flush_used()
        done = (step if k % 2 else cyc.turn)(1)
        assert done is not None and len(done) == 1 and fc.n_inflight == DEPTH
    assert step(4) is None  # idle: everything in flight, nothing completed
    liar = HostileDevice(pair.driver, pair.pool)
    liar.complete((70000, 1))  # an id out of range
    with pytest.raises(DeviceProtocolError):
        step(1)
    with pytest.raises(QueueBroken):
        cyc.turn()  # a fresh loop from the ring's state: the queue is broken
