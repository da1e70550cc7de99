"""Real peer for net tests: DPDK 22.11 dpdk-testpmd with the vhost PMD (PEERS.md, "Network").

:func:`start_testpmd` starts one testpmd serving a vhost-user-net socket
(``net_vhost0,iface=SOCK,queues=N``, ``--no-huge``, both lcores on CPU 0 as
PEERS.md says) in a forward mode (rxonly counts what we send, txonly floods
us, macswap echoes with MACs swapped), waits for the socket and returns a
:class:`Testpmd`. :meth:`Testpmd.stop` sends SIGINT to its PID (testpmd then
prints its final statistics), waits, falls back to SIGKILL, and removes
``/var/run/dpdk/NAME``; :meth:`Testpmd.final_stats` parses the "Forward
statistics for port 0" block.

Fixture ``testpmd_factory`` stops everything it started. A missing
``dpdk-testpmd`` skips the test, or fails it when CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from peers import peer_binary

TESTPMD = "dpdk-testpmd"


def testpmd_binary() -> str:
    return peer_binary("PYVIRTIO_TESTPMD", TESTPMD, "dpdk dpdk-dev")


@dataclass
class Testpmd:
    proc: subprocess.Popen[bytes]
    pid: int
    name: str
    dir: str
    sock: str
    log: str
    mode: str
    queues: int

    @property
    def target(self) -> str:
        return f"vhost-user:{self.sock}"

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT by PID (final stats are printed), SIGKILL after ``timeout``; always reaps and cleans up."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(f"/var/run/dpdk/{self.name}", ignore_errors=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def final_stats(self) -> dict[str, int]:
        """RX-packets / TX-packets / ... of port 0 from the final "Forward statistics" block (after stop)."""
        text = self.log_text()
        i = text.rfind("Forward statistics for port 0")
        if i < 0:
            raise AssertionError(f"no final statistics in the testpmd log:\n{text[-3000:]}")
        block = text[i : i + 600]
        return {k: int(v) for k, v in re.findall(r"([RT]X-[a-z]+):\s+(\d+)", block)}


def start_testpmd(mode: str, *, queues: int = 1, startup_timeout: float = 20.0) -> Testpmd:
    binary = testpmd_binary()
    d = tempfile.mkdtemp(prefix="pvn", dir="/tmp")
    name = "pyvirtio-" + os.path.basename(d)
    sock = os.path.join(d, "v.sock")
    log = os.path.join(d, "log")
    argv = [
        binary, "--lcores", "0@0,1@0", "--no-pci", "--no-huge", "-m", "256", f"--file-prefix={name}",
        "--no-telemetry", "--vdev", f"net_vhost0,iface={sock},queues={queues}", "--",
        f"--forward-mode={mode}", "--stats-period=1", "--nb-cores=1", "--total-num-mbufs=16384",
        f"--rxq={queues}", f"--txq={queues}",
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    t = Testpmd(proc, proc.pid, name, d, sock, log, mode, queues)
    deadline = time.monotonic() + startup_timeout
    try:
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"testpmd exited with status {proc.returncode}: {t.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"testpmd did not create {sock} within {startup_timeout} s: {t.log_text()}")
            time.sleep(0.02)
    except BaseException:
        t.cleanup()
        raise
    return t


@pytest.fixture
def testpmd_factory() -> Iterator[Callable[..., Testpmd]]:
    started: list[Testpmd] = []

    def make(mode: str, **kw: object) -> Testpmd:
        t = start_testpmd(mode, **kw)  # type: ignore[arg-type]
        started.append(t)
        return t

    yield make
    for t in started:
        t.cleanup()


# -- checks shared by the testpmd and embedded back end tests ----------------------


def echo_frames(net: object, pair: int, frames: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send ``frames`` on ``pair`` (one batch per ring's worth), return what comes back (copies), in order."""
    got: list[bytes] = []
    sent = 0
    deadline = time.monotonic() + timeout
    while len(got) < len(frames) and time.monotonic() < deadline:
        if sent < len(frames):
            sent += net.send_batch(frames[sent : sent + 64], pair)  # type: ignore[attr-defined]
        for f in net.recv_batch(64, pair):  # type: ignore[attr-defined]
            got.append(bytes(f))
    net.release_rx(pair)  # type: ignore[attr-defined]
    return got


def assert_swapped_echo(sent: list[bytes], got: list[bytes]) -> None:
    """Every frame came back once, in order, with source and destination MAC swapped, the rest byte-exact."""
    assert len(got) == len(sent), f"{len(got)} of {len(sent)} frames came back"
    for i, (s, g) in enumerate(zip(sent, got, strict=True)):
        assert len(g) == len(s), f"frame {i}: {len(g)} bytes back for {len(s)}"
        assert g[0:6] == s[6:12] and g[6:12] == s[0:6], f"frame {i}: MACs not swapped"
        assert g[12:] == s[12:], f"frame {i}: payload differs"


RXONLY_SIZES = [60, 64, 128, 512, 1514] * 200 + [64] * 1000  # 2000 frames


def send_all(net: object, frames: list[bytes], timeout: float = 20.0) -> int:
    """Send every frame (batches of 200 as the ring frees up), flush; the count sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    while sent < len(frames) and time.monotonic() < deadline:
        sent += net.send_batch(frames[sent : sent + 200])  # type: ignore[attr-defined]
    net.flush_tx()  # type: ignore[attr-defined]
    return sent


def check_txonly_flood(net: object, count: int, timeout: float = 20.0) -> int:
    """Receive and check ``count`` frames of testpmd's txonly flood; the number checked."""
    checked = 0
    deadline = time.monotonic() + timeout
    while checked < count and time.monotonic() < deadline:
        for frame, hdr in net.recv_batch(128, with_headers=True):  # type: ignore[attr-defined]
            assert hdr.gso_type == 0 and hdr.num_buffers == 1  # GSO_NONE, one buffer
            b = bytes(frame)
            # testpmd txonly: 64-byte Ether / IPv4 / UDP 198.18.0.1:9 -> 198.18.0.2:9
            assert len(b) == 64 and b[12:14] == b"\x08\x00"
            assert b[14] == 0x45 and b[23] == 17
            assert b[26:30] == bytes([198, 18, 0, 1]) and b[30:34] == bytes([198, 18, 0, 2])
            assert _ip_ok(b)
            assert struct.unpack("!HH", b[34:38]) == (9, 9)
            checked += 1
    return checked


def _ip_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0x0F) * 4
    s = sum(struct.unpack(f"!{ihl // 2}H", frame[14 : 14 + ihl]))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def payload_frames(src: bytes, pair: int, sizes: list[int]) -> list[bytes]:
    """Distinct frames (ethertype 0x88B5) whose payload encodes pair, index and a byte pattern."""
    dst = bytes.fromhex("020000000002")
    out = []
    for i, size in enumerate(sizes):
        head = dst + src + b"\x88\xb5" + bytes([pair]) + i.to_bytes(4, "big")
        body = bytes((i * 31 + k) & 0xFF for k in range(size - len(head)))
        out.append(head + body)
    return out
