"""Functional checks of VirtioBlk shared by the qemu-storage-daemon and loopback tests.

Each ``check_*`` takes an open :class:`~pyvirtio.drivers.blk.VirtioBlk`.
``stores`` says whether the device keeps data (a raw file, a RAM disk) or
not (null-co, whose reads return zeroes): data is only compared when it does.
Functions that change the device take a ``model`` bytearray of the whole
device and update it, so the caller can compare the backing file at the end.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from pyvirtio.drivers.blk import BlkRequest, VirtioBlk, pack_pattern
from pyvirtio.errors import InvalidArgument, OwnershipError


def pattern(offset: int, length: int, seed: int) -> bytes:
    """Distinct, verifiable bytes for ``length`` bytes at ``offset``."""
    return pack_pattern(offset // 512, seed, length)


#: The GET_ID answers of the devices these checks run against.
EMBEDDED_ID = "pyvirtio"  # pyvirtio.backends.blk.BlockBackend's default serial
QSD_ID = "vhost_user_blk"  # qemu-storage-daemon 7.2's vhost-user-blk export


def check_all_ops(blk: VirtioBlk, *, stores: bool, ident: str = EMBEDDED_ID, discard_zeroes: bool = True) -> None:
    """read, write, readinto, readv / writev, flush, discard, write_zeroes, get_id.

    ``ident``: what GET_ID must answer. ``discard_zeroes``: the device reads a
    discarded range back as zeroes (the embedded back end; qemu-storage-daemon's
    raw file ignores discard by default: the data stays).
    """
    bs = blk.block_size
    data = pattern(bs, 4 * bs, 1)
    blk.write(bs, data)
    got = blk.read(bs, 4 * bs)
    assert len(got) == 4 * bs
    if stores:
        assert got == data
    else:
        assert got == bytes(4 * bs)

    # Zero copy from / into pool buffers.
    buf = blk.pool.allocate(2 * bs, align=bs)
    try:
        buf.view[:] = pattern(8 * bs, 2 * bs, 2)
        blk.write(8 * bs, buf)
        buf.view[:] = bytes(2 * bs)
        assert blk.readinto(8 * bs, buf) == 2 * bs
        if stores:
            assert bytes(buf.view) == pattern(8 * bs, 2 * bs, 2)
    finally:
        blk.pool.free(buf)

    # Scatter-gather: one request, several buffers of unequal size.
    parts = [pattern(16 * bs, bs, 3), pattern(17 * bs, 2 * bs, 4), pattern(19 * bs, bs, 5)]
    blk.writev(16 * bs, parts)
    got_parts = blk.readv(16 * bs, [bs, 2 * bs, bs])
    assert [len(p) for p in got_parts] == [bs, 2 * bs, bs]
    if stores:
        assert got_parts == parts
        # Split differently on the way back: same bytes.
        assert b"".join(blk.readv(16 * bs, [3 * bs, bs])) == b"".join(parts)

    blk.flush()
    blk.write_zeroes(bs, 2 * bs)
    blk.write_zeroes(3 * bs, 2 * bs, unmap=True)
    if stores:
        assert blk.read(bs, 4 * bs) == bytes(4 * bs)
    blk.discard(16 * bs, 4 * bs)
    got = blk.read(16 * bs, 4 * bs)
    if not stores or discard_zeroes:
        assert got == bytes(4 * bs), "the discarded range does not read back as zeroes"
    else:
        # Discard is a hint: each block reads as it was or as zeroes, never anything else.
        before = b"".join(parts)
        for k in range(4):
            assert got[k * bs : (k + 1) * bs] in (before[k * bs : (k + 1) * bs], bytes(bs)), f"discarded block {k}"

    assert blk.get_id() == ident


def check_batch(blk: VirtioBlk, *, stores: bool, count: int = 300) -> None:
    """Submit many requests with one kick per batch, then wait; more than a queue holds."""
    bs = blk.block_size
    count = min(count, blk.capacity // bs)
    writes = [blk.write_request(i * bs, pattern(i * bs, bs, 7)) for i in range(count)]
    _submit_all(blk, writes)
    assert all(r.done and r.status == 0 for r in writes)
    reads = [blk.read_request(i * bs, bs) for i in range(count)]
    _submit_all(blk, reads)
    for i, r in enumerate(reads):
        assert r.done and r.status == 0
        data = r.result
        assert len(data) == bs
        if stores:
            assert data == pattern(i * bs, bs, 7), f"block {i}"
    # A mixed batch: flush, write-zeroes, get-id and a read in flight together
    # (virtio does not order requests in flight: the zeroed block is only read after).
    mixed = [blk.flush_request(), blk.write_zeroes_request(0, bs), blk.get_id_request()]
    mixed.append(blk.read_request(bs, bs))
    assert blk.submit(mixed) == len(mixed)
    blk.wait(mixed)
    assert all(r.status == 0 for r in mixed)
    if stores:
        assert blk.read(0, bs) == bytes(bs)
        assert mixed[3].result == pattern(bs, bs, 7)


def _submit_all(blk: VirtioBlk, requests: list[BlkRequest]) -> None:
    """Post in batches as the queue allows; one kick per batch at most; more requests than slots take several."""
    queue = blk.thread_queue()
    kicks = queue.vq.kicks
    pending = list(requests)
    posted: list[BlkRequest] = []
    batches = 0
    while pending:
        n = blk.submit(pending)
        batches += 1
        assert n > 0 or posted, "nothing could be posted on an empty queue"
        posted.extend(pending[:n])
        pending = pending[n:]
        if pending:
            # Queue full: reap what is done, then post the rest.
            assert queue.full_reason, "submit stopped early without saying why"
            blk.wait(posted[:1])
            posted = [r for r in posted if not r.done]
    blk.wait(requests)
    assert queue.vq.kicks - kicks <= batches, "more than one kick per batch"
    if len(requests) > queue.nslots:
        assert batches > 1, f"{len(requests)} requests posted in one batch on a queue of {queue.nslots} slots"
    assert queue.inflight == 0 and len(queue.free_slots) == queue.nslots


def check_asyncio(blk: VirtioBlk, *, stores: bool) -> None:
    """aread / awrite / aflush / adiscard / awrite_zeroes, several in flight at once."""
    bs = blk.block_size
    base = 64 * bs

    async def main() -> None:
        await asyncio.gather(*(blk.awrite(base + i * bs, pattern(base + i * bs, bs, 9)) for i in range(16)))
        got = await asyncio.gather(*(blk.aread(base + i * bs, bs) for i in range(16)))
        for i, data in enumerate(got):
            assert len(data) == bs
            if stores:
                assert data == pattern(base + i * bs, bs, 9)
        await blk.aflush()
        await blk.awrite_zeroes(base, 2 * bs)
        await blk.awrite_zeroes(base + 2 * bs, 2 * bs, unmap=True)
        await blk.adiscard(base + 8 * bs, 2 * bs)
        zero = await blk.aread(base, 4 * bs)
        if stores:
            assert zero == bytes(4 * bs)

    asyncio.run(asyncio.wait_for(main(), 20))


def write_patterns(blk: VirtioBlk, model: bytearray) -> None:
    """Writes at several offsets (incl. the last block and a scatter-gather one); updates ``model``."""
    bs = blk.block_size
    cap = blk.capacity
    assert len(model) == cap

    def put(off: int, data: bytes) -> None:
        model[off : off + len(data)] = data

    for off, n, seed in ((0, bs, 11), (4096, 8192, 12), ((1 << 20) + bs, 3 * bs, 13), (cap - bs, bs, 14)):
        data = pattern(off, n, seed)
        blk.write(off, data)
        put(off, data)
    # A 1 MiB write (one bounce buffer, many pages).
    big = pattern(2 << 20, 1 << 20, 15)
    blk.write(2 << 20, big)
    put(2 << 20, big)
    # Gather write: four pieces of unequal size, one request.
    off = 5 << 20
    pieces = [pattern(off, bs, 16), pattern(off + bs, 3 * bs, 17), pattern(off + 4 * bs, 2 * bs, 18)]
    pieces.append(b"\xa5" * bs)
    blk.writev(off, pieces)
    put(off, b"".join(pieces))
    # Zero a range in the middle of the big write.
    blk.write_zeroes((2 << 20) + 4096, 8192)
    put((2 << 20) + 4096, bytes(8192))
    blk.flush()
    # Read everything back through the device.
    for start, n in ((0, 16384), ((1 << 20), 4096), (2 << 20, 1 << 20), (off, 8 * bs), (cap - 4096, 4096)):
        assert blk.read(start, n) == bytes(model[start : start + n]), f"read at {start}"
    got = blk.readv(off, [2 * bs, 2 * bs, 2 * bs, bs])
    assert b"".join(got) == bytes(model[off : off + 7 * bs])


def check_two_queues(blk: VirtioBlk, model: bytearray, *, region: int = 1 << 20) -> None:
    """Two threads each own a queue and verify their data; a third gets OwnershipError."""
    assert blk.num_queues == 2
    bs = blk.block_size
    step = 16 * bs
    ready = [threading.Event(), threading.Event()]
    release = threading.Event()
    errors: list[BaseException] = []
    queues: dict[int, int] = {}

    def worker(k: int) -> None:
        try:
            base = k * region
            for off in range(base, base + region, step):
                data = pattern(off, step, 20 + k)
                blk.write(off, data)
                model[off : off + step] = data
            for off in range(base, base + region, step):
                assert blk.read(off, step) == pattern(off, step, 20 + k), f"thread {k} at {off}"
            queues[k] = blk.thread_queue().vq.index
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            ready[k].set()
            release.wait(20)
            # Give the queue back (one a thread left behind would wait for a thread that finds none free).
            try:
                blk.release_queue()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"blk-q{k}") for k in range(2)]
    for t in threads:
        t.start()
    try:
        for e in ready:
            assert e.wait(30)
        assert not errors, errors
        assert sorted(queues.values()) == [0, 1]

        third: list[BaseException | None] = []

        def intruder() -> None:
            try:
                blk.read(0, bs)
                third.append(None)
            except BaseException as exc:
                third.append(exc)

        t3 = threading.Thread(target=intruder, name="blk-intruder")
        t3.start()
        t3.join(10)
        assert third and isinstance(third[0], OwnershipError), third
        assert "queues are owned by other threads" in str(third[0])
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert not errors, errors


def check_argument_errors(blk: VirtioBlk) -> None:
    """Bad arguments raise InvalidArgument before anything reaches the ring."""
    bs = blk.block_size
    blk.read(0, bs)  # this thread now owns a queue
    vq = blk.thread_queue().vq
    before = (vq.ring.avail_idx, vq.ring.num_free, vq.kicks)
    cap = blk.capacity
    bad_calls = [
        ("misaligned offset", lambda: blk.read(bs // 2 if bs > 512 else 1, bs)),
        ("misaligned length", lambda: blk.read(0, bs + 1)),
        ("negative offset", lambda: blk.read(-bs, bs)),
        ("zero length", lambda: blk.read(0, 0)),
        ("beyond capacity", lambda: blk.read(cap, bs)),
        ("straddles the end", lambda: blk.read(cap - bs, 2 * bs)),
        ("write beyond capacity", lambda: blk.write(cap, bytes(bs))),
        ("misaligned write", lambda: blk.write(0, bytes(bs - 1))),
        ("zero-length write", lambda: blk.write(0, b"")),
        ("zero-length discard", lambda: blk.discard(0, 0)),
        ("discard beyond capacity", lambda: blk.discard(cap - bs, 2 * bs)),
        ("write-zeroes misaligned", lambda: blk.write_zeroes(1, bs)),
        ("readv zero length", lambda: blk.readv(0, [bs, 0])),
        ("writev beyond capacity", lambda: blk.writev(cap - bs, [bytes(bs), bytes(bs)])),
    ]
    if blk.max_transfer + bs <= cap:
        # One request is never split silently (the sync calls split: check_split_transfers).
        bad_calls.append(("one request too long", lambda: blk.read_request(0, blk.max_transfer + bs)))
    for what, call in bad_calls:
        with pytest.raises(InvalidArgument):
            call()
        assert (vq.ring.avail_idx, vq.ring.num_free, vq.kicks) == before, f"{what} touched the ring"
    # The device still works.
    blk.read(0, bs)
