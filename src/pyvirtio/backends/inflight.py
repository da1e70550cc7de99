"""Inflight I/O tracking for the embedded back ends (vhost-user.rst, "Inflight I/O tracking").

Theory of operation. A back end that crashes loses what it had popped from
the avail ring and not yet completed; the avail ring cannot tell it again,
because requests complete out of order and their avail entries get reused.
So the back end keeps a record in a shared area that outlives it: it
creates the area (a memfd) when the frontend asks (GET_INFLIGHT_FD), the
frontend keeps the fd and hands it to every later back end
(SET_INFLIGHT_FD), and a restarted back end reads there what its
predecessor had in flight and resubmits it, oldest first.

Layout (split rings; the same as libvhost-user and DPDK): one region per
queue, each :func:`queue_region_size` bytes (64-byte aligned)::

    header   features u64 (0), version u16 (1; 0 = not initialised yet),
             desc_num u16 (entries), last_batch_head u16, used_idx u16
    desc[i]  inflight u8, padding[5], next u16, counter u64     (16 bytes each)

Protocol, per queue (:class:`QueueInflight`): when a chain is popped,
``desc[head].counter`` takes the next value of a counter and
``desc[head].inflight`` is set (:meth:`~QueueInflight.begin`); after the used
entries of a batch are published (used index stored), their flags are
cleared and ``used_idx`` is set to the used index (:meth:`~QueueInflight.end`).
A back end that died between those two steps leaves ``used_idx`` behind
the ring's used index; :meth:`~QueueInflight.recover` then clears the
flags of the used entries in between (read from the used ring itself, so a
batch of any size is covered, where libvhost-user's ``last_batch_head``
covers one entry), and returns the heads still in flight ordered by
counter. The ring then resumes at ``used_idx + len(heads)``.

The area is written by the frontend's process too (it holds the fd), so it
is not trusted: a head outside the ring is ignored, a chain is walked with
every usual check, and the sizes in SET_INFLIGHT_FD are checked against the
file. Only :mod:`pyvirtio.memory` maps it.
"""

from __future__ import annotations

import os
import stat

from pyvirtio.errors import DriverProtocolError, PyvirtioError
from pyvirtio.memory import PAGE_SIZE, Region
from pyvirtio.protocol.vhost_user import InflightInfo
from pyvirtio.ring import ordering
from pyvirtio.ring.device_side import DeviceQueue
from pyvirtio.spec.ring import MAX_QUEUE_SIZE

HEADER_SIZE = 16
ENTRY_SIZE = 16
VERSION = 1
_ALIGN = 64


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region for ``queue_size`` descriptors (header + entries, 64-byte aligned)."""
    return (HEADER_SIZE + ENTRY_SIZE * queue_size + _ALIGN - 1) // _ALIGN * _ALIGN


class QueueInflight:
    """One queue's region of the area: mark popped heads, clear completed ones, recover."""

    __slots__ = ("index", "desc_num", "_bytes", "_h16", "_q64", "counter")

    def __init__(self, view: memoryview, index: int, desc_num: int) -> None:
        self.index = index
        self.desc_num = desc_num
        self._bytes = view
        self._h16 = view[:HEADER_SIZE].cast("H")  # [4] version, [5] desc_num, [6] last_batch_head, [7] used_idx
        self._q64 = view.cast("Q")  # counter of entry i at 3 + 2 * i
        self.counter = 0

    @property
    def used_idx(self) -> int:
        return int(self._h16[7])

    def begin(self, head: int) -> None:
        """``head`` was popped: it is in flight from now on."""
        self._q64[3 + 2 * head] = self.counter
        self.counter += 1
        ordering.write_barrier()  # the counter before the flag that makes it count
        self._bytes[HEADER_SIZE + ENTRY_SIZE * head] = 1

    def end(self, heads: list[int], used_idx: int) -> None:
        """``heads`` were published in the used ring, whose index is now ``used_idx``."""
        b = self._bytes
        for head in heads:
            b[HEADER_SIZE + ENTRY_SIZE * head] = 0
        if heads:
            self._h16[6] = heads[-1]
        ordering.write_barrier()
        self._h16[7] = used_idx

    def recover(self, queue: DeviceQueue) -> list[int]:
        """Heads the previous back end left in flight on ``queue``, oldest first (see the module docstring)."""
        size = queue.size
        h16 = self._h16
        b = self._bytes
        if h16[4] == 0:  # a fresh area: nothing was ever in flight
            h16[4] = VERSION
            h16[5] = self.desc_num
            h16[7] = queue.used_idx
            self.counter = 0
            return []
        used_idx = queue.used_idx
        behind = (used_idx - h16[7]) & 0xFFFF
        if behind:
            # Died after publishing used entries, before clearing their flags.
            start = h16[7]
            for k in range(min(behind, size)):
                head = queue.used_id(start + k)
                if head < self.desc_num:
                    b[HEADER_SIZE + ENTRY_SIZE * head] = 0
            h16[7] = used_idx
        q64 = self._q64
        heads = []
        top = -1
        for head in range(self.desc_num):
            if b[HEADER_SIZE + ENTRY_SIZE * head]:
                if head >= size:
                    b[HEADER_SIZE + ENTRY_SIZE * head] = 0  # outside the ring: cannot be a request of it
                    continue
                heads.append(head)
                top = max(top, q64[3 + 2 * head])
        heads.sort(key=lambda h: q64[3 + 2 * h])
        self.counter = top + 1
        return heads

    def release(self) -> None:
        for v in (self._h16, self._q64, self._bytes):
            v.release()


class InflightArea:
    """The shared area of every queue, mapped from the fd of GET/SET_INFLIGHT_FD."""

    def __init__(self, region: Region, num_queues: int, queue_size: int) -> None:
        self.region = region
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._queues: dict[int, QueueInflight] = {}

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightArea:
        """A new zeroed area (memfd) for GET_INFLIGHT_FD."""
        size = num_queues * queue_region_size(queue_size)
        region = Region.create(size, name="pyvirtio-inflight")
        return cls(region, num_queues, queue_size)

    @classmethod
    def attach(
        cls, fd: int, info: InflightInfo, error: type[PyvirtioError] = DriverProtocolError
    ) -> InflightArea:
        """Map the area a frontend sent with SET_INFLIGHT_FD; takes ``fd`` (closed on failure)."""
        try:
            if not 1 <= info.num_queues <= 0xFFFF or not 1 <= info.queue_size <= MAX_QUEUE_SIZE:
                raise error(f"SET_INFLIGHT_FD: {info.num_queues} queues of {info.queue_size} descriptors")
            need = info.num_queues * queue_region_size(info.queue_size)
            if info.mmap_size < need:
                raise error(f"SET_INFLIGHT_FD: {info.mmap_size} bytes for {need} needed")
            if info.mmap_offset % PAGE_SIZE:
                raise error(f"SET_INFLIGHT_FD: mmap_offset 0x{info.mmap_offset:x} is not page aligned")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise error("SET_INFLIGHT_FD: the fd is not a regular file (memfd, tmpfs)")
            if st.st_size < info.mmap_offset + info.mmap_size:
                raise error(
                    f"SET_INFLIGHT_FD: {info.mmap_size} bytes at {info.mmap_offset} exceed the file ({st.st_size})"
                )
            try:
                region = Region(fd, info.mmap_size, fd_offset=info.mmap_offset, owns_fd=True)
            except (OSError, ValueError, OverflowError) as exc:
                raise error(f"SET_INFLIGHT_FD: cannot map the area: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(region, info.num_queues, info.queue_size)

    @property
    def fd(self) -> int:
        return self.region.fd

    @property
    def info(self) -> InflightInfo:
        return InflightInfo(self.region.size, 0, self.num_queues, self.queue_size)

    def queue(self, index: int) -> QueueInflight | None:
        """Queue ``index``'s region, or None if the area has none for it."""
        if not 0 <= index < self.num_queues:
            return None
        q = self._queues.get(index)
        if q is None:
            size = queue_region_size(self.queue_size)
            view = self.region.view[index * size : (index + 1) * size]
            q = QueueInflight(view, index, self.queue_size)
            self._queues[index] = q
        return q

    def close(self) -> None:
        for q in self._queues.values():
            q.release()
        self._queues.clear()
        self.region.close()


__all__ = ["ENTRY_SIZE", "HEADER_SIZE", "InflightArea", "QueueInflight", "VERSION", "queue_region_size"]
