"""A Linux guest's virtio_net driver on ``pyvirtio serve net`` through ``virtio-net-pci`` + ``-netdev vhost-user``.

The back end runs in loopback mode with ``--swap-mac``: every frame the guest
transmits comes back to it with source and destination MAC exchanged. The
guest is set up so that traffic between two of its own addresses must cross
that loop (the only way its packets can come back):

* 10.0.0.1/24 on eth0, 10.0.0.2/32 on lo;
* policy routing sends locally generated packets to either address out of
  eth0 (table 100, consulted before the local table for ``iif lo``), to a
  permanent neighbour entry with a made-up MAC;
* ``accept_local`` lets eth0 take in packets whose source is a local address.

A packet from 10.0.0.1 to 10.0.0.2 is thus a frame sent to the back end; it
comes back addressed to the guest's MAC (swapped), is delivered to
10.0.0.2, and the answer travels the same loop the other way. So a ping
reply (small, and 4000 bytes: three IP fragments each way) and a 512 KiB TCP
stream from 10.0.0.2 to 10.0.0.1 (with checksum offload: the back end offers
CSUM and GUEST_CSUM) arrive only if frames flow in both directions through
the back end; the stream's SHA-256 shows they arrive intact. eth0's counters
say how many frames went each way; in a loop they must match.

``vectors=0``: QEMU 7.2 under TCG crashes in vhost-user net with MSI-X on
(PEERS.md), a QEMU fault; INTx works.

A second guest (2 vCPUs) uses two queue pairs: ``-netdev
vhost-user,queues=2``, ``virtio-net-pci,mq=on`` and ``pyvirtio serve net
--queues 2``. QEMU drives that as one vhost_dev per queue pair over the one
socket, each adding the same guest RAM (ADD_MEM_REG) and sending its own
SET_FEATURES: a back end that refuses the duplicate region drops the
connection and the guest's link stays down (issue 11). Linux enables as
many pairs as it has CPUs and maps each CPU's transmissions to its own pair
(XPS; INTx, so one interrupt for all queues). Pings from a process pinned
to vCPU 0, with the interrupt on vCPU 0, travel on pair 0 (rings 0 and 1);
then the interrupt is moved to vCPU 1, and pings and the TCP stream, both
ends pinned to vCPU 1, travel on pair 1 (rings 2 and 3), out and, in the
loop, back. The back end logs at the end of the connection how many chains
each ring carried: pair 0 must have carried the first pings, pair 1 at
least the stream's frames. A back end that does not serve pair 1 fails the
second half (no answer), one that serves only pair 1 the first. Last, the
driver is unbound and bound again: QEMU stops both pairs (GET_VRING_BASE on
every ring, SET_STATUS 0) and starts them afresh (SET_FEATURES from each
vhost_dev, the rings, no memory message: each vhost_dev's shadow of the
regions is unchanged), and pings from both vCPUs come back again.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from guest.harness import NET_MODULES, Guest
from guest.kernel import Kernel
from guest.qemu import GuestRun

pytest_plugins = ["guest.fixtures"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(300)]

GUEST_MAC = "52:54:00:70:79:07"
PEER_MAC = "02:00:00:00:00:02"  # a neighbour that does not exist: only the loop answers
STREAM_BYTES = 512 << 10
PINGS = 5
BIG_PINGS, BIG_SIZE = 3, 4000

SETUP = rf"""
wait_for /sys/class/net/eth0 || {{ result eth0 missing; exit 1; }}
result mac $(cat /sys/class/net/eth0/address)
ip link set lo up
ip addr add 10.0.0.2/32 dev lo
ip rule add pref 10 iif lo to 10.0.0.2 lookup 100
ip rule add pref 11 iif lo to 10.0.0.1 lookup 100
ip rule add pref 100 lookup local
ip rule del pref 0
# eth0's part of the set-up (again after the driver is bound anew: the interface is new).
eth0_up() {{
    echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6  # no IPv6 chatter in the counters
    for c in all default eth0 lo; do
        echo 0 > /proc/sys/net/ipv4/conf/$c/rp_filter
        echo 1 > /proc/sys/net/ipv4/conf/$c/accept_local
    done
    ip addr add 10.0.0.1/24 dev eth0
    ip link set eth0 up
    ip route add 10.0.0.1 dev eth0 table 100
    ip route add 10.0.0.2 dev eth0 table 100
    arp -i eth0 -s 10.0.0.1 {PEER_MAC}
    arp -i eth0 -s 10.0.0.2 {PEER_MAC}
    i=0; c=/sys/class/net/eth0/carrier
    while [ "$(cat $c 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
}}
eth0_up
result neighbours "$(ip neigh show dev eth0 | grep -c 'lladdr {PEER_MAC} .*PERMANENT')"
result route "$(ip route get 10.0.0.2 from 10.0.0.1 | head -1)"
result carrier "$(cat /sys/class/net/eth0/carrier)"
s=/sys/class/net/eth0/statistics
tx0=$(cat $s/tx_packets); rx0=$(cat $s/rx_packets); txb0=$(cat $s/tx_bytes); rxb0=$(cat $s/rx_bytes)
received() {{ sed -n 's/.* \([0-9]*\) packets received.*/\1/p'; }}
"""

SCRIPT = SETUP + rf"""
result ping_received $(ping -c {PINGS} -i 0.2 -W 3 -I 10.0.0.1 10.0.0.2 | received)
result big_ping_received $(ping -c {BIG_PINGS} -i 0.2 -W 3 -s {BIG_SIZE} -I 10.0.0.1 10.0.0.2 | received)
nc -l -p 5000 < /data/stream &
server=$!
sleep 0.5
result stream_sha $(timeout 30 nc -w 5 10.0.0.2 5000 | sha256sum | cut -d' ' -f1)
kill $server 2>/dev/null
sleep 0.5
result tx_packets $(($(cat $s/tx_packets) - tx0))
result rx_packets $(($(cat $s/rx_packets) - rx0))
result tx_bytes $(($(cat $s/tx_bytes) - txb0))
result rx_bytes $(($(cat $s/rx_bytes) - rxb0))
result rx_dropped $(cat $s/rx_dropped)
result rx_errors $(cat $s/rx_errors)
"""


#: Two queue pairs: pings from vCPU 0; then the interrupt moved to vCPU 1, pings and the stream from there.
MQ_SCRIPT = SETUP + rf"""
result queues "$(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
result xps_tx1 "$(cat /sys/class/net/eth0/queues/tx-1/xps_cpus)"
result ping_cpu0_received $(taskset -c 0 ping -c {PINGS} -i 0.2 -W 3 -I 10.0.0.1 10.0.0.2 | received)
irq=$(sed -n 's/^ *\([0-9]*\):.*virtio0.*/\1/p' /proc/interrupts | head -1)
echo 2 > /proc/irq/$irq/smp_affinity
result irq_affinity "$(cat /proc/irq/$irq/smp_affinity)"
result ping_cpu1_received $(taskset -c 1 ping -c {PINGS} -i 0.2 -W 3 -I 10.0.0.1 10.0.0.2 | received)
taskset -c 1 nc -l -p 5000 < /data/stream &
server=$!
sleep 0.5
result stream_sha $(timeout 30 taskset -c 1 nc -w 5 10.0.0.2 5000 | sha256sum | cut -d' ' -f1)
kill $server 2>/dev/null
result rx_dropped $(cat $s/rx_dropped)
result rx_errors $(cat $s/rx_errors)
# Driver unbind and rebind: QEMU stops both pairs and starts them again (no memory re-sent).
echo 0000:00:07.0 > /sys/bus/pci/drivers/virtio-pci/unbind
echo 0000:00:07.0 > /sys/bus/pci/drivers/virtio-pci/bind
wait_for /sys/class/net/eth0 50 && eth0_up
result rebind_carrier "$(cat /sys/class/net/eth0/carrier)"
result rebind_ping_cpu0_received $(taskset -c 0 ping -c 2 -i 0.2 -W 3 -I 10.0.0.1 10.0.0.2 | received)
result rebind_ping_cpu1_received $(taskset -c 1 ping -c 2 -i 0.2 -W 3 -I 10.0.0.1 10.0.0.2 | received)
"""

_RING_CHAINS_RE = re.compile(r"chains per ring: ((?:\d+=\d+ ?)+)")


@dataclass
class NetOutcome:
    run: GuestRun
    guest: Guest
    stream: bytes

    def context(self) -> str:
        return f"{self.run.describe()}\n{self.guest.backend_report()}"

    def ring_chains(self) -> dict[int, int]:
        """Chains per ring of the back end's (last) connection, from its log."""
        found = _RING_CHAINS_RE.findall(self.guest.backends["net"].log_text())
        assert found, f"the back end logged no chains per ring\n{self.context()}"
        return {int(k): int(v) for k, v in (item.split("=") for item in found[-1].split())}


@pytest.fixture(scope="module")
def net(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetOutcome]:
    stream = random.Random(0x7E7).randbytes(STREAM_BYTES)
    with Guest(guest_kernel, tmp_path_factory.mktemp("guest-net")) as g:
        served = g.serve("net", "net", "--mode", "loopback", "--swap-mac")
        devices = [*served.qemu_chardev(), "-netdev", "vhost-user,id=n0,chardev=net",
                   "-device", f"virtio-net-pci,netdev=n0,vectors=0,mac={GUEST_MAC},addr=07"]
        run = g.boot(SCRIPT, devices, modules=NET_MODULES, files={"data/stream": stream})
        g.close()
        yield NetOutcome(run, g, stream)


def test_guest_script_ran_to_its_end(net: NetOutcome) -> None:
    net.run.check()
    assert not net.run.duplicates, net.context()


def test_guest_sees_the_nic_with_link_up(net: NetOutcome) -> None:
    assert net.run.result("mac") == GUEST_MAC, net.context()
    assert net.run.result("carrier") == "1", net.context()
    # The loop is the only way: the route to 10.0.0.2 leaves through eth0.
    assert "dev eth0" in net.run.result("route"), net.context()


def test_pings_come_back_through_the_back_end(net: NetOutcome) -> None:
    assert net.run.int_result("neighbours") == 2, net.context()  # no ARP: the frames go to PEER_MAC
    assert net.run.int_result("ping_received") == PINGS, net.context()


def test_fragmented_pings_come_back(net: NetOutcome) -> None:
    """4000-byte pings: three IP fragments each way, reassembled by the guest."""
    assert net.run.int_result("big_ping_received") == BIG_PINGS, net.context()


def test_tcp_stream_arrives_intact(net: NetOutcome) -> None:
    assert net.run.result("stream_sha") == hashlib.sha256(net.stream).hexdigest(), net.context()


def test_every_frame_sent_came_back(net: NetOutcome) -> None:
    """In a loop, what eth0 received is what it sent: frames both ways, none lost or grown."""
    run = net.run
    tx, rx = run.int_result("tx_packets"), run.int_result("rx_packets")
    # At least: the small pings (request + reply), the fragmented ones (3 + 3 each), the stream's frames.
    assert tx >= 2 * PINGS + 6 * BIG_PINGS + STREAM_BYTES // 1500, net.context()
    assert rx == tx, net.context()
    assert run.int_result("rx_bytes") == run.int_result("tx_bytes"), net.context()
    assert run.int_result("rx_dropped") == 0, net.context()
    assert run.int_result("rx_errors") == 0, net.context()


def test_back_end_saw_no_fault_and_exited_cleanly(net: NetOutcome) -> None:
    assert net.guest.exit_status["net"] == 0, net.context()
    assert net.guest.backends["net"].faults() == [], net.context()


# -- two queue pairs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net_mq(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetOutcome]:
    stream = random.Random(0x7E8).randbytes(STREAM_BYTES)
    with Guest(guest_kernel, tmp_path_factory.mktemp("guest-netmq")) as g:
        served = g.serve("net", "net", "--mode", "loopback", "--swap-mac", "--queues", "2")
        devices = [*served.qemu_chardev(), "-netdev", "vhost-user,id=n0,chardev=net,queues=2",
                   "-device", f"virtio-net-pci,netdev=n0,vectors=0,mq=on,mac={GUEST_MAC},addr=07"]
        run = g.boot(MQ_SCRIPT, devices, modules=NET_MODULES, files={"data/stream": stream}, smp=2)
        g.close()
        yield NetOutcome(run, g, stream)


def test_two_pairs_guest_ran_with_link_up(net_mq: NetOutcome) -> None:
    net_mq.run.check()
    assert not net_mq.run.duplicates, net_mq.context()
    assert net_mq.run.result("carrier") == "1", net_mq.context()
    assert net_mq.run.result("queues").split() == ["rx-0", "rx-1", "tx-0", "tx-1"], net_mq.context()


def test_two_pairs_traffic_from_each_vcpu_comes_back(net_mq: NetOutcome) -> None:
    run = net_mq.run
    assert run.int_result("ping_cpu0_received") == PINGS, net_mq.context()
    assert run.int_result("ping_cpu1_received") == PINGS, net_mq.context()
    assert run.result("stream_sha") == hashlib.sha256(net_mq.stream).hexdigest(), net_mq.context()
    assert run.int_result("rx_dropped") == 0 and run.int_result("rx_errors") == 0, net_mq.context()


def test_two_pairs_both_carried_frames(net_mq: NetOutcome) -> None:
    """Every ring of both pairs (0, 1: pair 0; 2, 3: pair 1) carried chains, by the back end's count."""
    chains = net_mq.ring_chains()
    assert sorted(chains) == [0, 1, 2, 3], net_mq.context()
    # Pair 0: at least the pings from vCPU 0, out and back.
    assert chains[0] >= PINGS and chains[1] >= PINGS, f"{chains}\n{net_mq.context()}"
    # Pair 1: the stream from vCPU 1 (1500-byte frames: the back end offers no TSO), out and back.
    frames = STREAM_BYTES // 1500
    assert chains[2] >= frames and chains[3] >= frames, f"{chains}\n{net_mq.context()}"


def test_two_pairs_serve_again_after_driver_unbind_and_rebind(net_mq: NetOutcome) -> None:
    """The interrupt stays on vCPU 1: pings from vCPU 0 leave on pair 0, answers come on pair 1."""
    run = net_mq.run
    assert run.result("rebind_carrier") == "1", net_mq.context()
    assert run.int_result("rebind_ping_cpu0_received") == 2, net_mq.context()
    assert run.int_result("rebind_ping_cpu1_received") == 2, net_mq.context()


def test_two_pairs_back_end_saw_no_fault_and_exited_cleanly(net_mq: NetOutcome) -> None:
    assert net_mq.guest.exit_status["net"] == 0, net_mq.context()
    assert net_mq.guest.backends["net"].faults() == [], net_mq.context()
