"""One virtqueue API: both ring formats implement pyvirtio.ring.base's protocols, with the same semantics.

The protocols are checked three ways: structurally at run time
(``isinstance`` on runtime-checkable protocols), member by member (each
protocol method exists with a compatible signature), and by behaviour: the
same script driven through :class:`~pyvirtio.ring.base.RingQueue` and
:class:`~pyvirtio.ring.base.DeviceRing` gives the same completions, errors
and bookkeeping on a split and on a packed ring. (mypy --strict checks the
static side in pyvirtio/ring/__init__.py.)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest

from pyvirtio.errors import (
    DeviceProtocolError,
    InvalidArgument,
    QueueBroken,
    QueueFull,
    QueueStateError,
    RequestTooLarge,
)
from pyvirtio.memory import MemoryPool
from pyvirtio.ring import (
    DeviceQueue,
    DeviceRing,
    PackedDeviceQueue,
    PackedQueue,
    RingAddresses,
    RingQueue,
    SplitQueue,
)
from pyvirtio.spec.ring import PACKED_INITIAL_BASE
from pyvirtio.testing import HostileDevice, HostilePackedDevice, PackedRingPair, RingPair

Pair = RingPair | PackedRingPair
FORMATS = ["split", "packed"]


def make_pair(fmt: str, size: int = 8, **kw: bool | int) -> Pair:
    cls = RingPair if fmt == "split" else PackedRingPair
    return cls(size, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=FORMATS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    with make_pair(request.param) as p:
        yield p


# -- the protocols are what the classes implement ----------------------------------------


def _methods(proto: type) -> dict[str, object]:
    """The protocol's methods and properties (its data members are checked on live queues)."""
    return {
        name: value
        for name, value in vars(proto).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }


def _check_signatures(cls: type, proto: type) -> None:
    methods = _methods(proto)
    assert len(methods) >= 9  # not an empty match
    for name, want_attr in methods.items():
        impl_attr = inspect.getattr_static(cls, name)
        if isinstance(want_attr, property):
            assert isinstance(impl_attr, property), f"{cls.__name__}.{name} is not a property"
            continue
        assert inspect.isfunction(want_attr) and inspect.isfunction(impl_attr), name
        want = inspect.signature(want_attr).parameters
        impl = inspect.signature(impl_attr).parameters
        for param in want:
            assert param in impl, f"{cls.__name__}.{name} lacks parameter {param}"
            assert impl[param].default == want[param].default, (cls.__name__, name, param)
        extra = [p for p in impl.values() if p.name not in want]
        assert all(p.default is not inspect.Parameter.empty for p in extra), (cls.__name__, name, extra)


@pytest.mark.parametrize("cls", [SplitQueue, PackedQueue])
def test_driver_classes_implement_every_protocol_method(cls: type) -> None:
    _check_signatures(cls, RingQueue)


@pytest.mark.parametrize("cls", [DeviceQueue, PackedDeviceQueue])
def test_device_classes_implement_every_protocol_method(cls: type) -> None:
    _check_signatures(cls, DeviceRing)


def test_isinstance_on_live_queues(pair: Pair) -> None:
    """runtime_checkable: every member, data ones included, is present on a live queue."""
    for name in RingQueue.__annotations__:
        assert hasattr(pair.driver, name), name
    for name in DeviceRing.__annotations__:
        assert hasattr(pair.device, name), name
    assert isinstance(pair.driver, RingQueue)
    assert isinstance(pair.device, DeviceRing)
    assert pair.driver.format == pair.device.format in FORMATS
    assert not isinstance(object(), RingQueue)


def test_addresses_point_into_the_ring(pair: Pair) -> None:
    a = pair.driver.addresses()
    assert isinstance(a, RingAddresses)
    size = pair.driver.size
    assert a.desc_size == 16 * size
    if pair.driver.format == "split":
        assert (a.driver_size, a.device_size) == (6 + 2 * size, 6 + 8 * size)
    else:
        assert (a.driver_size, a.device_size) == (4, 4)
    # The three areas do not overlap and each is readable from the pool.
    spans = sorted([(a.desc, a.desc_size), (a.driver, a.driver_size), (a.device, a.device_size)])
    for (start, n), (nxt, _) in zip(spans, spans[1:], strict=False):
        assert start + n <= nxt
    for start, n in spans:
        assert len(pair.pool.translate(start, n)) == n
    assert a.desc % 16 == 0 and a.driver % 2 == 0 and a.device % 4 == 0


def test_initial_base(pair: Pair) -> None:
    want = 0 if pair.driver.format == "split" else PACKED_INITIAL_BASE
    assert pair.driver.restart_base() == want
    assert pair.device.base == want


# -- the same behaviour through the protocol ----------------------------------------------


def _script(q: RingQueue, dev: DeviceRing, pool: MemoryPool, pair: Pair) -> list[object]:
    """Requests of 1-3 buffers, completed out of order, reaped in pieces: the log of what came back."""
    log: list[object] = []
    w = pair.buffer(256)
    r = pair.buffer(64, bytes(range(64)))
    for token in range(6):
        q.submit(token, [(r.addr, 4 + token, False), (w.addr + 32 * token, 8, True)])
    log.append(("kick", q.flush()))
    log.append(("in_flight", sorted(q.in_flight_tokens())))  # type: ignore[type-var]
    chains = []
    while (c := dev.pop()) is not None:
        chains.append(c)
    for c in reversed(chains):  # out of order
        dev.add_used(c.head, c.write(c.read_all()[:5]))
    dev.flush_used()
    log.append(("pending", q.pending()))
    log.append(("reap2", q.reap(2)))
    log.append(("reap", q.reap()))
    log.append(("idle", q.outstanding, q.num_free, q.reap()))
    return log


def test_same_script_same_results() -> None:
    logs = []
    for fmt in FORMATS:
        with make_pair(fmt, 16) as p:
            logs.append(_script(p.driver, p.device, p.pool, p))
    assert logs[0] == logs[1]
    assert logs[0][3] == ("reap2", [(5, 5), (4, 5)])


def test_refusals_are_the_same(pair: Pair) -> None:
    q: RingQueue = pair.driver
    buf = pair.buffer(16)
    with pytest.raises(RequestTooLarge):
        q.submit("big", [(buf.addr, 1, False)] * 9)
    with pytest.raises(InvalidArgument):
        q.submit("bad", [(buf.addr, 1, False), (-1, 1, True)])
    assert not q.request_open and q.outstanding == 0 and q.num_free == 8
    with pytest.raises(QueueStateError):
        q.abort()
    q.start("open", 2)
    assert q.request_open
    q.add(buf.addr, 4)
    q.abort()
    assert not q.request_open and q.num_free == 8
    for k in range(4):
        q.submit(k, [(buf.addr, 1, False), (buf.addr, 1, True)])
    with pytest.raises(QueueFull):
        q.submit("full", [(buf.addr, 1, True)])
    assert sorted(q.in_flight_tokens()) == [0, 1, 2, 3]  # type: ignore[type-var]
    assert sorted(q.reset()) == [0, 1, 2, 3]  # type: ignore[type-var]
    assert q.outstanding == 0 and q.in_flight_tokens() == []


def test_device_errors_break_the_queue_the_same_way(pair: Pair) -> None:
    """A used entry naming an id out of range: DeviceProtocolError with the completions before it, then QueueBroken."""
    q: RingQueue = pair.driver
    buf = pair.buffer(16)
    q.submit("a", [(buf.addr, 8, True)])
    q.submit("b", [(buf.addr, 8, True)])
    q.flush()
    if isinstance(q, SplitQueue):
        h = HostileDevice(q)
        h.complete((0, 3), (999, 0))
    else:
        assert isinstance(q, PackedQueue)
        hp = HostilePackedDevice(q)
        hp.use(0, 3)
        hp.use(999, 0)
    with pytest.raises(DeviceProtocolError, match="used id 999 is out of range") as info:
        q.reap()
    assert info.value.completed == [("a", 3)]
    assert q.broken is not None and q.in_flight_tokens() == ["b"]
    with pytest.raises(QueueBroken):
        q.submit("c", [(buf.addr, 1, False)])
    with pytest.raises(QueueBroken):
        q.reap()
    assert q.reset() == ["b"] and q.broken is None


def test_interrupt_suppression_round_trip(pair: Pair) -> None:
    q: RingQueue = pair.driver
    buf = pair.buffer(16)
    assert not q.interrupts_enabled
    assert q.enable_interrupts() is False
    q.submit("x", [(buf.addr, 8, True)])
    q.flush()
    pair.serve()
    assert q.enable_interrupts() is True  # a completion is already there: reap, do not sleep
    assert q.interrupts_enabled
    q.disable_interrupts()
    assert not q.interrupts_enabled
    assert q.reap() == [("x", 0)]
