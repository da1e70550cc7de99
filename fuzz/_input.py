"""Turning fuzz bytes into values, and values back into seed bytes.

:class:`FuzzInput` reads little-endian integers, flags, choices and blobs
from the front of a byte string; once the bytes run out every read returns
zero (or an empty blob), so any input, even an empty one, is a complete
program for a target. :class:`Seed` writes the same values in the same
encoding: the seed corpus (:mod:`fuzz.make_corpus`) describes valid
messages and rings with it, call for call in the order the target reads
them. Both sides agree on one rule for widths: ``below(n)`` uses the
smallest of 1, 2, 4 or 8 bytes that holds ``n - 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def _width(n: int) -> int:
    if n <= 1 << 8:
        return 1
    if n <= 1 << 16:
        return 2
    if n <= 1 << 32:
        return 4
    return 8


class FuzzInput:
    """A cursor over fuzz bytes (zeros once they run out)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return max(0, len(self.data) - self.pos)

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def _int(self, width: int) -> int:
        raw = self.data[self.pos : self.pos + width]
        self.pos += width
        return int.from_bytes(raw, "little")

    def u8(self) -> int:
        return self._int(1)

    def u16(self) -> int:
        return self._int(2)

    def u32(self) -> int:
        return self._int(4)

    def u64(self) -> int:
        return self._int(8)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def below(self, n: int) -> int:
        """A value in ``0..n-1``."""
        return self._int(_width(n)) % n

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def choose(self, options: Sequence[T], other: Callable[[], T]) -> T:
        """One of ``options``, or (index ``len(options)``) a value read by ``other``."""
        i = self.below(len(options) + 1)
        return options[i] if i < len(options) else other()

    def take(self, n: int) -> bytes:
        """Exactly ``n`` bytes (zero-padded at the end of the input)."""
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw + bytes(n - len(raw))

    def blob(self, max_len: int) -> bytes:
        """A length (``below(max_len + 1)``) then that many bytes, short if the input ends."""
        n = self.below(max_len + 1)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def rest(self) -> bytes:
        raw = self.data[self.pos :]
        self.pos = len(self.data)
        return raw


class Seed:
    """Writes values in :class:`FuzzInput`'s encoding."""

    def __init__(self) -> None:
        self.out = bytearray()

    def _int(self, value: int, width: int) -> Seed:
        self.out += (value % (1 << (8 * width))).to_bytes(width, "little")
        return self

    def u8(self, value: int) -> Seed:
        return self._int(value, 1)

    def u16(self, value: int) -> Seed:
        return self._int(value, 2)

    def u32(self, value: int) -> Seed:
        return self._int(value, 4)

    def u64(self, value: int) -> Seed:
        return self._int(value, 8)

    def flag(self, value: bool) -> Seed:
        return self.u8(1 if value else 0)

    def below(self, value: int, n: int) -> Seed:
        if not 0 <= value < n:
            raise ValueError(f"{value} is not in 0..{n - 1}")
        return self._int(value, _width(n))

    def pick(self, value: T, options: Sequence[T]) -> Seed:
        return self.below(list(options).index(value), len(options))

    def choose(self, index: int, options: Sequence[object]) -> Seed:
        """:meth:`FuzzInput.choose`: ``index`` into ``options``; ``len(options)`` means "read the other
        value", which the caller writes next."""
        return self.below(index, len(options) + 1)

    def take(self, data: bytes, n: int) -> Seed:
        if len(data) > n:
            raise ValueError(f"{len(data)} bytes for a {n}-byte field")
        self.out += data + bytes(n - len(data))
        return self

    def blob(self, data: bytes, max_len: int) -> Seed:
        self.below(len(data), max_len + 1)
        self.out += data
        return self

    def raw(self, data: bytes) -> Seed:
        self.out += data
        return self

    def bytes(self) -> bytes:
        return bytes(self.out)
