"""The two rings of a virtio-net queue pair, as the driver keeps them (virtio 1.2 §5.1.2, §5.1.6).

Theory of operation. A queue pair is receive queue ``2i`` and transmit queue
``2i + 1`` (virtio 1.2 §5.1.2). Each ring has one single-buffer chain per
*slot*, laid out once in one buffer of the driver's pool and posted through
the ring's batch fast path (:class:`~pyvirtio.ring.fixed.FixedChains`, either
ring format): posting n slots publishes them with one kick decision (on a
split ring without VIRTIO_F_IN_ORDER the chains are pre-linked once and
posting is n avail-ring stores and one index store), and reaping validates
every used entry (the id must be a slot in flight, the length must fit the
slot; a transmit entry must report 0 bytes written), a violation marking the
queue broken (:class:`~pyvirtio.errors.DeviceProtocolError`, carrying the
slots completed before it, which go back where they belong here).

:class:`RxQueue`: slot s is a device-writable buffer of ``buf_size`` bytes at
``buf_size * s``. Every slot is posted except those whose frames the caller
holds (``held``, with the memoryviews handed out in ``views``);
:meth:`RxQueue.recycle` releases those views and re-posts their slots, which
is the recycling rule of :mod:`pyvirtio.drivers.net`. A frame the device
spread over several buffers (MRG_RXBUF: the first header's ``num_buffers``,
virtio 1.2 §5.1.6.4) is collected in ``partial`` until its last buffer
arrives, possibly at a later poll; :meth:`RxQueue.merge_piece` then gathers
it into one ``bytes`` and re-posts its buffers at once.

:class:`TxQueue`: slot s holds header + frame at ``slot_size * s``, and only
its length changes per frame (written through ``lengths[length_at[s]]``, the
ring's own length fields). ``free`` lists the slots out of the device's
hands; :meth:`TxQueue.reclaim` takes back the completed ones. ``hdr_dirty``
marks slots whose header is not the zero header, so a frame sent without a
header after one sent with it gets the zero header back.

These objects hold state and the per-queue steps; the per-call loops
(``send_batch``, ``recv_batch``) stay in :class:`~pyvirtio.drivers.net.VirtioNet`,
so a call costs no more Python calls than it needs. :class:`QueuePair`
also records the thread that owns the pair.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.net_frames import HDR_SIZE, NetHdr
from pyvirtio.errors import DeviceProtocolError
from pyvirtio.memory import Buffer, MemoryPool
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.spec import net as N


class RxQueue:
    """A receive ring: one writable buffer per slot, all posted but those the caller holds."""

    def __init__(self, device: VirtioDevice, index: int, buf_size: int) -> None:
        vq = device.queue(index)
        self.vq = vq
        self.transport = device.transport
        self.index = index
        self.nslots = vq.size
        self.buf_size = buf_size
        self.buf: Buffer = device.pool.allocate(buf_size * self.nslots, align=4096)
        self.view = self.buf.view
        self.h16 = self.view.cast("H")
        base = self.buf.addr
        self.fixed = FixedChains(vq.ring, [[(base + buf_size * s, buf_size, True)] for s in range(self.nslots)])
        self.held: list[int] = []  # slots whose frames the caller holds
        self.views: list[memoryview] = []
        self.partial: list[tuple[int, int]] = []  # (slot, length) of a merged frame in progress
        self.partial_want = 0
        self.frames = 0
        self.bytes = 0
        self.errors = 0
        self.merged = 0

    def recycle(self) -> None:
        """Release the views handed out by the last receive call and re-post their buffers."""
        if self.views:
            for v in self.views:
                try:
                    v.release()
                except BufferError:
                    pass  # the caller exported it (e.g. numpy): the buffer is re-posted anyway
            self.views = []
        if self.held:
            held, self.held = self.held, []
            if self.fixed.post(held):
                self.transport.notify_queue(self.index)

    def merge_piece(self, s: int, ln: int, out: list[Any], with_headers: bool) -> int:
        """Add one buffer to the merged frame in progress; 1 if that completed it (counted here)."""
        self.partial.append((s, ln))
        if len(self.partial) < self.partial_want:
            return 0
        view = self.view
        bs = self.buf_size
        first, first_len = self.partial[0]
        base = bs * first
        parts = [view[base + HDR_SIZE : base + first_len]]
        parts.extend(view[bs * t : bs * t + n] for t, n in self.partial[1:])
        data = b"".join(parts)
        hdr = NetHdr(*N.HDR.unpack_from(view, base))
        for part in parts:
            part.release()
        slots = [t for t, _ in self.partial]
        self.partial = []
        self.partial_want = 0
        if self.fixed.post(slots):
            self.transport.notify_queue(self.index)
        self.merged += 1
        self.frames += 1
        self.bytes += len(data)
        v = memoryview(data)
        out.append((v, hdr) if with_headers else v)
        return 1

    def close(self, pool: MemoryPool) -> None:
        for v in self.views:
            try:
                v.release()
            except BufferError:
                pass
        self.views = []
        self.h16.release()
        self.view = memoryview(b"")
        pool.free(self.buf)


class TxQueue:
    """A transmit ring: one readable header+frame buffer per slot."""

    def __init__(self, device: VirtioDevice, index: int, slot_size: int) -> None:
        vq = device.queue(index)
        self.vq = vq
        self.index = index
        self.nslots = vq.size
        self.slot_size = slot_size
        self.buf: Buffer = device.pool.allocate(slot_size * self.nslots, align=4096)
        self.view = self.buf.view
        base = self.buf.addr
        self.fixed = FixedChains(vq.ring, [[(base + slot_size * s, HDR_SIZE, False)] for s in range(self.nslots)])
        # Where each slot's frame length is written before it is posted.
        self.lengths: memoryview | list[int]
        self.lengths, self.length_at = self.fixed.length_fields()
        self.free: list[int] = list(range(self.nslots - 1, -1, -1))
        self.hdr_dirty = bytearray(self.nslots)
        self.frames = 0
        self.bytes = 0

    def reclaim(self) -> int:
        """Take back the slots the device has finished with; returns how many."""
        try:
            slots = self.fixed.reap_slots()
        except DeviceProtocolError as exc:
            self.free.extend(s for s, _ in exc.completed)  # type: ignore[misc]
            raise
        self.free.extend(slots)
        return len(slots)

    def close(self, pool: MemoryPool) -> None:
        self.view = memoryview(b"")
        pool.free(self.buf)


class QueuePair:
    """Queue pair ``index``: its two rings and the thread that owns it."""

    __slots__ = ("index", "rx", "tx", "owner", "reader_loop", "waiters")

    def __init__(self, index: int, rx: RxQueue, tx: TxQueue) -> None:
        self.index = index
        self.rx = rx
        self.tx = tx
        self.owner: int | None = None
        self.reader_loop: Any = None
        self.waiters: list[Any] = []


__all__ = ["QueuePair", "RxQueue", "TxQueue"]
