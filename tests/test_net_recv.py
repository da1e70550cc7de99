"""VirtioNet.recv: one frame as bytes, its buffer given back to the device, a timeout when none comes.

Against the embedded loopback back end (it echoes every frame it is sent):
each ``recv`` returns a copy that stays valid, and re-posts the receive
buffer at once, so receiving more frames than the ring has buffers, one at a
time, never runs dry; a frame spread over several buffers (MRG_RXBUF) comes
back whole; with nothing to receive, ``recv`` raises TransportTimeout after
the timeout it was given, not the driver's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from pyvirtio.backends.net import NetBackend
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.drivers.net import VirtioNet, build_frame
from pyvirtio.errors import TransportTimeout

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pvnr", dir="/tmp")
    path = os.path.join(d, "n.sock")
    model = NetBackend("loopback")
    server = VhostUserServer(path, model, poll_us=50)
    server.start()
    try:
        yield path
    finally:
        server.stop()
        server.wait(10)
        model.close()
        shutil.rmtree(d, ignore_errors=True)


def _frame(net: VirtioNet, n: int, size: int = 100) -> bytes:
    return build_frame(b"\x02\x00\x00\x00\x00\x09", net.mac, n.to_bytes(4, "big") + bytes(size - 18))


def test_recv_returns_each_frame_and_gives_its_buffer_back(served: str) -> None:
    with VirtioNet.open(served, queue_size=64) as net:
        ring = net.queue_size
        rx = net.device.queue(0).ring  # rx0's split ring: what the driver has made available
        kept: list[bytes] = []
        for n in range(2 * ring + 5):  # more frames than receive buffers: each recv must re-post its own
            frame = _frame(net, n)
            net.send(frame)
            posted = rx.avail_idx
            got = net.recv(timeout=5)
            assert type(got) is bytes and got == frame
            assert rx.avail_idx == (posted + 1) & 0xFFFF, "recv kept its buffer from the device"
            kept.append(got)
        assert kept[0] == _frame(net, 0)  # a copy: still valid after many receives
        # recv gave its buffer back at once (not at the next receive call): the device has
        # every buffer of the ring for the next frames.
        frames = [_frame(net, 1000 + n) for n in range(ring)]
        for f in frames:
            net.send(f)
        back: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(back) < ring and time.monotonic() < deadline:
            back += [bytes(v) for v in net.recv_batch(ring)]
        assert back == frames


def test_recv_merges_a_frame_spread_over_buffers(served: str) -> None:
    with VirtioNet.open(served, rx_buf_size=256) as net:
        assert net.mrg_rxbuf
        frame = _frame(net, 7, size=1400)  # header + 1400 bytes: 6 buffers of 256
        net.send(frame)
        assert net.recv(timeout=5) == frame


def test_recv_times_out_when_nothing_comes(served: str) -> None:
    with VirtioNet.open(served, timeout=30.0) as net:
        started = time.monotonic()
        with pytest.raises(TransportTimeout, match="no frame received within 0.2 s"):
            net.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - started < 5  # its own timeout, not the driver's 30 s
