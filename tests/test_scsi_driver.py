"""VirtioScsi against the embedded vhost-user-scsi back end (real socket, server thread).

Scan (multi-LUN REPORT LUNS, flat LUN addressing, 4 KiB blocks, READ
CAPACITY(16) beyond 2^32 blocks, START STOP UNIT for a stopped LUN, block
limits and provisioning), every I/O command with the data read back
(splitting above the limits, READ/WRITE(10) vs (16), UNMAP split by the block
limits, WRITE SAME(16) with UNMAP, SYNCHRONIZE CACHE), sense decoding in both
formats, UNIT ATTENTION retries, absent targets and LUNs, task management,
hot-plug events (added, removed, parameter change, events missed), several
threads with a queue each, asyncio (the benchmark on a LUN: tests/test_bench_scsi.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.backends.blk import Storage
from pyvirtio.backends.scsi import MAX_PENDING_EVENTS, ScsiBackend, ScsiLun, ram_lun
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.drivers.scsi import (
    UA_RETRIES,
    LunNotFound,
    ScsiError,
    ScsiEvent,
    ScsiRequest,
    VirtioScsi,
    rw_cdb,
)
from pyvirtio.errors import ConnectionLost, InvalidArgument, OwnershipError
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T

pytestmark = pytest.mark.timeout(30)

MAX_TARGET = 7  # keeps every scan short


class Served:
    """A ScsiBackend served on a socket in a thread."""

    def __init__(self, path: str, luns: dict[tuple[int, int], ScsiLun], **kw: object) -> None:
        self.backend = ScsiBackend(luns, max_target=kw.pop("max_target", MAX_TARGET), **kw)  # type: ignore[arg-type]
        self.server = VhostUserServer(path, self.backend)
        self.server.start()
        self.target = "vhost-user:" + path

    def open(self, **kw: object) -> VirtioScsi:
        return VirtioScsi.open(self.target, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.server.stop()
        assert self.server.wait(10)
        self.backend.close()


def make_luns(tmp: Path) -> dict[tuple[int, int], ScsiLun]:
    return {
        (0, 0): ram_lun(8 << 20, max_transfer_blocks=64, max_unmap_blocks=8, max_unmap_descriptors=2),
        (0, 1): ram_lun(4 << 20, block_size=4096, product="FOUR K"),
        (0, 300): ram_lun(1 << 20, serial="FLAT300"),
        (2, 5): ScsiLun(Storage(size=2 << 20, path=str(tmp / "lun25.img")), unmap=False),
        (3, 0): ScsiLun(Storage(size=1 << 20), readonly=True),
        (4, 0): ram_lun((1 << 41) + 8 * 512),  # 2^32 + 8 blocks (a sparse RAM disk)
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("scsi")
    s = Served(str(tmp / "scsi.sock"), make_luns(tmp), request_queues=2)
    yield s
    s.close()


@pytest.fixture
def scsi(served: Served) -> Iterator[VirtioScsi]:
    with served.open() as dev:
        yield dev


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    """A server of its own, for tests that change the device's state."""
    s = Served(str(tmp_path / "fresh.sock"), {(0, 0): ram_lun(1 << 20), (0, 2): ram_lun(1 << 20)})
    yield s
    s.close()


# -- scan ------------------------------------------------------------------------------


def test_scan_finds_every_lun_with_its_geometry(scsi: VirtioScsi) -> None:
    assert sorted(scsi.luns) == [(0, 0), (0, 1), (0, 300), (2, 5), (3, 0), (4, 0)]
    l00, l01 = scsi.luns[(0, 0)], scsi.luns[(0, 1)]
    assert (l00.block_size, l00.num_blocks, l00.capacity) == (512, 16384, 8 << 20)
    assert (l01.block_size, l01.num_blocks) == (4096, 1024)
    assert (l00.vendor, l00.product, l00.revision) == ("PYVIRTIO", "RAM DISK", "0001")
    assert l01.product == "FOUR K"
    assert scsi.luns[(0, 300)].serial == "FLAT300"
    assert scsi.luns[(2, 5)].product == "FILE DISK"
    assert scsi.scan_errors == {}


def test_scan_reads_block_limits_and_provisioning(scsi: VirtioScsi) -> None:
    l00 = scsi.luns[(0, 0)]
    assert l00.vpd_pages == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    assert (l00.max_transfer_blocks, l00.max_unmap_blocks, l00.max_unmap_descriptors) == (64, 8, 2)
    assert l00.unmap and l00.write_same_unmap and l00.lbprz
    assert not scsi.luns[(2, 5)].unmap  # no LBPU for this LUN
    assert scsi.luns[(3, 0)].readonly and not l00.readonly  # MODE SENSE WP bit


def test_scan_uses_read_capacity_16_beyond_2_32_blocks(scsi: VirtioScsi) -> None:
    big = scsi.luns[(4, 0)]
    assert big.read_capacity_16 and big.num_blocks == (1 << 32) + 8
    assert not scsi.luns[(0, 0)].read_capacity_16


def test_scan_skips_absent_targets_and_reports_config(scsi: VirtioScsi) -> None:
    assert scsi.max_target == MAX_TARGET and scsi.max_lun == 16383
    assert (scsi.cdb_size, scsi.sense_size) == (32, 96)
    assert scsi.hotplug
    assert scsi.report_luns(0) == [0, 1, 300]
    with pytest.raises(LunNotFound) as exc:
        scsi.report_luns(5)
    assert exc.value.response_name == "BAD_TARGET"


def test_missing_lun_on_a_present_target(scsi: VirtioScsi) -> None:
    assert scsi.probe_lun(0, 7) is None  # INQUIRY: peripheral qualifier 3
    with pytest.raises(LunNotFound) as exc:
        scsi.command(0, 7, bytes(6))  # TEST UNIT READY
    assert (exc.value.key_name, exc.value.asc_name) == ("ILLEGAL REQUEST", "LOGICAL UNIT NOT SUPPORTED")
    with pytest.raises(LunNotFound):
        scsi.disk(0, 7)


def test_stopped_lun_gets_start_stop_unit(tmp_path: Path) -> None:
    unit = ram_lun(1 << 20, started=False)
    s = Served(str(tmp_path / "stopped.sock"), {(1, 0): unit})
    try:
        with s.open() as scsi:
            info = scsi.luns[(1, 0)]
            assert info.started  # the driver sent START STOP UNIT
            assert unit.started
            disk = scsi.disk(1, 0)
            disk.write(0, b"s" * 512)
            assert disk.read(0, 512) == b"s" * 512
    finally:
        s.close()


def test_scan_only_some_targets(served: Served) -> None:
    with served.open(targets=[2, 3]) as scsi:
        assert sorted(scsi.luns) == [(2, 5), (3, 0)]
        with pytest.raises(InvalidArgument):
            scsi.scan([MAX_TARGET + 1])


# -- I/O -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [(0, 0), (0, 1), (0, 300), (2, 5)])
def test_write_then_read_back(scsi: VirtioScsi, where: tuple[int, int]) -> None:
    disk = scsi.disk(*where)
    bs = disk.block_size
    data = os.urandom(8 * bs)
    disk.write(3 * bs, data)
    assert disk.read(3 * bs, 8 * bs) == data
    assert disk.read(2 * bs, bs) != data[:bs] or bs == 0  # the block before was not touched
    disk.write(disk.capacity - bs, data[:bs])  # the last block
    assert disk.read(disk.capacity - bs, bs) == data[:bs]


def test_transfers_above_the_limit_are_split(served: Served, scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 0)
    assert disk.max_transfer == 64 * 512
    unit = served.backend.luns[(0, 0)]
    data = os.urandom(200 * 512)
    before = unit.commands
    disk.write(0, data)
    assert unit.commands - before == 4  # 64 + 64 + 64 + 8 blocks
    assert disk.read(0, len(data)) == data
    with pytest.raises(InvalidArgument):
        disk.read_request(0, 65 * 512)  # a single command is never split silently


def test_read_write_16_where_lba_or_length_need_it(scsi: VirtioScsi) -> None:
    assert rw_cdb(False, 0, 8)[0] == T.READ_10
    assert rw_cdb(True, 0xFFFFFFF0, 0x10)[0] == T.WRITE_10
    assert rw_cdb(True, 0xFFFFFFF0, 0x11)[0] == T.WRITE_16
    assert rw_cdb(False, 0, 0x10000)[0] == T.READ_16
    big = scsi.disk(4, 0)
    offset = ((1 << 32) + 2) * 512
    req = big.write_request(offset, b"B" * 1024)
    assert req.cdb[0] == T.WRITE_16
    scsi.run(req)
    assert big.read(offset, 1024) == b"B" * 1024
    assert big.read_request(512, 512).cdb[0] == T.READ_10


def test_zero_copy_buffers(scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 1)
    buf = scsi.pool.allocate(8192, align=4096)
    try:
        buf.view[:] = os.urandom(8192)
        disk.write(4096, buf)
        out = scsi.pool.allocate(8192, align=4096)
        try:
            assert disk.readinto(4096, out) == 8192
            assert bytes(out.view) == bytes(buf.view)
        finally:
            scsi.pool.free(out)
    finally:
        scsi.pool.free(buf)


def test_unmap_is_split_by_the_block_limits(served: Served, scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 0)
    disk.write(0, b"\xaa" * 40 * 512)
    reqs = disk.unmap_requests(512, 34 * 512)
    # 8 blocks per descriptor, 2 descriptors per command: 34 blocks -> 5 descriptors -> 3 commands.
    assert len(reqs) == 3
    assert all(len(r.data_out or b"") <= 8 + 2 * 16 for r in reqs)
    scsi.run_all(reqs)
    assert disk.read(0, 512) == b"\xaa" * 512
    assert disk.read(512, 34 * 512) == bytes(34 * 512)
    assert disk.read(35 * 512, 5 * 512) == b"\xaa" * 5 * 512


def test_unmap_refused_without_provisioning(scsi: VirtioScsi) -> None:
    disk = scsi.disk(2, 5)
    with pytest.raises(InvalidArgument, match="UNMAP"):
        disk.unmap(0, 512)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_same_16_zeroes(scsi: VirtioScsi, unmap: bool) -> None:
    disk = scsi.disk(0, 1)
    disk.write(0, b"\x55" * 6 * 4096)
    reqs = disk.write_zeroes_requests(4096, 4 * 4096, unmap=unmap)
    assert [r.cdb[0] for r in reqs] == [T.WRITE_SAME_16]
    assert bool(reqs[0].cdb[1] & 0x08) is unmap  # the UNMAP bit, as the LUN reports LBPWS
    scsi.run_all(reqs)
    assert disk.read(0, 6 * 4096) == b"\x55" * 4096 + bytes(4 * 4096) + b"\x55" * 4096


def test_write_same_without_lbpws_drops_the_unmap_bit(scsi: VirtioScsi) -> None:
    disk = scsi.disk(2, 5)
    assert disk.write_zeroes_requests(0, 512, unmap=True)[0].cdb[1] & 0x08 == 0
    disk.write(0, b"x" * 1024)
    disk.write_zeroes(0, 1024, unmap=True)
    assert disk.read(0, 1024) == bytes(1024)


def test_flush_is_synchronize_cache(served: Served, scsi: VirtioScsi) -> None:
    unit = served.backend.luns[(2, 5)]
    before = unit.commands
    req = scsi.disk(2, 5).flush_request()
    assert req.cdb[0] == T.SYNCHRONIZE_CACHE_10
    scsi.disk(2, 5).flush()
    assert unit.commands == before + 1
    assert scsi.disk(4, 0).flush_request().cdb[0] == T.SYNCHRONIZE_CACHE_16


def test_argument_checks(scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 1)
    for bad in ((100, 4096), (0, 100), (-4096, 4096), (disk.capacity, 4096)):
        with pytest.raises(InvalidArgument):
            disk.read(*bad)
    with pytest.raises(InvalidArgument, match="write-protected"):
        scsi.disk(3, 0).write(0, bytes(512))
    with pytest.raises(InvalidArgument):
        scsi.command(MAX_TARGET + 1, 0, bytes(6))


def test_batch_submit_one_kick(scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 0)
    writes = [disk.write_request(i * 4096, bytes([i]) * 4096) for i in range(16)]
    ctx = scsi.thread_queue()
    kicks = ctx.vq.kicks
    assert scsi.submit(writes) == 16
    assert ctx.vq.kicks - kicks <= 1
    scsi.wait(writes)
    reads = [disk.read_request(i * 4096, 4096) for i in range(16)]
    scsi.submit(reads)
    scsi.wait(reads)
    assert [r.data for r in reads] == [bytes([i]) * 4096 for i in range(16)]
    assert len({r.tag for r in writes + reads}) == 32  # every command had its own tag


# -- sense, status, response -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fixed", "descriptor"])
def test_check_condition_sense_is_decoded(tmp_path: Path, fmt: str) -> None:
    s = Served(str(tmp_path / f"{fmt}.sock"), {(0, 0): ram_lun(1 << 20)}, sense_format=fmt)
    try:
        with s.open() as scsi:
            with pytest.raises(ScsiError) as exc:
                scsi.command(0, 0, rw_cdb(False, 2048, 1), data_in=512)  # one block past the end
            e = exc.value
            assert e.sense is not None and e.sense.format == fmt
            assert (e.status, e.status_name) == (T.CHECK_CONDITION, "CHECK CONDITION")
            assert (e.key, e.key_name) == (T.ILLEGAL_REQUEST, "ILLEGAL REQUEST")
            assert (e.asc, e.ascq, e.asc_name) == (0x21, 0x00, "LOGICAL BLOCK ADDRESS OUT OF RANGE")
            assert "READ(10) on 0:0" in str(e) and "LOGICAL BLOCK ADDRESS OUT OF RANGE" in str(e)
            with pytest.raises(ScsiError) as exc:
                scsi.command(0, 0, bytes([0xC0]) + bytes(15))
            assert exc.value.asc_name == "INVALID COMMAND OPERATION CODE"
    finally:
        s.close()


def test_write_protected_lun_answers_data_protect(scsi: VirtioScsi) -> None:
    with pytest.raises(ScsiError) as exc:
        scsi.command(3, 0, rw_cdb(True, 0, 1), data_out=bytes(512))
    assert (exc.value.key_name, exc.value.asc_name) == ("DATA PROTECT", "WRITE PROTECTED")


def test_request_sense_and_raw_commands(scsi: VirtioScsi) -> None:
    req = scsi.command(0, 0, bytes([T.REQUEST_SENSE, 0, 0, 0, 18, 0]), data_in=18)
    sense = T.parse_sense(req.data or b"")
    assert sense is not None and sense.key == T.NO_SENSE
    inq = scsi.command(0, 0, bytes([T.INQUIRY, 1, T.VPD_DEVICE_ID, 0, 255, 0]), data_in=255)
    assert inq.data is not None and inq.data[1] == T.VPD_DEVICE_ID and inq.resid == 255 - len(inq.data)


def test_absent_target_is_lun_not_found(scsi: VirtioScsi) -> None:
    with pytest.raises(LunNotFound) as exc:
        scsi.command(6, 0, bytes(6))
    assert (exc.value.response, exc.value.response_name) == (S.S_BAD_TARGET, "BAD_TARGET")


def test_unit_attention_after_lun_reset_is_retried(fresh: Served) -> None:
    unit = fresh.backend.luns[(0, 0)]
    with fresh.open() as scsi:
        disk = scsi.disk(0, 0)
        disk.write(0, b"r" * 512)
        scsi.lun_reset(0, 0)
        assert unit.resets == 1
        assert fresh.backend.tmfs[-1][:3] == (S.T_TMF_LOGICAL_UNIT_RESET, 0, 0)
        # The reset left a UNIT ATTENTION: a command that may not retry sees it ...
        with pytest.raises(ScsiError) as exc:
            scsi.command(0, 0, bytes(6), ua_retries=0)
        assert (exc.value.key_name, exc.value.asc_name) == ("UNIT ATTENTION", "BUS DEVICE RESET FUNCTION OCCURRED")
        # ... and ordinary I/O is sent again once and succeeds.
        scsi.lun_reset(0, 0)
        req = disk.read_request(0, 512)
        scsi.run(req)
        assert req.attempts == 2 and req.data == b"r" * 512


def test_unit_attention_retries_are_bounded(fresh: Served) -> None:
    unit = fresh.backend.luns[(0, 0)]
    with fresh.open() as scsi:
        unit.pending_ua.extend([T.ASC_POWER_ON_RESET] * (UA_RETRIES + 2))
        req = scsi.disk(0, 0).read_request(0, 512)
        with pytest.raises(ScsiError, match="UNIT ATTENTION"):
            scsi.run(req)
        assert req.attempts == UA_RETRIES + 1


# -- task management ---------------------------------------------------------------------------


def test_abort_task_names_the_tag(fresh: Served) -> None:
    with fresh.open() as scsi:
        req = scsi.disk(0, 0).read_request(0, 512)
        scsi.run(req)
        assert scsi.abort_task(0, 0, req.tag) == "FUNCTION_COMPLETE"  # it had completed: not found
        assert fresh.backend.tmfs[-1] == (S.T_TMF_ABORT_TASK, 0, 0, req.tag)
        with pytest.raises(LunNotFound):
            scsi.lun_reset(5, 0)
        with pytest.raises(LunNotFound) as exc:
            scsi.lun_reset(0, 9)
        assert exc.value.response_name == "INCORRECT_LUN"


def test_tmf_from_another_thread(fresh: Served) -> None:
    with fresh.open() as scsi:
        scsi.disk(0, 0).read(0, 512)  # this thread owns a request queue
        errors: list[BaseException] = []

        def reset() -> None:
            try:
                scsi.lun_reset(0, 2)
            except BaseException as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=reset)
        t.start()
        t.join(10)
        assert not errors and fresh.backend.luns[(0, 2)].resets == 1


# -- events ----------------------------------------------------------------------------------


def _events_until(scsi: VirtioScsi, kinds: set[str], timeout: float = 5.0) -> list[ScsiEvent]:
    seen: list[ScsiEvent] = []
    deadline = time.monotonic() + timeout
    while not kinds <= {e.kind for e in seen}:
        assert time.monotonic() < deadline, f"events seen: {[e.kind for e in seen]}"
        seen.extend(scsi.poll_events(0.1))
    return seen


def test_hotplug_add_and_remove(fresh: Served) -> None:
    with fresh.open() as scsi:
        got: list[ScsiEvent] = []
        scsi.on_event(got.append)
        assert scsi.poll_events() == []
        fresh.backend.add_lun(1, 3, ram_lun(2 << 20))
        events = _events_until(scsi, {"added"})
        added = [e for e in events if e.kind == "added"][0]
        assert (added.target, added.lun, added.event, added.reason) == (1, 3, S.T_TRANSPORT_RESET, S.EVT_RESET_RESCAN)
        assert added.info is not None and added.info.capacity == 2 << 20
        assert (1, 3) in scsi.luns and got == events
        disk = scsi.disk(1, 3)
        disk.write(0, b"h" * 512)
        assert disk.read(0, 512) == b"h" * 512
        fresh.backend.remove_lun(1, 3)
        events = _events_until(scsi, {"removed"})
        assert [(e.kind, e.target, e.lun) for e in events] == [("removed", 1, 3)]
        assert (1, 3) not in scsi.luns
        with pytest.raises(LunNotFound):
            disk.read(0, 512)


def test_event_fd_becomes_readable(fresh: Served) -> None:
    import select

    with fresh.open() as scsi:
        fd = scsi.event_fd
        assert fd is not None
        fresh.backend.add_lun(0, 9, ram_lun(1 << 20))
        ready, _, _ = select.select([fd], [], [], 5)
        assert ready
        assert [e.kind for e in scsi.poll_events()] == ["added"]


def test_lun_added_to_a_busy_target_raises_a_unit_attention_that_io_survives(fresh: Served) -> None:
    with fresh.open() as scsi:
        disk = scsi.disk(0, 0)
        fresh.backend.add_lun(0, 4, ram_lun(1 << 20))
        req = disk.read_request(0, 512)
        scsi.run(req)  # REPORTED LUNS DATA HAS CHANGED, then success
        assert req.attempts == 2
        _events_until(scsi, {"added"})


def test_capacity_change_is_picked_up(fresh: Served) -> None:
    with fresh.open() as scsi:
        unit = fresh.backend.luns[(0, 2)]
        unit.num_blocks //= 2
        fresh.backend.push_event(S.T_PARAM_CHANGE, 0, 2, T.ASC_CAPACITY_CHANGED[0] | T.ASC_CAPACITY_CHANGED[1] << 8)
        events = _events_until(scsi, {"param_change", "changed"})
        changed = [e for e in events if e.kind == "changed"][0]
        assert changed.info is not None and changed.info.capacity == 512 << 10
        assert scsi.luns[(0, 2)].capacity == 512 << 10


def test_events_missed_triggers_a_full_rescan(fresh: Served) -> None:
    with fresh.open() as scsi:
        for i in range(MAX_PENDING_EVENTS + 40):
            fresh.backend.push_event(S.T_ASYNC_NOTIFY, 0, 0, i)
        fresh.backend.add_lun(2, 0, ram_lun(1 << 20))  # dropped too: only the rescan can find it
        events = _events_until(scsi, {"missed", "added"}, timeout=10)
        assert sum(e.kind == "async" for e in events) <= MAX_PENDING_EVENTS + 16
        assert (2, 0) in scsi.luns


def test_stale_event_from_before_the_connection_is_harmless(fresh: Served) -> None:
    fresh.backend.add_lun(1, 1, ram_lun(1 << 20))  # nobody connected: the event waits
    with fresh.open() as scsi:
        assert (1, 1) in scsi.luns  # the scan found it
        assert scsi.poll_events(0.2) == []  # RESCAN of a known, unchanged LUN: nothing to say


# -- queues, threads, asyncio ----------------------------------------------------------------


def test_each_thread_gets_its_own_request_queue(scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 0)
    scsi.release_queue()  # the scan gave this thread a queue: leave both to the workers
    ready = threading.Barrier(2)
    release = threading.Event()
    result: dict[str, object] = {}

    def worker(k: int) -> None:
        try:
            data = bytes([k]) * 4096
            disk.write(k * 4096, data)
            result[f"ok{k}"] = disk.read(k * 4096, 4096) == data
            result[f"q{k}"] = scsi.thread_queue().vq.index
            ready.wait(5)
            release.wait(5)
            scsi.release_queue()
        except BaseException as exc:  # reported below
            result[f"err{k}"] = exc

    threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 5
        while len([k for k in result if k.startswith("q")]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(OwnershipError, match="request queues are owned"):
            disk.read(0, 512)  # a third thread: no queue left
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert result.get("ok1") and result.get("ok2"), result
    assert {result["q1"], result["q2"]} == {2, 3}


def test_asyncio_api(scsi: VirtioScsi) -> None:
    disk = scsi.disk(0, 0)

    async def main() -> bytes:
        await disk.awrite(0, b"a" * 100 * 512)  # split in two commands
        await disk.aflush()
        await disk.aunmap(512, 512)
        await disk.awrite_zeroes(1024, 512)
        return await disk.aread(0, 100 * 512)

    data = asyncio.run(main())
    assert data == b"a" * 512 + bytes(1024) + b"a" * 97 * 512


def test_asyncio_request_to_a_back_end_that_went_away_fails_at_once(fresh: Served) -> None:
    with fresh.open() as dev:
        disk = dev.disk(0, 0)

        async def main() -> None:
            await disk.awrite(0, b"b" * 512)
            fresh.server.stop()
            assert fresh.server.wait(5)
            await disk.aread(0, 512)

        t0 = time.monotonic()
        with pytest.raises(ConnectionLost):
            asyncio.run(main())
        assert time.monotonic() - t0 < 5  # not the 30 s request timeout


def test_config_sizes_other_than_the_defaults(tmp_path: Path) -> None:
    class Odd(ScsiBackend):
        def reset(self) -> None:
            super().reset()
            self.cdb_size, self.sense_size = 16, 24

    backend = Odd({(0, 0): ram_lun(1 << 20)}, max_target=1, sense_format="descriptor")
    backend.reset()
    server = VhostUserServer(str(tmp_path / "odd.sock"), backend)
    server.start()
    try:
        with VirtioScsi.open(server.path) as scsi:
            assert (scsi.cdb_size, scsi.sense_size) == (16, 24)
            disk = scsi.disk(0, 0)
            disk.write(512, b"o" * 512)
            assert disk.read(512, 512) == b"o" * 512
            with pytest.raises(ScsiError) as exc:
                scsi.command(0, 0, rw_cdb(False, 4096, 1), data_in=512)
            assert exc.value.asc == 0x21
            with pytest.raises(InvalidArgument, match="CDB of 32 bytes"):
                scsi.command(0, 0, bytes(32))
    finally:
        server.stop()
        assert server.wait(10)
        backend.close()


def test_scsi_request_reports_its_own_error() -> None:
    req = ScsiRequest(0, 0, bytes(6))
    assert req.exception() is None and req.name == "TEST UNIT READY"
