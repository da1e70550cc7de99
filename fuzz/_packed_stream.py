"""Fuzz target for the packed ring's stream (``PackedFixedChains.stream``, ring/stream_packed.py).

* ``packed_stream``: every slot a one-buffer chain, all of them in flight,
  batches counted, checked and re-posted in bulk, against descriptors written
  by a :class:`~pyvirtio.testing.HostilePackedDevice`, honest or not. The
  stream turns away anything it does not expect (``peek`` -1 / ``()``); the
  target then closes it and lets ``reap_slots`` judge, re-posts what came
  back and opens a new stream over a ring with every slot in flight (the
  stream's read-back start). Declared: :class:`~pyvirtio.errors.DeviceProtocolError`
  from ``reap_slots`` (``QueueBroken`` once broken). Invariants: a batch the
  stream accepts names distinct slots with lengths within ``min_len`` and the
  slot's writable bytes; every slot stays in flight while streaming; the
  ring's id bookkeeping stays whole (``check_ids``); what ``reap_slots``
  returns after a close is distinct and in flight.
"""

from __future__ import annotations

from fuzz._input import FuzzInput, Seed
from fuzz.targets import _pool, expect
from pyvirtio.errors import DeviceProtocolError, QueueBroken
from pyvirtio.ring.fixed import FixedChains, Stream
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.testing import HostilePackedDevice

_MIN_LEN = 14


def target_packed_stream(data: bytes) -> int:
    """A packed ring's stream against a hostile device.

    Input: ``u8`` size (1..64), ``u8`` flags (device-writable slots,
    event_idx, NumPy peeks), ``u16`` buffer length, then operations
    (``below(4)``): an honest device using the next ``k`` available
    descriptors in order with a length; garbage (id, length, flags) at any
    slot; peek and advance part or all of what it accepted; close, reap,
    re-post and stream again.
    """
    fi = FuzzInput(data)
    size = 1 + fi.below(64)
    flags = fi.u8()
    writable = bool(flags & 1)
    use_numpy = bool(flags & 4)
    blen = fi.u16() or 1
    if use_numpy:
        try:
            import numpy  # noqa: F401
        except ImportError:  # the "fast" extra is not installed: Python path only
            use_numpy = False
    q = PackedQueue(size, _pool(), event_idx=bool(flags & 2))
    dev = HostilePackedDevice(q)
    fc = FixedChains(q, [[(0x10000 * (s + 1), blen, writable)] for s in range(size)])
    min_len = _MIN_LEN if writable else 0
    stream: Stream | None = fc.stream(lambda: None, min_len=min_len)
    stream.advance(0)
    accepted = 0
    pending: list[tuple[int, int]] = []  # made available, not yet used by the device
    try:
        for _ in range(64):
            if fi.exhausted:
                break
            op = fi.below(4)
            if op == 0:  # an honest device: the oldest available descriptors, in order
                pending += dev.available()
                k = 1 + fi.below(size)
                for bid, n in pending[:k]:
                    dev.use(bid, fi.u16(), n, write=writable)
                del pending[:k]
            elif op == 1:  # garbage
                for _ in range(1 + fi.below(3)):
                    dev.write_used(fi.below(size), fi.u16(), fi.u32(), fi.u16())
            elif op == 2 and stream is not None:  # peek, advance
                if use_numpy:
                    got = stream.peek_many()
                    n = 0 if got is None else -1 if got == () else len(got[0])
                    if n > 0:
                        slots, lens = got  # type: ignore[misc]
                        expect(len(set(slots.tolist())) == n, f"a batch names a slot twice: {slots.tolist()}")
                        expect(all(0 <= s < size for s in slots.tolist()), "a slot out of range")
                        if writable:
                            expect(int(lens.min()) >= min_len and int(lens.max()) <= blen, f"lengths {lens}")
                else:
                    n = stream.peek()
                if n > 0:
                    k = 1 + fi.below(n)
                    stream.advance(k)
                    accepted += k
                expect(fc.n_inflight == size, f"{fc.n_inflight} in flight while streaming, not {size}")
            else:  # close, let the exact path judge, re-post, stream again
                if stream is not None:
                    stream.close()
                    stream = None
                try:
                    lens_out: list[int] = []
                    done = fc.reap_slots(lengths=lens_out)
                except (DeviceProtocolError, QueueBroken):
                    expect(q.broken is not None, "reap_slots raised without breaking the queue")
                    break
                expect(len(set(done)) == len(done), f"reap_slots returned a slot twice: {done}")
                expect(all(n <= blen for n in lens_out) if writable else True, f"lengths {lens_out}")
                fc.post(done)
                stream = fc.stream(lambda: None, min_len=min_len)
            q.check_ids()
    finally:
        if stream is not None:
            stream.close()
        dev.release()
        q.close()
    return accepted


# -- seeds ------------------------------------------------------------------------------------


def _seed(size: int, flags: int, blen: int, ops: list[tuple[int, ...]]) -> bytes:
    s = Seed().below(size - 1, 64).u8(flags).u16(blen)
    for op in ops:
        kind = op[0]
        s.below(kind, 4)
        if kind == 0:
            _k, count, length = op
            s.below(count - 1, size)
            for _ in range(count):
                s.u16(length)
        elif kind == 1:
            _k, pos, id_, length, fl = op
            s.below(0, 3).below(pos, size).u16(id_).u32(length).u16(fl)
        elif kind == 2:
            _k, take = op
            if take:  # the target reads how many to advance only when the peek accepted some
                s.below(take - 1, size)
    return s.bytes()


def seeds_packed_stream() -> dict[str, bytes]:
    laps = [(0, 3, 40), (2, 3)] * 12  # round a ring of 7 several times, three at a time
    return {
        "rx_laps": _seed(7, 1 | 2, 64, laps),
        "rx_laps_numpy": _seed(7, 1 | 4, 64, laps),
        "tx_laps": _seed(5, 2, 60, [(0, 4, 0), (2, 4), (0, 2, 0), (2, 2)] * 6),
        "lie_then_restart": _seed(
            6, 1, 64, [(0, 2, 30), (2, 2), (1, 2, 4, 30, 0x8080 | 2), (2, 0), (3,), (0, 3, 30), (2, 3)]
        ),
        "short_then_restart": _seed(6, 1, 64, [(0, 2, 5), (2, 0), (3,), (0, 2, 30), (2, 2)]),
    }
