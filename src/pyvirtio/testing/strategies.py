"""Hypothesis strategies for pyvirtio's rings (needs the ``hypothesis`` package).

Imported on demand only: :mod:`pyvirtio.testing` itself does not need
Hypothesis, this module does.
"""

from __future__ import annotations

from hypothesis import strategies as st

from pyvirtio.spec.ring import MAX_QUEUE_SIZE


def queue_sizes(min_size: int = 1, max_size: int = MAX_QUEUE_SIZE) -> st.SearchStrategy[int]:
    """Powers of two in [min_size, max_size] (valid split-ring sizes)."""
    exps = [e for e in range(16) if min_size <= 1 << e <= max_size]
    return st.sampled_from([1 << e for e in exps])


def packed_queue_sizes(min_size: int = 1, max_size: int = MAX_QUEUE_SIZE) -> st.SearchStrategy[int]:
    """Any packed-ring size in [min_size, max_size] (virtio 1.2 §2.8: not only powers of two).

    Small and odd sizes most of the time, the edges (1, 2, powers of two and
    their neighbours) often, anything in range sometimes.
    """
    edges = sorted(
        {n for e in range(16) for n in ((1 << e) - 1, 1 << e, (1 << e) + 1) if min_size <= n <= max_size}
        | {min_size, max_size}
    )
    return st.one_of(
        st.integers(min_size, min(max_size, max(min_size, 17))),
        st.sampled_from(edges),
        st.integers(min_size, max_size),
    )


def buffer_layouts(max_buffers: int = 8, max_len: int = 64) -> st.SearchStrategy[list[tuple[int, bool]]]:
    """A request's buffers as (length, device-writable), readable ones first (virtio 1.2 §2.7.4.2)."""

    def split(n: int) -> st.SearchStrategy[list[tuple[int, bool]]]:
        lengths = st.lists(st.integers(0, max_len), min_size=n, max_size=n)
        # The first ``readable`` buffers are device-readable, the rest device-writable.
        return st.tuples(st.integers(0, n), lengths).map(
            lambda t: [(ln, k >= t[0]) for k, ln in enumerate(t[1])]
        )

    return st.integers(1, max_buffers).flatmap(split)


def used_entries(max_entries: int = 16) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Arbitrary used-ring elements (id, len): small ids and lengths most of the time, any u32 sometimes."""
    u32 = st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF))
    return st.lists(st.tuples(u32, u32), max_size=max_entries)
