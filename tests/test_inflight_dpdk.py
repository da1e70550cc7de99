"""INFLIGHT_SHMFD against a third-party back end: DPDK's vhost_blk example (PEERS.md).

The example offers INFLIGHT_SHMFD and resubmits what its predecessor left
in the inflight area. It is SIGKILLed and restarted twice under a reader;
the frontend hands the area over (``device_resubmits``) and every read
completes. Reads only: the example reports the data length as the used
length of a write (one writable byte offered), which the driver rightly
rejects as a protocol violation. Also checked: the area names the queues
really used (DPDK allocates that many rings on SET_INFLIGHT_FD and serves
none until all are started).

The example is built and run by tests/dpdk_blk.py (a missing piece is
missing_peer: a failure under CI=true). Packed rings: test_dpdk_blk_packed.py.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import pytest

# Before importing it, so that pytest rewrites the asserts in the helper module.
pytest.register_assert_rewrite("dpdk_blk")

from dpdk_blk import VhostBlkExample  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402

pytest_plugins = ["dpdk_blk"]


@pytest.mark.peer
@pytest.mark.timeout(120)
def test_dpdk_vhost_blk_restarts_with_inflight_tracking(vhost_blk_binary: str) -> None:
    d = tempfile.mkdtemp(prefix="pvd", dir="/tmp")
    backend = VhostBlkExample(vhost_blk_binary, d)
    backend.start()
    try:
        blk = VirtioBlk.open(backend.sock, num_queues=1, queue_size=128, reconnect=30.0)
        try:
            t = blk.device.transport
            info = t.inflight_info
            assert info is not None and info.num_queues == 1 and info.queue_size == 128
            done = [0]
            errors: list[BaseException] = []
            stop = threading.Event()

            def reader() -> None:
                try:
                    i = 0
                    while not stop.is_set():
                        reqs = [blk.read_request((i + k) % 4096 * 4096, 4096) for k in range(16)]
                        assert blk.submit(reqs) == 16
                        blk.wait(reqs)
                        done[0] += 16
                        i += 16
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=reader)
            thread.start()
            for n in range(2):
                time.sleep(0.3)
                before = done[0]
                backend.kill()
                backend.start()
                deadline = time.monotonic() + 30
                while (t.reconnects < n + 1 or done[0] <= before) and not errors:
                    assert time.monotonic() < deadline, "no progress after the restart"
                    time.sleep(0.01)
                assert t.device_resubmits  # the new back end took the inflight area
            stop.set()
            thread.join(30)
            assert not errors, errors
        finally:
            blk.close()
    finally:
        backend.stop()
        shutil.rmtree(d, ignore_errors=True)
