"""VirtioNet against the real peer: DPDK 22.11 dpdk-testpmd's vhost PMD (PEERS.md, "Network").

rxonly counts the frames we send (its final statistics); txonly floods us
and every frame is checked; macswap echoes our frames byte-exact with the
MACs swapped, on 2 queue pairs and with mergeable buffers spanning several
receive buffers; control-queue commands are accepted; the bench CLI runs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

# Before importing it, so that pytest rewrites the asserts in the helper module.
pytest.register_assert_rewrite("testpmd")

from pyvirtio.bench.net import NetEngine  # noqa: E402
from pyvirtio.drivers.net import NetControlError, VirtioNet  # noqa: E402
from pyvirtio.errors import InvalidArgument  # noqa: E402
from pyvirtio.spec import net as N  # noqa: E402
from testpmd import (  # noqa: E402
    RXONLY_SIZES,
    assert_swapped_echo,
    check_txonly_flood,
    echo_frames,
    payload_frames,
    send_all,
)

pytest_plugins = ["testpmd"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(90)]


def test_rxonly_counts_every_frame_we_send(testpmd_factory) -> None:
    t = testpmd_factory("rxonly")
    with VirtioNet.open(t.target, queue_size=256) as net:
        frames = payload_frames(net.mac, 0, RXONLY_SIZES)
        assert send_all(net, frames) == len(frames)
        assert net.stats()["tx_frames"] == len(frames)
    t.stop()
    stats = t.final_stats()
    assert stats["RX-packets"] == len(frames), stats
    assert stats.get("RX-dropped", 0) == 0


def test_txonly_flood_is_counted_and_every_frame_validated(testpmd_factory) -> None:
    t = testpmd_factory("txonly")
    with VirtioNet.open(t.target, queue_size=256) as net:
        assert check_txonly_flood(net, 3000) >= 3000
        # The vectorised receive loop on the same flood: frames counted, checked in bulk, in order.
        stats = NetEngine(net).run_rx(0.5)
        assert stats.ios > 1000 and stats.path == "in-order"  # type: ignore[attr-defined]
        assert stats.bytes == 64 * stats.ios
        received = net.stats()["rx_frames"] + stats.ios
    t.stop()
    final = t.final_stats()
    # Everything we counted was sent by testpmd; what it sent beyond that was still in our ring or dropped.
    assert final["TX-packets"] >= received
    assert final["TX-packets"] - received <= 2 * 256 + 64


def test_macswap_echo_is_byte_exact_on_two_queue_pairs(testpmd_factory) -> None:
    t = testpmd_factory("macswap", queues=2)
    with VirtioNet.open(t.target, queue_pairs=2) as net:
        assert net.num_pairs == 2 and net.active_pairs == 2
        assert net.device.has_feature(N.F_MQ)
        assert net.device.transport.info()["net"]["active_pairs"] == 2
        for pair in (0, 1):
            frames = payload_frames(net.mac, pair, [60, 64, 100, 256, 1000, 1514] * 20)
            got = echo_frames(net, pair, frames)
            assert_swapped_echo(frames, got)
            assert all(g[14] == pair for g in got)  # came back on the pair it was sent on


def test_macswap_echo_with_frames_spanning_several_mergeable_buffers(testpmd_factory) -> None:
    t = testpmd_factory("macswap")
    with VirtioNet.open(t.target, rx_buf_size=512) as net:
        assert net.mrg_rxbuf
        frames = payload_frames(net.mac, 0, [1514, 64, 1000, 500, 501, 1514, 60] * 10)
        got = echo_frames(net, 0, frames)
        assert_swapped_echo(frames, got)
        assert net.stats()["rx_merged"] >= 40  # 1514, 1000, 501 (with its header), 1514 need 2+ buffers


def test_macswap_echo_without_mergeable_buffers(testpmd_factory) -> None:
    t = testpmd_factory("macswap")
    with VirtioNet.open(t.target, mrg_rxbuf=False) as net:
        assert not net.mrg_rxbuf
        frames = payload_frames(net.mac, 0, [60, 1514, 777] * 20)
        assert_swapped_echo(frames, echo_frames(net, 0, frames))


def test_control_queue_commands_are_accepted(testpmd_factory) -> None:
    t = testpmd_factory("macswap", queues=2)
    with VirtioNet.open(t.target, queue_pairs=2) as net:
        net.set_promisc(True)
        net.set_allmulti(True)
        net.set_allmulti(False)
        net.set_mac("02:11:22:33:44:55")
        net.set_mac_table(["02:00:00:00:00:09"], ["01:00:5e:00:00:01", "33:33:00:00:00:01"])
        net.set_queue_pairs(1)
        net.set_queue_pairs(2)
        state = net.device.transport.info()["net"]
        assert state["rx_mode"]["promisc"] and not state["rx_mode"]["allmulti"]
        assert state["mac"] == "02:11:22:33:44:55" and net.mac == bytes.fromhex("021122334455")
        assert state["active_pairs"] == 2
        with pytest.raises(InvalidArgument):
            net.set_queue_pairs(3)
        with pytest.raises(NetControlError):
            net.control(N.CTRL_VLAN, 0, b"\x01\x00")  # not negotiated: the device says ERR
        # The device still works after the commands, with the new source MAC.
        frames = payload_frames(net.mac, 0, [64] * 10)
        assert_swapped_echo(frames, echo_frames(net, 0, frames))


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "pyvirtio", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_bench_cli_tx_frames_are_all_counted_by_testpmd(testpmd_factory) -> None:
    t = testpmd_factory("rxonly")
    r = _cli("net", "bench", t.sock, "--mode", "tx", "--size", "64", "--runtime", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["mode"] == "tx" and report["frames"] > 0 and report["pps"] > 0
    assert report["bps"] == pytest.approx(report["pps"] * 64 * 8, rel=0.01)
    t.stop()
    # Every frame handed to the device is counted: those completed in the timed window and the ring's last.
    assert t.final_stats()["RX-packets"] == report["sent"]
    assert 0 <= report["sent"] - report["frames"] <= report["queue_size"]


def test_recv_cli_writes_a_readable_pcap(testpmd_factory, tmp_path) -> None:
    t = testpmd_factory("txonly")
    pcap = tmp_path / "flood.pcap"
    r = _cli("net", "recv", t.sock, "--count", "50", "--pcap", str(pcap), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["received"] == 50
    data = pcap.read_bytes()
    magic, major, minor, _tz, _sig, snaplen, link = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, link) == (0xA1B2C3D4, 2, 4, 1) and snaplen == 65535
    pos, n = 24, 0
    while pos < len(data):
        _s, _us, incl, orig = struct.unpack_from("<IIII", data, pos)
        frame = data[pos + 16 : pos + 16 + incl]
        assert incl == orig == 64 and frame[12:14] == b"\x08\x00"
        pos += 16 + incl
        n += 1
    assert n == 50 and pos == len(data)
