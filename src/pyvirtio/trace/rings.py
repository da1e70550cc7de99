"""Ring sampling for ``pyvirtio trace --rings``: the frontend's memory, mapped read-only.

Theory of operation
-------------------
:class:`RingWatcher` maps every memory region the frontend hands to the back
end (SET_MEM_TABLE, ADD_MEM_REG; dropped at REM_MEM_REG) a second time, read
only (:class:`~pyvirtio.memory.Region` with ``readonly=True``: an observer
that cannot write cannot change what the two peers see), and translates
ring addresses through a :class:`~pyvirtio.memory.MemoryTable` like a back
end would (SET_VRING_ADDR carries frontend virtual addresses). A sample of a
split ring (virtio 1.2 §2.7.6, §2.7.8) reads the two 16-bit indices: the
driver's ``avail.idx`` and the device's ``used.idx``; their difference is
what is in flight. A packed ring (§2.8) has no indices in memory; its sample
reports the ring's size and the counts only.

Kicks and calls are counted by the proxy, which relays each ring's eventfds
in this mode (:mod:`pyvirtio.trace.proxy`), and stored here per ring.
Reading shared memory is not I/O in the sense of the house rules: no socket,
no eventfd, no clock.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvirtio.errors import PyvirtioError
from pyvirtio.memory import MemoryTable, Region
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.ring import AVAIL_OFF_IDX, USED_OFF_IDX
from pyvirtio.trace.decoder import SessionState

__all__ = ["RingSample", "RingWatcher"]

_U16 = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class RingSample:
    """One look at one ring: indices (split rings), in flight, kicks and calls relayed so far."""

    time: float
    index: int
    num: int
    packed: bool
    avail_idx: int | None
    used_idx: int | None
    kicks: int
    calls: int
    note: str = ""

    @property
    def in_flight(self) -> int | None:
        if self.avail_idx is None or self.used_idx is None:
            return None
        return (self.avail_idx - self.used_idx) & 0xFFFF

    def to_json(self) -> dict[str, Any]:
        return {
            "ring": self.index,
            "time": round(self.time, 6),
            "num": self.num,
            "format": "packed" if self.packed else "split",
            "avail_idx": self.avail_idx,
            "used_idx": self.used_idx,
            "in_flight": self.in_flight,
            "kicks": self.kicks,
            "calls": self.calls,
            **({"note": self.note} if self.note else {}),
        }

    def to_text(self) -> str:
        if self.avail_idx is None:
            where = self.note or "indices not sampled"
        else:
            where = f"avail {self.avail_idx} used {self.used_idx} in flight {self.in_flight}"
        kind = "packed" if self.packed else "split"
        head = f"{self.time:10.6f} ring {self.index} ({kind}, {self.num})"
        return f"{head}: {where}, kicks {self.kicks}, calls {self.calls}"


@dataclass(slots=True)
class RingWatcher:
    """Read-only mappings of the frontend's memory, and per-ring notification counts."""

    table: MemoryTable = field(default_factory=MemoryTable)
    kicks: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)

    def set_table(self, regions: tuple[vu.MemRegion, ...], fds: tuple[int, ...]) -> None:
        """SET_MEM_TABLE: the old mappings go, each new region is mapped from a dup of its fd."""
        self.table.close()
        self.table = MemoryTable()
        for region, fd in zip(regions, fds, strict=False):
            self.add(region, fd)

    def add(self, region: vu.MemRegion, fd: int) -> None:
        """ADD_MEM_REG (or one region of a table); a region that cannot be mapped is left out."""
        dup = os.dup(fd)
        try:
            mapped = Region(
                dup, region.memory_size, fd_offset=region.mmap_offset, guest_addr=region.guest_phys_addr,
                readonly=True,
            )
        except (OSError, ValueError, OverflowError, PyvirtioError):
            os.close(dup)
            return
        try:
            self.table.add(mapped, region.guest_phys_addr, region.userspace_addr)
        except PyvirtioError:
            mapped.close()

    def remove(self, region: vu.MemRegion) -> None:
        """REM_MEM_REG."""
        try:
            gone = self.table.remove(region.guest_phys_addr, region.memory_size, region.userspace_addr)
        except PyvirtioError:
            return
        if gone is not None:
            gone.region.close()

    def count_kick(self, index: int) -> None:
        self.kicks[index] = self.kicks.get(index, 0) + 1

    def count_call(self, index: int) -> None:
        self.calls[index] = self.calls.get(index, 0) + 1

    def sample(self, state: SessionState, now: float) -> list[RingSample]:
        """One sample per ring that has a size and addresses."""
        out = []
        for index in sorted(state.rings):
            ring = state.rings[index]
            if not ring.num or ring.addr is None:
                continue
            kicks, calls = self.kicks.get(index, 0), self.calls.get(index, 0)
            if state.packed:
                out.append(RingSample(now, index, ring.num, True, None, None, kicks, calls, "packed: no indices"))
                continue
            try:
                avail = _U16.unpack(self.table.uva(ring.addr.avail + AVAIL_OFF_IDX, 2))[0]
                used = _U16.unpack(self.table.uva(ring.addr.used + USED_OFF_IDX, 2))[0]
            except PyvirtioError:
                out.append(RingSample(now, index, ring.num, False, None, None, kicks, calls, "outside the memory seen"))
                continue
            out.append(RingSample(now, index, ring.num, False, int(avail), int(used), kicks, calls))
        return out

    def close(self) -> None:
        self.table.close()
