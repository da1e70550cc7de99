"""Fixed chains: the batch fast path of both ring formats (benchmark engines, fixed-shape I/O).

Theory of operation. When every request has the same shape (a virtio-blk
header, one data buffer, a status byte), building chains per request is
wasted work. :class:`FixedChains` prepares one chain per *slot* once, and
from then on a request is just "post slot s". It is a facade over the
ring's own fast paths: on a :class:`~pyvirtio.ring.split.SplitQueue`
without VIRTIO_F_IN_ORDER it is a
:class:`~pyvirtio.ring.fixed_split.SplitFixedChains` (one pre-linked chain
per slot in the descriptor table; posting writes the head into the avail
ring; its loops in :mod:`pyvirtio.ring.cycle_split` and
:mod:`pyvirtio.ring.stream_split`); on a
:class:`~pyvirtio.ring.packed.PackedQueue` without IN_ORDER whose slots all
fit the ring at once, a :class:`~pyvirtio.ring.fixed_packed.PackedFixedChains`
(buffer id = slot, each slot's descriptors prepared as bytes per lap;
posting writes them at the next ring positions, the head's flags last; its
loops in :mod:`pyvirtio.ring.cycle_packed` and
:mod:`pyvirtio.ring.stream_packed`); on any other ring (IN_ORDER
on either format, whose ids or descriptors follow ring order, or a packed
ring with more slots than fit, going indirect) a
:class:`~pyvirtio.ring.fixed_ring.RingFixedChains` (each slot's chain kept
here and submitted through the ring protocol, the slot being the token).
Engines, drivers and back ends use this API and never a ring's private
state.

Posting many slots publishes them at once (split: one avail index store;
packed: each head's flags last, behind a release barrier, §2.8.21.1)
and makes one kick decision (split: flags or EVENT_IDX, §2.7.10; packed:
event suppression, §2.8.10). Reaping takes every used entry at once.

Every used entry is validated before it is believed, by the rules of the
ring's own reap (virtio 1.2 §2.7.8 / §2.8.4, §2.8.6): more completions than
are in flight, an id out of range or not the head of a slot in flight, a
length above the slot's device-writable bytes, and for packed a descriptor
whose AVAIL/USED bits match neither the used nor the available pattern of
the current lap (a wrong wrap counter). A violation marks the queue broken
and raises :class:`~pyvirtio.errors.DeviceProtocolError` whose ``completed``
holds the (slot, length) pairs validated before the bad entry; the bad
entry's slot stays in flight, nothing is returned twice. The same rules and
errors hold on every path below.

Paths, sharing one state:

* plain calls: :meth:`~FixedChains.post`, :meth:`~FixedChains.reap_slots`,
  cheapest for a handful of requests;
* NumPy (the ``fast`` extra): :meth:`~FixedChains.post_many`,
  :meth:`~FixedChains.reap_many`, a fixed number of array operations per
  batch whatever its size; a NumPy batch with anything wrong is re-run entry
  by entry, which finds and reports the exact entry. A FixedChains is driven
  through one of the two (switching needs nothing in flight);
* the *cycle* (:meth:`~FixedChains.cycle`), an engine's closed loop in one
  call per pass: keep ``depth`` slots in flight, the others *spares* the
  caller has prepared. :meth:`Cycle.turn` looks at the used side, publishes
  one spare per completion seen (and any shortfall) and makes the kick
  decision, calling the transport's notifier if the device wants a kick
  (the ring decides; the notifier does the I/O, as Linux's ``vq->notify``);
  only then does it validate the completions, so the device's next work is
  in the ring one store after the last completion is seen (docs/benchmarks.md
  §1.2). The slots it returns are spares from then on: the caller prepares
  them before the next turn. The spares published are marked in flight only
  after the batch was checked, so an entry naming one is rejected. The
  vectorised cycle (``vectorised=True``) does the same in array operations.
  The split ring's plain-Python cycle keeps the ring's shadow indices in its
  loop between turns (the work between a kick and the next poll is on the
  QD1 round trip); :meth:`Cycle.sync` hands them back, and every plain call
  of the fixed chains calls it first, so the paths still share one state;
* the *stream* (:meth:`~FixedChains.stream`), the net engine's: every slot
  a one-buffer chain, all of them in flight all the time, each slot fixed
  at its ring position, so re-posting n slots is one store (split: the avail
  index; packed: the batch's prepared descriptors, then their flags;
  elsewhere the slots are submitted again through the ring),
  and a batch of completions is checked against the expected entries in
  bulk (:meth:`Stream.peek`), then taken and re-posted
  (:meth:`Stream.advance`). Anything unexpected is left in the ring for the
  exact path (:meth:`Stream.close`, then ``reap_slots``).

A slot has one or two *shapes*: ``chains[s]`` and, optionally,
``alternate[s]`` (e.g. a read and a write, with as many buffers);
:meth:`~FixedChains.use_alternate` switches between them and
:meth:`~FixedChains.set_buffer` changes one buffer of the current shape. A
slot in flight cannot be changed. The device-writable bytes of each slot's
current shape (``wlen``) bound its used lengths.

Reconnect: :meth:`~FixedChains.restart_base` prepares the ring for a new
device behind the same memory (vhost-user) and returns the base for
SET_VRING_BASE: completions the old device published are reaped once; with
``resubmit`` every slot in flight is made available again, exactly once.

While a FixedChains is attached, the queue is used only through it;
:meth:`~FixedChains.detach` gives the queue back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from pyvirtio.errors import InvalidArgument, QueueBroken, QueueStateError

if TYPE_CHECKING:
    import numpy as np

    from pyvirtio.ring.base import RingQueue

#: One completion of a slot: (slot, bytes written).
SlotCompletion = tuple[int, int]
#: One buffer of a chain: (address, length, device-writable).
BufferSpec = tuple[int, int, bool]

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class Cycle(Protocol):
    """An engine's closed loop on a FixedChains (see the module docstring)."""

    #: The slots the last busy :meth:`turn` published (a list, or an array when vectorised).
    posted: Any
    #: Kicks sent so far (current after an idle turn, and after :meth:`sync`).
    kicks: int

    def turn(self, spins: int = 1) -> Any:
        """One pass: None if nothing happened, else the slots completed (maybe none), now spares.

        ``spins``: with everything in flight and nothing completed, look at
        the used side up to this many times before returning None (a poll
        inside the ring's loop costs less than a call from the engine's).
        """
        ...

    def sync(self) -> None:
        """Hand the ring its shadow indices (and this object its ``kicks``) if the loop holds them between
        turns; the next turn takes them up again. The fixed chains call it before any plain call of theirs."""
        ...

    def stepper(self) -> Callable[[int], Any]:
        """A callable doing what :meth:`turn` does, cheaper to call in a closed loop.

        (The split cycle's is its loop's generator ``send``: no set-up per
        pass.) After it raised, go on with :meth:`turn`, which starts afresh
        from the ring's state.
        """
        ...


class Stream(Protocol):
    """Every slot in flight at a fixed ring position (see the module docstring)."""

    #: Kicks sent so far.
    kicks: int

    def peek(self) -> int:
        """Completions seen that match the expected entries (0: none); -1: anything else (see :meth:`close`)."""
        ...

    def peek_many(self) -> tuple[Any, ...] | None:
        """:meth:`peek` with the (slots, lengths) of the completions as NumPy arrays; None if none; ``()`` if
        anything else was seen."""
        ...

    def advance(self, n: int) -> None:
        """Take the ``n`` completions just peeked, publish every slot not in flight (one store), kick if wanted."""
        ...

    def close(self) -> None:
        """Back to the plain path (``reap_slots`` validates whatever is left in the used ring)."""
        ...


class FixedChains:
    """Fixed chains, one per slot, reserved on ``ring`` (see the module docstring).

    ``FixedChains(ring, chains)`` builds the implementation for the ring's
    format. ``chains[s]`` is slot s's list of (addr, length, writable)
    buffers, device-readable ones first; ``alternate[s]``, if given, its
    other shape with as many buffers.
    """

    ring: RingQueue
    #: Number of slots.
    nslots: int
    #: What identifies each slot in the ring's used entries: split, its head descriptor; over the ring
    #: protocol (packed, IN_ORDER), the slot itself (the request's token; the ring maps buffer ids).
    heads: list[int]
    #: The slot of each id (-1: none).
    slot_of: list[int]
    #: ``heads[s] == s`` for every slot: used ids are slots.
    heads_are_slots: bool
    #: A stream is open (the plain calls are refused until it closes).
    streaming: bool

    def __new__(
        cls,
        ring: RingQueue,
        chains: Sequence[Sequence[BufferSpec]],
        *,
        alternate: Sequence[Sequence[BufferSpec]] | None = None,
    ) -> FixedChains:
        if cls is FixedChains:
            # Imported here: the implementations import this module.
            if ring.format == "split" and not ring.in_order:
                from pyvirtio.ring.fixed_split import SplitFixedChains

                return cast(FixedChains, super().__new__(SplitFixedChains))
            if ring.format == "packed" and not ring.in_order:
                from pyvirtio.ring.fixed_packed import PackedFixedChains, fits
                from pyvirtio.ring.packed import PackedQueue

                if fits(cast(PackedQueue, ring), chains):
                    return cast(FixedChains, super().__new__(PackedFixedChains))
            from pyvirtio.ring.fixed_ring import RingFixedChains

            return cast(FixedChains, super().__new__(RingFixedChains))
        return super().__new__(cls)

    # -- state ------------------------------------------------------------------

    @property
    def n_inflight(self) -> int:
        """Slots published and not yet reaped."""
        raise NotImplementedError

    @property
    def wlen(self) -> Sequence[int]:
        """Device-writable bytes of each slot's current shape (read only)."""
        raise NotImplementedError

    def in_flight(self) -> list[int]:
        """The slots in flight, in no particular order."""
        raise NotImplementedError

    def pending(self) -> int:
        """Completions the device has published and nobody has reaped (up to the first malformed entry)."""
        raise NotImplementedError

    # -- shapes -------------------------------------------------------------------

    def set_buffer(
        self, s: int, k: int, addr: int | None = None, length: int | None = None, writable: bool | None = None
    ) -> None:
        """Change buffer ``k`` of slot ``s``'s current shape (the slot must not be in flight)."""
        raise NotImplementedError

    def set_length(self, s: int, k: int, length: int) -> None:
        """Change the length of buffer ``k`` of slot ``s`` (cheaper than :meth:`set_buffer`; not in flight)."""
        raise NotImplementedError

    def length_fields(self, k: int = 0) -> tuple[memoryview | list[int], list[int]]:
        """(lengths, index): ``lengths[index[s]]`` is the length of buffer ``k`` of slot s's chain.

        For a caller whose device-readable buffer changes length per request
        (a frame to send): it stores the length there while the slot is not
        in flight, then posts the slot; one store, no call. Buffer ``k`` must
        be device-readable in every slot and shape (a writable one bounds the
        used length, which such a store would not update).
        """
        raise NotImplementedError

    def use_alternate(self, s: int, on: bool) -> None:
        """Give slot ``s`` its alternate shape (True) or its first one (the slot must not be in flight)."""
        raise NotImplementedError

    def use_alternate_many(self, slots: np.ndarray, on: np.ndarray, *, check: bool = True) -> None:
        """:meth:`use_alternate` for arrays of slots and flags (NumPy path; ``check=False``: the caller
        guarantees none of them is in flight)."""
        raise NotImplementedError

    # -- plain calls --------------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        """Publish ``slots`` at once; True if the device must be kicked."""
        raise NotImplementedError

    def reap_slots(self, max_n: int = 1 << 16, lengths: list[int] | None = None) -> list[int]:
        """Validated slots of every used entry (up to ``max_n``); lengths appended to ``lengths`` if given."""
        raise NotImplementedError

    def reap(self, max_n: int = 1 << 16) -> list[SlotCompletion]:
        """Validated (slot, bytes written) pairs of every used entry (up to ``max_n``)."""
        lengths: list[int] = []
        slots = self.reap_slots(max_n, lengths)
        return list(zip(slots, lengths, strict=True))

    # -- NumPy --------------------------------------------------------------------

    def post_many(self, slots: np.ndarray, *, check: bool = True) -> bool:
        """Publish an integer array of slots in array operations; True if the device must be kicked.

        ``check=False`` skips the "already in flight" test, for callers that
        only ever post slots they reaped.
        """
        raise NotImplementedError

    def reap_many(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Every used entry as (slots, lengths) arrays, validated in array operations; None if none."""
        raise NotImplementedError

    # -- engines ------------------------------------------------------------------

    def cycle(self, depth: int, notify: Callable[[], object], *, vectorised: bool = False) -> Cycle:
        """The closed loop of an engine: ``depth`` slots in flight, the others spares (nothing may be in flight).

        Every slot must be prepared by the caller before the first turn.
        """
        raise NotImplementedError

    def stream(self, notify: Callable[[], object], *, min_len: int = 0) -> Stream:
        """Every one-buffer slot at its own ring position, for packet engines (see the module docstring).

        Starts with no slot in flight (all are published by the first
        :meth:`Stream.advance`) or every slot in flight. A used length below
        ``min_len`` is not an expected entry (the exact path sees it).
        """
        raise NotImplementedError

    # -- interrupts, reconnect, teardown -----------------------------------------------

    def enable_interrupts(self) -> None:
        """Ask the device to signal used buffers (the ring's, kept current by every reap)."""
        self.ring.enable_interrupts()

    def disable_interrupts(self) -> None:
        """Ask the device not to signal (polling, the default)."""
        self.ring.disable_interrupts()

    def restart_base(self, resubmit: bool = True) -> int:
        """Prepare the ring for a new device behind the same memory; returns the base for SET_VRING_BASE."""
        raise NotImplementedError

    def detach(self) -> None:
        """Give the queue back (nothing may be in flight unless the queue is broken)."""
        raise NotImplementedError

    # -- shared helpers -----------------------------------------------------------------

    def check_broken(self) -> None:
        ring = self.ring
        if ring.broken is not None:
            raise QueueBroken(f"queue {ring.index} is broken: {ring.broken}")

    def check_depth(self, depth: int) -> None:
        """Refuse a cycle depth the slots cannot give."""
        if not 1 <= depth <= self.nslots:
            raise InvalidArgument(f"depth must be 1..{self.nslots}, got {depth}")

    def check_cycle_start(self, depth: int, held: int = 0) -> None:
        """Refuse a cycle on a broken queue, while streaming, with anything in flight (``held``: slots
        completed but not yet returned), or at a depth the slots cannot give."""
        self.check_broken()
        if self.ring.outstanding or held or self.streaming:
            raise QueueStateError("a cycle starts with nothing in flight")
        self.check_depth(depth)

    def check_stream_start(self, descs: Sequence[int], held: int = 0) -> None:
        """Refuse a stream on a broken queue, while streaming, over slots of more than one buffer (``descs``:
        each slot's count), or with some slots in flight and others not."""
        self.check_broken()
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming already")
        if any(n != 1 for n in descs):
            raise InvalidArgument("a stream needs one-buffer slots")
        if held or self.ring.outstanding not in (0, self.nslots):
            raise QueueStateError("a stream starts with no slot or every slot in flight")


class ListArrays(FixedChains):
    """The NumPy calls for API parity, over the plain ones (lists converted to arrays and back)."""

    def use_alternate_many(self, slots: np.ndarray, on: np.ndarray, *, check: bool = True) -> None:
        for s, v in zip(slots.tolist(), on.tolist(), strict=True):
            self.use_alternate(s, bool(v))

    def post_many(self, slots: np.ndarray, *, check: bool = True) -> bool:
        if not len(slots):
            return False
        return self.post(slots.tolist())

    def reap_many(self) -> tuple[np.ndarray, np.ndarray] | None:
        import numpy as np

        lengths: list[int] = []
        slots = self.reap_slots(1 << 16, lengths)
        if not slots:
            return None
        return np.asarray(slots, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def changed_buffer(
    form: Sequence[Sequence[Any]], s: int, k: int, addr: int | None, length: int | None, writable: bool | None
) -> list[Any]:
    """Buffer ``k`` of slot ``s``'s shape ``form`` with the changes given (None: unchanged), checked."""
    if not 0 <= k < len(form):
        raise InvalidArgument(f"slot {s} has {len(form)} buffers, not {k + 1}")
    old = form[k]
    new = [old[0] if addr is None else addr, old[1] if length is None else length,
           old[2] if writable is None else bool(writable)]
    if not (0 <= new[1] <= _U32 and 0 <= new[0] <= _U64):
        raise InvalidArgument(f"bad buffer addr=0x{new[0]:x} length={new[1]}")
    if (k and form[k - 1][2] and not new[2]) or (k + 1 < len(form) and new[2] and not form[k + 1][2]):
        raise InvalidArgument(f"slot {s}: a device-readable buffer after a writable one (§2.7.4.2)")
    return new


def check_length_field(shapes: Sequence[Sequence[Sequence[Sequence[Any]]]], k: int) -> None:
    """Refuse :meth:`FixedChains.length_fields` for a buffer that is missing or device-writable somewhere."""
    for s, forms in enumerate(shapes):
        for form in forms:
            if not 0 <= k < len(form):
                raise InvalidArgument(f"slot {s} has {len(form)} buffers, not {k + 1}")
            if form[k][2]:
                raise InvalidArgument(f"buffer {k} of slot {s} is device-writable: its length bounds the used length")


def chain_shapes(
    chains: Sequence[Sequence[BufferSpec]], alternate: Sequence[Sequence[BufferSpec]] | None
) -> list[list[list[BufferSpec]]]:
    """Validate the chains and return the shapes of every slot: [[first], [first, alternate]...]."""
    if not chains:
        raise InvalidArgument("fixed chains need at least one slot")
    if alternate is not None and len(alternate) != len(chains):
        raise InvalidArgument(f"{len(alternate)} alternate chains for {len(chains)} slots")
    shapes: list[list[list[BufferSpec]]] = []
    for s, chain in enumerate(chains):
        forms = [list(chain)] if alternate is None else [list(chain), list(alternate[s])]
        for form in forms:
            if not form:
                raise InvalidArgument("every chain needs at least one buffer")
            seen_writable = False
            for addr, length, writable in form:
                if not (0 <= length <= _U32 and 0 <= addr <= _U64):
                    raise InvalidArgument(f"slot {s}: bad buffer addr=0x{addr:x} length={length}")
                if seen_writable and not writable:
                    raise InvalidArgument(f"slot {s}: a device-readable buffer after a writable one (§2.7.4.2)")
                seen_writable = seen_writable or bool(writable)
        if len(forms) == 2 and len(forms[1]) != len(forms[0]):
            raise InvalidArgument(f"slot {s}: the alternate chain has {len(forms[1])} buffers, not {len(forms[0])}")
        shapes.append(forms)
    return shapes


__all__ = [
    "BufferSpec",
    "Cycle",
    "FixedChains",
    "ListArrays",
    "SlotCompletion",
    "Stream",
    "chain_shapes",
    "changed_buffer",
    "check_length_field",
]
