"""1,000 connect/disconnect cycles leave no file descriptor and no memory behind.

Measured in this process: the number of entries in /proc/self/fd and the
resident set size (/proc/self/statm), after a warm-up, before and after.

* 1,000 reconnects of one open device: the back end (the embedded server,
  in a thread, INFLIGHT_SHMFD on) drops the connection in the middle of a
  request each cycle, the frontend reconnects, hands over the inflight area
  and resubmits.
* 1,000 full open / I/O / close cycles with a reconnect policy, half of
  them in server mode (the frontend listens, the back end connects).
"""

from __future__ import annotations

import os
import time

import pytest

from peers_restart import CrashingModel
from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.server import VhostUserClient, VhostUserServer
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.testing import open_fd_count

CYCLES = 1000
RSS_SLACK = 4 << 20  # allocator noise; a leak of a mapping or a buffer per cycle would be far above

# Injected crashes and dropped connections are logged by the back ends: expected here.
pytestmark = pytest.mark.usefixtures("quiet_backend_logs")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _settled_fd_count(expected: int, timeout: float = 5.0) -> int:
    """The fd count once the server thread has closed its side of the last connection."""
    deadline = time.monotonic() + timeout
    while True:
        n = open_fd_count()
        if n <= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


@pytest.mark.timeout(90)
def test_reconnect_cycles_leak_nothing(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    storage = Storage(size=4 << 20)
    model = CrashingModel(BlockBackend(storage))
    try:
        with VhostUserServer(path, model, inflight=True), VirtioBlk.open(path, reconnect=10.0) as blk:
            for _ in range(50):  # warm up
                model.arm()
                blk.read(0, 4096)
            fds, rss = open_fd_count(), _rss()
            for _ in range(CYCLES):
                model.arm()
                blk.read(0, 4096)
            assert blk.device.transport.reconnects == CYCLES + 50
            assert _settled_fd_count(fds) <= fds  # no growth (the baseline may hold a closing connection)
            assert _rss() - rss < RSS_SLACK
    finally:
        storage.close()


@pytest.mark.timeout(90)
def test_open_close_cycles_leak_nothing(sockdir: str) -> None:
    storage = Storage(size=4 << 20)
    client_path = os.path.join(sockdir, "c.sock")
    server_path = os.path.join(sockdir, "s.sock")
    client = VhostUserClient(client_path, BlockBackend(storage), inflight=True, retry=0.001)
    client.start()
    try:
        with VhostUserServer(server_path, BlockBackend(storage), inflight=True):

            def cycle(i: int) -> None:
                server_mode = bool(i & 1)
                path = client_path if server_mode else server_path
                with VirtioBlk.open(path, server=server_mode, reconnect=5.0) as blk:
                    blk.write(4096 * (i % 64), bytes(4096))

            for i in range(40):
                cycle(i)
            # The baseline may still include the server side of the last connection
            # (its thread closes it a moment later), so the check is "no growth".
            fds = _settled_fd_count(open_fd_count())
            rss = _rss()
            for i in range(CYCLES):
                cycle(i)
            assert _settled_fd_count(fds) <= fds
            assert _rss() - rss < RSS_SLACK
    finally:
        client.stop()
        client.wait(10)
        storage.close()
