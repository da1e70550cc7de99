"""Stateful and long-run tests: the driver ring against the device ring.

A Hypothesis state machine drives :class:`~pyvirtio.ring.split.SplitQueue`
(driver) and :class:`~pyvirtio.ring.device_side.DeviceQueue` (device) over
one shared :class:`~pyvirtio.memory.MemoryPool` and checks them against a
model: which requests hold how many descriptors, which are published,
popped, completed (with what length, in what order) and reaped.

Invariants after every step: free descriptors + descriptors held by
requests == queue size; the shadow free list is intact; every completion
comes back exactly once, in used-ring order, with the length the device
wrote (and the bytes it wrote). A second, deterministic test pushes more
than 70,000 requests through a small queue so that every 16-bit index
wraps (virtio 1.2 §2.7: indices are free-running modulo 2^16).
"""

from __future__ import annotations

import random
import sys
from collections import deque
from dataclasses import dataclass

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pyvirtio.errors import QueueFull, RequestTooLarge
from pyvirtio.memory import Buffer
from pyvirtio.ring.device_side import Chain
from pyvirtio.testing import RingPair
from pyvirtio.testing.strategies import buffer_layouts, queue_sizes

MAX_BUFFERS = 12
MAX_LEN = 48


def pattern(token: int, length: int) -> bytes:
    return bytes((token * 7 + k) & 0xFF for k in range(length))


@dataclass
class Request:
    token: int
    layout: list[tuple[int, bool]]  # (length, device-writable)
    indirect: bool
    out: Buffer | None  # backs the writable buffers

    @property
    def ndescs(self) -> int:
        return 1 if self.indirect else len(self.layout)

    @property
    def readable_len(self) -> int:
        return sum(n for n, w in self.layout if not w)

    @property
    def writable_len(self) -> int:
        return sum(n for n, w in self.layout if w)


class SplitRingMachine(RuleBasedStateMachine):
    """Model-based test of driver and device rings sharing one pool."""

    pair: RingPair

    @initialize(
        size=queue_sizes(2, 1024),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        threshold=st.integers(2, 8),
    )
    def setup(self, size: int, event_idx: bool, indirect: bool, threshold: int) -> None:
        pair = RingPair(
            size, event_idx=event_idx, indirect=indirect, indirect_threshold=threshold, region_size=4 << 20
        )
        self.size = size
        self.indirect = indirect
        self.threshold = threshold
        self.rbuf = pair.buffer(MAX_LEN * MAX_BUFFERS, bytes(range(256)) * 2)
        self.next_token = 0
        self.open: Request | None = None  # started, not published
        self.published: deque[Request] = deque()  # in avail order, not yet popped
        self.popped: dict[int, tuple[Request, Chain]] = {}  # head -> popped, not completed
        self.unflushed: list[tuple[Request, int]] = []  # add_used done, used.idx not yet moved
        self.completed: deque[tuple[Request, int]] = deque()  # visible to the driver, not reaped
        self.in_flight: dict[int, Request] = {}  # published and not reaped
        self.returned: set[int] = set()
        self.refused = 0
        self.pair = pair  # last: teardown and invariants only run on a complete setup

    def teardown(self) -> None:
        if not hasattr(self, "pair"):
            return
        try:
            # Drain only after a clean run: after a failed step the model and the
            # ring disagree by definition, and a second error here would make
            # Hypothesis shrink two failures instead of one.
            if sys.exc_info()[1] is None:
                self._drain()
        finally:
            self.pair.close()

    # -- the model ------------------------------------------------------------

    def model_free(self) -> int:
        held = sum(r.ndescs for r in self.in_flight.values())
        if self.open is not None and not self.open.indirect:
            held += len(self.open.layout)  # direct descriptors are taken as they are added
        return self.size - held

    def _publish_open(self) -> None:
        if self.open is not None:
            self.published.append(self.open)
            self.in_flight[self.open.token] = self.open
            self.open = None

    def _predict(self, k: int) -> tuple[type[Exception] | None, bool]:
        """(error start() raises, goes indirect) for k buffers, once the open request is published."""
        free = self.model_free() - (1 if self.open is not None and self.open.indirect else 0)
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
        try:
            if one_call:
                q.submit(token, bufs)
            else:
                q.start(token, len(bufs))
                for b in bufs:
                    q.add(*b)
        except (QueueFull, RequestTooLarge) as exc:
            assert type(exc) is error, f"predicted {error}, got {exc!r}"
            self._publish_open()  # start() published the open request before refusing
            self.refused += 1
            event(f"refused: {type(exc).__name__}")
            return
        assert error is None, f"predicted {error.__name__}, the ring accepted {len(layout)} buffers"
        event("indirect" if indirect else "direct")
        self._publish_open()
        self.open = req
        if one_call:
            self._publish_open()

    @rule()
    def flush(self) -> None:
        self.pair.driver.flush()
        self._publish_open()

    @precondition(lambda self: self.open is not None)
    @rule()
    def abort(self) -> None:
        self.pair.driver.abort()
        self.open = None

    @rule(max_n=st.integers(1, 64))
    def reap(self, max_n: int) -> None:
        got = self.pair.driver.reap(max_n)
        assert len(got) == min(max_n, len(self.completed))
        for token, length in got:
            req, expected = self.completed.popleft()
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
            assert q.enable_interrupts() is bool(self.completed)
        else:
            q.disable_interrupts()

    # -- device rules ---------------------------------------------------------

    @rule(n=st.integers(1, 16))
    def device_pop(self, n: int) -> None:
        for _ in range(n):
            chain = self.pair.device.pop()
            if chain is None:
                assert not self.published
                return
            req = self.published.popleft()
            assert chain.head not in self.popped, f"head {chain.head} handed out twice"
            assert len(chain.readable) + len(chain.writable) == len(req.layout)
            assert [len(b) for b in chain.readable] == [ln for ln, w in req.layout if not w]
            assert [len(b) for b in chain.writable] == [ln for ln, w in req.layout if w]
            self.popped[chain.head] = (req, chain)

    @precondition(lambda self: bool(self.popped))
    @rule(data=st.data(), flush=st.booleans())
    def device_complete(self, data: st.DataObject, flush: bool) -> None:
        heads = data.draw(st.permutations(sorted(self.popped)))
        heads = heads[: data.draw(st.integers(1, len(heads)))]
        for head in heads:
            req, chain = self.popped.pop(head)
            length = data.draw(st.integers(0, chain.writable_len))
            assert chain.write(pattern(req.token, length)) == length
            self.pair.device.add_used(head, length)
            self.unflushed.append((req, length))
        if flush:
            self.device_flush()

    @rule()
    def device_flush(self) -> None:
        self.pair.device.flush_used()
        self.completed.extend(self.unflushed)
        self.unflushed.clear()

    # -- invariants -----------------------------------------------------------

    @invariant()
    def descriptors_are_conserved(self) -> None:
        if not hasattr(self, "pair"):
            return
        q = self.pair.driver
        assert q.num_free == self.model_free()
        assert q.check_free_list() == q.num_free
        assert q.outstanding == len(self.in_flight)
        assert sorted(q.in_flight_tokens(), key=int) == sorted(self.in_flight)  # type: ignore[call-overload]
        assert q.pending() == len(self.completed)
        assert self.pair.device.avail_pending() == len(self.published)
        assert q.broken is None

    def _drain(self) -> None:
        """Finish everything outstanding; every accepted request must come back exactly once."""
        self.flush()
        self.device_pop(self.size)
        for head in list(self.popped):
            req, chain = self.popped.pop(head)
            chain.write(pattern(req.token, chain.writable_len))
            self.pair.device.add_used(head, chain.writable_len)
            self.unflushed.append((req, chain.writable_len))
        self.device_flush()
        self.reap(1 << 16)
        assert not self.in_flight
        assert self.pair.driver.num_free == self.size
        assert len(self.returned) + self.refused <= self.next_token


# max_examples comes from the loaded profile (conftest.py: 50 by default, 100 under CI).
SplitRingMachine.TestCase.settings = settings(stateful_step_count=60)
test_split_ring_state_machine = SplitRingMachine.TestCase


# -- index wrap ---------------------------------------------------------------


def test_more_than_65536_requests_wrap_every_index() -> None:
    """70,000+ requests through an 8-entry queue: random layouts, paths and completion order.

    Each request's first buffer carries its token, so the device knows which
    request it completes and what length it wrote; the driver must hand back
    exactly that, in used-ring order, with every descriptor accounted for.
    """
    rng = random.Random(20260601)
    size, threshold = 8, 4
    with RingPair(size, event_idx=True, indirect=True, indirect_threshold=threshold) as pair:
        q, dev = pair.driver, pair.device
        hdr = pair.buffer(8 * size)
        rbuf = pair.buffer(8)
        wbuf = pair.buffer(24 * size)
        free_slots = list(range(size))
        slot_of: dict[int, int] = {}
        held: dict[int, int] = {}  # token -> ring descriptors it holds (model)
        completions: deque[tuple[int, int]] = deque()  # what the device wrote, in used order
        total = returned = kicks = 0
        while total < 70_500:
            for _ in range(rng.randint(1, size)):
                if not free_slots:
                    break
                nr, nw = rng.randint(0, 2), rng.randint(0, 3)
                n = 1 + nr + nw
                free = size - sum(held.values())
                indirect = n > 1 and (n >= threshold or n > free)
                full = free < 1 if indirect else n > free
                slot = free_slots[-1]
                hdr.view[8 * slot : 8 * slot + 8] = total.to_bytes(8, "little")
                layout = [(hdr.addr + 8 * slot, 8, False)] + [(rbuf.addr, 8, False)] * nr
                layout += [(wbuf.addr + 24 * slot + 8 * k, 8, True) for k in range(nw)]
                try:
                    if rng.random() < 0.5:
                        q.submit(total, layout)
                    else:
                        q.start(total, n)
                        q.add_buffers(layout)
                except QueueFull:
                    assert full, f"QueueFull with {free} free for {n} buffers"
                    break
                assert not full, f"accepted {n} buffers with {free} free"
                free_slots.pop()
                slot_of[total] = slot
                held[total] = 1 if indirect else n
                total += 1
            kicks += q.flush()
            assert q.num_free == size - sum(held.values())
            chains = []
            while (chain := dev.pop()) is not None:
                chains.append(chain)
            rng.shuffle(chains)
            for chain in chains:
                token = int.from_bytes(chain.readable[0], "little")
                length = rng.randint(0, chain.writable_len)
                dev.add_used(chain.head, length)
                completions.append((token, length))
            dev.flush_used()
            dev.enable_notifications()
            for token, length in q.reap():
                assert (token, length) == completions.popleft()
                del held[token]
                free_slots.append(slot_of.pop(token))
                returned += 1
            assert q.num_free == size - sum(held.values())
            assert q.check_free_list() == q.num_free
        assert not held and not completions
        assert returned == total > 1 << 16
        assert q.num_free == size and q.outstanding == 0
        # Every 16-bit index went round at least once and still agrees on both sides.
        assert q.avail_idx == dev.last_avail == total & 0xFFFF
        assert q.last_used == dev.used_idx == total & 0xFFFF
        assert kicks > 0
