"""Server target on packed rings: the embedded vhost-user back end, a hostile frontend, VIRTIO_F_RING_PACKED.

The twin of :mod:`fuzz._server` (same harness, same checks: declared end
of the connection, no hang, well-formed replies, no fd leaked, and a
normal frontend served afterwards, here on packed rings). The session
(:class:`PackedSession`) asks for RING_PACKED in every honest handshake and
lays its rings out as packed virtqueues (virtio 1.2 §2.8): a descriptor
ring of any size (not only powers of two) followed by the driver and
device event suppression areas, SET_VRING_BASE with the 32-bit packed
ring state (positions and wrap counters; fuzzed values too), descriptors
with buffer ids and AVAIL/USED flags, chains written head last with the
flags of the frontend's current lap, and fuzzed flags, ids and positions
for the hostile cases: descriptors available in the wrong lap, chains
running off the ring's end, INDIRECT with NEXT, ids out of range, used
flags written by the "driver".
"""

from __future__ import annotations

from fuzz._server import GPA_BASE, RING_SLOT, RingSpec, Session, serve_fuzzed
from pyvirtio.spec.common import F_RING_PACKED
from pyvirtio.spec.ring import (
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    packed_base,
)

_BOTH = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED


def _lap_bits(wrap: int) -> int:
    """AVAIL/USED of a descriptor made available in a lap with driver wrap counter ``wrap`` (§2.8.1)."""
    return PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED


class PackedSession(Session):
    """:class:`fuzz._server.Session` with packed rings (module docstring)."""

    ring_features = 1 << F_RING_PACKED

    def op_ring(self) -> None:
        """A packed ring's SET_VRING_NUM/BASE/ADDR/KICK/CALL(/ERR)(/ENABLE), honest or not."""
        fi = self.fi
        index = fi.below(4)
        if fi.flag():  # honest: any size up to what fits a ring slot, areas where they belong
            num = 1 + fi.below(RING_SLOT // 16 - 1)
            desc = index * RING_SLOT
            ring = RingSpec(num, desc, desc + 16 * num, desc + 16 * num + 4)
        else:
            num = fi.choose((1, 3, 256, 1 << 15, 1 << 16, 0), fi.u32)
            ring = RingSpec(num, fi.u16() & ~15, fi.u16() & ~3, fi.u16() & ~3)
        which = fi.below(4)
        if which == 0:  # a fresh ring
            ring.pos, ring.wrap, base = 0, 1, packed_base(0, 1, 0, 1)
        elif which == 1:  # a ring in lap 0, every slot stale for it (as pyvirtio's packed_zero_wrap starts)
            ring.pos, ring.wrap, base = 0, 0, 0
            for i in range(min(num, RING_SLOT // 16)):
                self.region_write(ring.desc + 16 * i + 14, _BOTH.to_bytes(2, "little"))
        elif which == 2:  # a restart somewhere in the ring, used side caught up
            ring.pos, ring.wrap = fi.u16() % max(num, 1), fi.below(2)
            base = packed_base(ring.pos, ring.wrap, ring.pos, ring.wrap)
        else:  # anything (positions outside the ring, halves that disagree)
            base = fi.u32()
            ring.pos, ring.wrap = base & 0x7FFF, base >> 15 & 1
        self.ring_setup(index, ring, base)

    def op_desc(self) -> None:
        """One packed descriptor with fuzzed fields (flags with any AVAIL/USED bits, any id)."""
        fi = self.fi
        ring = self.pick_ring()
        if ring is None or ring.num == 0:
            return
        i = fi.u16() % ring.num
        addr, length = self.desc_buffer()
        bid = fi.u16() if fi.below(4) == 0 else fi.u16() % ring.num
        flags = fi.u16() if fi.below(4) == 0 else (fi.u8() & 7) | _lap_bits(fi.below(2))
        self.region_write(ring.desc + 16 * i, PACKED_DESC.pack(addr, length, bid, flags))

    def op_publish(self) -> None:
        """Flags of the next slot: available in the current lap (honest), or any bits; the position moves on."""
        fi = self.fi
        ring = self.pick_ring()
        if ring is None or ring.num == 0:
            return
        pos = ring.pos % ring.num
        if fi.below(4) == 0:
            flags = fi.u16()
        else:
            flags = (fi.u8() & (DESC_F_NEXT | DESC_F_WRITE)) | _lap_bits(ring.wrap if fi.below(8) else 1 - ring.wrap)
        self.region_write(ring.desc + 16 * pos + 14, flags.to_bytes(2, "little"))
        self._advance(ring, 1)

    def can_chain(self, ring: RingSpec) -> bool:
        return ring.num > 0  # any size

    def chain(self, ring: RingSpec, first: int, parts: list[tuple[int, int, bool]]) -> None:
        """``parts`` at the frontend's position, buffer id ``next_id``, the head's flags written last."""
        n = len(parts)
        if n > ring.num:
            return  # the ring is too small for this chain
        pos, wrap = ring.pos % ring.num, ring.wrap
        bid = ring.next_id % ring.num
        ring.next_id += 1
        head: bytes | None = None
        head_pos = pos
        for k, (off, length, w) in enumerate(parts):
            flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if k + 1 < n else 0) | _lap_bits(wrap)
            raw = PACKED_DESC.pack(GPA_BASE + off, length, bid, flags)
            if k == 0:
                head = raw
                self.region_write(ring.desc + 16 * pos, raw[:14])  # all but the flags, for now
            else:
                self.region_write(ring.desc + 16 * pos, raw)
            pos += 1
            if pos == ring.num:
                pos, wrap = 0, 1 - wrap
        assert head is not None
        self.region_write(ring.desc + 16 * head_pos + 14, head[14:])
        ring.avail_idx += 1
        self._advance(ring, n)

    @staticmethod
    def _advance(ring: RingSpec, n: int) -> None:
        pos = ring.pos % ring.num + n
        if pos >= ring.num:
            pos -= ring.num
            ring.wrap = 1 - ring.wrap
        ring.pos = pos

    def drained(self, ring: RingSpec) -> bool:
        """Has the back end served as many chains as this session published (any ring)?"""
        published = sum(r.avail_idx for r in self.rings.values())
        return self.conn.backend.chains >= published


def target_server_packed(data: bytes) -> int:
    """:func:`fuzz._server.target_server` on packed rings (:class:`PackedSession`); same input format."""
    return serve_fuzzed(data, PackedSession, packed=True)
