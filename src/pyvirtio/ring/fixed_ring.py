"""Fixed chains over the ring protocol: the batch fast path of a packed ring, or of a split ring with IN_ORDER.

Theory of operation (the API and its rules: :mod:`pyvirtio.ring.fixed`).
Where chains cannot be linked once in a descriptor table (a packed ring lays
each request's descriptors at the next ring position, virtio 1.2 §2.8.6; a
split ring with VIRTIO_F_IN_ORDER uses descriptors in ring order, §2.7.9),
:class:`RingFixedChains` keeps each slot's shapes itself and posts a slot
with the ring's own ``submit(slot, buffers)``: the slot number is the
request's token. It needs no ring internals: everything goes through
:class:`~pyvirtio.ring.base.RingQueue`, so it serves any format.

Validation is the ring's: :meth:`RingQueue.reap
<pyvirtio.ring.base.RingQueue.reap>` checks every used entry (§2.7.8,
§2.8.4/§2.8.6: id out of range or not in flight, length above the buffer's
device-writable bytes, more completions than in flight, wrong wrap
counter, IN_ORDER skips) and raises
:class:`~pyvirtio.errors.DeviceProtocolError` carrying the completions it
validated before the bad entry, whose tokens are slots here. This module
only keeps its own per-slot in-flight flags in step, also on the error path,
so a slot is never lost or returned twice.

Completions taken from the ring but not yet handed out (a stream's batch
that did not match what it expected, see :class:`RingStream`) wait in a
*held* list, which :meth:`RingFixedChains.reap_slots` returns first.

The cycle (:class:`RingCycle`) reaps first and publishes afterwards (one
spare per completion), so an entry can never name a slot published in the
same turn. The NumPy calls exist for API parity: they convert arrays to
lists and back (the ring protocol is per request).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueStateError
from pyvirtio.ring.fixed import BufferSpec, ListArrays, chain_shapes, changed_buffer, check_length_field

if TYPE_CHECKING:
    from pyvirtio.ring.base import RingQueue


class RingFixedChains(ListArrays):
    """Fixed chains submitted through the ring protocol (see the module docstring)."""

    def __init__(
        self,
        ring: RingQueue,
        chains: Sequence[Sequence[BufferSpec]],
        *,
        alternate: Sequence[Sequence[BufferSpec]] | None = None,
    ) -> None:
        if ring.outstanding or ring.request_open:
            raise QueueStateError("fixed chains need an idle queue")
        shapes = chain_shapes(chains, alternate)
        need = sum(len(forms[0]) for forms in shapes)
        if need > ring.size and not ring.indirect:
            raise InvalidArgument(f"{len(shapes)} chains need {need} descriptors, the queue has {ring.size}")
        self.ring = ring
        self.nslots = len(shapes)
        self.heads = list(range(self.nslots))
        self.slot_of = list(range(self.nslots))
        self.heads_are_slots = True
        self.shapes = [[[list(b) for b in form] for form in forms] for forms in shapes]
        self.alt_now = bytearray(self.nslots)
        # The buffers of every slot's current shape, flat: slot s's are at
        # base[s] .. base[s] + count[s] - 1 (lengths writable through length_fields).
        self.base: list[int] = []
        self.addrs: list[int] = []
        self.lengths: list[int] = []
        self.writable: list[bool] = []
        for forms in self.shapes:
            self.base.append(len(self.addrs))
            for addr, length, w in forms[0]:
                self.addrs.append(addr)
                self.lengths.append(length)
                self.writable.append(bool(w))
        self.count = [len(forms[0]) for forms in self.shapes]
        # Slot s's chain as submit takes it, built at its first post after a change (None: rebuild);
        # not kept once length_fields handed the lengths out (they may change under us).
        self.chain: list[list[BufferSpec] | None] = [None] * self.nslots
        self.keep_chains = True
        self.busy = bytearray(self.nslots)  # 1: published, not yet reaped
        self.held: list[tuple[int, int]] = []  # reaped from the ring, not yet handed out
        self.streaming = False

    def buffers(self, s: int) -> list[BufferSpec]:
        """Slot s's current chain, as the ring's ``submit`` takes it."""
        c = self.chain[s]
        if c is None:
            b = self.base[s]
            e = b + self.count[s]
            c = list(zip(self.addrs[b:e], self.lengths[b:e], self.writable[b:e], strict=True))
            if self.keep_chains:
                self.chain[s] = c
        return c

    # -- state ------------------------------------------------------------------

    @property
    def n_inflight(self) -> int:
        return self.ring.outstanding

    @property
    def wlen(self) -> Sequence[int]:
        out = []
        for s in range(self.nslots):
            b = self.base[s]
            out.append(sum(n for n, w in zip(self.lengths[b : b + self.count[s]],
                                            self.writable[b : b + self.count[s]], strict=True) if w))
        return out

    def in_flight(self) -> list[int]:
        return [s for s in range(self.nslots) if self.busy[s]]

    def pending(self) -> int:
        return len(self.held) + self.ring.pending()

    def check_idle(self, s: int) -> None:
        """Refuse a change to a slot that does not exist or is in flight (or while streaming)."""
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        if not 0 <= s < self.nslots:
            raise InvalidArgument(f"slot {s} out of range (0..{self.nslots - 1})")
        if self.busy[s]:
            raise QueueStateError(f"slot {s} is in flight")

    # -- shapes -------------------------------------------------------------------

    def set_buffer(
        self, s: int, k: int, addr: int | None = None, length: int | None = None, writable: bool | None = None
    ) -> None:
        self.check_idle(s)
        form = self.shapes[s][self.alt_now[s]]
        new = changed_buffer(form, s, k, addr, length, writable)
        form[k] = new
        i = self.base[s] + k
        self.addrs[i], self.lengths[i], self.writable[i] = new[0], new[1], bool(new[2])
        self.chain[s] = None

    def set_length(self, s: int, k: int, length: int) -> None:
        self.set_buffer(s, k, length=length)

    def length_fields(self, k: int = 0) -> tuple[list[int], list[int]]:
        check_length_field(self.shapes, k)
        self.keep_chains = False
        self.chain = [None] * self.nslots
        return self.lengths, [b + k for b in self.base]

    def use_alternate(self, s: int, on: bool) -> None:
        self.check_idle(s)
        if len(self.shapes[s]) < 2:
            raise InvalidArgument(f"slot {s} has no alternate chain")
        v = 1 if on else 0
        if self.alt_now[s] != v:
            self.alt_now[s] = v
            b = self.base[s]
            for k, (addr, length, w) in enumerate(self.shapes[s][v]):
                self.addrs[b + k], self.lengths[b + k], self.writable[b + k] = addr, length, bool(w)
            self.chain[s] = None

    # -- plain calls --------------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        self.check_broken()
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        ring = self.ring
        busy = self.busy
        submit = ring.submit
        for s in slots:
            if busy[s]:
                raise QueueStateError(f"slot {s} is already in flight")  # the earlier ones stay published
            submit(s, self.buffers(s))
            busy[s] = 1
        return ring.kick_prepare()

    def take(self, max_n: int) -> list[tuple[int, int]]:
        """Validated (slot, length) completions: the held ones first, then the ring's (raises as its reap)."""
        out: list[tuple[int, int]] = []
        if self.held:
            out = self.held[:max_n]
            del self.held[:max_n]
            max_n -= len(out)
            if not max_n:
                return out
        busy = self.busy
        try:
            done = self.ring.reap(max_n)
        except DeviceProtocolError as exc:
            # The completions validated before the fault: no longer in flight; handed out with the error.
            for s, _n in exc.completed:
                busy[s] = 0  # type: ignore[call-overload]  # tokens are the slots posted
            exc.completed = [*out, *exc.completed]
            raise
        for s, _n in done:
            busy[s] = 0  # type: ignore[call-overload]
        out += done  # type: ignore[arg-type]
        return out

    def reap_slots(self, max_n: int = 1 << 16, lengths: list[int] | None = None) -> list[int]:
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        done = self.take(max_n)
        if lengths is not None:
            lengths.extend(n for _s, n in done)
        return [s for s, _n in done]

    # -- NumPy --------------------------------------------------------------------

    # (post_many, reap_many, use_alternate_many: ListArrays, over the plain calls)

    # -- engines ------------------------------------------------------------------

    def cycle(self, depth: int, notify: Callable[[], object], *, vectorised: bool = False) -> RingCycle:
        self.check_cycle_start(depth, len(self.held))
        return RingCycle(self, depth, notify, vectorised)

    def stream(self, notify: Callable[[], object], *, min_len: int = 0) -> RingStream:
        self.check_stream_start(self.count, len(self.held))
        return RingStream(self, notify, min_len)

    # -- interrupts, reconnect, teardown -----------------------------------------------

    def restart_base(self, resubmit: bool = True) -> int:
        return self.ring.restart_base(resubmit)

    def detach(self) -> None:
        ring = self.ring
        if (ring.outstanding or self.held) and ring.broken is None:
            raise QueueStateError(f"{ring.outstanding + len(self.held)} slots still in flight")
        if self.streaming:
            raise QueueStateError("close the stream first")


class RingCycle:
    """:meth:`FixedChains.cycle` over the ring protocol: reap (validated), then publish one spare per completion."""

    def __init__(self, fc: RingFixedChains, depth: int, notify: Callable[[], object], vectorised: bool) -> None:
        self.fc = fc
        self.ring = fc.ring
        self.notify = notify
        self.depth = depth
        self.spares = list(range(fc.nslots))  # prepared, not published; oldest first
        self.kicks = 0
        self.np: Any = None
        if vectorised:
            import numpy as np

            self.np = np
        self.posted: Any = [] if self.np is None else self.np.zeros(0, dtype=self.np.intp)

    def sync(self) -> None:
        """Nothing to hand back: the ring's state is current after every turn."""

    def stepper(self) -> Callable[[int], Any]:
        return self.turn

    def turn(self, spins: int = 1) -> Any:
        fc = self.fc
        ring = self.ring
        out = ring.outstanding
        take = fc.take
        got = take(1 << 16)  # validated by the ring's reap (raises QueueBroken on a broken queue)
        if not got and out == self.depth:
            while spins > 1:
                spins -= 1
                got = take(1 << 16)
                if got:
                    break
            else:
                return None
        done = [s for s, _n in got]
        spares = self.spares
        want = len(done) + self.depth - out
        posted = spares[:want]
        if posted:
            del spares[:want]
            busy = fc.busy
            submit = ring.submit
            for s in posted:
                submit(s, fc.buffers(s))
                busy[s] = 1
            if ring.kick_prepare():
                self.notify()
                self.kicks += 1
        spares += done
        np = self.np
        if np is None:
            self.posted = posted
            return done
        self.posted = np.asarray(posted, dtype=np.intp)
        return np.asarray(done, dtype=np.intp)


class RingStream:
    """:meth:`FixedChains.stream` over the ring protocol: every slot in flight, re-posted as it completes.

    :meth:`peek` takes the ring's completions (validated by its reap) into a
    batch; a batch whose lengths are not what a stream expects (below
    ``min_len``, or above 0 for device-readable slots, which the ring's reap
    already refuses) is kept for the exact path: :meth:`close` puts it back
    in front of the fixed chains' held completions.
    """

    def __init__(self, fc: RingFixedChains, notify: Callable[[], object], min_len: int) -> None:
        self.fc = fc
        self.ring = fc.ring
        self.notify = notify
        self.min_len = min_len
        self.batch: list[tuple[int, int]] = []
        self.kicks = 0
        self.started = False  # the first advance publishes every slot not in flight
        fc.streaming = True

    def peek(self) -> int:
        batch = self.batch
        if not batch:
            batch += self.fc.take(1 << 16)
            if not batch:
                return 0
        if min(n for _s, n in batch) < self.min_len:
            return -1
        return len(batch)

    def peek_many(self) -> tuple[Any, ...] | None:
        n = self.peek()
        if not n:
            return None
        if n < 0:
            return ()
        import numpy as np

        arr = np.asarray(self.batch, dtype=np.int64)
        return arr[:, 0].astype(np.intp), arr[:, 1]

    def advance(self, n: int) -> None:
        fc = self.fc
        busy = fc.busy
        if self.started:
            slots = [s for s, _n in self.batch[:n]]  # the slots just taken: the only ones not in flight
        else:
            self.started = True
            slots = [s for s in range(fc.nslots) if not busy[s]]
        del self.batch[:n]
        submit = self.ring.submit
        buffers = fc.buffers
        for s in slots:
            submit(s, buffers(s))
            busy[s] = 1
        if self.ring.kick_prepare():
            self.notify()
            self.kicks += 1

    def close(self) -> None:
        fc = self.fc
        if not fc.streaming:
            return
        fc.streaming = False
        fc.held[:0] = self.batch
        self.batch = []


__all__ = ["RingCycle", "RingFixedChains", "RingStream"]
