"""Fuzz targets: one function per trust boundary, ``target_<name>(data: bytes) -> None``.

Each target builds the object under test from the fuzz bytes (read with
:class:`~fuzz._input.FuzzInput`, so any byte string is a valid program),
runs it, and checks two things:

* only the errors declared for that boundary escape the library: a
  malformed request is the frontend's fault (:class:`DriverProtocolError`),
  a malformed reply or ring entry the device's (:class:`DeviceProtocolError`,
  :class:`DeviceError`), and so on. Anything else propagates and is a crash;
* the invariants of the object hold afterwards (free list intact, no token
  delivered twice, every buffer inside the memory table, fds accounted
  for, ...). A broken invariant raises :class:`InvariantBroken`.

A target never sleeps for long and never waits without a bound; the runner
(:mod:`fuzz.run`) adds a per-input time limit on top and treats a timeout
as a crash. Targets return a small count of "useful work" (messages
decoded, chains served...) that the tests use to check that the seed
corpus still reaches the code it was written for.

The vhost-user server target lives in :mod:`fuzz._server`, the driver
targets in :mod:`fuzz._drivers`; they are registered here with the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from fuzz._input import FuzzInput
from pyvirtio.backends.blk import CHUNK, BlockBackend, Storage
from pyvirtio.backends.scsi import ScsiBackend, ScsiLun
from pyvirtio.errors import (
    DeviceError,
    DeviceProtocolError,
    DriverProtocolError,
    QueueBroken,
    QueueFull,
    QueueStateError,
    RequestTooLarge,
)
from pyvirtio.memory import MemoryPool, MemoryTable, Region
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.device_side import Chain, ChainError, DeviceQueue
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.ring.split import SplitQueue
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.ring import avail_size, desc_table_size, used_size
from pyvirtio.testing import HostileDevice


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence pyvirtio's loggers meanwhile: the back ends log every rejected request."""
    logger = logging.getLogger("pyvirtio")
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)


#: Known library bugs the targets tolerate (counted through :func:`note_known`) unless
#: FUZZ_STRICT=1: name -> description. Each needs a strict-xfail reproducer in
#: tests/test_fuzz_short.py and an entry in docs/fuzzing.md. (remap-leak in
#: backends/server.py and net-queue-count in drivers/net.py were here; fixed, they now crash.)
KNOWN_ISSUES: dict[str, str] = {}  # net-mq-without-ctrl was here too; fixed in drivers/net.py


def strict() -> bool:
    """FUZZ_STRICT=1: known issues are crashes too."""
    return os.environ.get("FUZZ_STRICT", "") not in ("", "0")


def note_known(name: str) -> None:
    """A known issue was met and tolerated: count it where the runner looks (FUZZ_KNOWN_LOG)."""
    assert name in KNOWN_ISSUES, name
    path = os.environ.get("FUZZ_KNOWN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


class InvariantBroken(AssertionError):
    """The object under test accepted an input but its state is now wrong."""


def expect(condition: object, message: str) -> None:
    if not condition:
        raise InvariantBroken(message)


# -- vhost-user message framing, shared by the three codec targets ------------------

#: Fake fd numbers handed to MessageReader: it only counts and returns them
#: (and closes them in close_pending_fds, which the targets never call).
_FAKE_FD = 1 << 20


def _feed_records(
    fi: FuzzInput,
    reader: vu.MessageReader,
    error: type[Exception],
    on_message: Callable[[vu.Message], None],
) -> int:
    """Feed ``[u16 length % 1025][u8 nfds % 4][bytes]`` records, hand out every message.

    Checks the framing: the messages returned are exactly the stream's bytes
    in order, every fd fed is either in a returned message or still held by
    the reader, and no message breaks the header rules the reader enforces.
    Returns the number of messages handed out.
    """
    stream = bytearray()
    returned = bytearray()
    fed_fds: list[int] = []
    got_fds: list[int] = []
    next_fd = _FAKE_FD
    count = 0
    broken = False
    while not fi.exhausted:
        n = fi.below(1025)
        nfds = fi.below(4)
        chunk = fi.take(n) if fi.remaining >= n else fi.rest()
        fds = tuple(range(next_fd, next_fd + nfds))
        next_fd += nfds
        fed_fds.extend(fds)
        stream += chunk
        reader.feed(chunk, fds)
        while not broken:
            try:
                msg = reader.next_message()
            except error:  # the declared error class of this direction (the reader's)
                broken = True
                expect(reader.broken, "next_message raised but the reader is not broken")
                break
            if msg is None:
                break
            count += 1
            expect(msg.flags & vu.VERSION_MASK == vu.VERSION, f"message with version bits {msg.flags:#x}")
            expect(len(msg.payload) <= vu.MAX_PAYLOAD, f"payload of {len(msg.payload)} bytes")
            expect(len(msg.fds) <= vu.MAX_FDS, f"{len(msg.fds)} fds in one message")
            returned += msg.to_bytes()
            got_fds.extend(msg.fds)
            on_message(msg)
    expect(bytes(stream[: len(returned)]) == bytes(returned), "messages do not reproduce the byte stream")
    if not reader.broken:
        expect(reader.buffered == len(stream) - len(returned), "bytes lost between messages")
    held = list(reader.pending_fds())
    expect(sorted(got_fds + held) == fed_fds, f"fds fed {fed_fds} != returned {got_fds} + held {held}")
    return count


def target_vu_decode_request(data: bytes) -> int:
    """Back end direction: MessageReader(DriverProtocolError) + decode_request.

    Input: records ``[u16 len % 1025][u8 nfds % 4][len bytes]`` forming a
    byte stream; ``nfds`` fake fds arrive with each record.
    """
    fi = FuzzInput(data)
    decoded = 0

    def on_message(msg: vu.Message) -> None:
        nonlocal decoded
        try:
            value = vu.decode_request(msg)
        except DriverProtocolError:
            return
        decoded += 1
        expect(msg.request in vu.REQUEST_NAMES, f"decoded unknown request {msg.request}")
        expect(not msg.flags & vu.REPLY, "decoded a request with the reply flag")
        if isinstance(value, vu.MemTable):
            expect(len(value.regions) == len(msg.fds), "memory table regions != fds")

    _feed_records(fi, vu.MessageReader(DriverProtocolError), DriverProtocolError, on_message)
    return decoded


def _sent_for(fi: FuzzInput) -> vu.Outgoing:
    """A request as FrontendCodec encodes it, chosen and parametrised by the input."""
    codec = vu.FrontendCodec()
    fd = _FAKE_FD
    kind = fi.below(len(_SENDERS))
    return _SENDERS[kind](codec, fi, fd)


def _config_sent(codec: vu.FrontendCodec, fi: FuzzInput, _fd: int) -> vu.Outgoing:
    offset = fi.below(vu.MAX_CONFIG_SIZE)
    size = 1 + fi.below(vu.MAX_CONFIG_SIZE - offset)
    return codec.get_config(offset, size)


_SENDERS: list[Callable[[vu.FrontendCodec, FuzzInput, int], vu.Outgoing]] = [
    lambda c, fi, fd: c.get_features(),
    lambda c, fi, fd: c.get_protocol_features(),
    lambda c, fi, fd: c.get_queue_num(),
    lambda c, fi, fd: c.get_max_mem_slots(),
    lambda c, fi, fd: c.get_status(),
    lambda c, fi, fd: c.check_device_state(),
    lambda c, fi, fd: c.get_vring_base(fi.u8()),
    _config_sent,
    lambda c, fi, fd: c.get_inflight_fd(fi.u16(), fi.u16()),
    lambda c, fi, fd: c.set_log_base(fi.u16(), 0, fd),
    lambda c, fi, fd: c.set_features(fi.u64(), need_reply=True),
    lambda c, fi, fd: c.set_owner(need_reply=True),
    lambda c, fi, fd: c.set_mem_table([vu.MemRegion(0x1000, 0x1000, 0x7F0000000000)], [fd], need_reply=True),
    lambda c, fi, fd: c.set_vring_num(fi.u8(), fi.u16(), need_reply=True),
    lambda c, fi, fd: c.set_vring_kick(fi.u8(), None if fi.flag() else fd, need_reply=True),
    lambda c, fi, fd: c.set_status(fi.u8(), need_reply=True),
    lambda c, fi, fd: c.set_config(0, b"\0" * (1 + fi.below(16)), need_reply=True),
    lambda c, fi, fd: c.add_mem_reg(vu.MemRegion(0x1000, 0x1000, 0x7F0000000000), fd, need_reply=True),
    lambda c, fi, fd: c.reset_device(need_reply=True),
]


def target_vu_parse_reply(data: bytes) -> int:
    """Front end direction: MessageReader(DeviceProtocolError) + parse_reply for the question sent.

    Input: records as in :func:`target_vu_decode_request`; for each message
    the reader returns, the next bytes choose the request it answers (one of
    FrontendCodec's encoders, with its arguments).
    """
    fi = FuzzInput(data)
    parsed = 0

    def on_message(msg: vu.Message) -> None:
        nonlocal parsed
        sent = _sent_for(fi)
        try:
            value = vu.parse_reply(sent.request, msg, asked=sent.sent)
            if isinstance(value, int) and sent.request not in (
                vu.GET_FEATURES,
                vu.GET_PROTOCOL_FEATURES,
                vu.GET_QUEUE_NUM,
                vu.GET_MAX_MEM_SLOTS,
                vu.GET_STATUS,
                vu.CHECK_DEVICE_STATE,
                vu.SET_LOG_BASE,
            ):
                vu.check_ack(sent.request, value)
        except DeviceError:  # DeviceProtocolError included: both are the back end's fault
            return
        parsed += 1
        if isinstance(value, vu.ConfigSpace):
            asked = sent.sent
            assert isinstance(asked, vu.ConfigSpace)
            expect((value.offset, value.size) == (asked.offset, asked.size), "config reply for another range")
            expect(len(value.data) == value.size, "config data length != size")
        if isinstance(value, vu.InflightInfo):
            expect(len(msg.fds) == 1, "inflight reply accepted without exactly one fd")
        if sent.request == vu.GET_STATUS:
            expect(isinstance(value, int) and 0 <= value <= 0xFF, f"status {value!r}")

    _feed_records(fi, vu.MessageReader(DeviceProtocolError), DeviceProtocolError, on_message)
    return parsed


def target_vu_backend_channel(data: bytes) -> int:
    """The back-end channel, both ways: decode_backend_request and BackendCodec.parse_ack.

    Input: records as in :func:`target_vu_decode_request`; per message one
    more byte picks the back-end request an ack would answer.
    """
    fi = FuzzInput(data)
    ok = 0
    codes = sorted(vu.BACKEND_REQUEST_NAMES) + [0, 9]

    def on_message(msg: vu.Message) -> None:
        nonlocal ok
        try:
            vu.decode_backend_request(msg)  # the front end reads a back-end request
            ok += 1
        except DeviceProtocolError:
            pass
        code = fi.pick(codes)
        try:
            vu.BackendCodec.parse_ack(code, msg)  # the back end reads the front end's ack
            ok += 1
        except DriverProtocolError:
            pass

    reader = vu.MessageReader(DeviceProtocolError, names=vu.BACKEND_REQUEST_NAMES)
    _feed_records(fi, reader, DeviceProtocolError, on_message)
    return ok


# -- driver-side split ring: used-ring validation ------------------------------------

_POOL: MemoryPool | None = None


def _pool() -> MemoryPool:
    global _POOL
    if _POOL is None:
        _POOL = MemoryPool(4 << 20, name="fuzz")
    return _POOL


class _SplitModel:
    """What the driver published, kept by the fuzzer to check SplitQueue.reap."""

    def __init__(self, q: SplitQueue) -> None:
        self.q = q
        self.inflight: dict[int, tuple[int, int, int]] = {}  # token -> (head, wlen, descriptors)
        self.delivered: set[int] = set()
        self.next_token = 0

    def completed(self, got: list[tuple[object, int]]) -> None:
        for token, length in got:
            expect(isinstance(token, int), f"token {token!r}")
            assert isinstance(token, int)
            expect(token not in self.delivered, f"token {token} delivered twice")
            expect(token in self.inflight, f"token {token} was never in flight")
            _head, wlen, _n = self.inflight.pop(token)
            expect(0 <= length <= wlen, f"token {token}: length {length} > {wlen} writable bytes")
            self.delivered.add(token)

    def check(self) -> None:
        q = self.q
        expect(set(q.in_flight_tokens()) == set(self.inflight), "in-flight tokens differ from the model")
        expect(q.outstanding == len(self.inflight), f"outstanding {q.outstanding} != {len(self.inflight)}")
        held = sum(n for _h, _w, n in self.inflight.values())
        free = q.check_free_list()
        expect(free == q.num_free == q.size - held, f"free list {free}, num_free {q.num_free}, held {held}")


def _reap_checked(model: _SplitModel, max_n: int) -> None:
    q = model.q
    was_broken = q.broken is not None
    try:
        got = q.reap(max_n)
    except DeviceProtocolError as exc:
        expect(q.broken is not None, "DeviceProtocolError without marking the queue broken")
        if was_broken:
            expect(isinstance(exc, QueueBroken), "a broken queue reported a new violation")
            expect(not exc.completed, "a broken queue delivered completions")
        else:
            expect(not isinstance(exc, QueueBroken), "the first violation was reported as QueueBroken")
        model.completed(list(exc.completed))
    else:
        expect(not was_broken, "a broken queue reaped")
        expect(len(got) <= max_n, f"{len(got)} completions for max_n {max_n}")
        model.completed(got)
    model.check()


def target_split_reap(data: bytes) -> int:
    """SplitQueue.reap against a used ring written by a hostile device.

    Input: ``u8`` size exponent, ``u8`` flags (indirect, event_idx), ``u8``
    indirect threshold, then operations (``u8`` opcode): submit a request,
    complete published heads honestly, write garbage entries and a used
    index, reap, reset, toggle interrupts.
    """
    fi = FuzzInput(data)
    size = 1 << fi.below(6)
    flags = fi.u8()
    q = SplitQueue(
        size, _pool(), event_idx=bool(flags & 2), indirect=bool(flags & 1), indirect_threshold=2 + fi.below(8)
    )
    dev = HostileDevice(q)
    model = _SplitModel(q)
    heads: dict[int, int] = {}  # published head -> token
    reaped = 0
    try:
        for _ in range(64):
            if fi.exhausted:
                break
            op = fi.below(7)
            if op == 0:  # submit
                nr, nw = fi.below(4), fi.below(4)
                if nr + nw == 0:
                    nw = 1
                bufs = [(0x10000 * (k + 1), fi.u16(), k >= nr) for k in range(nr + nw)]
                token = model.next_token
                model.next_token += 1
                head, before = q.free_head, q.num_free
                try:
                    if fi.flag():
                        q.submit(token, bufs)
                    else:
                        q.start(token, len(bufs))
                        q.add_buffers(bufs)
                    q.flush()
                except (QueueFull, RequestTooLarge, QueueBroken):
                    expect(q.num_free == before, "a refused request took descriptors")
                    continue
                model.inflight[token] = (head, sum(n for _a, n, w in bufs if w), before - q.num_free)
                heads[head] = token
            elif op == 1:  # an honest device completes some published heads
                for head in dev.available_heads()[: 1 + fi.below(size)]:
                    token = heads.get(head, -1)
                    wlen = model.inflight[token][1] if token in model.inflight else 0
                    dev.complete((head, fi.u32() % (wlen + 1)))
            elif op == 2:  # garbage: any entries, any used index
                n = fi.below(size + 1)
                entries = [(fi.pick((fi.u8, fi.u32))(), fi.u32()) for _ in range(n)]
                delta = fi.u16()
                dev.write_garbage(dev.used_idx + delta, entries)
            elif op == 3:
                max_n = fi.u8() or 1 << 16
                _reap_checked(model, max_n)
                reaped += 1
            elif op == 4:
                lost = q.reset()
                expect(sorted(lost) == sorted(model.inflight), "reset() lost tokens differ from the model")  # type: ignore[type-var]
                model.inflight.clear()
                heads.clear()
                dev.last_avail = 0
                model.check()
            elif op == 5:
                if q.broken is None:
                    if fi.flag():
                        q.enable_interrupts()
                    else:
                        q.disable_interrupts()
                    q.kick_prepare()
            else:
                expect(0 <= q.pending() <= 0xFFFF, "pending out of range")
        _reap_checked(model, 1 << 16)
    finally:
        dev.release()
        q.close()
    return reaped


# -- FixedChains: the batch engine's reap (Python and NumPy paths) -------------------


def target_fixed_reap(data: bytes) -> int:
    """FixedChains.reap_slots / reap / reap_many against a hostile used ring.

    Input: ``u8`` size exponent, ``u8`` slot count, per slot ``u8`` readable
    and writable buffer counts with ``u16`` lengths, ``u8`` path (NumPy or
    Python), then operations: post idle slots (bit mask), complete honestly,
    write garbage, reap. At the end the chains are detached and the queue's
    free list must be whole again.
    """
    fi = FuzzInput(data)
    size = 1 << (1 + fi.below(5))
    q = SplitQueue(size, _pool())
    dev = HostileDevice(q)
    chains: list[list[tuple[int, int, bool]]] = []
    used = 0
    for _ in range(1 + fi.below(size)):
        nr, nw = fi.below(3), fi.below(3)
        if nr + nw == 0:
            nw = 1
        n = min(nr + nw, size - used)  # trimmed to what is left (the first chain always fits)
        if n == 0:
            break
        used += n
        chains.append([(0x10000 * (k + 1), fi.u16(), k >= nr) for k in range(n)])
    fc = FixedChains(q, chains)
    use_numpy = fi.flag()
    inflight: dict[int, int] = {}  # slot -> wlen
    delivered = 0
    np: Any = None
    if use_numpy:
        try:
            import numpy

            np = numpy
        except ImportError:  # the "fast" extra is not installed: Python path only
            use_numpy = False

    def completed(pairs: list[tuple[int, int]]) -> None:
        nonlocal delivered
        seen: set[int] = set()
        for slot, length in pairs:
            expect(slot in inflight and slot not in seen, f"slot {slot} delivered but not in flight")
            expect(0 <= length <= inflight[slot], f"slot {slot}: length {length} > {inflight[slot]}")
            seen.add(slot)
            del inflight[slot]
            delivered += 1

    def check() -> None:
        expect(fc.n_inflight == len(inflight) == q.outstanding, "in-flight counts disagree")
        expect(sorted(fc.in_flight()) == sorted(inflight), "the slots in flight disagree")

    try:
        for _ in range(64):
            if fi.exhausted:
                break
            op = fi.below(4)
            if op == 0:  # post idle slots
                mask = fi.u32()
                slots = [s for s in range(fc.nslots) if mask >> s & 1 and s not in inflight]
                try:
                    if use_numpy:
                        fc.post_many(np.asarray(slots, dtype=np.int64))
                    else:
                        fc.post(slots)
                except QueueBroken:
                    continue
                for s in slots:
                    inflight[s] = fc.wlen[s]
            elif op == 1:
                for head in dev.available_heads()[: 1 + fi.below(size)]:
                    slot = fc.slot_of[head]
                    dev.complete((head, fi.u32() % (fc.wlen[slot] + 1)))
            elif op == 2:
                n = fi.below(size + 1)
                entries = [(fi.pick((fi.u8, fi.u32))(), fi.u32()) for _ in range(n)]
                dev.write_garbage(dev.used_idx + fi.u16(), entries)
            else:
                was_broken = q.broken is not None
                how = fi.below(3)
                try:
                    if use_numpy:
                        got = fc.reap_many()
                        pairs = [] if got is None else list(zip(got[0].tolist(), got[1].tolist(), strict=True))
                    elif how == 0:
                        lengths: list[int] = []
                        slots = fc.reap_slots(fi.u8() or 1 << 16, lengths)
                        pairs = list(zip(slots, lengths, strict=True))
                    else:
                        pairs = fc.reap(fi.u8() or 1 << 16)
                except DeviceProtocolError as exc:
                    expect(q.broken is not None, "violation without marking the queue broken")
                    expect(was_broken == isinstance(exc, QueueBroken), "QueueBroken mix-up")
                    pairs = [(int(s), int(n)) for s, n in exc.completed]  # type: ignore[call-overload]
                else:
                    expect(not was_broken or not pairs, "a broken queue delivered completions")
                completed(pairs)
            check()
        if q.broken is None or not inflight:
            try:
                fc.detach()
            except QueueStateError:
                expect(inflight and q.broken is None, "detach refused with nothing in flight")
            else:
                free = q.check_free_list()
                expect(free == q.num_free == size, f"after detach: free list {free}, num_free {q.num_free}")
        else:
            fc.detach()
            free = q.check_free_list()
            expect(free == q.num_free == size, f"after detach (broken): free list {free}, num_free {q.num_free}")
    finally:
        dev.release()
        q.close()
    return delivered


# -- device side: descriptor-chain walking -------------------------------------------

_DEV_GPA = 0x10000  # guest address of the fuzz region's first byte
_DEV_REGION_SIZE = 4096
_dev_region: Region | None = None
_dev_table: MemoryTable | None = None


def _device_memory() -> tuple[Region, MemoryTable]:
    global _dev_region, _dev_table
    if _dev_region is None or _dev_table is None:
        _dev_region = Region.create(_DEV_REGION_SIZE, "fuzz-device")
        _dev_table = MemoryTable()
        _dev_table.add(_dev_region, _DEV_GPA, _DEV_GPA)
    return _dev_region, _dev_table


def device_ring_layout(size: int) -> tuple[int, int, int]:
    """Offsets of the descriptor table, avail ring and used ring in the fuzz region."""
    avail = desc_table_size(size)
    used = (avail + avail_size(size) + 3) & ~3
    return 0, avail, used


def _check_inside(buf: memoryview, region: Region) -> None:
    """``buf`` must be a view of ``region``'s mapping, wholly inside it."""
    expect(buf.obj is region.mmap, f"buffer of {len(buf)} bytes is not a view of the memory table's region")
    if len(buf):
        anchor = ctypes.c_char.from_buffer(buf)
        try:
            addr = ctypes.addressof(anchor)
        finally:
            del anchor
        start = region.user_addr
        expect(start <= addr and addr + len(buf) <= start + region.size, "buffer outside the region")


def target_device_pop(data: bytes) -> int:
    """DeviceQueue.pop over a descriptor table and avail ring written from the input.

    Input: ``u8`` size exponent (1..64), ``u8`` flags (indirect, event_idx),
    ``u16`` last_avail, ``u16`` max_chain (0: default), then the contents of
    the 4 KiB region at guest address 0x10000 that holds the ring
    (:func:`device_ring_layout`), indirect tables and data buffers.
    """
    fi = FuzzInput(data)
    size = 1 << fi.below(7)
    flags = fi.u8()
    last_avail = fi.u16()
    max_chain = fi.u16() or None
    region, table = _device_memory()
    content = fi.take(_DEV_REGION_SIZE)
    region.view[:] = content
    desc_off, avail_off, used_off = device_ring_layout(size)
    q = DeviceQueue(
        size,
        table,
        table.gpa(_DEV_GPA + desc_off, desc_table_size(size)),
        table.gpa(_DEV_GPA + avail_off, avail_size(size)),
        table.gpa(_DEV_GPA + used_off, used_size(size)),
        indirect=bool(flags & 1),
        event_idx=bool(flags & 2),
        last_avail=last_avail,
        max_chain=max_chain,
    )
    bound = max(size, q.max_chain)
    popped = 0
    try:
        for _ in range(2 * size + 2):
            before = q.last_avail
            try:
                chain = q.pop()
            except ChainError as exc:
                if exc.head is None and q.last_avail == before:
                    break  # the avail index itself is impossible: nothing was consumed
                expect(q.last_avail == (before + 1) & 0xFFFF, "a bad chain consumed != 1 avail entry")
                expect(exc.head is None or 0 <= exc.head < size, f"ChainError head {exc.head}")
                continue
            if chain is None:
                expect(q.last_avail == before, "pop() returned None but consumed an entry")
                break
            popped += 1
            expect(q.last_avail == (before + 1) & 0xFFFF, "pop() consumed != 1 avail entry")
            expect(0 <= chain.head < size, f"chain head {chain.head} out of range")
            nbufs = len(chain.readable) + len(chain.writable)
            expect(nbufs <= bound, f"chain of {nbufs} buffers from a ring of {size} (max_chain {q.max_chain})")
            for buf in (*chain.readable, *chain.writable):
                _check_inside(buf, region)
            chain.write(b"\xa5" * min(chain.writable_len, 64))
            q.add_used(chain.head, min(chain.writable_len, 64))
            del chain
        q.flush_used()
        q.enable_notifications()
        q.disable_notifications()
    finally:
        q.release()
    return popped


# -- device models: virtio-blk and virtio-scsi request parsing ------------------------

_file_storage: Storage | None = None


def _file_backed() -> Storage:
    global _file_storage
    if _file_storage is None:
        tmp = tempfile.NamedTemporaryFile(prefix="pyvirtio-fuzz-", suffix=".img", delete=False)
        tmp.close()
        _file_storage = Storage(size=1 << 20, path=tmp.name)
    return _file_storage


def chain_from_input(fi: FuzzInput, *, max_buffers: int = 4, max_len: int = 4096) -> tuple[Chain, list[bytes]]:
    """A Chain of fuzz-filled readable buffers and 0xEE-filled writable ones.

    Input: ``u16`` head, ``u8`` readable count, ``u8`` writable count, then
    per buffer a ``u16`` length (``% (max_len + 1)``) and, for readable
    ones, that many content bytes. Returns the chain and the readable
    contents (to check that the device did not write into them).
    """
    head = fi.u16()
    nr = fi.below(max_buffers + 1)
    nw = fi.below(max_buffers + 1)
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    for _ in range(nr):
        n = fi.u16() % (max_len + 1)
        readable.append(memoryview(bytearray(fi.take(n))))
    for _ in range(nw):
        n = fi.u16() % (max_len + 1)
        writable.append(memoryview(bytearray(b"\xee" * n)))
    return Chain(head, readable, writable), [bytes(b) for b in readable]


def _check_handled(chain: Chain, before: list[bytes], written: object) -> int:
    expect(isinstance(written, int), f"handle() returned {written!r}")
    assert isinstance(written, int)
    expect(0 <= written <= chain.writable_len, f"{written} bytes written into {chain.writable_len} writable")
    expect([bytes(b) for b in chain.readable] == before, "the device wrote into a device-readable buffer")
    return written


def target_blk_handle(data: bytes) -> int:
    """BlockBackend.handle on chains built from the input.

    Input: ``u8`` storage choice (RAM, read-only RAM, file), ``u8``
    capacity in 4 KiB units, ``u8`` max_discard_seg, then up to 8 chains
    (:func:`chain_from_input`). Each request must end with a status byte
    (0, 1 or 2) in the last writable byte, or, without room for one, with
    nothing written at all.
    """
    fi = FuzzInput(data)
    choice = fi.below(3)
    capacity = 4096 * (1 + fi.u8())
    if choice == 2:
        storage = _file_backed()
    else:
        storage = Storage(size=capacity, readonly=choice == 1)
    backend = BlockBackend(storage, max_discard_seg=1 + fi.below(32))
    ok = 0
    try:
        for _ in range(8):
            if fi.exhausted:
                break
            chain, before = chain_from_input(fi)
            written = _check_handled(chain, before, backend.handle(0, chain))
            last = chain.writable[-1] if chain.writable else None
            if last is None or not len(last):
                expect(written == 0, "a request without a status byte reported bytes written")
                expect(all(not any(b != 0xEE for b in w) for w in chain.writable), "wrote without a status byte")
                continue
            status = last[len(last) - 1]
            expect(status in (B.S_OK, B.S_IOERR, B.S_UNSUPP), f"status byte {status:#x}")
            expect(written >= 1, "status written but not counted")
            ok += status == B.S_OK
        if storage.chunks is not None:
            limit = -(-storage.size // CHUNK)
            expect(all(0 <= k < limit for k in storage.chunks), "RAM disk chunk beyond the capacity")
    finally:
        if choice != 2:
            storage.close()
    return ok


def target_scsi_handle(data: bytes) -> int:
    """ScsiBackend.handle on chains built from the input, on any of its queues.

    Input: ``u8`` options (block size, sense format, second LUN), then
    operations: ``u8`` opcode (a chain on the control / event / request
    queue (:func:`chain_from_input`), or a hot-plug of LUN 0:1).
    """
    fi = FuzzInput(data)
    opts = fi.u8()
    block = 4096 if opts & 1 else 512
    luns = {(0, 0): ScsiLun(Storage(size=64 * block), block_size=block)}
    if opts & 2:
        luns[(0, 2)] = ScsiLun(Storage(size=1 << 20), readonly=True)
    backend = ScsiBackend(luns, sense_format="descriptor" if opts & 4 else "fixed")
    served = 0
    try:
        for _ in range(12):
            if fi.exhausted:
                break
            op = fi.below(5)
            if op == 4:
                if (0, 1) in backend.luns:
                    backend.remove_lun(0, 1)
                else:
                    backend.add_lun(0, 1, ScsiLun(Storage(size=1 << 16)))
                continue
            queue = min(op, S.FIRST_REQUEST_QUEUE)
            if queue == S.EVENT_QUEUE and not backend.pending(queue):
                continue  # the server only hands it event buffers when it has events
            chain, before = chain_from_input(fi, max_len=1024)
            _check_handled(chain, before, backend.handle(queue, chain))
            served += 1
    finally:
        backend.close()
    return served


def target_net_handle(data: bytes) -> int:
    """NetBackend.handle (loopback mode) on transmit and receive chains built from the input.

    Input: ``u8`` options (two pairs, swap_mac), ``u32`` negotiated feature
    bits (MRG_RXBUF, GUEST_CSUM...), then operations: ``u8`` opcode (a
    transmit chain on a tx queue, a receive chain on an rx queue (only while
    :meth:`~pyvirtio.backends.net.NetBackend.pending` says frames wait, as
    the server does), a reset), each chain as :func:`chain_from_input`.
    Transmit chains write nothing; receive chains get at most their
    writable bytes; every frame queued comes out once, whole or counted
    as dropped or truncated.
    """
    from pyvirtio.backends.net import NetBackend

    fi = FuzzInput(data)
    opts = fi.u8()
    backend = NetBackend("loopback", pairs=2 if opts & 1 else 1, swap_mac=bool(opts & 2))
    backend.negotiated(fi.u32())
    served = 0
    try:
        for _ in range(16):
            if fi.exhausted:
                break
            op = fi.below(5)
            if op == 4:
                backend.reset()
                continue
            pair = (op >> 1) % backend.pairs
            queue = 2 * pair + (op & 1)  # odd: transmit, even: receive
            if queue % 2 == 0 and not backend.pending(queue):
                continue  # the server only hands out receive chains when frames wait
            chain, before = chain_from_input(fi, max_len=2048)
            written = _check_handled(chain, before, backend.handle(queue, chain))
            if queue % 2:
                expect(written == 0, "a transmit chain reported bytes written")
                expect(all(not any(b != 0xEE for b in w) for w in chain.writable), "tx wrote into the chain")
            served += 1
            expect(all(backend.pending(q) >= 0 for q in range(0, 2 * backend.pairs, 2)), "negative pending")
    finally:
        backend.close()
    return served


# -- pure parsers of device-provided data --------------------------------------------


def target_spec_parsers(data: bytes) -> int:
    """Config-space, sense and LUN parsers (blk, scsi, net, T10) on arbitrary bytes.

    Input: ``u8`` parser choice, then the bytes to parse. None of them may
    raise at all: they decode what a device wrote.
    """
    fi = FuzzInput(data)
    which = fi.below(7)
    raw = fi.rest()
    if which == 0:
        cfg = B.parse_config(raw)
        expect(all(isinstance(v, int) for v in cfg.values()), "blk config values")
    elif which == 1:
        S.parse_config(raw)
    elif which == 2:
        N.parse_config(raw)
    elif which == 3:
        sense = T.parse_sense(raw)
        if sense is not None:
            str(sense)
            expect(0 <= sense.key <= 0xF, f"sense key {sense.key}")
    elif which == 4:
        lun = T.decode_lun(raw[:8])
        expect(lun is None or 0 <= lun < 0x4000, f"LUN {lun}")
        if lun is not None:
            expect(T.decode_lun(T.encode_lun(lun)) == lun, "LUN does not round-trip")
    elif which == 5:
        T.opcode_name(raw)
    else:
        T.asc_name(raw[0] if raw else 0, raw[1] if len(raw) > 1 else 0)
    return 1


# -- registry -------------------------------------------------------------------------


def _late(module: str, name: str) -> Callable[[bytes], int]:
    """Targets in other modules, imported on first use (they start threads, open sockets)."""

    def run(data: bytes) -> int:
        import importlib

        fn: Callable[[bytes], int] = getattr(importlib.import_module(module), name)
        return fn(data)

    run.__name__ = name
    run.__doc__ = f"See :func:`{module}.{name}`."
    return run


TARGETS: dict[str, Callable[[bytes], int]] = {
    "vu_decode_request": target_vu_decode_request,
    "vu_parse_reply": target_vu_parse_reply,
    "vu_backend_channel": target_vu_backend_channel,
    "split_reap": target_split_reap,
    "fixed_reap": target_fixed_reap,
    "device_pop": target_device_pop,
    "blk_handle": target_blk_handle,
    "scsi_handle": target_scsi_handle,
    "net_handle": target_net_handle,
    "spec_parsers": target_spec_parsers,
    "blk_driver": _late("fuzz._drivers", "target_blk_driver"),
    "scsi_driver": _late("fuzz._drivers", "target_scsi_driver"),
    "net_driver": _late("fuzz._drivers", "target_net_driver"),
    "server": _late("fuzz._server", "target_server"),
    "packed_reap": _late("fuzz._packed", "target_packed_reap"),
    "packed_device_pop": _late("fuzz._packed", "target_packed_device_pop"),
    "server_packed": _late("fuzz._server_packed", "target_server_packed"),
    "packed_stream": _late("fuzz._packed_stream", "target_packed_stream"),
}

__all__ = ["KNOWN_ISSUES", "TARGETS", "InvariantBroken", "expect", "note_known", "quiet_logs", "strict"]
