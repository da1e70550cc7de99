"""VirtioNet on packed rings, with and without VIRTIO_F_IN_ORDER, against DPDK 22.11 testpmd's vhost PMD (issue 12).

The vhost PMD offers RING_PACKED and IN_ORDER (PEERS.md, "Network"). For each
of packed and packed + IN_ORDER (and split + IN_ORDER, the one combination
test_net_testpmd.py does not cover): rxonly counts every frame we send,
txonly floods us and every frame is checked, macswap echoes our frames
byte-exact with the MACs swapped (mergeable buffers on, frames spanning
several receive buffers). Each test first checks that the format asked for
is the one negotiated, so a device that quietly fell back to split fails.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("testpmd")

from pyvirtio.drivers.net import VirtioNet  # noqa: E402
from pyvirtio.spec.common import F_IN_ORDER, F_RING_PACKED  # noqa: E402
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

VARIANTS = [("packed", False), ("packed", True), ("split", True)]
IDS = ["packed", "packed-in-order", "split-in-order"]


def _open(t: object, ring: str, in_order: bool, **kw: object) -> VirtioNet:
    net = VirtioNet.open(t.target, ring=ring, in_order=in_order, **kw)  # type: ignore[attr-defined]
    try:
        dev = net.device
        assert dev.ring_format == ring
        assert dev.has_feature(F_RING_PACKED) == (ring == "packed")
        assert dev.has_feature(F_IN_ORDER) == in_order
        info = dev.info()["virtio"]
        assert info["ring"] == ring and info["in_order"] == in_order
    except BaseException:
        net.close()
        raise
    return net


@pytest.mark.parametrize(("ring", "in_order"), VARIANTS, ids=IDS)
def test_rxonly_counts_every_frame_we_send(testpmd_factory, ring: str, in_order: bool) -> None:
    t = testpmd_factory("rxonly")
    with _open(t, ring, in_order, queue_size=256) as net:
        frames = payload_frames(net.mac, 0, RXONLY_SIZES)  # 2000 frames: several laps of a 256-entry ring
        assert send_all(net, frames) == len(frames)
        assert net.stats()["tx_frames"] == len(frames)
    t.stop()
    stats = t.final_stats()
    assert stats["RX-packets"] == len(frames), stats
    assert stats.get("RX-dropped", 0) == 0


@pytest.mark.parametrize(("ring", "in_order"), VARIANTS, ids=IDS)
def test_txonly_flood_every_frame_validated(testpmd_factory, ring: str, in_order: bool) -> None:
    t = testpmd_factory("txonly")
    with _open(t, ring, in_order, queue_size=256) as net:
        checked = check_txonly_flood(net, 3000)
        assert checked >= 3000  # > 11 laps of the receive ring
        received = net.stats()["rx_frames"]
        assert received == checked
    t.stop()
    final = t.final_stats()
    assert final["TX-packets"] >= received
    assert final["TX-packets"] - received <= 2 * 256 + 64


@pytest.mark.parametrize(("ring", "in_order"), VARIANTS, ids=IDS)
def test_macswap_echo_is_byte_exact(testpmd_factory, ring: str, in_order: bool) -> None:
    t = testpmd_factory("macswap")
    with _open(t, ring, in_order, rx_buf_size=512) as net:
        assert net.mrg_rxbuf
        for _round in range(3):  # 210 frames a round on a 256-entry ring: laps and wraps
            frames = payload_frames(net.mac, 0, [1514, 64, 1000, 500, 501, 1514, 60] * 10)
            assert_swapped_echo(frames, echo_frames(net, 0, frames))
        assert net.stats()["rx_merged"] >= 40


@pytest.mark.parametrize(("ring", "in_order"), VARIANTS[:2], ids=IDS[:2])
def test_macswap_echo_on_two_packed_queue_pairs(testpmd_factory, ring: str, in_order: bool) -> None:
    t = testpmd_factory("macswap", queues=2)
    with _open(t, ring, in_order, queue_pairs=2) as net:
        assert net.num_pairs == 2 and net.active_pairs == 2
        for pair in (0, 1):
            frames = payload_frames(net.mac, pair, [60, 64, 100, 256, 1000, 1514] * 20)
            got = echo_frames(net, pair, frames)
            assert_swapped_echo(frames, got)
            assert all(g[14] == pair for g in got)
