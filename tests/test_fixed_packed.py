"""The packed ring's own batch fast path (ring/fixed_packed.py, ring/cycle_packed.py; issue 12).

Each validation rule of a used descriptor (virtio 1.2 §2.8.1 wrap bits, §2.8.4 length, §2.8.6 id) is
broken by a hostile device on both of the fast path's readers (the plain ``reap_slots`` and the cycle's
inlined loop): the queue breaks, DeviceProtocolError carries exactly the completions validated before the
bad descriptor, and every other slot stays in flight. A Hypothesis test then interleaves cycles, plain
calls, reconnects (restart_base with a new device at the returned base) and the ring's own calls after
``detach`` against the packed device side, over many wraps of rings of odd sizes, with and without
EVENT_IDX and ``zero_wrap``: every completion comes back once with the length the device wrote, and the
ring's shadow state stays whole (``check_ids``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueBroken, QueueStateError
from pyvirtio.memory import MemoryPool, MemoryTable
from pyvirtio.ring.chain import Chain
from pyvirtio.ring.device_packed import PackedDeviceQueue
from pyvirtio.ring.fixed import Cycle, FixedChains
from pyvirtio.ring.fixed_packed import PackedFixedChains
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.spec.ring import (
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    packed_need_event,
)
from pyvirtio.testing import HostilePackedDevice, PackedRingPair
from pyvirtio.testing.hostile import packed_used_flags

NSLOTS = 6
DEPTH = 4
WLEN = 512 + 1  # the device-writable bytes of every slot: data + status


@pytest.fixture(params=[24, 23], ids=["size24", "size23"])
def pair(request: pytest.FixtureRequest) -> Iterator[PackedRingPair]:
    p = PackedRingPair(request.param, event_idx=True)
    yield p
    p.close()


def chains(p: PackedRingPair, n: int) -> list[list[tuple[int, int, bool]]]:
    out = []
    for _ in range(n):
        hdr, data, st_ = p.buffer(16), p.buffer(512), p.buffer(1)
        out.append([(hdr.addr, 16, False), (data.addr, 512, True), (st_.addr, 1, True)])
    return out


def test_the_facade_picks_it_and_falls_back_when_ids_cannot_be_slots(pair: PackedRingPair) -> None:
    fc = FixedChains(pair.driver, chains(pair, 4))
    assert isinstance(fc, PackedFixedChains)
    fc.detach()
    pair.driver.check_ids()
    with PackedRingPair(16, indirect=True) as p:  # 18 descriptors > the ring: indirect, over the ring protocol
        too_many = FixedChains(p.driver, chains(p, 6))
        assert not isinstance(too_many, PackedFixedChains)
    with PackedRingPair(16, in_order=True) as p:  # IN_ORDER ids must stay a cyclic range
        assert not isinstance(FixedChains(p.driver, chains(p, 2)), PackedFixedChains)


# -- one hostile-device test per rule, on both readers ---------------------------------------------------

RULES = ["wrong_wrap", "avail_differs_from_used", "out_of_range", "not_in_flight", "too_long", "duplicate",
         "nothing_in_flight"]


def _lie(dev: HostilePackedDevice, rule: str, ids: list[int], fc: PackedFixedChains) -> None:
    """Three good used descriptors, then one that breaks ``rule`` at the used cursor."""
    for i in ids[:3]:
        dev.use(i, 5, 3)
    pos, wrap = dev.used_pos, dev.used_wrap
    if rule == "wrong_wrap":
        dev.write_used(pos, ids[3], 5, packed_used_flags(wrap ^ 1) | DESC_F_WRITE)
    elif rule == "avail_differs_from_used":
        dev.write_used(pos, ids[3], 5, (PACKED_DESC_F_USED if wrap else PACKED_DESC_F_AVAIL) | DESC_F_WRITE)
    elif rule == "out_of_range":
        dev.use(fc.ring.size, 5, 3)
    elif rule == "not_in_flight":
        dev.use(next(s for s in range(fc.nslots) if s not in ids[:DEPTH]), 5, 3)
    elif rule == "too_long":
        dev.use(ids[3], WLEN + 1, 3)
    elif rule == "duplicate":
        dev.use(ids[0], 5, 3)
    else:  # nothing_in_flight: the last one in flight, then one more
        dev.use(ids[3], 5, 3)
        dev.use(ids[3], 5, 3)


@pytest.mark.parametrize("reader", ["reap_slots", "cycle"])
@pytest.mark.parametrize("rule", RULES)
def test_each_rule_breaks_the_queue_with_what_was_validated_before(
    pair: PackedRingPair, rule: str, reader: str
) -> None:
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    assert isinstance(fc, PackedFixedChains)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    try:
        if reader == "cycle":
            cyc = fc.cycle(DEPTH, lambda: None)
            cyc.turn()
        else:
            fc.post(list(range(DEPTH)))
        ids = [i for i, n in dev.available()]
        assert len(ids) == DEPTH
        _lie(dev, rule, ids, fc)
        with pytest.raises(DeviceProtocolError) as ei:
            cyc.turn() if reader == "cycle" else fc.reap_slots()
        expected = 4 if rule == "nothing_in_flight" else 3
        assert [(int(s), n) for s, n in ei.value.completed] == [(i, 5) for i in ids[:expected]]
        assert fc.ring.broken is not None
        inflight = set(fc.in_flight())
        assert set(ids[expected:]) <= inflight  # nothing lost
        extra = inflight - set(ids[expected:])
        assert not extra & set(ids)  # nothing returned twice: the rest are spares the turn published
        if reader == "reap_slots":
            assert not extra
        with pytest.raises(QueueBroken):
            cyc.turn() if reader == "cycle" else fc.reap_slots()
    finally:
        dev.release()


QD1_RULES = ["wrong_wrap", "avail_differs_from_used", "out_of_range", "not_in_flight", "names_the_next_request",
             "too_long", "nothing_in_flight"]


@pytest.mark.parametrize("warm", [4, 7, 19])
@pytest.mark.parametrize("rule", QD1_RULES)
def test_at_qd1_the_next_request_goes_out_first_and_each_rule_still_breaks_the_queue(
    pair: PackedRingPair, rule: str, warm: int
) -> None:
    """QD1 publishes the next request before it checks the completion; what that check finds is as at depth.

    ``warm`` good round trips first (the ring's end and laps on the way); then the device lies about the
    one in flight. The next request was published (by the lane, not when the ring's end or a second used
    descriptor sends the turn the general way), is not taken for the completion, and nothing is lost."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    assert isinstance(fc, PackedFixedChains)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    try:
        cyc = fc.cycle(1, lambda: None)
        assert cyc.turn() == []
        for _ in range(warm):
            ((i, n),) = dev.available()
            dev.use(i, 5, n)
            assert list(cyc.turn()) == [i]
        ((i, n),) = dev.available()
        nxt = (i + 1) % NSLOTS  # one slot at a time round the spares, oldest first
        pos, wrap = dev.used_pos, dev.used_wrap
        if rule == "wrong_wrap":
            dev.write_used(pos, i, 5, packed_used_flags(wrap ^ 1) | DESC_F_WRITE)
        elif rule == "avail_differs_from_used":
            dev.write_used(pos, i, 5, (PACKED_DESC_F_USED if wrap else PACKED_DESC_F_AVAIL) | DESC_F_WRITE)
        elif rule == "out_of_range":
            dev.use(fc.ring.size, 5, n)
        elif rule == "not_in_flight":
            dev.use((i + 2) % NSLOTS, 5, n)
        elif rule == "names_the_next_request":
            dev.use(nxt, 5, n)
        elif rule == "too_long":
            dev.use(i, WLEN + 1, n)
        else:  # nothing_in_flight: the one in flight, then one more
            dev.use(i, 5, n)
            dev.use(i, 5, n)
        lane = rule in ("not_in_flight", "names_the_next_request", "too_long") and pos + 2 * n < fc.ring.size
        with pytest.raises(DeviceProtocolError) as ei:
            cyc.turn()
        returned = [(int(s), k) for s, k in ei.value.completed]
        assert returned == ([(i, 5)] if rule == "nothing_in_flight" else [])
        assert fc.ring.broken is not None
        inflight = set(fc.in_flight())
        assert (i in inflight) == (rule != "nothing_in_flight")  # nothing lost, nothing returned twice
        if lane:
            assert inflight == {i, nxt}  # published before the check
        with pytest.raises(QueueBroken):
            cyc.turn()
    finally:
        dev.release()


def test_a_used_descriptor_beyond_what_is_in_flight_is_caught_below_depth_too(pair: PackedRingPair) -> None:
    """The cycle publishes before it checks; a used descriptor after everything in flight lies where it
    would publish, so then it publishes nothing (not even a shortfall) and raises in the same turn."""
    fc = FixedChains(pair.driver, chains(pair, DEPTH))  # no spare slots: a turn can start below depth
    dev = HostilePackedDevice(pair.driver, pair.pool)
    try:
        cyc = fc.cycle(DEPTH, lambda: None)
        cyc.turn()
        ids = [i for i, n in dev.available()]
        assert len(ids) == DEPTH
        for i in ids[:2]:
            dev.use(i, 5, 3)
        assert sorted(cyc.turn()) == sorted(ids[:2])  # no spare to publish: below depth now
        for i in ids[2:]:  # more than one in flight: the turn counts, then publishes, then checks
            dev.use(i, 5, 3)
        dev.use(ids[0], 5, 3)  # one more than in flight, in the part of the ring the turn would publish to
        with pytest.raises(DeviceProtocolError):
            cyc.turn()
        assert fc.ring.broken is not None
    finally:
        dev.release()


BULK_CASES = [(rule, bad) for rule in ("out_of_range", "not_in_flight", "too_long", "duplicate", "no_write_flag")
              for bad in (0, 1, 3) if (rule, bad) != ("duplicate", 0)]  # a duplicate needs one before it
#: Completions before the batch under test, two per turn: none (its heads at 0..9), four (heads 12..21:
#: the last slot ends at the end of a ring of 24, straddles it in one of 23) and six (heads 18, 21, then
#: two in the next lap).
SHIFTS = {"first-lap": 0, "to-the-end": 4, "across-the-end": 6}


def shifted(cyc: Cycle, dev: HostilePackedDevice, completions: int) -> list[int]:
    """Run the cycle's first turn and ``completions`` clean completions; the ids in flight, oldest first."""
    turn = cyc.turn
    turn()
    order = [i for i, _n in dev.available()]
    for _ in range(completions // 2):
        for i in order[:2]:
            dev.use(i, 5, 3)
        assert list(turn()) == order[:2]
        order = order[2:] + [i for i, _n in dev.available()]
    return order


@pytest.mark.parametrize("shift", list(SHIFTS))
@pytest.mark.parametrize(("rule", "bad"), BULK_CASES)
def test_a_batch_checked_in_bulk_still_finds_each_rule_at_its_place(
    pair: PackedRingPair, rule: str, bad: int, shift: str
) -> None:
    """The cycle checks a counted batch in bulk (also across the end of the ring) and walks it one by one
    only when the bulk test fails: a bad descriptor anywhere in the batch (good ones after it too) raises
    with exactly the ones before it, and a reserved length (no WRITE flag, §2.8.4) fails the bulk test
    without being an error."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    dev = HostilePackedDevice(pair.driver, pair.pool)
    try:
        cyc = fc.cycle(DEPTH, lambda: None)
        ids = shifted(cyc, dev, SHIFTS[shift])
        assert len(ids) == DEPTH and dev.used_pos == 3 * SHIFTS[shift]
        for k, i in enumerate(ids):
            if k != bad:
                dev.use(i, 5, 3)
            elif rule == "out_of_range":
                dev.use(fc.ring.size + 1, 5, 3)
            elif rule == "not_in_flight":
                dev.use(next(s for s in range(fc.nslots) if s not in ids), 5, 3)
            elif rule == "too_long":
                dev.use(i, WLEN + 1, 3)
            elif rule == "duplicate":
                dev.use(ids[0], 5, 3)
            else:
                dev.use(i, 99999, 3, write=False)
        if rule == "no_write_flag":
            assert list(cyc.turn()) == ids
            assert fc.ring.broken is None
            return
        with pytest.raises(DeviceProtocolError) as ei:
            cyc.turn()
        assert [(int(s), n) for s, n in ei.value.completed] == [(i, 5) for i in ids[:bad]]
        assert fc.ring.broken is not None
        assert set(ids[bad:]) - ({ids[0]} if rule == "duplicate" else set()) <= set(fc.in_flight())  # nothing lost
    finally:
        dev.release()


def test_a_clean_batch_across_the_end_is_checked_in_bulk(pair: PackedRingPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A counted batch whose heads lie on both sides of the end of the ring takes the bulk check, neither
    the walk nor the fixed chains' exact take: no line of the walk's per-descriptor body runs in that turn,
    and take is not called (both give the same result, so only this says the bulk path was taken), and
    the ring's used position and wrap counter are those after the batch. The batches published on the
    way, one of them up to or across the end, are the cycle's own stores, not the fixed chains' publish."""
    import inspect
    import sys

    from pyvirtio.ring import cycle_packed

    lines, first = inspect.getsourcelines(cycle_packed.PackedCycle._steps)
    walk = first + next(k for k, line in enumerate(lines) if "done.append(bid)" in line)
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    dev = HostilePackedDevice(pair.driver, pair.pool)
    ran: list[int] = []

    def trace(frame, event, _arg):  # type: ignore[no-untyped-def]
        if frame.f_code is cycle_packed.PackedCycle._steps.__code__:
            return lambda f, e, _a: ran.append(f.f_lineno) if e == "line" else None
        return None

    calls: list[str] = []
    for name in ("take", "publish"):
        plain = getattr(PackedFixedChains, name)
        spy = lambda self, *a, _f=plain, _n=name: calls.append(_n) or _f(self, *a)  # noqa: E731
        monkeypatch.setattr(PackedFixedChains, name, spy)
    try:
        cyc = fc.cycle(DEPTH, lambda: None)
        ids = shifted(cyc, dev, SHIFTS["across-the-end"])
        assert (fc.ring.next_avail, fc.ring.avail_bits) == (30 - pair.driver.size, PACKED_DESC_F_USED)  # 10 slots on
        for i in ids:
            dev.use(i, 5, 3)
        sys.settrace(trace)
        try:
            got = list(cyc.turn())
        finally:
            sys.settrace(None)
        assert got == ids
        assert ran and walk not in ran and not calls
        assert (fc.ring.next_used, fc.ring.used_bits) == (dev.used_pos, packed_used_flags(dev.used_wrap))
    finally:
        dev.release()


@pytest.mark.parametrize("size", [23, 24, 25])
def test_a_batch_written_across_the_end_is_available_in_the_lap_each_descriptor_lies_in(size: int) -> None:
    """``across``: every descriptor of the batch at its ring position, in the lap it lies in (§2.8.1: AVAIL
    and USED from that lap's wrap counter), NEXT on all but a slot's last, its slot's id, address and
    length, except the first head, left not available (its flags are written last, §2.8.21.1)."""
    p = PackedRingPair(size, event_idx=True)
    try:
        specs = chains(p, 7)
        fc = FixedChains(p.driver, specs)
        assert isinstance(fc, PackedFixedChains) and fc.n1 == 3
        for wrap in (1, 0):
            bits = PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED
            for pos in range(size - 20, size):
                k = random.Random(pos).randrange(1, 7)
                slots = random.Random(size + pos).sample(range(7), k)
                if pos + 3 * k < size:
                    continue
                before, after = fc.across(slots, pos, bits)
                assert len(before) == 16 * (size - pos) and len(before) + len(after) == 48 * k
                image = before + after
                for n in range(3 * k):
                    addr, length, ident, flags = (int.from_bytes(image[16 * n + a : 16 * n + b], "little")
                                                  for a, b in ((0, 8), (8, 12), (12, 14), (14, 16)))
                    s, part = slots[n // 3], n % 3
                    lap = wrap if pos + n < size else wrap ^ 1
                    want = (specs[s][part][0], specs[s][part][1], s)
                    assert (addr, length, ident) == want, (pos, n)
                    avail, used = bool(flags & PACKED_DESC_F_AVAIL), bool(flags & PACKED_DESC_F_USED)
                    if n == 0:  # its flags, all of them, come last
                        assert not (avail == bool(lap) and used != bool(lap)), "the first head is not available yet"
                        continue
                    assert bool(flags & DESC_F_WRITE) is specs[s][part][2]
                    assert bool(flags & 1) is (part < 2)  # VIRTQ_DESC_F_NEXT
                    assert (avail, used) == (bool(lap), not lap), (pos, n)
    finally:
        p.close()


@pytest.mark.parametrize("reader", ["reap_slots", "cycle"])
def test_a_length_without_the_write_flag_is_reserved_and_taken_as_0(pair: PackedRingPair, reader: str) -> None:
    """§2.8.4: without VIRTQ_DESC_F_WRITE the used length is reserved: not checked, reported as 0."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    dev = HostilePackedDevice(pair.driver, pair.pool)
    try:
        cyc = fc.cycle(DEPTH, lambda: None) if reader == "cycle" else None
        if cyc is not None:
            cyc.turn()
        else:
            fc.post(list(range(DEPTH)))
        ids = [i for i, _n in dev.available()]
        dev.use(ids[0], 99999, 3, write=False)
        if cyc is not None:
            assert cyc.turn() == [ids[0]]
        else:
            lengths: list[int] = []
            assert fc.reap_slots(lengths=lengths) == [ids[0]] and lengths == [0]
        assert fc.ring.broken is None
    finally:
        dev.release()


@pytest.mark.parametrize("mode", [RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DESC])
def test_the_kick_decision_follows_the_device_event_suppression(pair: PackedRingPair, mode: int) -> None:
    """§2.8.10: DISABLE never kicks, ENABLE always, DESC when the descriptor named was made available."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    dev = HostilePackedDevice(pair.driver, pair.pool)
    try:
        dev.set_event(mode, 3 | 1 << 15)  # DESC: descriptor 3 of the lap with wrap counter 1 (the 2nd chain)
        assert fc.post([0]) is (mode == RING_EVENT_FLAGS_ENABLE)  # descriptors 0..2
        assert fc.post([1]) is (mode != RING_EVENT_FLAGS_DISABLE)  # 3..5
        assert fc.post([2]) is (mode == RING_EVENT_FLAGS_ENABLE)
    finally:
        dev.release()


def test_a_chain_across_the_end_of_the_ring_is_written_in_two_laps(pair: PackedRingPair) -> None:
    fc = FixedChains(pair.driver, chains(pair, 4))
    size = pair.driver.size
    seen = 0
    for rnd in range(3 * size):  # 3-descriptor chains on a ring of 24 or 23: every offset at the wrap
        fc.post([rnd % 4])
        chain = pair.device.pop()
        assert chain is not None and chain.head == rnd % 4
        assert [len(b) for b in chain.writable] == [512, 1]
        pair.device.push_used(chain.head, 7)
        lengths: list[int] = []
        assert fc.reap_slots(lengths=lengths) == [rnd % 4] and lengths == [7]
        seen += 1
    pair.driver.check_ids()
    assert seen == 3 * size


def test_a_batch_is_written_in_runs_before_and_after_the_end_of_the_ring(pair: PackedRingPair) -> None:
    """Slots posted together: the runs that fit before the end of the ring in one store each, the one
    across it in two laps; the device sees every chain whole, in order, in both laps."""
    fc = FixedChains(pair.driver, chains(pair, 4))
    size = pair.driver.size
    for rnd in range(2 * size):  # batches of 3 chains of 3 descriptors: every offset, both laps
        batch = [(rnd + k) % 4 for k in range(3)]
        fc.post(batch)
        for s in batch:
            chain = pair.device.pop()
            assert chain is not None and chain.head == s
            assert [len(b) for b in chain.readable] == [16] and [len(b) for b in chain.writable] == [512, 1]
            pair.device.add_used(chain.head, 5)
        assert pair.device.pop() is None
        pair.device.flush_used()
        lengths: list[int] = []
        assert fc.reap_slots(lengths=lengths) == batch and lengths == [5, 5, 5]
    pair.driver.check_ids()


# -- interleaved: cycles, plain calls, reconnects, the ring's own calls --------------------------------


class Run:
    """A packed driver ring, its device, fixed chains on it, and the model of what is in flight."""

    def __init__(self, size: int, nbuf: int, nslots: int, event_idx: bool, zero_wrap: bool, seed: int) -> None:
        self.pool = MemoryPool(1 << 20, name="pyvirtio-fixed-packed")
        self.table = MemoryTable.from_pool(self.pool)
        self.ring = PackedQueue(size, self.pool, event_idx=event_idx, zero_wrap=zero_wrap)
        self.event_idx = event_idx
        self.device = self.new_device(self.ring.initial_base)
        self.rng = random.Random(seed)
        self.nbuf = nbuf
        self.bufs = [[self.pool.allocate(64) for _ in range(nbuf)] for _ in range(nslots)]
        self.fc = self.attach()
        self.in_flight: set[int] = set()
        self.popped: list[Chain] = []
        self.written: dict[int, int] = {}  # slot -> length used by the device, not yet reaped
        self.returned = 0

    def new_device(self, base: int) -> PackedDeviceQueue:
        r = self.ring
        return PackedDeviceQueue.from_addresses(
            self.table, r.size, r.desc_addr, r.driver_addr, r.device_addr, event_idx=self.event_idx, base=base
        )

    def attach(self) -> FixedChains:
        # The first buffer device-readable, the rest device-writable (a request header, data, a status).
        chains = [[(b.addr, 64, k > 0) for k, b in enumerate(bs)] for bs in self.bufs]
        return FixedChains(self.ring, chains)

    def serve(self, k: int) -> None:
        """The device pops what is available and completes ``k`` of its chains, in random order."""
        while (chain := self.device.pop()) is not None:
            self.popped.append(chain)
        self.rng.shuffle(self.popped)
        for chain in self.popped[:k]:
            n = self.rng.randrange(0, 64 * (self.nbuf - 1) + 1)
            assert chain.head in self.in_flight and chain.head not in self.written
            self.written[chain.head] = n
            self.device.add_used(chain.head, n)
        del self.popped[:k]
        self.device.flush_used()

    def took(self, slots: list[int], lengths: list[int] | None = None) -> None:
        for k, s in enumerate(slots):
            assert s in self.in_flight, f"slot {s} returned but not in flight"
            n = self.written.pop(s)
            if lengths is not None:
                assert lengths[k] == n
            self.in_flight.discard(s)
            self.returned += 1

    def check(self) -> None:
        self.ring.check_ids()
        assert set(self.fc.in_flight()) == self.in_flight
        assert self.fc.n_inflight == len(self.in_flight)

    def close(self) -> None:
        self.device.release()
        self.ring.close()
        self.pool.close()


OPS = st.lists(
    st.tuples(st.sampled_from(["cycle", "plain", "restart", "detach"]), st.integers(1, 40)), min_size=1, max_size=8
)


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(3, 41),
    nbuf=st.integers(1, 3),
    event_idx=st.booleans(),
    zero_wrap=st.booleans(),
    ops=OPS,
    seed=st.integers(0, 1 << 16),
)
def test_fast_path_and_plain_calls_interleaved_cross_many_wraps(
    size: int, nbuf: int, event_idx: bool, zero_wrap: bool, ops: list[tuple[str, int]], seed: int
) -> None:
    nbuf = min(nbuf, size)
    nslots = max(1, min(size // nbuf, 7))
    run = Run(size, nbuf, nslots, event_idx, zero_wrap, seed)
    try:
        assert isinstance(run.fc, PackedFixedChains)
        for op, k in ops:
            fc = run.fc
            if op == "cycle" and not run.in_flight:
                depth = 1 + k % nslots
                cyc = fc.cycle(depth, lambda: None)
                for t in range(k * 3):
                    done = cyc.turn()
                    run.took(list(done or []))
                    run.in_flight |= set(cyc.posted if done is not None else [])
                    run.check()
                    if t == k and run.rng.random() < 0.3:  # a reconnect in the middle of the loop
                        run.serve(run.rng.randrange(0, depth + 1))
                        run.popped.clear()  # the old device forgot what it popped
                        base = fc.restart_base(True)
                        run.device.release()
                        run.device = run.new_device(base)
                        run.check()
                    run.serve(1 + t % depth)
            elif op == "plain":
                for _ in range(k):
                    idle = [s for s in range(nslots) if s not in run.in_flight]
                    post = run.rng.sample(idle, run.rng.randrange(0, len(idle) + 1))
                    fc.post(post)
                    run.in_flight |= set(post)
                    run.serve(run.rng.randrange(0, nslots + 1))
                    lengths: list[int] = []
                    run.took(fc.reap_slots(run.rng.randrange(1, nslots + 1), lengths), lengths)
                    run.check()
            elif op == "restart":
                run.serve(run.rng.randrange(0, nslots + 1))
                run.popped.clear()
                base = fc.restart_base(True)
                run.device.release()
                run.device = run.new_device(base)
                if zero_wrap:
                    assert base & 0x8000 == 0 and base & 0x80000000 == 0  # both wrap counters 0: lap 0
                run.check()
            else:  # detach: drain, the ring's own calls for a while, then fixed chains again
                while run.in_flight:
                    run.serve(nslots)
                    lengths = []
                    run.took(fc.reap_slots(lengths=lengths), lengths)
                fc.detach()
                run.ring.check_ids()
                for j in range(k):
                    run.ring.submit(("plain", j), [(run.bufs[0][0].addr, 64, True)])
                    chain = run.device.pop()
                    assert chain is not None
                    run.device.push_used(chain.head, 3)
                    assert run.ring.reap() == [(("plain", j), 3)]
                run.ring.check_ids()
                run.fc = run.attach()
            run.check()
        # Drain: every slot posted comes back exactly once.
        while run.in_flight:
            run.serve(nslots)
            lengths = []
            run.took(run.fc.reap_slots(lengths=lengths), lengths)
        assert not run.written and run.ring.outstanding == 0
        run.check()
        laps = run.returned * nbuf // size
        event(f"laps of the ring: {laps}" if laps < 10 else "laps of the ring: 10+")
    finally:
        run.close()


def test_a_length_stored_through_length_fields_is_posted_and_resubmitted(pair: PackedRingPair) -> None:
    """A frame's length stored per request (the net tx stream's way) reaches the device, also after a reconnect."""
    size = pair.driver.size
    bufs = [pair.buffer(64) for _ in range(4)]
    fc = FixedChains(pair.driver, [[(b.addr, 64, False)] for b in bufs])
    lengths, index = fc.length_fields()
    for rnd in range(2 * size):  # across wraps
        s = rnd % 4
        lengths[index[s]] = 10 + rnd % 50
        fc.post([s])
        chain = pair.device.pop()
        assert chain is not None and chain.head == s and [len(b) for b in chain.readable] == [10 + rnd % 50]
        pair.device.push_used(chain.head, 0)
        assert fc.reap_slots() == [s]
    lengths[index[2]] = 33
    fc.post([2])
    base = fc.restart_base(True)  # the device went away before it popped slot 2: resubmitted from the shadow
    pair.reset_device(base)
    chain = pair.device.pop()
    assert chain is not None and chain.head == 2 and [len(b) for b in chain.readable] == [33]
    assert pair.device.pop() is None


def test_a_refused_post_publishes_nothing(pair: PackedRingPair) -> None:
    fc = FixedChains(pair.driver, chains(pair, 4))
    fc.post([1])
    for bad, err in (([0, 1], QueueStateError), ([2, 2], QueueStateError), ([3, 4], InvalidArgument)):
        with pytest.raises(err):
            fc.post(bad)
        assert fc.in_flight() == [1] and fc.n_inflight == 1
    pair.driver.check_ids()


@pytest.mark.parametrize("depth", [1, DEPTH])
def test_a_kick_that_fails_leaves_what_the_turn_published_in_flight(pair: PackedRingPair, depth: int) -> None:
    """The turn publishes before it checks, the new slots out of flight until the check; a kick that raises
    (the connection lost) must not leave them out of flight: published, they are the device's, and a
    reconnect resubmits what is in flight."""
    fc = FixedChains(pair.driver, chains(pair, NSLOTS))
    assert isinstance(fc, PackedFixedChains)
    dev = HostilePackedDevice(pair.driver, pair.pool)
    fail = [False]

    def notify() -> None:
        if fail[0]:
            raise ConnectionError("kick: connection lost")

    try:
        dev.set_event(RING_EVENT_FLAGS_ENABLE, 0)  # every publication kicks
        cyc = fc.cycle(depth, notify)
        assert cyc.turn() == []
        first = dev.available()
        assert len(first) == depth
        for i, n in first:
            dev.use(i, 5, n)
        fail[0] = True
        with pytest.raises(ConnectionError):
            cyc.turn()
        inflight = fc.in_flight()
        assert fc.ring.outstanding == len(inflight)  # every descriptor chain the ring counts has its token
        new = [i for i, _n in dev.available()]
        assert len(new) == min(depth, NSLOTS - depth) and set(new) <= set(inflight)  # published: in flight
    finally:
        dev.release()


def test_the_cycle_s_qd1_kick_decision_follows_the_device_event_suppression(pair: PackedRingPair) -> None:
    """The QD1 cycle decides its kick inline (§2.8.10): as packed_need_event, for every mode and descriptor named.

    One request in flight, over four laps of a ring of 24 or 23 (3-descriptor chains: the QD1 fast path,
    and the general path where a chain would cross the end of the ring). Before each turn the device uses
    the request and names, in DESC mode, the descriptor where the next one goes, the one after, the one
    before, or the same offset in the other lap; or asks for every kick (ENABLE) or none (DISABLE).
    """
    drv = pair.driver
    fc = FixedChains(drv, chains(pair, 2))
    dev = HostilePackedDevice(drv, pair.pool)
    kicks: list[int] = []
    cyc = fc.cycle(1, lambda: kicks.append(1))
    rng = random.Random(7)
    try:
        cyc.turn()  # the first request
        assert len(kicks) == 1  # a fresh device structure is ENABLE
        size = drv.size
        for rnd in range(4 * size // 3):
            chain = pair.device.pop()
            assert chain is not None
            pair.device.push_used(chain.head, WLEN)
            pos, wrap = drv.next_avail, 1 if drv.avail_bits == PACKED_DESC_F_AVAIL else 0
            kind = rnd % 6
            if kind == 0:
                mode, off_wrap = RING_EVENT_FLAGS_ENABLE, 0
            elif kind == 1:
                mode, off_wrap = RING_EVENT_FLAGS_DISABLE, 0
            else:
                mode = RING_EVENT_FLAGS_DESC
                named = (pos + (0, 3, -1, rng.randrange(size))[kind - 2]) % size
                named_wrap = wrap if kind != 5 else rng.randrange(2)
                off_wrap = named | named_wrap << 15
            dev.set_event(mode, off_wrap)
            before = len(kicks)
            done = cyc.turn()
            assert list(done) == [chain.head]
            new_pos, new_wrap = drv.next_avail, 1 if drv.avail_bits == PACKED_DESC_F_AVAIL else 0
            want = {RING_EVENT_FLAGS_ENABLE: True, RING_EVENT_FLAGS_DISABLE: False}.get(
                mode, packed_need_event(off_wrap, new_pos, new_wrap, 3, size)
            )
            assert (len(kicks) - before == 1) is want, (rnd, mode, off_wrap, pos)
            assert cyc.kicks == len(kicks)
    finally:
        dev.release()
