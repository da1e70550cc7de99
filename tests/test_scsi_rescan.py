"""VirtioScsi.rescan and poll_events: LUNs whose capacity changed, LUNs that went away.

The embedded back end in process (loopback), changed through its public
API (``add_lun``, ``remove_lun``, ``push_event``, a LUN's ``num_blocks``):
a full :meth:`~pyvirtio.drivers.scsi.VirtioScsi.rescan` reports ``changed``
and ``removed`` with the new and the old :class:`LunInfo`; so does an
EVENTS_MISSED event (the events were lost: only a full rescan can tell);
and a RESCAN event for a LUN that is no longer a disk reports it removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pyvirtio.backends.scsi import MAX_PENDING_EVENTS, ScsiBackend, ScsiLoopback, loopback_scsi, ram_lun
from pyvirtio.device import VirtioDevice
from pyvirtio.drivers.scsi import ScsiEvent, VirtioScsi
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

pytestmark = pytest.mark.timeout(30)


class Rig:
    def __init__(self) -> None:
        self.backend = ScsiBackend(
            {(0, 0): ram_lun(1 << 20), (0, 2): ram_lun(1 << 20), (1, 0): ram_lun(2 << 20)}, max_target=3
        )
        self.transport: ScsiLoopback = loopback_scsi(self.backend)
        self.answer: Callable[[Chain, int], int] | None = None  # rewrites the device's answer to a command
        self.transport.handlers[S.FIRST_REQUEST_QUEUE] = self._handle
        self.scsi = VirtioScsi(VirtioDevice("rescan", self.transport, pool_size=8 << 20))

    def _handle(self, queue: int, chain: Chain) -> int:
        written = self.backend.handle(queue, chain)
        return written if self.answer is None else self.answer(chain, written)

    def close(self) -> None:
        self.scsi.close()
        self.backend.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _by_kind(events: list[ScsiEvent]) -> dict[tuple[str, int, int], ScsiEvent]:
    return {(e.kind, e.target, e.lun): e for e in events}


def test_rescan_reports_a_changed_and_a_removed_lun(rig: Rig) -> None:
    scsi = rig.scsi
    assert sorted(scsi.luns) == [(0, 0), (0, 2), (1, 0)]
    old_00 = scsi.luns[(0, 0)]
    rig.backend.luns[(0, 2)].num_blocks //= 4  # the LUN shrank to 256 KiB
    rig.backend.remove_lun(0, 0)  # its REMOVED event is left unread: rescan must find out by itself
    events = scsi.rescan()
    got = _by_kind(events)
    assert set(got) == {("changed", 0, 2), ("removed", 0, 0)}
    changed = got[("changed", 0, 2)].info
    assert changed is not None and changed.capacity == 256 << 10
    assert got[("removed", 0, 0)].info is old_00  # what the LUN was
    assert sorted(scsi.luns) == [(0, 2), (1, 0)] and scsi.luns[(0, 2)].capacity == 256 << 10
    assert scsi.rescan() == []  # nothing changed since
    # The disk handle follows the new capacity.
    disk = scsi.disk(0, 2)
    assert disk.capacity == 256 << 10
    disk.write(disk.capacity - 512, b"z" * 512)
    assert disk.read(disk.capacity - 512, 512) == b"z" * 512


def test_events_missed_rescan_reports_changes_through_poll_events(rig: Rig) -> None:
    scsi = rig.scsi
    seen: list[ScsiEvent] = []
    scsi.on_event(seen.append)
    # More events than the back end keeps: the ones after are dropped and EVENTS_MISSED is set.
    for i in range(MAX_PENDING_EVENTS + 20):
        rig.backend.push_event(S.T_ASYNC_NOTIFY, 1, 0, i)
    rig.backend.luns[(1, 0)].num_blocks *= 2  # grew to 4 MiB: a PARAM_CHANGE nobody sends
    rig.backend.remove_lun(0, 2)  # REMOVED: dropped too
    events: list[ScsiEvent] = []
    for _ in range(20):
        events += scsi.poll_events(0.05)
        if any(e.kind == "missed" for e in events):
            break
    got = _by_kind(events)
    assert ("missed", 0, 0) in got
    assert ("removed", 0, 2) in got and ("changed", 1, 0) in got
    changed = got[("changed", 1, 0)].info
    assert changed is not None and changed.capacity == 4 << 20
    assert (0, 2) not in scsi.luns and scsi.luns[(1, 0)].capacity == 4 << 20
    assert [e.kind for e in seen] == [e.kind for e in events]  # the callbacks saw the same


def test_rescan_event_for_a_lun_that_is_no_longer_a_disk(rig: Rig) -> None:
    scsi = rig.scsi
    old = scsi.luns[(1, 0)]

    def nothing_at_1_0(chain: Chain, written: int) -> int:
        header = bytes(chain.readable[0])
        if S.decode_lun_address(header[:8]) == (1, 0) and header[19] == T.INQUIRY:
            data = chain.writable[1]  # after the response header: INQUIRY data, peripheral qualifier 3
            data[0] = 0x7F
        return written

    rig.answer = nothing_at_1_0
    rig.backend.push_event(S.T_TRANSPORT_RESET, 1, 0, S.EVT_RESET_RESCAN)
    events = scsi.poll_events(0.5)
    assert [(e.kind, e.target, e.lun, e.reason) for e in events] == [("removed", 1, 0, S.EVT_RESET_RESCAN)]
    assert events[0].info is old and (1, 0) not in scsi.luns
    rig.answer = None
    rig.backend.push_event(S.T_TRANSPORT_RESET, 1, 0, S.EVT_RESET_RESCAN)  # it is back
    events = scsi.poll_events(0.5)
    assert [(e.kind, e.target, e.lun) for e in events] == [("added", 1, 0)]
