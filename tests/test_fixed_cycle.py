"""The ring-owned batch fast path on every format: FixedChains.cycle and .stream (issue 12).

Split rings without IN_ORDER get the pre-linked implementation (ring/fixed_split.py, ring/cycle_split.py),
packed rings without IN_ORDER their prepared descriptors (ring/fixed_packed.py, ring/cycle_packed.py), and
IN_ORDER rings of either format the one over the ring protocol (ring/fixed_ring.py). Both must keep
``depth`` slots in flight, hand every completed slot back exactly once, and on a lying device raise
DeviceProtocolError carrying the completions validated before the bad entry, with the queue broken and
no slot lost or returned twice.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvirtio.errors import DeviceProtocolError, QueueBroken
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.ring.fixed_packed import PackedFixedChains
from pyvirtio.ring.fixed_ring import RingFixedChains
from pyvirtio.ring.fixed_split import SplitFixedChains
from pyvirtio.testing import HostileDevice, HostilePackedDevice, PackedRingPair, RingPair

np = pytest.importorskip("numpy")

#: (format, ring size, IN_ORDER)
FORMATS = [
    ("split", 64, False),
    ("packed", 64, False),
    ("packed", 50, False),
    ("packed", 37, False),
    ("split", 64, True),
    ("packed", 50, True),
]
FORMAT_IDS = ["split", "packed", "packed-odd-size", "packed-prime-size", "split-in-order", "packed-in-order"]
DEPTH = 8
NSLOTS = 12


@pytest.fixture(params=FORMATS, ids=FORMAT_IDS)
def pair(request: pytest.FixtureRequest) -> Iterator[RingPair | PackedRingPair]:
    fmt, size, in_order = request.param
    p: RingPair | PackedRingPair = (
        RingPair(size, event_idx=True, in_order=in_order)
        if fmt == "split"
        else PackedRingPair(size, event_idx=True, in_order=in_order)
    )
    yield p
    p.close()


def chains(p: RingPair | PackedRingPair, n: int) -> list[list[tuple[int, int, bool]]]:
    out = []
    for _ in range(n):
        hdr, data, st = p.buffer(16), p.buffer(512), p.buffer(1)
        out.append([(hdr.addr, 16, False), (data.addr, 512, True), (st.addr, 1, True)])
    return out


class Liar:
    """Writes used entries of its choosing into either format (the hostile devices of pyvirtio.testing)."""

    def __init__(self, p: RingPair | PackedRingPair) -> None:
        self.packed = isinstance(p, PackedRingPair)
        self.dev: HostileDevice | HostilePackedDevice = (
            HostilePackedDevice(p.driver, p.pool) if self.packed else HostileDevice(p.driver, p.pool)  # type: ignore[arg-type]
        )
        self.ndescs: dict[int, int] = {}

    def available(self) -> list[int]:
        if isinstance(self.dev, HostilePackedDevice):
            got = self.dev.available()
            self.ndescs.update(got)
            return [i for i, _n in got]
        return self.dev.available_heads()

    def use(self, id_: int, length: int) -> None:
        if isinstance(self.dev, HostilePackedDevice):
            self.dev.use(id_, length, self.ndescs.get(id_, 1))
        else:
            self.dev.complete((id_, length))

    @property
    def out_of_range(self) -> int:
        return 0xFFFF if self.packed else 70000

    def release(self) -> None:
        self.dev.release()


def test_the_facade_picks_the_ring_s_own_fast_path(pair: RingPair | PackedRingPair) -> None:
    fc = FixedChains(pair.driver, chains(pair, 4))
    kind = RingFixedChains if pair.driver.in_order else SplitFixedChains
    if pair.driver.format == "packed" and not pair.driver.in_order:
        kind = PackedFixedChains
    assert isinstance(fc, kind)


@pytest.mark.parametrize("vectorised", [False, True], ids=["python", "numpy"])
def test_cycle_keeps_depth_in_flight_and_returns_each_completion_once(
    pair: RingPair | PackedRingPair, vectorised: bool
) -> None:
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    kicks: list[int] = []
    cyc = fc.cycle(DEPTH, lambda: kicks.append(1), vectorised=vectorised)
    first = cyc.turn()
    assert first is not None and len(first) == 0 and len(cyc.posted) == DEPTH
    inflight = {int(s) for s in cyc.posted}
    assert set(fc.in_flight()) == inflight and kicks
    assert cyc.turn() is None  # nothing completed, depth reached: nothing to do
    returned = 0
    for rnd in range(200):  # many laps of the ring (packed: wraps with an odd size too)
        k = 1 + rnd % DEPTH
        for _ in range(k):
            chain = pair.device.pop()
            assert chain is not None
            pair.device.add_used(chain.head, 1 + rnd % 7)
        pair.device.flush_used()
        done = cyc.turn()
        assert done is not None
        done_set = {int(s) for s in done}
        assert len(done_set) == len(done) == k and done_set <= inflight  # each once, each one in flight
        returned += k
        inflight = (inflight - done_set) | {int(s) for s in cyc.posted}
        assert len(inflight) == fc.n_inflight
        # One spare published per completion seen, as many as there are (NSLOTS - DEPTH of them before
        # this turn); the shortfall is published by the next turn, from the slots just returned.
        assert len(inflight) == DEPTH - max(0, k - (NSLOTS - DEPTH))
        if len(inflight) < DEPTH:
            again = cyc.turn()
            assert again is not None and len(again) == 0
            inflight |= {int(s) for s in cyc.posted}
            assert len(inflight) == DEPTH == fc.n_inflight
        assert set(fc.in_flight()) == inflight
    assert returned == sum(1 + r % DEPTH for r in range(200))


def complete(pair: RingPair | PackedRingPair, k: int) -> None:
    for _ in range(k):
        chain = pair.device.pop()
        assert chain is not None
        pair.device.add_used(chain.head, 3)
    pair.device.flush_used()


def test_plain_calls_between_turns_see_the_cycle_s_state_and_the_cycle_sees_theirs(
    pair: RingPair | PackedRingPair,
) -> None:
    """The plain-Python cycle may hold the ring's shadow indices between turns; a plain call first takes them
    back (``sync``), and the next turn takes up what the plain call left."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    kicks: list[int] = []
    cyc = fc.cycle(DEPTH, lambda: kicks.append(1))
    cyc.turn()
    assert fc.n_inflight == DEPTH and fc.pending() == 0
    complete(pair, 3)
    done = cyc.turn()
    assert done is not None and len(done) == 3 and fc.n_inflight == DEPTH
    complete(pair, 2)
    assert fc.pending() == 2  # the ring's used index against the cycle's last_used
    got = fc.reap_slots()  # a plain call between turns
    assert len(got) == 2 and fc.n_inflight == DEPTH - 2 and fc.pending() == 0
    complete(pair, 1)
    again = cyc.turn()  # sees the one new completion only, and publishes for it and for the two reaped
    assert again is not None and len(again) == 1 and not set(again) & set(got)
    assert fc.n_inflight == DEPTH and len(cyc.posted) == 3  # from the cycle's spares: the two reaped are the caller's
    cyc.sync()
    cyc.sync()  # cheap when done: nothing moves
    assert cyc.kicks == len(kicks) and fc.n_inflight == DEPTH
    assert sorted(fc.in_flight()) == sorted(set(fc.in_flight()))


@pytest.mark.parametrize("vectorised", [False, True], ids=["python", "numpy"])
def test_a_ring_broken_under_a_running_cycle_stops_the_next_idle_turn(
    pair: RingPair | PackedRingPair, vectorised: bool
) -> None:
    """The ring marked broken (or closed) by another path between turns: the next turn that finds nothing to do
    raises, and the ring's shadow state is handed back first."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    cyc = fc.cycle(DEPTH, lambda: None, vectorised=vectorised)
    cyc.turn()
    assert cyc.turn() is None
    pair.driver.broken = "closed under the cycle"
    try:
        with pytest.raises(QueueBroken):
            cyc.turn()
        assert pair.driver.outstanding == DEPTH
    finally:
        pair.driver.broken = None


@pytest.mark.parametrize("vectorised", [False, True], ids=["python", "numpy"])
def test_split_cycle_with_signals_on_asks_for_the_next_completion_before_its_kick(vectorised: bool) -> None:
    """Device signals on (EVENT_IDX): each batch asks for a signal at the next completion, in the ring before the
    kick, so a device that completes the new request at once still sees the request for it."""
    p = RingPair(64, event_idx=True)
    try:
        fc = FixedChains(p.driver, chains(p, NSLOTS))
        fc.enable_interrupts()
        dev = HostileDevice(p.driver, p.pool)
        at_kick: list[tuple[int, int]] = []
        cyc = fc.cycle(DEPTH, lambda: at_kick.append((dev.used_event, dev.used_idx)), vectorised=vectorised)
        cyc.turn()
        for k in (3, 1, 2):
            complete(p, k)
            dev.avail_event = dev.avail_idx  # the device asks for the next kick
            assert cyc.turn() is not None
            assert at_kick[-1][0] == at_kick[-1][1]  # used_event = the used index just reaped: signal the next
        assert len(at_kick) == 4
    finally:
        p.close()


@pytest.mark.parametrize("vectorised", [False, True], ids=["python", "numpy"])
@pytest.mark.parametrize("lie", ["not_in_flight", "out_of_range", "too_long", "too_many"])
def test_a_lie_breaks_the_queue_with_the_completions_validated_before_it(
    pair: RingPair | PackedRingPair, vectorised: bool, lie: str
) -> None:
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    cyc = fc.cycle(DEPTH, lambda: None, vectorised=vectorised)
    cyc.turn()
    before = set(fc.in_flight())
    liar = Liar(pair)
    try:
        ids = liar.available()
        assert len(ids) == DEPTH
        good = 3
        for i in ids[:good]:
            liar.use(i, 5)
        if lie == "not_in_flight":
            busy = set(ids) if liar.packed else {fc.heads[s] for s in before}
            liar.use(next(i for i in range(pair.driver.size) if i not in busy), 1)
        elif lie == "out_of_range":
            liar.use(liar.out_of_range, 1)
        elif lie == "too_long":
            liar.use(ids[good], 512 + 1 + 1)
        else:
            for i in ids[good:]:
                liar.use(i, 5)
            liar.use(ids[0], 5)  # one more than in flight
        with pytest.raises(DeviceProtocolError) as ei:
            cyc.turn()
        assert fc.ring.broken is not None
        completed = [(int(s), n) for s, n in ei.value.completed]
        slots = {s for s, _n in completed}
        assert len(slots) == len(completed) and all(n == 5 for _s, n in completed)
        if lie != "too_many":
            assert len(completed) == good  # exactly the entries validated before the bad one
        assert slots <= before
        # Nothing lost, nothing twice: what was not handed out is still in flight.
        assert before - slots <= set(fc.in_flight())
        assert not slots & set(fc.in_flight())
        with pytest.raises(QueueBroken):
            cyc.turn()
    finally:
        liar.release()


def test_stream_reposts_at_the_same_positions_and_hands_back_what_it_did_not_take(
    pair: RingPair | PackedRingPair,
) -> None:
    size = pair.driver.size
    bufs = [pair.buffer(64) for _ in range(size)]
    fc = FixedChains(pair.driver, [[(b.addr, 64, True)] for b in bufs])
    kicks: list[int] = []
    stream = fc.stream(lambda: kicks.append(1), min_len=14)
    stream.advance(0)
    assert fc.n_inflight == size and kicks
    seen = 0
    for rnd in range(40):
        k = 1 + rnd % 5
        for _ in range(k):
            chain = pair.device.pop()
            assert chain is not None
            pair.device.add_used(chain.head, 20)
        pair.device.flush_used()
        got = stream.peek_many()
        assert got is not None and len(got) == 2
        slots, lens = got
        assert len(slots) == k and (lens == 20).all()
        stream.advance(k)
        seen += k
        assert fc.n_inflight == size
    # A short frame is not what the stream expects: it is left for the exact path.
    chain = pair.device.pop()
    assert chain is not None
    pair.device.add_used(chain.head, 3)
    pair.device.flush_used()
    assert stream.peek() == -1
    stream.close()
    lengths: list[int] = []
    assert len(fc.reap_slots(lengths=lengths)) == 1 and lengths == [3]


@pytest.mark.parametrize("vectorised", [False, True], ids=["python", "numpy"])
def test_an_idle_turn_polls_spins_times_and_takes_what_arrives(
    pair: RingPair | PackedRingPair, vectorised: bool
) -> None:
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    cyc = fc.cycle(DEPTH, lambda: None, vectorised=vectorised)
    cyc.turn()
    assert cyc.turn(spins=50) is None  # everything in flight, nothing used
    chain = pair.device.pop()
    assert chain is not None
    pair.device.add_used(chain.head, 1)
    pair.device.flush_used()
    done = cyc.turn(spins=50)
    assert done is not None and len(done) == 1 and len(cyc.posted) == 1
    assert fc.n_inflight == DEPTH


@pytest.mark.parametrize("vectorised", [False, True], ids=["python", "numpy"])
def test_a_ring_that_clamps_overlong_lengths_clamps_them_in_the_cycle_too(
    pair: RingPair | PackedRingPair, vectorised: bool
) -> None:
    """``clamp_used_len`` (a driver's tolerance for a peer's quirk): the cycle takes the batch as the ring's reap."""
    pair.driver.clamp_used_len = True
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    cyc = fc.cycle(DEPTH, lambda: None, vectorised=vectorised)
    cyc.turn()
    liar = Liar(pair)
    try:
        ids = liar.available()
        liar.use(ids[0], 5)
        liar.use(ids[1], 512 + 1 + 4096)  # above the 513 writable bytes: clamped, counted
        liar.use(ids[2], 5)
        done = cyc.turn()
        assert done is not None and len(done) == 3 and fc.ring.broken is None
        assert pair.driver.long_used == 1
        assert fc.n_inflight == DEPTH and len(set(fc.in_flight())) == DEPTH
    finally:
        liar.release()
