"""VirtioNet against the embedded back end (``pyvirtio serve net``), and in-process driver checks.

The same echo checks as against testpmd's macswap run against the embedded
loopback back end (MAC swap on, 2 queue pairs, mergeable buffers, no
mergeable buffers); then what only our back end has (config: MAC, MTU,
link status; checksum offload passed through), the zero-copy recycling
rule, the asyncio API, the CLI (``serve net``, ``net info``), a TAP bridge
when /dev/net/tun is usable, and device faults seen through an in-process
loopback device.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

pytest.register_assert_rewrite("testpmd")

from peers import missing_peer  # noqa: E402
from pyvirtio.backends.net import NetBackend  # noqa: E402
from pyvirtio.backends.server import VhostUserServer  # noqa: E402
from pyvirtio.bench.net import NetEngine  # noqa: E402
from pyvirtio.device import VirtioDevice  # noqa: E402
from pyvirtio.drivers.net import NetHdr, VirtioNet, inet_checksum  # noqa: E402
from pyvirtio.errors import InvalidArgument, OwnershipError  # noqa: E402
from pyvirtio.spec import net as N  # noqa: E402
from pyvirtio.spec.common import DEVICE_ID_NET, F_RING_EVENT_IDX, F_VERSION_1  # noqa: E402
from pyvirtio.transport.loopback import LoopbackTransport  # noqa: E402
from testpmd import assert_swapped_echo, echo_frames, payload_frames  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def serve(path: str, **kw: object) -> VhostUserServer:
    model = NetBackend("loopback", **kw)  # type: ignore[arg-type]
    server = VhostUserServer(path, model, poll_us=50)
    server.start()
    return server


def stop(server: VhostUserServer) -> None:
    server.stop()
    server.wait(10)
    server.model.close()  # type: ignore[attr-defined]


def test_embedded_loopback_echo_is_byte_exact_on_two_queue_pairs(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path, pairs=2, swap_mac=True)
    try:
        with VirtioNet.open(path, queue_pairs=2) as net:
            assert net.num_pairs == 2 and net.device.has_feature(N.F_MQ)
            for pair in (0, 1):
                frames = payload_frames(net.mac, pair, [60, 64, 100, 256, 1000, 1514] * 20)
                got = echo_frames(net, pair, frames)
                assert_swapped_echo(frames, got)
                assert all(g[14] == pair for g in got)
    finally:
        stop(server)


@pytest.mark.parametrize("mrg, buf", [(True, 512), (False, 2048)])
def test_embedded_loopback_echo_mergeable_or_not(sockdir: str, mrg: bool, buf: int) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path, swap_mac=True)
    try:
        with VirtioNet.open(path, mrg_rxbuf=mrg, rx_buf_size=buf) as net:
            assert net.mrg_rxbuf is mrg
            frames = payload_frames(net.mac, 0, [1514, 64, 1000, 500, 501, 1514, 60] * 10)
            assert_swapped_echo(frames, echo_frames(net, 0, frames))
            assert (net.stats()["rx_merged"] >= 40) is mrg
    finally:
        stop(server)


def test_config_control_queue_and_engine_against_the_embedded_back_end(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path, pairs=2, mac=bytes.fromhex("02aabbccddee"), mtu=1400)
    try:
        with VirtioNet.open(path, queue_pairs=2) as net:
            assert net.device_mac == net.mac == bytes.fromhex("02aabbccddee")
            assert net.mtu == 1400 and net.max_frame == 1418
            assert net.link_up is True
            with pytest.raises(InvalidArgument):
                net.send_batch([bytes(1419)])
            net.set_promisc(True)
            net.set_mac("02:00:00:00:00:33")
            net.set_queue_pairs(1)
            info = net.info()
            assert info["net"]["mac"] == "02:00:00:00:00:33"
            assert info["virtio"]["net"]["active_pairs"] == 1
            net.set_queue_pairs(2)
            # Loopback without swap: the echo engine expects the frame back unchanged.
            stats = NetEngine(net, pair=1, swapped=False).run_echo(0.3, window=8)
            assert stats.ios > 10 and stats.verify_errors == 0 and stats.errors == 0
            assert stats.percentile(50) > 0
            tx = NetEngine(net, pair=0).run_tx(0.3)
            assert tx.ios > 100 and tx.path == "in-order"  # type: ignore[attr-defined]
    finally:
        stop(server)


def test_checksum_offload_headers_pass_through(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path)
    try:
        with VirtioNet.open(path, csum=True) as net:
            assert net.csum and net.guest_csum
            frame = payload_frames(net.mac, 0, [100])[0]
            hdr = NetHdr(flags=N.HDR_F_NEEDS_CSUM, csum_start=20, csum_offset=6)
            assert net.send_batch([frame], hdr=hdr) == 1
            deadline = time.monotonic() + 5
            got: list = []
            while not got and time.monotonic() < deadline:
                got = net.recv_batch(8, with_headers=True)
            (f, h), = got
            assert bytes(f) == frame
            assert h.flags == N.HDR_F_NEEDS_CSUM and (h.csum_start, h.csum_offset) == (20, 6)
            with pytest.raises(InvalidArgument):
                net.send_batch([frame], hdr=NetHdr(flags=N.HDR_F_NEEDS_CSUM, csum_start=99, csum_offset=0))
        # Without GUEST_CSUM the device completes the checksum itself.
        with VirtioNet.open(path) as net:
            assert not net.csum
            with pytest.raises(InvalidArgument):
                net.send_batch([frame], hdr=hdr)
        out = bytearray(frame)
        out[26:28] = b"\0\0"  # the checksum field holds the seed (the pseudo-header sum); 0 here
        from pyvirtio.backends.net import _complete_csum

        done = _complete_csum(bytes(out), 20, 6)
        assert inet_checksum(done[20:]) == 0 and done[:26] == out[:26] and done[28:] == out[28:]
    finally:
        stop(server)


def test_zero_copy_views_are_recycled_at_the_next_receive(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path)
    model = server.model
    assert isinstance(model, NetBackend)
    try:
        with VirtioNet.open(path) as net:
            frames = payload_frames(net.mac, 0, [64, 65, 66, 67])
            assert net.send_batch(frames) == 4
            deadline = time.monotonic() + 5
            while model.counters["rx_frames"] < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # the device publishes the used entries after writing the last frame
            got = net.recv_batch(16)
            assert [bytes(g) for g in got] == frames
            rx = net._pairs[0].rx
            # Views straight into the receive buffers (no copy), held out of the device's hands.
            assert all(g.obj is got[0].obj for g in got) and len(rx.held) == 4
            assert rx.fixed.n_inflight == rx.nslots - 4
            assert net.recv_batch(16) == []  # the next receive call recycles them...
            with pytest.raises(ValueError):
                bytes(got[0])  # ...so the old views are released
            assert rx.held == [] and rx.fixed.n_inflight == rx.nslots  # ...and every buffer is posted again
    finally:
        stop(server)


def test_asyncio_send_and_receive(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path, swap_mac=True)
    try:
        with VirtioNet.open(path) as net:
            frames = payload_frames(net.mac, 0, [64, 300, 1514] * 10)

            async def main() -> list[bytes]:
                assert await net.asend(frames) == len(frames)
                out: list[bytes] = []
                while len(out) < len(frames):
                    out += [bytes(f) for f in await asyncio.wait_for(net.arecv(64), 10)]
                return out

            assert_swapped_echo(frames, asyncio.run(main()))
    finally:
        stop(server)


def test_a_pair_belongs_to_one_thread(sockdir: str) -> None:
    import threading

    path = os.path.join(sockdir, "n.sock")
    server = serve(path)
    try:
        with VirtioNet.open(path) as net:
            net.recv_batch(1)
            errors: list[BaseException] = []
            t = threading.Thread(target=lambda: _catch(errors, lambda: net.recv_batch(1)))
            t.start()
            t.join()
            assert errors and isinstance(errors[0], OwnershipError)
            net.release_pair(0)
            t = threading.Thread(target=lambda: _catch(errors, lambda: net.send_batch([bytes(60)])))
            t.start()
            t.join()
            assert len(errors) == 1
    finally:
        stop(server)


def _catch(errors: list[BaseException], fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:
        errors.append(exc)


# -- CLI ---------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_net_cli_info_send_and_echo_bench(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "serve", "net", "--socket", path, "--mode", "loopback", "--swap-mac"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = _cli("net", "info", path, "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["device_type"] == "net" and info["net"]["mac"] == "02:70:79:76:00:01"
        assert "NET_MRG_RXBUF" in info["negotiated_features"]
        r = _cli("net", "info", path)
        assert r.returncode == 0 and "02:70:79:76:00:01" in r.stdout
        r = _cli("net", "send", path, "--count", "100", "--size", "128", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sent"] == 100
        r = _cli("net", "bench", path, "--mode", "echo", "--runtime", "0.5", "--window", "4", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["frames"] > 0 and rep["verify_errors"] == 0 and rep["latency_us"]["p50"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        if proc.stderr:
            proc.stderr.close()
    assert not os.path.exists(path)


def test_net_cli_argument_errors() -> None:
    r = _cli("net", "send", "/nonexistent.sock", "--dst-mac", "zz")
    assert r.returncode == 2 and "invalid MAC" in r.stderr
    r = _cli("net", "info", "/nonexistent.sock", "--connect-timeout", "0.1")
    assert r.returncode == 1 and r.stderr.startswith("pyvirtio: error:")


# -- TAP ---------------------------------------------------------------------------


def _tap_usable() -> str | None:
    if not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        return "no /dev/net/tun or no ip(8)"
    try:
        b = NetBackend("tap", tap="pvprobe%d")
    except OSError as exc:
        return f"TAP not usable: {exc}"
    b.close()
    return None


def test_tap_bridge_answers_arp(sockdir: str) -> None:
    why = _tap_usable()
    if why:
        missing_peer(f"{why} (CI needs /dev/net/tun and iproute2)")
    path = os.path.join(sockdir, "n.sock")
    model = NetBackend("tap", tap="pvtest%d")
    name = model.tap_name
    assert name
    server = VhostUserServer(path, model)
    server.start()
    try:
        subprocess.run(["ip", "addr", "add", "10.213.77.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        with VirtioNet.open(path) as net:
            me = net.mac
            arp = (b"\xff" * 6 + me + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
                   + me + bytes([10, 213, 77, 2]) + bytes(6) + bytes([10, 213, 77, 1]))
            deadline = time.monotonic() + 10
            reply = None
            while reply is None and time.monotonic() < deadline:
                net.send_batch([arp + bytes(60 - len(arp))])
                end = time.monotonic() + 0.5
                while reply is None and time.monotonic() < end:
                    for f in net.recv_batch(16):
                        b = bytes(f)
                        if b[12:14] == b"\x08\x06" and struct.unpack("!H", b[20:22])[0] == 2:
                            reply = b
        assert reply is not None, "no ARP reply from the kernel through the TAP device"
        assert reply[0:6] == me and reply[28:32] == bytes([10, 213, 77, 1]) and reply[38:42] == bytes([10, 213, 77, 2])
    finally:
        server.stop()
        server.wait(10)
        model.close()


# -- device faults, in process --------------------------------------------------------


def _loop_net(rx_handler: object, **kw: object) -> VirtioNet:
    t = LoopbackTransport(
        device_id=DEVICE_ID_NET,
        features=(1 << F_VERSION_1) | (1 << F_RING_EVENT_IDX) | (1 << N.F_MRG_RXBUF),
        num_queues=2,
        queue_size=16,
        handlers={0: rx_handler, 1: lambda i, c: 0},  # type: ignore[dict-item]
        auto=False,
    )
    return VirtioNet(VirtioDevice("loop", t), **kw)  # type: ignore[arg-type]


def test_short_receive_entries_are_counted_and_their_buffers_reposted() -> None:
    net = _loop_net(lambda i, c: c.write(bytes(5)))
    t = net.device.transport
    assert isinstance(t, LoopbackTransport)
    t.process(0, limit=3)
    assert net.recv_batch(16) == []
    assert net.stats()["rx_errors"] == 3
    assert net._pairs[0].rx.fixed.n_inflight == 16
    net.close()


def test_merged_frame_split_across_polls() -> None:
    frame = bytes(range(256)) * 2  # 512 bytes: 2 buffers of 300 with the header
    pieces: list[bytes] = [struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 2) + frame[:288], frame[288:]]
    net = _loop_net(lambda i, c: c.write(pieces.pop(0)), rx_buf_size=300)
    t = net.device.transport
    assert isinstance(t, LoopbackTransport)
    t.process(0, limit=1)
    assert net.recv_batch(16) == []  # first buffer only: waits for the rest
    t.process(0, limit=1)
    (got,) = net.recv_batch(16)
    assert bytes(got) == frame
    assert net.stats()["rx_merged"] == 1
    net.close()


def test_transmit_entry_claiming_written_bytes_breaks_the_queue() -> None:
    from pyvirtio.errors import DeviceProtocolError

    t = LoopbackTransport(
        device_id=DEVICE_ID_NET, features=(1 << F_VERSION_1), num_queues=2, queue_size=16,
        handlers={0: lambda i, c: 0, 1: lambda i, c: 5},
    )
    net = VirtioNet(VirtioDevice("loop", t))
    net.send_batch([bytes(60)])
    with pytest.raises(DeviceProtocolError, match="exceeds the 0 device-writable bytes"):
        net.send_batch([bytes(60)])
    net.close()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_net_engine_on_either_ring_format(sockdir: str, ring: str) -> None:
    """tx through the ring's stream and echo through the general calls, on split and packed rings."""
    path = os.path.join(sockdir, "n.sock")
    server = serve(path, swap_mac=True)
    try:
        with VirtioNet.open(path, ring=ring) as net:
            assert net.device.ring_format == ring
            echo = NetEngine(net).run_echo(0.3, window=8)  # first: the loopback echoes tx's frames too
            assert echo.ios > 10 and echo.verify_errors == 0 and echo.errors == 0
            tx = NetEngine(net).run_tx(0.3)
            assert tx.ios > 100 and tx.errors == 0 and tx.path == "in-order"  # type: ignore[attr-defined]
    finally:
        stop(server)


def test_net_bench_cli_ring_packed(sockdir: str) -> None:
    path = os.path.join(sockdir, "n.sock")
    server = serve(path, swap_mac=True)
    try:
        for mode in ("tx", "echo"):
            r = _cli("net", "bench", path, "--ring", "packed", "--mode", mode, "--runtime", "0.3", "--json")
            assert r.returncode == 0, r.stderr
            rep = json.loads(r.stdout)
            assert rep["ring"] == "packed" and rep["frames"] > 0 and rep["errors"] == 0
    finally:
        stop(server)
