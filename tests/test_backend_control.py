"""The back end's control plane (backends/control.py) driven in memory, without a socket.

pyvirtio's frontend codec encodes requests, a MessageReader cuts them into
messages, and :class:`ControlPlane` answers with actions (replies to send,
rings to start and stop). Replies are parsed with the frontend codec, so each
test reads like a conversation: the answer a frontend gets, and what the
connection is told to do with the rings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.control import MAX_MEM_SLOTS, Action, ControlPlane, Notify, Send, StartRing, StopRing
from pyvirtio.backends.model import ModelHooks
from pyvirtio.errors import DriverProtocolError, ProtocolViolation
from pyvirtio.memory import Region
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec.common import F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
from pyvirtio.spec.ring import split_layout

UVA = 0x7F00_0000_0000
GPA = 0x10_0000


class Conversation:
    """A control plane and a frontend codec joined in memory."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.codec = vu.FrontendCodec()

    def send(self, out: vu.Outgoing) -> list[Action]:
        reader = vu.MessageReader(DriverProtocolError)
        reader.feed(out.data, out.fds)
        msg = reader.next_message()
        assert msg is not None and reader.next_message() is None
        # The control plane owns the fds of a message: give it copies, keep ours.
        msg = vu.Message(msg.request, msg.flags, msg.payload, tuple(os.dup(fd) for fd in msg.fds))
        return self.control.receive(msg)

    def ask(self, out: vu.Outgoing) -> vu.ReplyValue:
        """Send a request that has a reply: exactly one Send, parsed as the frontend would."""
        actions = self.send(out)
        sends = [a for a in actions if isinstance(a, Send)]
        assert len(sends) == 1, actions
        reader = vu.MessageReader()
        reader.feed(sends[0].out.data, sends[0].out.fds)
        reply = reader.next_message()
        assert reply is not None
        return self.codec.parse_reply(out, reply)


@pytest.fixture
def conv() -> Iterator[Conversation]:
    storage = Storage(size=1 << 20)
    control = ControlPlane(ModelHooks.of(BlockBackend(storage, num_queues=2)))
    try:
        yield Conversation(control)
    finally:
        control.close()
        storage.close()


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region.create(64 << 10, "control-test")
    yield r
    r.close()


def start_ring(conv: Conversation, region: Region, index: int, kick: int) -> list[Action]:
    """Mem table (once), then ring ``index`` at the start of ``region``; returns the kick's actions."""
    c = conv.codec
    if not len(conv.control.memory):
        assert conv.send(c.set_mem_table([vu.MemRegion(GPA, region.size, UVA)], [region.fd])) == []
    avail, used, size = split_layout(8)
    base = UVA + index * 4096
    assert conv.send(c.set_vring_num(index, 8)) == []
    assert conv.send(c.set_vring_addr(vu.VringAddr(index, 0, base, base + used, base + avail))) == []
    return conv.send(c.set_vring_kick(index, kick))


def test_replies_are_actions_and_nothing_else(conv: Conversation) -> None:
    c = conv.codec
    offered = conv.ask(c.get_features())
    assert isinstance(offered, int) and offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1 and offered >> F_VERSION_1 & 1
    assert conv.ask(c.get_queue_num()) == 2
    assert conv.ask(c.get_max_mem_slots()) == MAX_MEM_SLOTS
    assert conv.send(c.set_owner()) == []  # no reply asked: nothing to do
    assert conv.ask(c.set_owner(need_reply=True)) == 0  # asked: acked, even without REPLY_ACK
    space = conv.ask(c.get_config(0, 8))
    assert isinstance(space, vu.ConfigSpace) and int.from_bytes(space.data, "little") == (1 << 20) // B.SECTOR_SIZE
    assert conv.control.owner


def test_a_ring_starts_on_its_kick_and_stops_at_get_vring_base(conv: Conversation, region: Region) -> None:
    c = conv.codec
    conv.send(c.set_owner())
    conv.send(c.set_features(1 << F_VERSION_1))  # no PROTOCOL_FEATURES: rings start enabled
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        actions = start_ring(conv, region, 0, kick)
        assert len(actions) == 1 and isinstance(actions[0], StartRing)
        started = actions[0]
        assert started.ring.index == 0 and started.ring.queue is not None and started.kick >= 0
        assert started.kick != kick  # the control plane holds its own fd (the message's)
        # A second memory table while the ring runs: stopped, re-translated, started.
        other = Region.create(64 << 10, "control-test-2")
        try:
            actions = conv.send(c.set_mem_table([vu.MemRegion(GPA, other.size, UVA)], [other.fd]))
        finally:
            other.close()
        stop, start = actions
        assert isinstance(stop, StopRing) and isinstance(start, StartRing)
        assert stop.ring is start.ring is started.ring
        assert stop.kick == start.kick == started.kick
        # GET_VRING_BASE: the ring stops (its kick is forgotten), then the answer.
        actions = conv.send(c.get_vring_base(0))
        stop, reply = actions
        assert isinstance(stop, StopRing) and isinstance(reply, Send)
        assert stop.ring is started.ring and stop.kick == started.kick
        assert started.ring.queue is None and started.ring.kick == -1  # eventfds dropped
        with pytest.raises(OSError):
            os.fstat(started.kick)  # closed by the control plane
    finally:
        os.close(kick)


def test_with_protocol_features_a_ring_waits_for_enable(conv: Conversation, region: Region) -> None:
    c = conv.codec
    conv.send(c.set_owner())
    conv.send(c.set_features(1 << F_VERSION_1 | 1 << VHOST_USER_F_PROTOCOL_FEATURES))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        assert start_ring(conv, region, 1, kick) == []  # disabled: not started
        actions = conv.send(c.set_vring_enable(1, True))
        assert len(actions) == 1 and isinstance(actions[0], StartRing) and actions[0].ring.index == 1
        actions = conv.send(c.set_vring_enable(1, False))
        assert len(actions) == 1 and isinstance(actions[0], StopRing)
    finally:
        os.close(kick)


def test_close_stops_what_runs_and_releases_everything(conv: Conversation, region: Region) -> None:
    c = conv.codec
    conv.send(c.set_owner())
    conv.send(c.set_features(1 << F_VERSION_1))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        ring = start_ring(conv, region, 0, kick)[0]
        assert isinstance(ring, StartRing)
        conv.send(c.set_vring_call(0, call))
        held_call = ring.ring.call
        actions = conv.control.close()
        assert [type(a) for a in actions] == [StopRing]
        assert len(conv.control.memory) == 0
        for fd in (ring.kick, held_call):
            with pytest.raises(OSError):
                os.fstat(fd)
        assert conv.control.close() == []  # idempotent
    finally:
        os.close(kick)
        os.close(call)


def test_unknown_requests_and_violations(conv: Conversation) -> None:
    # Unknown with NEED_REPLY: a failure ack, the connection stays.
    msg = vu.Message(vu.SET_LOG_FD, vu.VERSION | vu.NEED_REPLY, b"", ())
    (send,) = conv.control.receive(msg)
    assert isinstance(send, Send) and send.out.data[12:] == (1).to_bytes(8, "little")
    # Unknown without it: a violation (the frontend would wait forever otherwise).
    with pytest.raises(ProtocolViolation, match="not supported"):
        conv.control.receive(vu.Message(vu.SET_LOG_FD, vu.VERSION, b"", ()))
    # A ring request before SET_OWNER.
    with pytest.raises(ProtocolViolation, match="before SET_OWNER"):
        conv.send(conv.codec.set_vring_num(0, 8))
    conv.send(conv.codec.set_owner())
    with pytest.raises(ProtocolViolation, match="the device has 2"):
        conv.send(conv.codec.set_vring_num(2, 8))
    with pytest.raises(ProtocolViolation, match="not a power of 2"):
        conv.send(conv.codec.set_vring_num(0, 6))


def test_a_refused_request_is_a_failure_ack(conv: Conversation) -> None:
    # blk's config is read-only: SET_CONFIG is refused, not a violation.
    assert conv.ask(conv.codec.set_config(0, b"\x01", need_reply=True)) == 1
    assert conv.ask(conv.codec.get_features())  # still answering


def test_a_notification_missed_without_a_call_fd_goes_to_the_next_one(conv: Conversation, region: Region) -> None:
    """The data path marks a ring that completed work with no call fd; SET_VRING_CALL then signals once."""
    c = conv.codec
    conv.send(c.set_owner())
    conv.send(c.set_features(1 << F_VERSION_1))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    calls = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    try:
        started = start_ring(conv, region, 0, kick)[0]
        assert isinstance(started, StartRing)
        ring = started.ring
        ring.call_missed = True  # what DataPath does when a notification is due and ring.call < 0
        (notify,) = conv.send(c.set_vring_call(0, calls[0]))
        assert isinstance(notify, Notify)
        assert notify.ring is ring and notify.fd == ring.call >= 0 and not ring.call_missed
        assert conv.send(c.set_vring_call(0, calls[1])) == []  # nothing missed since: no spurious one
        ring.call_missed = True
        assert conv.send(c.set_vring_call(0, None)) == []  # NOFD: nobody to tell (still owed)
        assert ring.call_missed
    finally:
        for fd in (kick, *calls):
            os.close(fd)
