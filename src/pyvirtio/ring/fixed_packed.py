"""Fixed chains on a packed ring: the batch fast path of :class:`~pyvirtio.ring.packed.PackedQueue`.

Theory of operation (the API and its rules: :mod:`pyvirtio.ring.fixed`).
Buffer id = slot: the ring reserves ids 0 .. nslots-1 for us
(:meth:`PackedQueue.reserve_ids <pyvirtio.ring.packed.PackedQueue.reserve_ids>`)
and shares its shadow lists, so the in-flight state has one truth: the
ring's per-id token (the slot while in flight, the ring's idle token
otherwise), ring slots held and device-writable bytes. Each slot's
descriptors are prepared once as bytes per lap (address, length, id, flags
with that lap's AVAIL/USED bits, virtio 1.2 §2.8.1), the head's flags in the
image being "not available" in that lap. Posting a slot is one slice store
of its image at the next ring positions, then the head's real flags, last,
behind the write barrier (§2.8.6, §2.8.21.1: the device polls the head, so
it never sees part of a chain). Slots posted together whose descriptors
fit before the end of the ring (a run) go in one store, every head but the
first's available, then the first head's flags (as the cycle writes a
batch). A chain that runs past the end of the ring is written in two parts,
the second with the next lap's bits. A batch makes
one kick decision from the device's event suppression structure (§2.8.10:
DISABLE, ENABLE, or DESC with VIRTIO_F_RING_EVENT_IDX).

Reaping reads used descriptors at the ring's used position while their
AVAIL/USED bits both equal the used wrap counter (§2.8.1), and checks each
(§2.8.4, §2.8.6): something in flight, id in range and in flight, length
(reserved, taken as 0, without VIRTQ_DESC_F_WRITE) within the slot's
device-writable bytes; a slot's descriptors are skipped by its descriptor
count. A descriptor at the used position that is neither used nor the
available pattern of that lap (a wrong wrap counter) is an error too. On
any anomaly the progress so far is committed to the ring and the ring's own
:meth:`~pyvirtio.ring.packed.PackedQueue.reap` takes over from the bad
descriptor: it raises :class:`~pyvirtio.errors.DeviceProtocolError` (whose
``completed`` gets the entries validated here in front) or, with
``clamp_used_len``, returns the rest with overlong lengths clamped. One set
of rules, stated in :mod:`pyvirtio.ring.packed`.

The ring's shadow state (``next_avail``, ``avail_bits``, ``next_used``,
``used_bits``, ``num_free``, ``outstanding``, the per-id lists) is current
after every call, so the ring's ``pending``, ``restart_base`` (a reconnect:
its completions wait in the ring's stash, which every reap here takes
first), ``in_flight_tokens`` and ``reset`` see the truth. The fast path's
kick decisions are its own: its publications never enter the ring's
``kick_prepare`` window.

The engines' loops are in :mod:`pyvirtio.ring.cycle_packed` (the cycle) and
:mod:`pyvirtio.ring.stream_packed` (the stream). The NumPy calls
exist for API parity (lists converted to arrays and back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyvirtio.errors import DeviceProtocolError, InvalidArgument, QueueStateError
from pyvirtio.ring import ordering
from pyvirtio.ring.cycle_packed import PackedCycle
from pyvirtio.ring.fixed import BufferSpec, ListArrays, chain_shapes, changed_buffer, check_length_field
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.stream_packed import PackedStream
from pyvirtio.spec.ring import (
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PACKED_DESC_F_WRAP_BITS,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_MASK,
    RING_EVENT_WRAP_SHIFT,
    packed_need_event,
)

AVAIL = PACKED_DESC_F_AVAIL
USED = PACKED_DESC_F_USED
FLIP = PACKED_DESC_F_WRAP_BITS


def fits(ring: PackedQueue, chains: Sequence[Sequence[BufferSpec]]) -> bool:
    """Can these chains take the packed fast path (ids = slots, every slot in flight at once)?"""
    return not ring.in_order and 0 < len(chains) <= ring.size and sum(len(c) for c in chains) <= ring.size


class PackedFixedChains(ListArrays):
    """Fixed chains on a :class:`~pyvirtio.ring.packed.PackedQueue` (see the module docstring)."""

    ring: PackedQueue

    def __init__(
        self,
        ring: PackedQueue,
        chains: Sequence[Sequence[BufferSpec]],
        *,
        alternate: Sequence[Sequence[BufferSpec]] | None = None,
    ) -> None:
        shapes = chain_shapes(chains, alternate)
        n = len(shapes)
        if sum(len(f[0]) for f in shapes) > ring.size:
            raise InvalidArgument(f"{n} chains need more than the {ring.size} descriptors of the queue")
        sh = ring.reserve_ids(n)
        self.ring = ring
        self.sh = sh
        self.nslots = n
        self.shapes = [[[list(b) for b in form] for form in forms] for forms in shapes]
        self.alt_now = bytearray(n)
        self.heads = list(range(n))
        self.slot_of = list(range(n)) + [-1] * (ring.size - n)
        self.heads_are_slots = True
        # Per slot, per lap (1: avail wrap counter 1, 0: wrap 0): its descriptors as bytes, and the head's flags.
        self.img1: list[bytes] = [b""] * n
        self.img0: list[bytes] = [b""] * n
        self.hf1 = [0] * n
        self.hf0 = [0] * n
        # The same images with the head available too: a batch's slots after its first (the cycle's store).
        self.av1: list[bytes] = [b""] * n
        self.av0: list[bytes] = [b""] * n
        self.streaming = False
        # length_fields: the caller's lengths of buffer ``vol_k`` (None: not handed out), written at each post.
        self.vol: list[int] | None = None
        self.vol_k = 0
        for s in range(n):
            self._write_slot(s)
        self.o16 = [16 * p for p in range(ring.size + 1)]  # byte offset of each ring slot (no multiplication)
        counts = {len(forms[0]) for forms in self.shapes}
        self.n1 = counts.pop() if len(counts) == 1 else 0  # descriptors of every slot (0: they differ)

    def _write_slot(self, s: int) -> None:
        """Prepare slot s's current shape: images, head flags, the ring's shadow entries for id s."""
        form = self.shapes[s][self.alt_now[s]]
        last = len(form) - 1
        sh = self.sh
        parts1: list[bytes] = []
        parts0: list[bytes] = []
        wlen = 0
        bufs = []
        for k, (addr, length, writable) in enumerate(form):
            f = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if k < last else 0)
            if k == 0:
                self.hf1[s] = f | AVAIL
                self.hf0[s] = f | USED
                f1, f0 = 0, FLIP  # the head in the image: not available in its lap (AVAIL/USED = !wrap)
            else:
                f1, f0 = f | AVAIL, f | USED
            parts1.append(PACKED_DESC.pack(addr, length, s, f1))
            parts0.append(PACKED_DESC.pack(addr, length, s, f0))
            if writable:
                wlen += length
            bufs.append((addr, length, bool(writable)))
        self.img1[s] = b"".join(parts1)
        self.img0[s] = b"".join(parts0)
        self.av1[s] = self.img1[s][:14] + self.hf1[s].to_bytes(2, "little") + self.img1[s][16:]
        self.av0[s] = self.img0[s][:14] + self.hf0[s].to_bytes(2, "little") + self.img0[s][16:]
        sh.ndescs[s] = len(form)
        sh.wlen[s] = wlen
        sh.bufs[s] = bufs

    def fold(self) -> None:
        """Take the lengths stored through :meth:`length_fields` into the shapes (before they are read)."""
        vol = self.vol
        if vol is None:
            return
        k = self.vol_k
        for s in range(self.nslots):
            b = self.shapes[s][self.alt_now[s]][k]
            if b[1] != vol[s]:
                b[1] = vol[s]
                self._write_slot(s)

    # -- state ------------------------------------------------------------------

    @property
    def n_inflight(self) -> int:
        return self.ring.outstanding

    @property
    def wlen(self) -> Sequence[int]:
        return self.sh.wlen[: self.nslots]

    def in_flight(self) -> list[int]:
        sh = self.sh
        idle = sh.idle
        tokens = sh.tokens
        return [s for s in range(self.nslots) if tokens[s] is not idle] + [int(t) for t, _n in sh.stash]  # type: ignore[call-overload]

    def pending(self) -> int:
        return self.ring.pending()

    def check_idle(self, s: int) -> None:
        """Refuse a change to a slot that does not exist or is in flight (or while streaming)."""
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        if not 0 <= s < self.nslots:
            raise InvalidArgument(f"slot {s} out of range (0..{self.nslots - 1})")
        if self.sh.tokens[s] is not self.sh.idle or any(t == s for t, _n in self.sh.stash):
            raise QueueStateError(f"slot {s} is in flight")

    # -- shapes -------------------------------------------------------------------

    def set_buffer(
        self, s: int, k: int, addr: int | None = None, length: int | None = None, writable: bool | None = None
    ) -> None:
        self.check_idle(s)
        self.fold()
        form = self.shapes[s][self.alt_now[s]]
        form[k] = changed_buffer(form, s, k, addr, length, writable)
        if self.vol is not None and k == self.vol_k:
            self.vol[s] = form[k][1]
        self._write_slot(s)

    def set_length(self, s: int, k: int, length: int) -> None:
        self.set_buffer(s, k, length=length)

    def length_fields(self, k: int = 0) -> tuple[list[int], list[int]]:
        check_length_field(self.shapes, k)
        self.fold()
        self.vol_k = k
        self.vol = [self.shapes[s][self.alt_now[s]][k][1] for s in range(self.nslots)]
        return self.vol, list(range(self.nslots))

    def use_alternate(self, s: int, on: bool) -> None:
        self.check_idle(s)
        if len(self.shapes[s]) < 2:
            raise InvalidArgument(f"slot {s} has no alternate chain")
        v = 1 if on else 0
        if self.alt_now[s] != v:
            self.fold()
            self.alt_now[s] = v
            self._write_slot(s)
            if self.vol is not None:
                self.vol[s] = self.shapes[s][v][self.vol_k][1]

    # -- plain calls --------------------------------------------------------------

    def post(self, slots: Sequence[int]) -> bool:
        self.check_broken()
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        # Checked before anything is written: a refused post publishes nothing (no kick decision is lost).
        tokens = self.sh.tokens
        idle = self.sh.idle
        n = self.nslots
        for s in slots:
            if not 0 <= s < n:
                raise InvalidArgument(f"slot {s} out of range (0..{n - 1})")
            if tokens[s] is not idle:
                raise QueueStateError(f"slot {s} is already in flight")
        if len(slots) > 1 and len(set(slots)) != len(slots):
            raise QueueStateError("a slot posted twice in one call")
        return self.publish(slots)

    def publish(self, slots: Sequence[int]) -> bool:
        """Write and publish ``slots`` (each head's flags last), make the kick decision; True: kick.

        The slots must be idle (a slot in flight raises QueueStateError; the slots before it stay published).
        """
        ring = self.ring
        sh = self.sh
        desc = sh.desc
        fl = sh.flags
        o16 = self.o16
        tokens = sh.tokens
        idle = sh.idle
        nd = sh.ndescs
        vol = self.vol
        size = ring.size
        pos = ring.next_avail
        bits = ring.avail_bits
        n1 = self.n1 if vol is None else 0
        total = 0
        count = 0
        i = 0
        nslots = len(slots)
        try:
            while i < nslots:
                if bits == AVAIL:
                    img, av, hf = self.img1, self.av1, self.hf1
                else:
                    img, av, hf = self.img0, self.av0, self.hf0
                k = min(nslots - i, (size - 1 - pos) // n1) if n1 else 0
                if k > 1:
                    # A run of slots wholly before the end of the ring, as the cycle writes a batch: in one
                    # store, the first with its head not available, then (barrier) the first head's flags.
                    run = slots[i : i + k]
                    if all(tokens[s] is idle for s in run):
                        first = run[0]
                        parts = [av[s] for s in run]
                        parts[0] = img[first]
                        end = pos + n1 * k
                        desc[o16[pos] : o16[end]] = b"".join(parts)
                        for s in run:
                            tokens[s] = s
                        if not ordering.STRONGLY_ORDERED:
                            ordering.write_barrier()
                        fl[pos] = hf[first]
                        pos = end
                        total += n1 * k
                        count += k
                        i += k
                        continue
                # One slot: across the end of the ring, of its own length or size, or alone.
                s = slots[i]
                i += 1
                if tokens[s] is not idle:
                    raise QueueStateError(f"slot {s} is already in flight")
                n = nd[s]
                head = pos
                end = pos + n
                if end < size:
                    desc[o16[pos] : o16[end]] = img[s]
                    h = hf[s]
                    pos = end
                else:
                    h, pos, bits = self.write_wrapping(s, pos, bits)
                if vol is not None:
                    p = head + self.vol_k
                    sh.lens[p - size if p >= size else p] = vol[s]
                tokens[s] = s
                if not ordering.STRONGLY_ORDERED:
                    ordering.write_barrier()
                fl[head] = h  # the head's flags last (§2.8.21.1)
                total += n
                count += 1
        finally:
            ring.next_avail = pos
            ring.avail_bits = bits
            ring.num_free -= total
            ring.outstanding += count
        return self.kick_needed(total)

    def write_wrapping(self, s: int, pos: int, bits: int) -> tuple[int, int, int]:
        """Write slot s's descriptors from ``pos`` up to and past the end of the ring (the rest in the next
        lap); returns (head flags, next position, next lap's bits)."""
        size = self.ring.size
        first = (self.img1, self.hf1) if bits == AVAIL else (self.img0, self.hf0)
        nxt = self.img0 if bits == AVAIL else self.img1
        c = size - pos
        n = self.sh.ndescs[s]
        desc = self.sh.desc
        desc[16 * pos : 16 * size] = first[0][s][: 16 * c]
        if n > c:
            desc[0 : 16 * (n - c)] = nxt[s][16 * c : 16 * n]
        return first[1][s], n - c, bits ^ FLIP

    def across(self, slots: Sequence[int], pos: int, bits: int) -> tuple[bytes, bytes]:
        """The descriptors of a batch of n1-descriptor slots written from ``pos`` across the end of the ring:
        (the bytes from ``pos`` to the end, the bytes from slot 0 of the next lap on).

        As the cycle's one-store batch: the first slot's head not available (its flags are written
        last, by the caller), every other descriptor available in the lap it lies in (the next lap's
        bits after the end, a slot that straddles the end split between the two, §2.8.1).
        """
        n1 = self.n1
        first = slots[0]
        if bits == AVAIL:
            img, av, nxt = self.img1, self.av1, self.av0
        else:
            img, av, nxt = self.img0, self.av0, self.av1
        j, d = divmod(self.ring.size - pos, n1)  # j slots wholly before the end, then d descriptors of slot j
        before = list(map(av.__getitem__, slots[:j]))
        after = list(map(nxt.__getitem__, slots[j:]))
        if d:  # slot j straddles the end: its first d descriptors in this lap, the rest in the next
            cut = 16 * d
            before.append((img[first] if j == 0 else av[slots[j]])[:cut])
            after[0] = after[0][cut:]
        if j:
            before[0] = img[first]
        return b"".join(before), b"".join(after)

    def kick_needed(self, count: int) -> bool:
        """The kick decision for ``count`` descriptors just made available (§2.8.10, as PackedQueue.kick_prepare)."""
        if not count:
            return False
        ordering.fence_acquire()  # §2.8.21.3.1: the flags exposed before the device's structure is read
        ordering.fence_release()
        dev = self.sh.device16
        flags = dev[1] & RING_EVENT_FLAGS_MASK
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        ring = self.ring
        if flags == RING_EVENT_FLAGS_DESC and ring.event_idx:
            return packed_need_event(dev[0], ring.next_avail, 1 if ring.avail_bits == AVAIL else 0, count, ring.size)
        return True

    def take(self, max_n: int, slots: list[int], lens: list[int]) -> None:
        """Validated completions, up to ``max_n``, appended to ``slots`` / ``lens`` (the ring's stash first).

        Raises DeviceProtocolError as the ring's reap (whose ``completed`` holds
        every completion validated by this call), QueueBroken on a broken queue.
        """
        ring = self.ring
        if ring.broken is not None:
            self.check_broken()
        sh = self.sh
        stash = sh.stash
        first = len(slots)
        if stash:  # completions a reconnect validated (restart_base)
            got = stash[:max_n]
            del stash[:max_n]
            ring.outstanding -= len(got)
            for s, n in got:
                slots.append(s)  # type: ignore[arg-type]  # tokens are slots
                lens.append(n)
            max_n -= len(got)
            if max_n <= 0:
                return
        fl = sh.flags
        pos = ring.next_used
        ub = ring.used_bits
        flags = fl[pos]
        left = ring.outstanding
        if flags & FLIP != ub:
            if left and flags & FLIP != ub ^ USED:
                self.exact(max_n, slots, lens, first)  # raises: a wrong wrap counter
            return
        ids = sh.ids
        lv = sh.lens
        tokens = sh.tokens
        idle = sh.idle
        wlen = sh.wlen
        nd = sh.ndescs
        size = ring.size
        k = nfree = 0
        while True:
            if not ordering.STRONGLY_ORDERED:
                ordering.read_barrier()
            bid = ids[pos]
            length = lv[pos] if flags & DESC_F_WRITE else 0  # §2.8.4: reserved without WRITE
            if not left or bid >= size or tokens[bid] is idle or length > wlen[bid]:
                break
            tokens[bid] = idle
            slots.append(bid)
            lens.append(length)
            n = nd[bid]
            nfree += n
            pos += n
            if pos >= size:
                pos -= size
                ub ^= FLIP
            left -= 1
            k += 1
            if k >= max_n:
                flags = -1
                break
            flags = fl[pos]
            if flags & FLIP != ub:
                if not left or flags & FLIP == ub ^ USED:
                    flags = -1
                break
        ring.next_used = pos
        ring.used_bits = ub
        ring.num_free += nfree
        ring.outstanding = left
        if ring.interrupts_enabled and ring.event_idx:
            sh.driver16[0] = pos | (1 if ub else 0) << RING_EVENT_WRAP_SHIFT
        if flags != -1:
            self.exact(max_n - k, slots, lens, first)

    def exact(self, max_n: int, slots: list[int], lens: list[int], first: int) -> None:
        """The descriptor at the used position failed the quick check: the ring's reap takes it from there.

        It raises DeviceProtocolError (the completions of this call from
        ``first`` on are put in front of its ``completed``), or, with
        ``clamp_used_len``, returns the rest with overlong lengths clamped.
        """
        try:
            more = self.ring.reap(max_n)
        except DeviceProtocolError as exc:
            exc.completed[:0] = list(zip(slots[first:], lens[first:], strict=True))
            raise
        for s, n in more:
            slots.append(s)  # type: ignore[arg-type]  # tokens are slots
            lens.append(n)

    def reap_slots(self, max_n: int = 1 << 16, lengths: list[int] | None = None) -> list[int]:
        if self.streaming:
            raise QueueStateError("this FixedChains is streaming: close the stream first")
        slots: list[int] = []
        self.take(max_n, slots, [] if lengths is None else lengths)
        return slots

    # -- NumPy --------------------------------------------------------------------

    # (post_many, reap_many, use_alternate_many: ListArrays, over the plain calls)

    # -- engines ------------------------------------------------------------------

    def cycle(self, depth: int, notify: Callable[[], object], *, vectorised: bool = False) -> PackedCycle:
        self.check_cycle_start(depth)
        return PackedCycle(self, depth, notify, vectorised)

    def stream(self, notify: Callable[[], object], *, min_len: int = 0) -> PackedStream:
        self.check_stream_start(self.sh.ndescs[: self.nslots], len(self.sh.stash))
        return PackedStream(self, notify, min_len)

    # -- interrupts, reconnect, teardown -----------------------------------------------

    def restart_base(self, resubmit: bool = True) -> int:
        self.fold()  # a resubmission writes the chains from the ring's shadow buffers
        return self.ring.restart_base(resubmit)

    def detach(self) -> None:
        ring = self.ring
        if ring.outstanding and ring.broken is None:
            raise QueueStateError(f"{ring.outstanding} slots still in flight")
        if self.streaming:
            raise QueueStateError("close the stream first")
        ring.give_back_ids()


__all__ = ["PackedFixedChains", "fits"]
