"""A back end's ring as the frontend laid it out: the layout checked, its queue built.

Theory of operation
-------------------
The control plane (:mod:`pyvirtio.backends.control`) records what the
SET_VRING_* messages say in a :class:`~pyvirtio.backends.ringstate.RingState`
and decides *when* a ring starts and stops (vhost-user.rst, "Ring states").
This module holds the checks that depend only on the ring's layout and the
negotiated features, and builds the ring's queue
(:class:`~pyvirtio.ring.base.DeviceRing`, split or packed) over the
frontend's memory table. The frontend is not trusted: each check raises
:class:`~pyvirtio.errors.ProtocolViolation`, and the connection is dropped.

The ring format is the negotiated one (:func:`ring_format`:
VIRTIO_F_RING_PACKED, with VIRTIO_F_IN_ORDER or not). The control plane
makes these checks when a message comes, if the features are known, and
:func:`make_queue` makes them again when the ring starts:

* the size (:func:`check_num`): a split ring's is a power of 2 up to 32768
  (virtio 1.2 §2.7), a packed ring's 1..32768 (§2.8);
* the addresses (:func:`check_addr`): for a split ring the descriptor
  table, avail and used rings are 16-, 2- and 4-byte aligned (§2.7); for a
  packed ring SET_VRING_ADDR's descriptor / available / used fields are the
  descriptor ring (16-byte aligned, §2.8.13) and the driver / device event
  suppression structures (4-byte aligned, §2.8.10.1). Each must lie in the
  memory table, which the queue's construction checks;
* the base: a split ring's is a 16-bit avail index; a packed ring's carries
  both positions with their wrap counters (vhost-user.rst, "Vring
  descriptor indices for packed virtqueues"; SET_VRING_BASE itself is
  checked by the control plane);
* a chain is at most the ring's size long, indirect chains included
  (§2.7.5.3.1 / §2.8.19).

A connection with an inflight area (INFLIGHT_SHMFD,
:mod:`pyvirtio.backends.inflight`) starts each ring with its tracker
(:func:`start_queue`), which resubmits what a previous back end left in
flight; a packed ring resumes where the area says, so its base is recovered
from the area and the descriptor ring before the queue is built.

Kick, call and err fds must be eventfds (:func:`is_eventfd`): the data path
writes and reads them as counters.
"""

from __future__ import annotations

import os

from pyvirtio.backends.inflight import InflightArea, PackedQueueInflight
from pyvirtio.backends.ringstate import RingState
from pyvirtio.errors import DriverProtocolError, InvalidArgument, ProtocolViolation
from pyvirtio.memory import MemoryTable
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.ring.base import DeviceRing
from pyvirtio.ring.device_side import open_device_ring
from pyvirtio.spec.common import F_IN_ORDER, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_RING_PACKED
from pyvirtio.spec.ring import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_SIZE,
    EVENT_SUPPRESS_ALIGN,
    MAX_QUEUE_SIZE,
    PACKED_DESC_ALIGN,
    USED_ALIGN,
    is_power_of_two,
)

__all__ = ["check_addr", "check_num", "is_eventfd", "make_queue", "ring_format", "start_queue"]


def ring_format(features: int) -> str:
    """``"packed"`` or ``"split"``, as the acked ``features`` say."""
    return "packed" if features >> F_RING_PACKED & 1 else "split"


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return True  # no /proc: cannot tell, accept


def check_num(fmt: str, index: int, num: int) -> None:
    """Ring ``index``'s size ``num`` for a ring of format ``fmt``."""
    if fmt == "packed":
        if not 1 <= num <= MAX_QUEUE_SIZE:
            raise ProtocolViolation(f"ring size {num} for packed ring {index}: not 1..32768 (virtio 1.2 §2.8)")
    elif not is_power_of_two(num) or num > MAX_QUEUE_SIZE:
        # virtio 1.2 §2.7: a split queue's size is a power of 2, at most 32768.
        raise ProtocolViolation(f"SET_VRING_NUM {num} for ring {index}: not a power of 2 up to 32768")


def check_addr(fmt: str, index: int, value: vu.VringAddr) -> None:
    """Ring ``index``'s addresses aligned for a ring of format ``fmt``."""
    if fmt == "packed":
        # virtio 1.2 §2.8.13: descriptors 16-byte aligned; §2.8.10.1: event structures 4-byte aligned.
        areas = (
            ("descriptor ring", value.desc, PACKED_DESC_ALIGN),
            ("driver event suppression area", value.avail, EVENT_SUPPRESS_ALIGN),
            ("device event suppression area", value.used, EVENT_SUPPRESS_ALIGN),
        )
    else:
        # virtio 1.2 §2.7: descriptor table 16-, avail 2-, used ring 4-byte aligned.
        areas = (
            ("descriptor table", value.desc, DESC_ALIGN),
            ("avail ring", value.avail, AVAIL_ALIGN),
            ("used ring", value.used, USED_ALIGN),
        )
    for what, addr, align in areas:
        if addr % align:
            raise ProtocolViolation(f"ring {index}: {what} address 0x{addr:x} not {align}-byte aligned")


def make_queue(ring: RingState, memory: MemoryTable, features: int, base: int | None) -> DeviceRing:
    """The ring's queue at ``base`` (None: only checking the addresses, at the format's initial base)."""
    addr = ring.addr
    assert addr is not None
    fmt = ring_format(features)
    check_num(fmt, ring.index, ring.num)
    check_addr(fmt, ring.index, addr)
    if base is None:
        base = 0  # only the addresses are checked: any base the format allows
    if fmt == "split" and base > 0xFFFF:
        raise ProtocolViolation(f"ring {ring.index}: base {base} is beyond a split ring's 16 bits")
    try:
        return open_device_ring(
            fmt,
            memory,
            ring.num,
            addr.desc,
            addr.avail,
            addr.used,
            base=base,
            user_addresses=True,
            index=ring.index,
            event_idx=bool(features >> F_RING_EVENT_IDX & 1),
            indirect=bool(features >> F_RING_INDIRECT_DESC & 1),
            in_order=bool(features >> F_IN_ORDER & 1),
            max_chain=ring.num,  # virtio 1.2 §2.7.5.3.1 / §2.8.19, indirect chains included
        )
    except (DriverProtocolError, InvalidArgument) as exc:
        raise ProtocolViolation(f"ring {ring.index}: {exc}") from None


def start_queue(ring: RingState, memory: MemoryTable, features: int, area: InflightArea | None) -> DeviceRing:
    """The ring's queue, with its inflight tracking (``ring.inflight``) if the connection has an ``area``."""
    fmt = ring_format(features)
    tracker = None if area is None else area.queue(ring.index, fmt)
    if tracker is None:
        if area is not None and fmt == "packed" and ring.index < area.num_queues:
            raise ProtocolViolation(f"ring {ring.index}: the inflight area has no room for a packed ring's region")
        return make_queue(ring, memory, features, ring.base)
    if tracker.desc_num < ring.num:
        raise ProtocolViolation(
            f"ring {ring.index} of {ring.num} descriptors: the inflight area tracks {tracker.desc_num}"
        )
    try:
        if isinstance(tracker, PackedQueueInflight):
            desc = _desc_ring(ring, memory)
            try:
                base = tracker.recover(desc, ring.num, ring.base)
                queue = make_queue(ring, memory, features, base)
                tracker.start(queue, desc)
            except BaseException:
                desc.release()
                raise
        else:
            queue = make_queue(ring, memory, features, ring.base)
            tracker.start(queue)
    except DriverProtocolError as exc:
        raise ProtocolViolation(str(exc)) from None
    ring.inflight = tracker
    return queue


def _desc_ring(ring: RingState, memory: MemoryTable) -> memoryview:
    """The ring's descriptor area (a view the caller releases)."""
    addr = ring.addr
    assert addr is not None
    return memory.uva(addr.desc, DESC_SIZE * ring.num)
