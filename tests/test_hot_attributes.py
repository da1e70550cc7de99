"""The rings' state is in slots, so CPython specialises every attribute access on the hot paths.

CPython 3.11 keeps an instance's attributes inline (and its specialised
``LOAD_ATTR_INSTANCE_VALUE`` reads one) only while the class's shared keys
hold fewer than 30 names; at that the instance gets a real dict and every
access becomes ``LOAD_ATTR_WITH_HINT``, a dict probe. The driver rings
(about 50 names) and the packed device ring (30) were there: the packed
device's pop / add_used / flush_used made 50 such probes per request
(2,300 of its 51,000 instructions per QD1 request, ``bench/device_count.py``).
With ``__slots__`` every access is ``LOAD_ATTR_SLOT`` / ``STORE_ATTR_SLOT``.

Three checks: the ring classes' instances have no dict, nor have those of
the request engine and the drivers built on it (``VirtioBlk``,
``VirtioScsi``: 32 and 39 names, read on their one-request paths); and, after a served
block workload on each format (the driver's fixed-chain cycle, the embedded
back end's ``DataPath`` with the block model, as ``bench/device_count.py``
runs them), no function of the ring and back-end modules holds a dict-probe
attribute instruction (CPython's adaptive bytecode, ``dis(adaptive=True)``).
"""

from __future__ import annotations

import dis
import inspect
import io
import os
import sys
import types
from collections.abc import Iterator

import pytest

from pyvirtio.backends import datapath
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.datapath import DataPath
from pyvirtio.backends.model import ModelHooks
from pyvirtio.backends.ringstate import RingState
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.drivers.requests import RequestEngine
from pyvirtio.drivers.scsi.driver import VirtioScsi
from pyvirtio.memory import MemoryPool, MemoryTable
from pyvirtio.ring import (
    cycle_packed,
    cycle_split,
    device_packed,
    device_side,
    fixed,
    fixed_packed,
    fixed_split,
    packed,
    split,
    stream_packed,
    stream_split,
)
from pyvirtio.ring.device_packed import PackedDeviceQueue
from pyvirtio.ring.device_side import DeviceQueue, open_device_ring
from pyvirtio.ring.fixed import FixedChains
from pyvirtio.ring.packed import PackedQueue
from pyvirtio.ring.split import SplitQueue

HOT_MODULES = (cycle_packed, cycle_split, device_packed, device_side, fixed, fixed_packed, fixed_split, packed,
               split, stream_packed, stream_split, datapath)
SIZE = 128


@pytest.fixture
def big_pool() -> Iterator[MemoryPool]:
    with MemoryPool(4 << 20, name="pyvirtio-test-hot") as p:
        yield p


def _serve_blk(pool: MemoryPool, fmt: str, depth: int, passes: int) -> tuple[object, object]:
    """Blk-shaped requests through the fixed-chain cycle and the embedded back end's data path."""
    ring = (PackedQueue if fmt == "packed" else SplitQueue)(SIZE, pool, event_idx=True)
    bufs = [(pool.allocate(16), pool.allocate(4096), pool.allocate(1)) for _ in range(2 * depth)]
    fc = FixedChains(ring, [[(h.addr, 16, False), (d.addr, 4096, True), (s.addr, 1, True)] for h, d, s in bufs])
    fc.enable_interrupts()
    cyc = fc.cycle(depth, lambda: None, vectorised=False)
    a = ring.addresses()
    base = ring.initial_base if isinstance(ring, PackedQueue) else 0
    queue = open_device_ring(fmt, MemoryTable.from_pool(pool), SIZE, a.desc, a.driver, a.device, base=base,
                             event_idx=True)
    dp = DataPath(ModelHooks.of(BlockBackend(Storage(size=1 << 20))), poll_us=0)
    state = RingState(0)
    state.queue = queue
    state.call = os.eventfd(0, os.EFD_NONBLOCK)
    before = dp.chains
    try:
        for _ in range(passes):
            cyc.turn()
            dp.wake(state)
            while state in dp.busy:
                dp.run()
    finally:
        os.close(state.call)
    assert dp.chains - before >= passes * depth - 2 * depth  # the workload ran
    return ring, queue


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_rings_have_no_instance_dict(big_pool: MemoryPool, fmt: str) -> None:
    ring, queue = _serve_blk(big_pool, fmt, 1, 4)
    assert type(queue) is (PackedDeviceQueue if fmt == "packed" else DeviceQueue)
    for obj in (ring, queue):
        assert not hasattr(obj, "__dict__"), type(obj).__name__
        with pytest.raises(AttributeError):
            obj.not_an_attribute = 1  # type: ignore[union-attr]


@pytest.mark.parametrize("cls", [SplitQueue, PackedQueue, DeviceQueue, PackedDeviceQueue, RequestEngine, VirtioBlk,
                                 VirtioScsi])
def test_per_request_classes_have_no_instance_dict(cls: type) -> None:
    """The rings, and the request engine with the drivers on it (their one-request paths: allocate, build, free)."""
    assert cls.__dictoffset__ == 0, f"{cls.__name__} instances have a __dict__: a base or the class lacks __slots__"


def _dict_probes() -> list[str]:
    out = []
    for mod in HOT_MODULES:
        for cls in vars(mod).values():
            if not inspect.isclass(cls) or cls.__module__ != mod.__name__:
                continue
            for name, fn in vars(cls).items():
                if isinstance(fn, types.FunctionType):
                    text = io.StringIO()
                    dis.dis(fn, adaptive=True, file=text)  # type: ignore[call-arg]
                    probes = sorted({ln.rsplit("(", 1)[-1].rstrip(")") for ln in text.getvalue().splitlines()
                                     if "ATTR_WITH_HINT" in ln})
                    if probes:
                        out.append(f"{cls.__name__}.{name}: {probes}")
    return out


@pytest.mark.skipif(sys.implementation.name != "cpython" or sys.version_info < (3, 11),
                    reason="CPython's adaptive bytecode (3.11+)")
@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("depth", [1, 16])
def test_served_workload_specialises_every_attribute(big_pool: MemoryPool, fmt: str, depth: int) -> None:
    _serve_blk(big_pool, fmt, depth, 300)  # enough passes for the interpreter to specialise
    assert _dict_probes() == []
