"""The embedded back end against a hostile frontend on packed rings (virtio 1.2 §2.8).

The same distrust as on split rings (tests/test_backend_hostile.py), for
the packed layout: ring sizes that are not powers of two are served, ring
areas misaligned or bases pointing outside the ring are refused at set-up,
and in a running ring a descriptor list longer than the ring, a descriptor
outside the memory table (direct or in an indirect table), an indirect table
larger than the ring or inside a list, an unavailable descriptor inside a
list and a readable buffer after a writable one each drop the connection,
never the server; good lists before a bad one are completed first. After
each case pyvirtio's own frontend still gets service on a packed ring.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import ADDR, PACKED_FEATURES, STATE, HostileFrontend  # noqa: E402
from pyvirtio.backends.blk import BlockBackend, Storage  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.memory import Buffer  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402
from pyvirtio.spec import blk as B  # noqa: E402
from pyvirtio.spec.ring import DESC_F_INDIRECT, DESC_F_WRITE, packed_base  # noqa: E402
from pyvirtio.testing.hostile import RawPackedDriver, packed_avail_flags  # noqa: E402
from test_backend_hostile import Case, wait_reason  # noqa: E402

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserServer]:
    storage = Storage(size=8 << 20)
    srv = VhostUserServer(str(tmp_path_factory.mktemp("hostile-packed") / "blk.sock"), BlockBackend(storage))
    srv.start()
    yield srv
    srv.stop()
    assert srv.wait(10)
    storage.close()


def assert_serves_packed(server: VhostUserServer) -> None:
    with VirtioBlk.open(server.path, ring="packed", num_queues=1) as blk:
        data = os.urandom(4096)
        blk.write(8192, data)
        assert blk.read(8192, 4096) == data


@pytest.fixture
def case(server: VhostUserServer) -> Iterator[Case]:
    c = Case(server)
    try:
        yield c
    finally:
        c.fe.close()
    wait_reason(server, c.before)
    assert_serves_packed(server)


def _buf(fe: HostileFrontend, data: bytes | int) -> Buffer:
    size = data if isinstance(data, int) else len(data)
    buf = fe.pool.allocate(max(size, 1), align=16)
    buf.view[: len(buf.view)] = bytes(len(buf.view)) if isinstance(data, int) else data.ljust(len(buf.view), b"\0")
    return buf


def _get_id(fe: HostileFrontend) -> tuple[list[tuple[int, int, int]], Buffer, Buffer]:
    """The (addr, len, flags) list of a GET_ID request, its status and data buffers."""
    status = _buf(fe, b"\xee")
    ident = _buf(fe, B.ID_BYTES)
    hdr = _buf(fe, B.OUTHDR.pack(B.T_GET_ID, 0, 0))
    return [(hdr.addr, 16, 0), (ident.addr, B.ID_BYTES, DESC_F_WRITE), (status.addr, 1, DESC_F_WRITE)], status, ident


def test_odd_ring_size_is_served(case: Case) -> None:
    fe = case.fe
    fe.handshake(features=PACKED_FEATURES)
    fe.set_mem_table()
    rd = fe.setup_packed_ring(0, 100)
    for k in range(40):  # 120 descriptors: more than a lap, the wrap counters flip
        descs, status, ident = _get_id(fe)
        wrap = rd.wrap
        head = rd.publish(k % 7, descs)
        fe.kick()
        assert fe.wait_packed_used(0, head, wrap)
        _addr, length, id_, _flags = rd.read(head)
        assert (id_, length) == (k % 7, B.ID_BYTES + 1)
        assert bytes(status.view) == bytes([B.S_OK]) and bytes(ident.view).rstrip(b"\0") == b"pyvirtio"
    assert fe.is_open()


def test_misaligned_driver_area(case: Case) -> None:
    fe = case.fe
    fe.handshake(features=PACKED_FEATURES)
    fe.set_mem_table()
    rd = RawPackedDriver(fe.pool, 64)
    fe.packed_rings[0] = rd
    fe.set(vu.SET_VRING_NUM, STATE.pack(0, 64))
    fe.send(vu.SET_VRING_ADDR, ADDR.pack(0, 0, rd.desc_addr, rd.device_addr, rd.driver_addr + 2, 0))
    case.dropped(r"driver event suppression area address 0x[0-9a-f]+ not 4-byte aligned")


@pytest.mark.parametrize("base", [packed_base(64, 1, 0, 1), packed_base(0, 1, 70, 1)])
def test_base_outside_the_ring(case: Case, base: int) -> None:
    fe = case.fe
    fe.handshake(features=PACKED_FEATURES)
    fe.set_mem_table()
    fe.set(vu.SET_VRING_NUM, STATE.pack(0, 64))
    fe.send(vu.SET_VRING_BASE, STATE.pack(0, base))
    case.dropped(r"ring base 0x[0-9a-f]+ points outside 64 descriptors")


def test_split_base_beyond_16_bits_is_still_refused(case: Case) -> None:
    fe = case.fe
    fe.handshake()  # split rings
    fe.send(vu.SET_VRING_BASE, STATE.pack(0, 0x8000_8000))
    case.dropped(r"a split ring index is 16 bits")


def test_descriptor_address_outside_the_memory_table(case: Case) -> None:
    rd = case.fe.start_packed()
    descs, _status, _ident = _get_id(case.fe)
    region = case.fe.pool.regions[0]
    descs[1] = (region.guest_addr + region.size - 8, B.ID_BYTES, DESC_F_WRITE)
    rd.publish(3, descs)
    case.fe.kick()
    case.dropped(r"queue 0: descriptor 1: guest address 0x[0-9a-f]+\+20 is outside the memory table")


def test_list_longer_than_the_ring(case: Case) -> None:
    rd = case.fe.start_packed(size=16)
    buf = _buf(case.fe, 512)
    # 17 descriptors linked by NEXT in a ring of 16: the walk stops at the ring's size.
    rd.publish(0, [(buf.addr, 16, 0)] * 16)  # all but the last have NEXT; the 16th is made NEXT too
    rd.desc(15, buf.addr, 16, 0, packed_avail_flags(1) | 1)
    case.fe.kick()
    case.dropped(r"the list from 0 is longer than the ring")


def test_indirect_table_larger_than_the_ring(case: Case) -> None:
    rd = case.fe.start_packed(size=16)
    buf = _buf(case.fe, 512)
    addr, length = rd.table([(buf.addr, 16, 0)] + [(buf.addr, 16, DESC_F_WRITE)] * 17)
    rd.publish(0, [(addr, length, DESC_F_INDIRECT)])
    case.fe.kick()
    case.dropped(r"indirect table of 18 > 16 descriptors")


def test_indirect_entry_outside_the_memory_table(case: Case) -> None:
    rd = case.fe.start_packed()
    descs, _status, _ident = _get_id(case.fe)
    region = case.fe.pool.regions[0]
    descs[2] = (region.guest_addr + region.size, 1, DESC_F_WRITE)
    addr, length = rd.table(descs)
    rd.publish(0, [(addr, length, DESC_F_INDIRECT)])
    case.fe.kick()
    case.dropped(r"indirect entry 2: guest address 0x[0-9a-f]+\+1 is outside the memory table")


def test_indirect_inside_a_list(case: Case) -> None:
    rd = case.fe.start_packed()
    descs, _status, _ident = _get_id(case.fe)
    addr, length = rd.table(descs)
    rd.publish(0, [descs[0], (addr, length, DESC_F_INDIRECT)])
    case.fe.kick()
    case.dropped(r"indirect descriptor 1 inside a list")


def test_unavailable_descriptor_inside_a_list(case: Case) -> None:
    rd = case.fe.start_packed()
    descs, _status, _ident = _get_id(case.fe)
    rd.publish(0, descs)
    rd.desc(1, descs[1][0], descs[1][1], 0, DESC_F_WRITE | 1)  # NEXT, but the AVAIL/USED bits of no lap
    case.fe.kick()
    case.dropped(r"descriptor 1 in the list from 0 is not available")


def test_readable_after_writable(case: Case) -> None:
    rd = case.fe.start_packed()
    descs, _status, _ident = _get_id(case.fe)
    descs[2] = (descs[2][0], 1, 0)
    rd.publish(0, descs)
    case.fe.kick()
    case.dropped(r"readable descriptor 2 after a writable one")


def test_good_lists_before_a_bad_one_are_completed(case: Case) -> None:
    fe = case.fe
    rd = fe.start_packed()
    good, status, ident = _get_id(fe)
    rd.publish(5, good)
    bad, _s, _i = _get_id(fe)
    bad[0] = (fe.pool.regions[0].guest_addr + fe.pool.regions[0].size, 16, 0)
    rd.publish(6, bad)
    fe.kick()
    case.dropped(r"descriptor 3: guest address")
    _addr, length, id_, flags = rd.read(0)
    assert (id_, length) == (5, B.ID_BYTES + 1) and flags & 0x8080 == 0x8080  # used, wrap 1
    assert bytes(status.view) == bytes([B.S_OK]) and bytes(ident.view).rstrip(b"\0") == b"pyvirtio"
