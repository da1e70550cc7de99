"""Stateful tests: the packed driver ring against the packed device ring (and IN_ORDER on both formats).

A Hypothesis state machine drives :class:`~pyvirtio.ring.packed.PackedQueue`
and :class:`~pyvirtio.ring.device_packed.PackedDeviceQueue` over one
shared pool, as tests/test_split_stateful.py does for the split ring, and
checks them against a model of which requests are open, published, popped,
completed (with what length, in what order) and reaped. Sizes are any of
1..1024, odd ones included (virtio 1.2 §2.8 needs no power of two); indirect
tables, chains and VIRTIO_F_IN_ORDER are drawn per run; the same machine
also runs the split ring with IN_ORDER (its device batching and the
driver's un-batching).

Invariants after every step: ring slots held + free == size and the id
bookkeeping is whole; every completion comes back exactly once, in used
order, with the length the device wrote (and the bytes it wrote); no
wake-up is lost: once a side asked to be notified with nothing pending, the
other side's next publication says "notify" (§2.8.10, §2.7.10).
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pyvirtio.errors import QueueFull, RequestTooLarge
from pyvirtio.memory import Buffer
from pyvirtio.ring.chain import Chain
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue
from pyvirtio.testing import PackedRingPair, RingPair
from pyvirtio.testing.strategies import buffer_layouts, packed_queue_sizes, queue_sizes

MAX_BUFFERS = 12
MAX_LEN = 48


def pattern(token: int, length: int) -> bytes:
    return bytes((token * 7 + k) & 0xFF for k in range(length))


@dataclass
class Request:
    token: int
    layout: list[tuple[int, bool]]  # (length, device-writable)
    indirect: bool
    out: Buffer | None

    @property
    def ndescs(self) -> int:
        return 1 if self.indirect else len(self.layout)


@st.composite
def ring_setups(draw: st.DrawFn) -> tuple[str, int, bool]:
    """(format, size, in_order): packed of any size with or without IN_ORDER, or split with IN_ORDER."""
    fmt = draw(st.sampled_from(["packed", "split", "packed"]))
    if fmt == "packed":
        # Small rings most of the time, so that a run of 60 steps wraps them (often several times).
        size = draw(st.one_of(st.integers(1, 9), packed_queue_sizes(1, 1024)))
        return fmt, size, draw(st.sampled_from([False, True]))
    return fmt, draw(st.one_of(st.sampled_from([2, 4, 8]), queue_sizes(2, 1024))), True


class RingMachine(RuleBasedStateMachine):
    """Model-based test of driver and device rings sharing one pool."""

    pair: RingPair | PackedRingPair

    @initialize(
        setup=ring_setups(),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        threshold=st.integers(2, 8),
    )
    def setup(self, setup: tuple[str, int, bool], event_idx: bool, indirect: bool, threshold: int) -> None:
        fmt, size, in_order = setup
        cls = PackedRingPair if fmt == "packed" else RingPair
        pair = cls(
            size,
            event_idx=event_idx,
            indirect=indirect,
            indirect_threshold=threshold,
            region_size=4 << 20,
            in_order=in_order,
        )
        event(f"{fmt} in_order={in_order}")
        event("odd size" if size & (size - 1) else "power of two")
        self.fmt = fmt
        self.size = size
        self.in_order = in_order
        self.indirect = indirect
        self.threshold = threshold
        self.rbuf = pair.buffer(MAX_LEN * MAX_BUFFERS, bytes(range(256)) * 2)
        self.next_token = 0
        self.open: Request | None = None
        self.published: deque[Request] = deque()  # in ring order, not yet popped
        self.popped: dict[int, tuple[Request, Chain]] = {}  # id -> popped, not used (pop order)
        self.unflushed: list[tuple[Request, int]] = []
        # Visible to the driver, not reaped, as the device wrote them: one group per used entry
        # (IN_ORDER batches several requests in one). A reap takes whole groups; what goes past
        # its max_n is the driver's stash: completed (descriptors free), not yet returned.
        self.completed: deque[list[tuple[Request, int]]] = deque()
        self.stash: deque[tuple[Request, int]] = deque()
        self.in_flight: dict[int, Request] = {}
        self.returned: set[int] = set()
        self.refused = 0
        self.wraps = 0
        self.device_asked = False  # the device asked for a kick with nothing pending
        self.driver_asked = False  # the driver asked for an interrupt with nothing pending
        self.pair = pair

    def teardown(self) -> None:
        if not hasattr(self, "pair"):
            return
        try:
            if sys.exc_info()[1] is None:
                self._drain()
                if self.wraps:
                    event("ring wrapped")
        finally:
            self.pair.close()

    # -- the model ------------------------------------------------------------

    def visible(self) -> int:
        return len(self.stash) + sum(len(g) for g in self.completed)

    def held(self) -> int:
        stashed = {r.token for r, _ in self.stash}
        held = sum(r.ndescs for r in self.in_flight.values() if r.token not in stashed)
        if self.fmt == "split" and self.open is not None and not self.open.indirect:
            held += len(self.open.layout)  # split takes direct descriptors as they are added
        return held

    def _publish_open(self) -> None:
        if self.open is not None:
            self._published_since_decision = True
            self.published.append(self.open)
            self.in_flight[self.open.token] = self.open
            self.open = None

    def _predict(self, k: int) -> tuple[type[Exception] | None, bool]:
        """(error start() raises, goes indirect) for k buffers, once the open request is published."""
        stashed = {r.token for r, _ in self.stash}
        free = self.size - sum(r.ndescs for r in self.in_flight.values() if r.token not in stashed)
        if self.open is not None:
            free -= self.open.ndescs
        if self.indirect and k > 1 and (k >= self.threshold or k > free):
            return (QueueFull if free < 1 else None), True
        if k > self.size:
            return RequestTooLarge, False
        return (QueueFull if k > free else None), False

    # -- driver rules ---------------------------------------------------------

    @rule(layout=buffer_layouts(MAX_BUFFERS, MAX_LEN), one_call=st.booleans())
    def submit(self, layout: list[tuple[int, bool]], one_call: bool) -> None:
        q = self.pair.driver
        token = self.next_token
        self.next_token += 1
        error, indirect = self._predict(len(layout))
        wlen = sum(n for n, w in layout if w)
        out = self.pair.buffer(max(wlen, 1)) if any(w for _, w in layout) else None
        req = Request(token, layout, indirect, out)
        bufs: list[tuple[int, int, bool]] = []
        rpos = wpos = 0
        for n, w in layout:
            if w:
                assert out is not None
                bufs.append((out.addr + wpos, n, True))
                wpos += n
            else:
                bufs.append((self.rbuf.addr + rpos, n, False))
                rpos += n
        before = q.next_avail if isinstance(q, PackedQueue) else 0
        try:
            if one_call:
                q.submit(token, bufs)
            else:
                q.start(token, len(bufs))
                for b in bufs:
                    q.add(*b)
        except (QueueFull, RequestTooLarge) as exc:
            assert type(exc) is error, f"predicted {error}, got {exc!r}"
            self._publish_open()
            self.refused += 1
            return
        assert error is None, f"predicted {error.__name__}, the ring accepted {len(layout)} buffers"
        event("indirect" if indirect else "direct")
        self._publish_open()
        self.open = req
        if one_call:
            self._publish_open()
        if isinstance(q, PackedQueue) and q.next_avail < before:
            self.wraps += 1

    @rule()
    def flush(self) -> None:
        new = self.open is not None or self._published_since_decision
        kick = self.pair.driver.flush()
        self._publish_open()
        if self.device_asked and new:
            event("a kick was due")
            assert kick, "the device asked for a kick and the driver published without one"
            self.device_asked = False
        self._published_since_decision = False

    _published_since_decision = False

    @precondition(lambda self: self.open is not None)
    @rule()
    def abort(self) -> None:
        self.pair.driver.abort()
        self.open = None

    @rule(max_n=st.integers(1, 64))
    def reap(self, max_n: int) -> None:
        got = self.pair.driver.reap(max_n)
        want = [self.stash.popleft() for _ in range(min(max_n, len(self.stash)))]
        while len(want) < max_n and self.completed:
            want += self.completed.popleft()
        self.stash.extend(want[max_n:])
        del want[max_n:]
        assert len(got) == len(want)
        for (token, length), (req, expected) in zip(got, want, strict=True):
            assert (token, length) == (req.token, expected)
            assert token not in self.returned, f"token {token} returned twice"
            self.returned.add(token)
            del self.in_flight[token]
            if req.out is not None:
                assert bytes(req.out.view[:length]) == pattern(token, length)

    @rule(on=st.booleans())
    def interrupts(self, on: bool) -> None:
        q = self.pair.driver
        if on:
            pending = q.enable_interrupts()
            assert pending is bool(self.visible())
            self.driver_asked = not pending
        else:
            q.disable_interrupts()
            self.driver_asked = False

    # -- device rules ---------------------------------------------------------

    @rule(on=st.booleans())
    def kicks(self, on: bool) -> None:
        dev = self.pair.device
        if on:
            pending = dev.enable_notifications()
            assert pending is bool(self.published)
            self.device_asked = not pending
            self._published_since_decision = False
        else:
            dev.disable_notifications()
            self.device_asked = False

    @rule(n=st.integers(1, 16))
    def device_pop(self, n: int) -> None:
        for _ in range(n):
            chain = self.pair.device.pop()
            if chain is None:
                assert not self.published
                return
            req = self.published.popleft()
            assert chain.head not in self.popped, f"id {chain.head} handed out twice"
            assert [len(b) for b in chain.readable] == [ln for ln, w in req.layout if not w]
            assert [len(b) for b in chain.writable] == [ln for ln, w in req.layout if w]
            self.popped[chain.head] = (req, chain)
            self.device_asked = False  # a polling device

    @precondition(lambda self: bool(self.popped))
    @rule(data=st.data(), flush=st.booleans())
    def device_complete(self, data: st.DataObject, flush: bool) -> None:
        ids = list(self.popped)  # pop order
        if not self.in_order:
            ids = data.draw(st.permutations(ids))
        ids = ids[: data.draw(st.integers(1, len(ids)))]
        for bid in ids:
            req, chain = self.popped.pop(bid)
            full = chain.writable_len
            length = data.draw(st.one_of(st.just(full), st.integers(0, full)))  # often all: batches
            assert chain.write(pattern(req.token, length)) == length
            self.pair.device.add_used(bid, length)
            self.unflushed.append((req, length))
        if flush:
            self.device_flush()

    @rule()
    def device_flush(self) -> None:
        new = bool(self.unflushed)
        signal = self.pair.device.flush_used()
        if self.driver_asked and new:
            event("an interrupt was due")
            assert signal, "the driver asked for an interrupt and the device used a buffer without one"
            self.driver_asked = False
        group: list[tuple[Request, int]] = []
        for k, (req, length) in enumerate(self.unflushed):
            group.append((req, length))
            # The devices batch a run of buffers used completely, ending at one that is not (or the last).
            wlen = sum(n for n, w in req.layout if w)
            if not self.in_order or length != wlen or k + 1 == len(self.unflushed):
                self.completed.append(group)
                group = []
        self.unflushed.clear()

    # -- the notification round trips, as rules of their own ---------------------

    @precondition(lambda self: self.open is None and not self.published)
    @rule(layout=buffer_layouts(4, MAX_LEN))
    def kick_round_trip(self, layout: list[tuple[int, bool]]) -> None:
        """The device asks for a kick, the driver publishes one request: the decision must be "kick"."""
        self.kicks(True)
        assert self.device_asked
        self.submit(layout, True)
        self.flush()
        self.kicks(False)

    @precondition(lambda self: bool(self.popped) and not self.visible() and not self.unflushed)
    @rule(data=st.data())
    def interrupt_round_trip(self, data: st.DataObject) -> None:
        """The driver asks for an interrupt, the device uses buffers: the decision must be "signal"."""
        self.interrupts(True)
        assert self.driver_asked
        self.device_complete(data, True)
        self.interrupts(False)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def bookkeeping(self) -> None:
        if not hasattr(self, "pair"):
            return
        q = self.pair.driver
        assert q.num_free == self.size - self.held()
        if isinstance(q, SplitQueue):
            assert q.check_free_list() == q.num_free
        else:
            q.check_ids()
        assert q.outstanding == len(self.in_flight)
        assert sorted(q.in_flight_tokens(), key=int) == sorted(self.in_flight)  # type: ignore[call-overload]
        assert q.pending() == self.visible()
        assert bool(self.pair.device.avail_pending()) == bool(self.published)
        assert q.broken is None

    def _drain(self) -> None:
        """Finish everything outstanding; every accepted request must come back exactly once."""
        self.flush()
        self.device_pop(self.size)
        for bid in list(self.popped):
            req, chain = self.popped.pop(bid)
            chain.write(pattern(req.token, chain.writable_len))
            self.pair.device.add_used(bid, chain.writable_len)
            self.unflushed.append((req, chain.writable_len))
        self.device_flush()
        self.reap(64)
        while self.visible():
            self.reap(64)
        assert not self.in_flight
        assert self.pair.driver.num_free == self.size
        assert len(self.returned) + self.refused <= self.next_token


RingMachine.TestCase.settings = settings(stateful_step_count=60)
test_packed_ring_state_machine = RingMachine.TestCase
