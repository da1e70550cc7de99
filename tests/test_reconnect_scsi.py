"""Reconnect with virtio-scsi: the shared request engine holds commands across a back-end restart.

The embedded vhost-user-scsi back end in a thread, its model crashing on
command in the middle of a batch (the connection dropped with commands
popped and not answered), as tests/test_reconnect.py does for virtio-blk:
with a reconnect policy, ``wait`` (and ``asubmit``) reconnect and resubmit
what was not answered, with and without the back end's inflight tracking,
and the control and event queues work on the new connection; with
reconnect off, every command pending on the queue fails with ConnectionLost
and the queue is left empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator

import pytest

from peers_restart import InjectedCrash
from pyvirtio.backends.scsi import ScsiBackend, ram_lun
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.drivers.scsi import ScsiRequest, VirtioScsi
from pyvirtio.errors import ConnectionLost
from pyvirtio.ring.device_side import Chain
from pyvirtio.spec import scsi as S

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("quiet_backend_logs")]

BS = 512


class CrashingScsi(ScsiBackend):
    """A ScsiBackend whose request queues crash (drop the connection) at the n-th command after :meth:`arm`."""

    def __init__(self) -> None:
        super().__init__({(0, 0): ram_lun(4 << 20)}, max_target=1)
        self.crashes = 0
        self._countdown = 0
        self._lock = threading.Lock()

    def arm(self, after: int = 0) -> None:
        with self._lock:
            self._countdown = after + 1

    def handle(self, queue: int, chain: Chain) -> int:
        if queue >= S.FIRST_REQUEST_QUEUE:
            with self._lock:
                if self._countdown:
                    self._countdown -= 1
                    if not self._countdown:
                        self.crashes += 1
                        raise InjectedCrash("injected crash")
        return super().handle(queue, chain)


@contextlib.contextmanager
def crashing_server(path: str, *, inflight: bool = False) -> Iterator[CrashingScsi]:
    backend = CrashingScsi()
    try:
        with VhostUserServer(path, backend, inflight=inflight):
            yield backend
    finally:
        backend.close()


def _block(b: int, version: int) -> bytes:
    return bytes([b & 0xFF, version & 0xFF]) * (BS // 2)


@pytest.mark.parametrize("inflight", [False, True], ids=["frontend-resubmits", "backend-inflight"])
def test_wait_survives_a_back_end_restart(sockdir: str, inflight: bool) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path, inflight=inflight) as backend, VirtioScsi.open(path, reconnect=5.0) as scsi:
        disk = scsi.disk(0, 0)
        # The back end crashes at its 4th command of the batch: 3 answered, the rest popped or waiting.
        backend.arm(after=3)
        reqs = [disk.write_request(b * BS, _block(b, 1)) for b in range(16)]
        assert scsi.submit(reqs) == 16
        scsi.wait(reqs)  # before the shared engine, scsi's wait raised ConnectionLost here
        transport = scsi.device.transport
        assert backend.crashes == 1 and transport.reconnects == 1  # type: ignore[attr-defined]
        assert all(r.ok for r in reqs)
        ctx = scsi.thread_queue()
        assert ctx.inflight == 0 and len(ctx.free_slots) == ctx.nslots
        assert disk.read(0, 16 * BS) == b"".join(_block(b, 1) for b in range(16))
        # The control and event queues were restored too: a TMF and an event on the new connection.
        scsi.lun_reset(0, 0)
        backend.add_lun(1, 0, ram_lun(1 << 20))
        events: list[str] = []
        for _ in range(50):
            events += [e.kind for e in scsi.poll_events(0.1)]
            if "added" in events:
                break
        assert "added" in events and (1, 0) in scsi.luns


def test_asyncio_survives_a_back_end_restart(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path) as backend, VirtioScsi.open(path, reconnect=5.0) as scsi:
        disk = scsi.disk(0, 0)

        async def main() -> bytes:
            backend.arm(after=2)
            await asyncio.gather(*(disk.awrite(b * BS, _block(b, 2)) for b in range(8)))
            return await disk.aread(0, 8 * BS)

        assert asyncio.run(main()) == b"".join(_block(b, 2) for b in range(8))
        assert backend.crashes == 1 and scsi.device.transport.reconnects == 1  # type: ignore[attr-defined]


def test_reconnect_off_fails_every_pending_command(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    with crashing_server(path) as backend, VirtioScsi.open(path) as scsi:
        disk = scsi.disk(0, 0)
        disk.write(0, _block(0, 3))
        backend.arm(after=2)
        reqs: list[ScsiRequest] = [disk.read_request(b * BS, BS) for b in range(8)]
        assert scsi.submit(reqs) == 8
        with pytest.raises(ConnectionLost):
            scsi.wait(reqs)
        assert all(r.done and isinstance(r.error, ConnectionLost) for r in reqs[3:])
        assert all(r.done for r in reqs)
        ctx = scsi.thread_queue()
        assert ctx.inflight == 0 and len(ctx.free_slots) == ctx.nslots
        with pytest.raises(ConnectionLost):
            disk.read(0, BS)
