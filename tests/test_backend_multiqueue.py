"""QEMU's multi-queue vhost-user-net: several vhost_devs over one connection.

QEMU drives a vhost-user-net device with ``queues=N`` as N ``vhost_dev``\\ s
(one per queue pair, ring indexes 2p and 2p+1) over one socket. What QEMU
7.2 sends (the guest test's back-end log, ``-netdev vhost-user,queues=2``):
each vhost_dev at start sends SET_FEATURES (the same value), then, with
CONFIGURE_MEM_SLOTS, ADD_MEM_REG for the guest RAM from its own shadow of
the regions (so the same region once per queue pair, a new fd each time for
the same memfd), then its two rings; GET_QUEUE_NUM (queue pairs) is asked
once; REM_MEM_REG comes per vhost_dev when its own view of memory changes.

The back end counts an identical region as one more reference to the
mapping it has (:meth:`pyvirtio.memory.MemoryTable.share`) and unmaps it
with the last REM_MEM_REG; a region that overlaps without being identical
stays a protocol violation. A repeated SET_FEATURES while rings run does not
reset the model (frames waiting for pair 0 survive pair 1's start).

The table itself first, then the exchange from a raw frontend
(``hostile_frontend``) against a 2-pair loopback net back end, in QEMU's
order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("hostile_frontend")

from hostile_frontend import REGION, U64, Chains, HostileFrontend  # noqa: E402
from pyvirtio.backends.net import NetBackend  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.errors import DriverProtocolError  # noqa: E402
from pyvirtio.memory import PAGE_SIZE, MemoryTable, Region  # noqa: E402
from pyvirtio.protocol import vhost_user as vu  # noqa: E402

pytestmark = pytest.mark.timeout(60)

GPA, UVA = 0x100000, 0x7F0000000000


# -- the table ------------------------------------------------------------------------------


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region.create(4 * PAGE_SIZE)
    yield r
    r.close()


def test_an_identical_region_is_one_more_reference(region: Region) -> None:
    table = MemoryTable()
    first = table.add(region, GPA, UVA)
    dup = os.dup(region.fd)  # what SCM_RIGHTS delivers: another fd, the same memfd
    try:
        assert table.share(GPA, region.size, UVA, 0, dup) is first
    finally:
        os.close(dup)
    assert first.refs == 2 and len(table) == 1
    region.view[:4] = b"kept"
    assert table.remove(GPA, region.size, UVA) is None  # one reference left: still mapped
    assert bytes(table.gpa(GPA, 4)) == b"kept"
    assert table.remove(GPA, region.size, UVA) is first  # the last: it leaves the table
    assert len(table) == 0
    with pytest.raises(DriverProtocolError, match="no memory region"):
        table.remove(GPA, region.size, UVA)


def test_a_region_that_differs_in_anything_is_not_shared(region: Region) -> None:
    other = Region.create(4 * PAGE_SIZE)  # the same size, other memory
    try:
        table = MemoryTable()
        table.add(region, GPA, UVA)
        size, fd = region.size, region.fd
        for gpa, length, uva, offset, fd_ in (
            (GPA, size, UVA, 0, other.fd),  # another file
            (GPA, size, UVA, PAGE_SIZE, fd),  # the same file at another offset
            (GPA, size, UVA + PAGE_SIZE, 0, fd),  # another user address
            (GPA, size - PAGE_SIZE, UVA, 0, fd),  # a part of it
            (GPA + PAGE_SIZE, size, UVA, 0, fd),  # shifted
        ):
            assert table.share(gpa, length, uva, offset, fd_) is None
        # Mapped and added, each of those is an overlap: refused.
        with pytest.raises(DriverProtocolError, match="overlaps"):
            table.add(other, GPA, UVA)
        assert [m.refs for m in table] == [1]
        # REM_MEM_REG names the region by guest address, size and user address.
        with pytest.raises(DriverProtocolError, match="no memory region"):
            table.remove(GPA, size, UVA + PAGE_SIZE)
        assert len(table) == 1
    finally:
        other.close()


# -- the exchange, as QEMU 7.2 sends it ----------------------------------------------------


@pytest.fixture
def net2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VhostUserServer]:
    model = NetBackend("loopback", pairs=2)
    server = VhostUserServer(str(tmp_path_factory.mktemp("memslots") / "net.sock"), model)
    try:
        with server:
            yield server
    finally:
        model.close()


def _why_dropped(server: VhostUserServer) -> str:
    """Why the connection ended, once the server has finished with it."""
    deadline = time.monotonic() + 5
    while not server.finished:
        assert time.monotonic() < deadline, "the connection was not finished"
        time.sleep(0.005)
    return server.disconnects[-1]


def _mem_reg(region: Region) -> bytes:
    return U64.pack(0) + REGION.pack(region.guest_addr, region.size, region.user_addr, region.fd_offset)


def _frame_loops(fe: HostileFrontend, pair: int, rx: Chains, tx: Chains) -> None:
    """One frame out on ``pair``'s transmit ring comes back on its receive ring (loopback)."""
    inbox = rx.buffer(2048)
    rx.post([(inbox, 2048, True)])
    frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5" + os.urandom(60) + bytes([pair])
    tx.send([(tx.buffer(bytes(12) + frame), 12 + len(frame), False)])
    (got,) = rx.wait()
    assert got == 12 + len(frame)
    assert bytes(inbox.view[12:got]) == frame


def _start_pair(fe: HostileFrontend, pair: int) -> tuple[Chains, Chains]:
    """What one QEMU vhost_dev sends at start: SET_FEATURES, ADD_MEM_REG, then its two rings."""
    fe.set(vu.SET_FEATURES, U64.pack(fe.features))
    region = fe.pool.regions[0]
    fe.set(vu.ADD_MEM_REG, _mem_reg(region), fds=[region.fd])
    for index in (2 * pair, 2 * pair + 1):
        fe.setup_ring(index)
    return Chains(fe, 2 * pair), Chains(fe, 2 * pair + 1)


def test_each_queue_pair_adds_the_same_region(net2: VhostUserServer) -> None:
    with HostileFrontend(net2.path) as fe:
        fe.handshake()
        assert fe.protocol >> vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS & 1
        assert fe.u64(vu.GET_QUEUE_NUM) == 2  # queue pairs (QEMU's vhost-user-net convention)
        pairs = [_start_pair(fe, 0), _start_pair(fe, 1)]  # the second ADD_MEM_REG is a duplicate
        connection = net2.backend
        assert connection is not None
        assert connection.info()["regions"] == 1  # one mapping, two references
        for p, (rx, tx) in enumerate(pairs):
            _frame_loops(fe, p, rx, tx)
        # Pair 0's vhost_dev removes the region (its own view changed): pair 1 keeps it.
        region = fe.pool.regions[0]
        fe.set(vu.REM_MEM_REG, _mem_reg(region))
        _frame_loops(fe, 1, *pairs[1])
        assert connection.info()["regions"] == 1
        # The last reference: unmapped. The rings lived there, so they cannot restart.
        fe.send(vu.REM_MEM_REG, _mem_reg(region), need_reply=True)
        assert fe.expect_closed()
    assert "ring 0 started without a memory table" in _why_dropped(net2)


def test_an_overlapping_region_of_other_memory_is_refused(net2: VhostUserServer) -> None:
    with HostileFrontend(net2.path) as fe:
        fe.handshake()
        _start_pair(fe, 0)
        region = fe.pool.regions[0]
        other = os.memfd_create("other")
        try:
            os.ftruncate(other, region.size)
            # Everything the same but the file: other memory at the same guest address.
            fe.send(vu.ADD_MEM_REG, _mem_reg(region), fds=[other], need_reply=True)
        finally:
            os.close(other)
        assert fe.expect_closed()
    assert "overlaps an existing one" in _why_dropped(net2)


def test_a_queue_pair_starting_keeps_the_frames_waiting_for_another(net2: VhostUserServer) -> None:
    with HostileFrontend(net2.path) as fe:
        fe.handshake()
        rx, tx = _start_pair(fe, 0)
        # A frame out on pair 0 before the driver posted receive buffers: it waits in the back end.
        frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5" + os.urandom(60)
        tx.send([(tx.buffer(bytes(12) + frame), 12 + len(frame), False)])
        _start_pair(fe, 1)  # SET_FEATURES again (the same), the duplicate ADD_MEM_REG, rings 2 and 3
        inbox = rx.buffer(2048)
        rx.post([(inbox, 2048, True)])
        (got,) = rx.wait()
        assert bytes(inbox.view[12:got]) == frame
