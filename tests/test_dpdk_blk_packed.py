"""VirtioBlk on a packed ring against a third-party back end: DPDK's vhost_blk example (issue 12).

The example offers RING_PACKED (tests/dpdk_blk.py says what else it does).
It reads bit 15 of the ring base as part of the ring position, so the
driver keeps every base in lap 0 (``packed_zero_wrap=True``; a fresh ring at
base 0x8000_8000 is never served). Checked here:

* I/O with the data checked: writes of 1..16 blocks, read back and compared,
  one at a time and 16 in flight, over many laps of a 128-entry ring (and
  an odd-sized one); ``fixed_io`` reads and writes on the same ring;
* reconnect on a packed ring with INFLIGHT_SHMFD negotiated: the example
  is SIGKILLed and restarted three times under writes and reads; each time
  the ring is moved to lap 0 if it was in lap 1, the frontend resubmits
  what was in flight (the example never resubmits from the area on a
  packed ring, and a ring that changed lap cannot resume where an old area
  says: each instance gets a fresh area), the new instance starts at the
  base, and every request completes, its data checked when no restart came
  between write and read (each instance starts with an empty RAM disk);
* the CLI: ``info``, ``blk write`` and ``blk read`` with ``--ring packed
  --packed-zero-wrap``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

# Before importing it, so that pytest rewrites the asserts in the helper module.
pytest.register_assert_rewrite("dpdk_blk")

from dpdk_blk import VhostBlkExample  # noqa: E402
from pyvirtio.drivers.blk import VirtioBlk  # noqa: E402
from pyvirtio.spec.common import F_IN_ORDER, F_RING_PACKED  # noqa: E402

pytest_plugins = ["dpdk_blk"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(120)]

BLOCK = 4096


def _open(sock: str, **kw: object) -> VirtioBlk:
    blk = VirtioBlk.open(sock, ring="packed", num_queues=1, packed_zero_wrap=True, **kw)
    try:
        dev = blk.device
        assert dev.ring_format == "packed" and dev.has_feature(F_RING_PACKED)
        assert not dev.has_feature(F_IN_ORDER)  # the example does not offer it
        assert blk.info()["virtio"]["ring"] == "packed"
    except BaseException:
        blk.close()
        raise
    return blk


@pytest.mark.parametrize("queue_size", [128, 37])
def test_blk_io_with_data_checked_on_a_packed_ring(vhost_blk: VhostBlkExample, queue_size: int) -> None:
    with _open(vhost_blk.sock, queue_size=queue_size) as blk:
        assert blk.capacity == 128 << 20  # no BLK_SIZE offered: 512-byte blocks as far as the driver knows
        model: dict[int, bytes] = {}
        # One at a time: 3 descriptors a request, so ~3 requests per lap of a 128-slot ring.
        for k in range(200):
            data = os.urandom(BLOCK * (1 + k % 16))
            offset = BLOCK * (17 * k % 4000)
            blk.write(offset, data)
            assert blk.read(offset, len(data)) == data
            for b in range(len(data) // BLOCK):
                model[offset // BLOCK + b] = data[b * BLOCK : (b + 1) * BLOCK]
        # Many in flight at once (as many as the ring holds).
        depth = min(16, queue_size // 3)
        for rnd in range(20):
            blocks = [(rnd * depth + j) * 3 % 30000 for j in range(depth)]
            datas = [os.urandom(BLOCK) for _ in blocks]
            reqs = [blk.write_request(b * BLOCK, d) for b, d in zip(blocks, datas, strict=True)]
            assert blk.submit(reqs) == depth
            blk.wait(reqs)
            model.update(zip(blocks, datas, strict=True))
            reads = [blk.read_request(b * BLOCK, BLOCK) for b in blocks]
            assert blk.submit(reads) == depth
            blk.wait(reads)
            for b, r in zip(blocks, reads, strict=True):
                assert r.result == model[b]
        for b, want in list(model.items())[:: max(1, len(model) // 200)]:
            assert blk.read(b * BLOCK, BLOCK) == want


def test_fixed_io_on_a_packed_ring(vhost_blk: VhostBlkExample) -> None:
    with _open(vhost_blk.sock, queue_size=128) as blk:
        buf = blk.allocate(8192, align=4096)
        try:
            with blk.fixed_io(buf) as fixed:
                for i in range(100):  # 300 descriptors: laps of the ring
                    buf.view[:] = bytes([i]) * 8192
                    fixed.write(8192 * i)
                for i in range(100):
                    fixed.read(8192 * i)
                    assert bytes(buf.view) == bytes([i]) * 8192
        finally:
            blk.free(buf)
        assert blk.read(8192 * 7, 8192) == bytes([7]) * 8192  # through the general API too


def test_reconnect_with_inflight_on_a_packed_ring(vhost_blk: VhostBlkExample) -> None:
    blk = _open(vhost_blk.sock, queue_size=128, reconnect=30.0)
    try:
        t = blk.device.transport
        info = t.inflight_info
        assert info is not None and info.num_queues == 1 and info.queue_size == 128
        done = [0]
        checked = [0]
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            try:
                i = 0
                while not stop.is_set():
                    # 16 writes in flight, then 16 reads of the same blocks. Each instance starts with an
                    # empty RAM disk: the data is compared when no restart came between write and read.
                    generation = t.reconnects
                    blocks = [(i + k) * 7 % 30000 for k in range(16)]
                    datas = [os.urandom(BLOCK) for _ in blocks]
                    writes = [blk.write_request(b * BLOCK, d) for b, d in zip(blocks, datas, strict=True)]
                    assert blk.submit(writes) == 16
                    blk.wait(writes)
                    reads = [blk.read_request(b * BLOCK, BLOCK) for b in blocks]
                    assert blk.submit(reads) == 16
                    blk.wait(reads)
                    if t.reconnects == generation:
                        for b, r, d in zip(blocks, reads, datas, strict=True):
                            assert r.result == d, f"block {b} read back wrong"
                        checked[0] += 1
                    done[0] += 32
                    i += 16
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        try:
            for n in range(3):
                time.sleep(0.3 + 0.17 * n)  # different points of the ring's laps
                before = done[0]
                vhost_blk.kill()
                vhost_blk.start()
                deadline = time.monotonic() + 30
                while (t.reconnects < n + 1 or done[0] <= before + 64) and not errors:
                    assert time.monotonic() < deadline, f"no progress after restart {n + 1}: {vhost_blk.log()[-2000:]}"
                    time.sleep(0.01)
                assert not t.device_resubmits and t.inflight_info is not None  # a fresh area; we resubmit
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors
        assert checked[0] > 3, checked
        data = os.urandom(16 * BLOCK)
        blk.write(0, data)
        assert blk.read(0, len(data)) == data
    finally:
        blk.close()


def test_cli_on_a_packed_ring(vhost_blk: VhostBlkExample) -> None:
    """``pyvirtio info`` / ``blk write`` / ``blk read`` with --ring packed --packed-zero-wrap against the example."""

    def cli(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "pyvirtio", *args], input=data, capture_output=True, timeout=60)

    opts = ("--ring", "packed", "--packed-zero-wrap")
    r = cli("info", vhost_blk.sock, "--json", *opts)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["virtio"]["ring"] == "packed" and not info["virtio"]["in_order"]
    r = cli("info", vhost_blk.sock, *opts)
    assert r.returncode == 0, r.stderr
    assert any(line.split() == ["ring", "format", "packed"] for line in r.stdout.decode().splitlines())
    data = os.urandom(256 << 10)  # 4 requests of 64 KiB: laps of the 128-slot ring
    r = cli("blk", "write", vhost_blk.sock, "--offset", "1M", "--input", "-", "--chunk", "64k", *opts, data=data)
    assert r.returncode == 0, r.stderr
    r = cli("blk", "read", vhost_blk.sock, "--offset", "1M", "--length", "256k", "-o", "-", *opts)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
