"""``pyvirtio trace``: the proxy decodes a whole session and changes nothing.

* Between pyvirtio's frontend and qemu-storage-daemon (a real peer): the
  decoded sequence is the handshake, the memory table, the ring set-up and
  the stop, in that order; every reply is matched to its request; the data
  written through the proxy is in the daemon's image.
* With ``--rings`` (kick and call eventfds relayed, memory mapped read-only):
  ``pyvirtio bench --verify`` through the proxy against the embedded back end
  completes with no error and no verify error, the back end completed every
  request the bench counted, and the last ring sample has nothing in flight.
* The CLI: ``pyvirtio trace --json --once`` prints one JSON object per line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.backends.blk import BlockBackend, Storage
from pyvirtio.backends.server import VhostUserServer
from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.trace import Event, RingSample, Source, TraceItem, TraceProxy

pytest.register_assert_rewrite("peers")

from peers import Qsd, read_file  # noqa: E402

pytest_plugins = ["peers"]
pytestmark = pytest.mark.timeout(90)

SRC = Path(__file__).resolve().parent.parent / "src"


class Traced:
    """A TraceProxy running in a thread, collecting what it reports."""

    def __init__(self, listen: str, connect: str, *, rings: bool = False) -> None:
        self.items: list[TraceItem] = []
        self.proxy = TraceProxy(listen, connect, self.items.append, rings=rings, interval=0.2)
        self.thread = threading.Thread(target=self.proxy.serve, daemon=True)
        self.thread.start()
        assert self.proxy.wait_listening(5)
        self.target = f"vhost-user:{listen}"

    def events(self) -> list[Event]:
        return [i for i in self.items if isinstance(i, Event)]

    def wait_ended(self, sessions: int = 1, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while sum(isinstance(i, str) and "session ended" in i for i in self.items) < sessions:
            assert time.monotonic() < deadline, self.items[-5:]
            time.sleep(0.01)

    def stop(self) -> None:
        self.proxy.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def traced_qsd(qsd_raw: Qsd, sockdir: str) -> Iterator[tuple[Traced, Qsd]]:
    t = Traced(f"{sockdir}/t.sock", qsd_raw.sock)
    yield t, qsd_raw
    t.stop()


def subsequence(names: list[str], wanted: list[str]) -> bool:
    it = iter(names)
    return all(w in it for w in wanted)


def test_trace_pyvirtio_and_qsd(traced_qsd: tuple[Traced, Qsd]) -> None:
    t, qsd = traced_qsd
    data = os.urandom(8192)
    with VirtioBlk.open(t.target) as blk:
        blk.write(4096, data)
        assert blk.read(4096, 8192) == data
        features = blk.features
    t.wait_ended()
    assert read_file(qsd.image or "", 4096, 8192) == data  # the proxy passed the memory and rings on untouched

    events = t.events()
    assert events and all(e.error is None for e in events), [e for e in events if e.error]
    requests = [e for e in events if e.source is Source.FRONTEND]
    replies = [e for e in events if e.source is Source.BACKEND]
    names = [e.name for e in requests]
    assert names[0] == "GET_FEATURES"
    assert subsequence(names, [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER", "SET_FEATURES",
        "SET_MEM_TABLE", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "GET_VRING_BASE",
    ]), names
    # Every reply is a reply, matched to the frontend request of the same name, which came before it.
    by_seq = {e.seq: e for e in events}
    for r in replies:
        assert r.is_reply and r.reply_to is not None
        asked = by_seq[r.reply_to]
        assert asked.source is Source.FRONTEND and asked.name == r.name and asked.seq < r.seq
        assert r.latency is not None and r.latency >= 0
    assert len({r.reply_to for r in replies}) == len(replies)  # one reply per request
    # Fields decoded by name: the features qsd offered include what the driver negotiated.
    (offered,) = [r for r in replies if r.name == "GET_FEATURES"][:1]
    assert int(offered.fields["features"], 16) & features == features
    mem = next(e for e in requests if e.name == "SET_MEM_TABLE")
    assert len(mem.fds) >= 1 and "regions[0]" in mem.to_text()
    kick = next(e for e in requests if e.name == "SET_VRING_KICK")
    assert kick.fields["index"] == 0 and len(kick.fds) == 1


@pytest.fixture
def embedded(sockdir: str) -> Iterator[VhostUserServer]:
    storage = Storage(size=16 << 20)
    server = VhostUserServer(f"{sockdir}/blk.sock", BlockBackend(storage))
    server.start()
    yield server
    server.stop()
    assert server.wait(10)
    storage.close()


def test_bench_through_the_proxy_with_rings(embedded: VhostUserServer, sockdir: str) -> None:
    t = Traced(f"{sockdir}/t.sock", embedded.path, rings=True)
    try:
        env = dict(os.environ, PYTHONPATH=str(SRC))
        res = subprocess.run(
            [sys.executable, "-m", "pyvirtio", "bench", t.target, "--rw", "randrw", "--runtime", "1",
             "--iodepth", "8", "--verify", "--json", "--no-progress"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        t.wait_ended()
        # Data through the proxy reads back without it: nothing was changed on the way.
        with VirtioBlk.open(t.target) as blk:
            blk.write(1 << 20, b"\x5a" * 4096)
        t.wait_ended(2)
    finally:
        t.stop()
    assert report["errors"] == 0 and report["verify_errors"] == 0 and report["ios"] > 0
    with VirtioBlk.open(f"vhost-user:{embedded.path}") as blk:
        assert blk.read(1 << 20, 4096) == b"\x5a" * 4096
    second = next(k for k, i in enumerate(t.items) if isinstance(i, str) and i.startswith("frontend 2 connected"))
    bench_samples = [i for i in t.items[:second] if isinstance(i, RingSample) and i.index == 0]
    assert bench_samples
    last = bench_samples[-1]  # the bench's ring, sampled when it stopped: kicks and calls were relayed
    assert last.kicks > 0 and last.calls > 0
    assert last.used_idx is not None and last.avail_idx is not None
    # The second frontend wrote once and waited for it: nothing left in flight.
    (write,) = [i for i in t.items[second:] if isinstance(i, RingSample) and i.index == 0][-1:]
    assert write.avail_idx == write.used_idx and write.avail_idx is not None and write.avail_idx >= 1


def test_cli_trace_json_once(embedded: VhostUserServer, sockdir: str) -> None:
    listen = f"{sockdir}/t.sock"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "trace", "--listen", listen, "--connect", embedded.path,
         "--json", "--once", "--device", "blk"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(listen):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with VirtioBlk.open(f"vhost-user:{listen}") as blk:
            assert blk.get_id() == "pyvirtio"
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    objs = [json.loads(line) for line in out.splitlines()]
    messages = [o for o in objs if o["kind"] == "message"]
    assert messages[0]["name"] == "GET_FEATURES" and messages[0]["source"] == "frontend"
    reply = messages[1]
    assert reply["source"] == "backend" and reply["reply_to"] == messages[0]["seq"]
    assert "BLK_FLUSH" in reply["fields"]["names"]  # --device blk names the device's bits
    assert objs[-1]["kind"] == "note" and "session ended" in objs[-1]["text"]
