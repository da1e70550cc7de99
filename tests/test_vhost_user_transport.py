"""VhostUserTransport on real sockets: no leaks, and clear errors from bad peers.

* 200 connect / close cycles against one qemu-storage-daemon leave no fd
  (and no mapping) behind; so do full VirtioBlk open / I/O / close cycles.
* A missing socket, a stale socket file: ConnectionLost, quickly.
* A fake back end in a thread (a listening Unix socket) that answers the
  first message wrongly (request code, size, version, reply flag, an fd
  nobody asked for, an oversized header): DeviceProtocolError, and the fds
  of the failed attempt are closed. One that never answers: TransportTimeout
  after ``timeout``. One that hangs up mid-handshake: ConnectionLost.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from pyvirtio.drivers.blk import VirtioBlk
from pyvirtio.errors import ConnectionLost, DeviceProtocolError, TransportTimeout
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
from pyvirtio.testing import open_fd_count
from pyvirtio.transport.vhost_user import VhostUserTransport

if TYPE_CHECKING:
    from peers import Qsd

pytest_plugins = ["peers"]

HDR = struct.Struct("<III")
REPLY = vu.VERSION | vu.REPLY


def _maps_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


# -- leaks against a real back end ---------------------------------------------------


@pytest.mark.peer
@pytest.mark.timeout(60)
def test_no_fd_leak_connect_close(qsd_null: Qsd) -> None:
    # Warm up (imports, lazily created objects), then count.
    VhostUserTransport(qsd_null.sock).close()
    gc.collect()
    fds = open_fd_count()
    for _ in range(200):
        t = VhostUserTransport(qsd_null.sock, timeout=5.0)
        assert t.connected
        assert t.num_queues == 2
        t.close()
        assert not t.connected
    gc.collect()
    assert open_fd_count() == fds


@pytest.mark.peer
@pytest.mark.timeout(60)
def test_no_fd_or_mapping_leak_blk_cycles(qsd_null: Qsd) -> None:
    with VirtioBlk.open(qsd_null.target) as blk:
        blk.read(0, 4096)
    gc.collect()
    fds, maps = open_fd_count(), _maps_count()
    for i in range(50):
        with VirtioBlk.open(qsd_null.target) as blk:
            blk.write(i * 4096, bytes(4096))
            blk.read(i * 4096, 4096)
    gc.collect()
    assert open_fd_count() == fds
    assert _maps_count() == maps


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_second_frontend_times_out_while_first_is_served(qsd_null: Qsd) -> None:
    # qemu-storage-daemon serves one frontend at a time; the second one's
    # GET_FEATURES stays unanswered.
    first = VhostUserTransport(qsd_null.sock)
    try:
        start = time.monotonic()
        with pytest.raises(TransportTimeout, match="GET_FEATURES"):
            VhostUserTransport(qsd_null.sock, timeout=0.5)
        assert 0.4 <= time.monotonic() - start < 3.0
    finally:
        first.close()
    # ... and once the first has gone, the next is served.
    VhostUserTransport(qsd_null.sock).close()


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_lost_peer_is_sticky(qsd_null: Qsd) -> None:
    t = VhostUserTransport(qsd_null.sock)
    try:
        qsd_null.kill()
        with pytest.raises(ConnectionLost):
            t.check_alive()
        assert not t.connected
        for call in (t.check_alive, t.get_status, lambda: t.read_config(0, 8), lambda: t.set_status(1)):
            with pytest.raises(ConnectionLost):
                call()
    finally:
        t.close()


def test_ack_queue_and_has_config(qsd_null: Qsd) -> None:
    """The driver side of a queue's call eventfd: readable when signalled, quiet once acknowledged."""
    import select

    with VirtioBlk.open(qsd_null.target) as blk:
        t = blk.device.transport
        assert t.has_config()  # qemu-storage-daemon offers PROTOCOL_F_CONFIG
        fd = t.queue_fd(0)
        assert fd is not None
        blk.read(0, 4096)
        os.eventfd_write(fd, 1)  # as the back end signals a completion
        assert select.select([fd], [], [], 0)[0] == [fd]
        t.ack_queue(0)
        assert select.select([fd], [], [], 0)[0] == []
        t.ack_queue(0)  # nothing pending: not an error
        t.ack_queue(99)  # no such queue: nothing to acknowledge
        assert blk.read(0, 4096) == bytes(4096)


# -- connecting to nothing -------------------------------------------------------------


@pytest.mark.timeout(10)
def test_missing_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "missing.sock")
    gc.collect()
    fds = open_fd_count()
    start = time.monotonic()
    with pytest.raises(ConnectionLost, match="cannot connect"):
        VhostUserTransport(path, connect_timeout=0.2)
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    with pytest.raises(ConnectionLost, match="No such file"):
        VhostUserTransport(path, connect_timeout=0)
    assert time.monotonic() - start < 0.5
    gc.collect()
    assert open_fd_count() == fds


@pytest.mark.timeout(10)
def test_stale_socket_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # bound, never listening: what a crashed daemon leaves behind
    s.close()
    start = time.monotonic()
    with pytest.raises(ConnectionLost, match="refused"):
        VhostUserTransport(path, connect_timeout=0.2)
    assert time.monotonic() - start < 1.5


@pytest.mark.timeout(10)
def test_socket_appearing_late_is_waited_for(sockdir: str) -> None:
    # connect_timeout covers a back end that is still starting up.
    path = os.path.join(sockdir, "late.sock")
    done = threading.Event()

    def late(conn: socket.socket) -> None:
        _answer_features(conn)
        done.wait(5)

    with FakeBackend(path, late, delay=0.3):
        with pytest.raises(TransportTimeout):
            # Features answered, then silence: the connection itself was made.
            VhostUserTransport(path, connect_timeout=3, timeout=0.3)
        done.set()


# -- a fake back end ------------------------------------------------------------------


class FakeBackend:
    """A listening Unix socket whose first connection is handed to ``script`` in a thread."""

    def __init__(self, path: str, script: Callable[[socket.socket], None], *, delay: float = 0.0) -> None:
        self.path = path
        self.script = script
        self.delay = delay
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="fake-vhost-user-backend", daemon=True)

    def __enter__(self) -> FakeBackend:
        if not self.delay:
            self._listen()
        self._thread.start()
        return self

    def _listen(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(1)
        s.settimeout(5)
        self._listener = s

    def _run(self) -> None:
        try:
            if self.delay:
                time.sleep(self.delay)
                self._listen()
            assert self._listener is not None
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                return
            with conn:
                conn.settimeout(5)
                self.script(conn)
        except (OSError, AssertionError) as exc:
            self.errors.append(exc)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(10)
        if self._listener is not None:
            self._listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def recv_msg(conn: socket.socket) -> tuple[int, int, bytes]:
    head = _recv_exact(conn, HDR.size)
    request, flags, size = HDR.unpack(head)
    return request, flags, _recv_exact(conn, size)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = conn.recv(n - len(buf))
        if not data:
            raise ConnectionError("frontend closed")
        buf += data
    return buf


def send_msg(
    conn: socket.socket, request: int, flags: int, payload: bytes, fds: tuple[int, ...] = ()
) -> None:
    data = HDR.pack(request, flags, len(payload)) + payload
    if fds:
        conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        conn.sendall(data)


FEATURES = (1 << F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
U64_FEATURES = struct.pack("<Q", FEATURES)


def _answer_features(conn: socket.socket) -> None:
    request, flags, _ = recv_msg(conn)
    assert request == vu.GET_FEATURES
    send_msg(conn, vu.GET_FEATURES, REPLY, struct.pack("<Q", FEATURES))


def _reply_then_wait(reply: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        request, _, _ = recv_msg(conn)
        assert request == vu.GET_FEATURES
        reply(conn)
        # Keep the connection open: the error must come from the reply, not from EOF.
        try:
            conn.settimeout(3)
            conn.recv(1)
        except OSError:
            pass

    return script


def _make_fd_reply(conn: socket.socket) -> None:
    r, w = os.pipe()
    try:
        send_msg(conn, vu.GET_FEATURES, REPLY, struct.pack("<Q", FEATURES), fds=(r,))
    finally:
        os.close(r)
        os.close(w)


MALFORMED: dict[str, tuple[Callable[[socket.socket], None], str]] = {
    "wrong request code": (
        lambda c: send_msg(c, vu.GET_PROTOCOL_FEATURES, REPLY, struct.pack("<Q", FEATURES)),
        "request code 15",
    ),
    "wrong size": (lambda c: send_msg(c, vu.GET_FEATURES, REPLY, b"\0\0\0\0"), "must be 8 bytes, got 4"),
    "bad version": (lambda c: send_msg(c, vu.GET_FEATURES, 0x2 | vu.REPLY, U64_FEATURES), "header version 2"),
    "no reply flag": (
        lambda c: send_msg(c, vu.GET_FEATURES, vu.VERSION, U64_FEATURES),
        "flags 0x1, expected 0x5",
    ),
    "unexpected fd": (_make_fd_reply, "unexpected file descriptor"),
    "oversized header": (lambda c: c.sendall(HDR.pack(vu.GET_FEATURES, REPLY, 1 << 20)), "payload size"),
}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reply(sockdir: str, case: str) -> None:
    reply, pattern = MALFORMED[case]
    path = os.path.join(sockdir, "bad.sock")
    gc.collect()
    fds = open_fd_count()
    with FakeBackend(path, _reply_then_wait(reply)) as fake:
        start = time.monotonic()
        with pytest.raises(DeviceProtocolError, match=pattern):
            VhostUserTransport(path, timeout=2.0, connect_timeout=1.0)
        assert time.monotonic() - start < 1.5, "a malformed reply must fail at once, not time out"
    assert not fake.errors, fake.errors
    gc.collect()
    assert open_fd_count() == fds, "the failed attempt left file descriptors open"


@pytest.mark.timeout(15)
def test_malformed_later_in_handshake(sockdir: str) -> None:
    # A good GET_FEATURES, then a GET_PROTOCOL_FEATURES reply with reserved bits in the size.
    path = os.path.join(sockdir, "bad2.sock")

    def script(conn: socket.socket) -> None:
        _answer_features(conn)
        request, _, _ = recv_msg(conn)
        assert request == vu.GET_PROTOCOL_FEATURES
        send_msg(conn, vu.GET_PROTOCOL_FEATURES, REPLY, b"\1" * 9)
        try:
            conn.recv(1)
        except OSError:
            pass

    with FakeBackend(path, script) as fake:
        with pytest.raises(DeviceProtocolError, match="GET_PROTOCOL_FEATURES"):
            VhostUserTransport(path, timeout=2.0)
    assert not fake.errors, fake.errors


@pytest.mark.timeout(15)
def test_backend_never_answers(sockdir: str) -> None:
    path = os.path.join(sockdir, "mute.sock")
    release = threading.Event()

    def script(conn: socket.socket) -> None:
        recv_msg(conn)
        release.wait(5)

    with FakeBackend(path, script) as fake:
        start = time.monotonic()
        with pytest.raises(TransportTimeout, match="did not answer GET_FEATURES"):
            VhostUserTransport(path, timeout=0.5)
        elapsed = time.monotonic() - start
        release.set()
    assert 0.45 <= elapsed < 2.0
    assert not fake.errors, fake.errors


@pytest.mark.timeout(15)
@pytest.mark.parametrize("when", ["at once", "after GET_FEATURES", "half a reply"])
def test_backend_closes_mid_handshake(sockdir: str, when: str) -> None:
    path = os.path.join(sockdir, "gone.sock")

    def script(conn: socket.socket) -> None:
        if when == "at once":
            return
        if when == "half a reply":
            recv_msg(conn)
            conn.sendall(HDR.pack(vu.GET_FEATURES, REPLY, 8) + b"\0\0\0")
            return
        _answer_features(conn)
        recv_msg(conn)  # GET_PROTOCOL_FEATURES: hang up instead of answering

    gc.collect()
    fds = open_fd_count()
    with FakeBackend(path, script) as fake:
        start = time.monotonic()
        with pytest.raises(ConnectionLost):
            VhostUserTransport(path, timeout=3.0)
        assert time.monotonic() - start < 2.0
    assert not fake.errors, fake.errors
    gc.collect()
    assert open_fd_count() == fds
