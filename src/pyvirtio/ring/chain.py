"""A descriptor chain as the device sees it, and the error for a malformed one (both ring formats).

A :class:`Chain` is what :meth:`DeviceQueue.pop <pyvirtio.ring.device_side.DeviceQueue.pop>`
and :meth:`PackedDeviceQueue.pop <pyvirtio.ring.device_packed.PackedDeviceQueue.pop>`
return: the device-readable buffers, then the device-writable ones, each a
memoryview into guest memory already checked against the memory table, and
``head``, the value the device reports back in ``add_used`` (split: the head
descriptor's index; packed: the buffer id). :class:`ChainError` is the
frontend's fault (a :class:`~pyvirtio.errors.DriverProtocolError`, defined in
:mod:`pyvirtio.errors`).
"""

from __future__ import annotations

from pyvirtio.errors import ChainError

__all__ = ["Chain", "ChainError"]  # ChainError lives in errors.py with every exception class


class Chain:
    """One available descriptor chain: device-readable then device-writable buffers."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(b) for b in self.writable)

    def read_all(self) -> bytes:
        return b"".join(self.readable)

    def write(self, data: bytes | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers from byte ``offset``; returns bytes written."""
        done = 0
        pos = 0
        total = len(data)
        for buf in self.writable:
            if done >= total:
                break
            n = len(buf)
            end = pos + n
            if offset < end:  # an empty buffer takes nothing and no longer ends the scatter
                start = max(0, offset - pos)
                take = min(n - start, total - done)
                buf[start : start + take] = data[done : done + take]
                done += take
            pos = end
        return done
