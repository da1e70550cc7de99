"""``pyvirtio net``: inspect, send to, receive from and benchmark a virtio-net device.

``pyvirtio net info TARGET``; ``pyvirtio net send TARGET --count N --size 64
[--dst-mac MAC]``; ``pyvirtio net recv TARGET --count N [--pcap FILE]``;
``pyvirtio net bench TARGET --mode tx|rx|echo --size 64 --runtime 10
[--queues N] [--json]``. TARGET is a vhost-user-net socket (DPDK's vhost
PMD, ``pyvirtio serve net``). ``pyvirtio serve net --socket PATH --mode
loopback|tap [--tap NAME]`` runs the embedded back end.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from typing import Any, BinaryIO

from pyvirtio.cli.common import add_target_arguments, positive_int, print_json, print_table, size_arg
from pyvirtio.cli.ring_option import add_ring_arguments, ring_options
from pyvirtio.cli.serving import add_serve_options, serve_model, setup_logging
from pyvirtio.errors import InvalidArgument, TransportTimeout
from pyvirtio.spec.common import F_IN_ORDER

BENCH_MODES = ("tx", "rx", "echo")


def _mac_arg(text: str) -> str:
    from pyvirtio.drivers.net import parse_mac

    try:
        parse_mac(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(sub: Any) -> None:
    p = sub.add_parser("net", help="virtio-net: info, send, recv, bench", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="net_command", metavar="COMMAND")
    cmds.required = True

    def common(q: argparse.ArgumentParser) -> None:
        add_target_arguments(q)
        q.add_argument("--queue-pairs", type=positive_int, default=1, metavar="N",
                       help="queue pairs the device gets (default 1)")
        q.add_argument("--queue-size", type=positive_int, default=None, metavar="N", help="ring size (default 256)")
        q.add_argument("--mac", type=_mac_arg, default=None, help="our MAC (default: the device's or a random one)")
        q.add_argument("--no-mrg-rxbuf", action="store_true", help="do not negotiate mergeable receive buffers")

    q = cmds.add_parser("info", help="features, MAC, MTU, link, queues")
    common(q)
    add_ring_arguments(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_info)

    q = cmds.add_parser("send", help="send N frames")
    common(q)
    add_ring_arguments(q)
    q.add_argument("--count", type=positive_int, default=1)
    q.add_argument("--size", type=size_arg, default=64, help="frame bytes without FCS (default 64)")
    q.add_argument("--dst-mac", type=_mac_arg, default="ff:ff:ff:ff:ff:ff", help="default broadcast")
    q.add_argument("--pair", type=int, default=0, help="queue pair (default 0)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_send)

    q = cmds.add_parser("recv", help="receive N frames (optionally into a pcap file)")
    common(q)
    add_ring_arguments(q)
    q.add_argument("--count", type=positive_int, default=1)
    q.add_argument("--pcap", metavar="FILE", default=None, help="write the frames to a pcap file")
    q.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="give up after this long without the N frames (default 10)")
    q.add_argument("--pair", type=int, default=0, help="queue pair (default 0)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_recv)

    q = cmds.add_parser("bench", help="packet rate (tx, rx) or round-trip latency (echo)")
    common(q)
    q.add_argument("--mode", choices=BENCH_MODES, default="tx")
    q.add_argument("--size", type=size_arg, default=64, help="frame bytes without FCS (default 64)")
    q.add_argument("--runtime", type=float, default=10.0, help="seconds (default 10)")
    q.add_argument("--queues", type=positive_int, default=None, metavar="N",
                   help="queue pairs to load, one thread each (default: --queue-pairs)")
    q.add_argument("--window", type=positive_int, default=32, help="echo: frames in flight (default 32)")
    q.add_argument("--dst-mac", type=_mac_arg, default="02:00:00:00:00:02")
    q.add_argument("--no-swap", action="store_true", help="echo: the peer does not swap MACs")
    q.add_argument("--json", action="store_true", help="one JSON object")
    add_ring_arguments(q)
    q.set_defaults(func=run_bench)


def _open(args: argparse.Namespace, pairs: int | None = None, ring: dict[str, Any] | None = None) -> Any:
    """VirtioNet on ``args.target``; ``ring``: :func:`~pyvirtio.cli.ring_option.ring_options` (default: auto)."""
    from pyvirtio.drivers.net import VirtioNet

    return VirtioNet.open(
        args.target,
        queue_pairs=pairs or args.queue_pairs,
        queue_size=args.queue_size,
        mac=args.mac,
        mrg_rxbuf=not args.no_mrg_rxbuf,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
        **(ring or {}),
    )


def run_info(args: argparse.Namespace) -> int:
    with _open(args, ring=ring_options(args)) as net:
        info = net.info()
    if args.json:
        print_json(info)
        return 0
    render_net(info)
    return 0


def render_net(info: dict[str, Any]) -> None:
    """The human form of a VirtioNet info dict (also ``pyvirtio info`` on a net device)."""
    n = info["net"]
    rows = [
        ("device", info["name"]),
        ("mac", n["mac"] + ("" if n["device_mac"] else " (the driver's: the device has no MAC)")),
        ("mtu", str(n["mtu"]) if n["mtu"] else "not offered (1500 assumed)"),
        ("link", "up" if n["link_status"] is None or n["link_status"] & 1 else "down")
        if n["link_status"] is not None else ("link", "not reported (up assumed)"),
        ("queue pairs", f"{n['queue_pairs']} of {n['max_queue_pairs']}"),
        ("queue size", str(n["queue_size"])),
        ("ring format", info["virtio"]["ring"]),
        ("in order", "yes" if info["virtio"]["in_order"] else "no"),
        ("mergeable rx buffers", "yes" if n["mrg_rxbuf"] else "no"),
        ("control queue", "yes" if n["control_queue"] else "no"),
        ("offered features", ", ".join(info["offered_features"])),
        ("negotiated features", ", ".join(info["negotiated_features"])),
    ]
    print_table("virtio-net", rows)


def run_send(args: argparse.Namespace) -> int:
    from pyvirtio.bench.net import udp_frame
    from pyvirtio.drivers.net import parse_mac

    with _open(args, ring=ring_options(args)) as net:
        frames = [udp_frame(args.size, parse_mac(args.dst_mac), net.mac, seq=i) for i in range(min(args.count, 256))]
        sent = 0
        t0 = time.monotonic()
        while sent < args.count:
            batch = frames[: args.count - sent]
            n = net.send_batch(batch, args.pair)
            sent += n
            if not n:
                if time.monotonic() - t0 > args.timeout:
                    raise TransportTimeout(f"only {sent} of {args.count} frames queued within {args.timeout} s")
                time.sleep(0.0001)
        net.flush_tx(args.pair)
        secs = time.monotonic() - t0
    result = {"sent": sent, "size": args.size, "seconds": round(secs, 4), "mac": net.mac.hex(":")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sent {sent} frames of {args.size} bytes from {result['mac']} to {args.dst_mac} in {secs:.3f} s")
    return 0


def write_pcap_header(f: BinaryIO) -> None:
    """libpcap format: magic, version 2.4, no zone, snaplen 65535, link type 1 (Ethernet)."""
    f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))


def write_pcap_record(f: BinaryIO, frame: bytes | memoryview, t: float) -> None:
    sec = int(t)
    f.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
    f.write(frame)


def run_recv(args: argparse.Namespace) -> int:
    out: BinaryIO | None = open(args.pcap, "wb") if args.pcap else None  # noqa: SIM115 - closed below
    got = 0
    sizes: list[int] = []
    try:
        if out is not None:
            write_pcap_header(out)
        with _open(args, ring=ring_options(args)) as net:
            deadline = time.monotonic() + args.wait
            while got < args.count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                frames = net.recv_wait(min(256, args.count - got), args.pair, timeout=min(left, 0.2))
                now = time.time()
                for f in frames:
                    if out is not None:
                        write_pcap_record(out, f, now)
                    sizes.append(len(f))
                got += len(frames)
            net.release_rx(args.pair)
    finally:
        if out is not None:
            out.close()
    result = {"received": got, "wanted": args.count, "bytes": sum(sizes), "pcap": args.pcap}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"received {got} of {args.count} frames ({sum(sizes)} bytes)"
              + (f", written to {args.pcap}" if args.pcap else ""))
    return 0 if got >= args.count else 1


def run_bench(args: argparse.Namespace) -> int:
    from pyvirtio.bench.net import NetStats, run_pairs

    if args.runtime <= 0:
        raise InvalidArgument("--runtime must be positive")
    pairs = args.queues or args.queue_pairs
    show_progress = sys.stderr.isatty() and not args.json

    def progress(stats: NetStats) -> None:
        secs = stats.seconds or 1e-9
        sys.stderr.write(f"\r[{secs:5.1f}/{args.runtime:.0f}s] {stats.ios / secs:>12,.0f} pps   ")
        sys.stderr.flush()

    with _open(args, pairs=max(pairs, args.queue_pairs), ring=ring_options(args)) as net:
        if pairs > net.num_pairs:
            raise InvalidArgument(f"--queues {pairs}: the device has {net.num_pairs} pairs")
        stats = run_pairs(net, args.mode, args.runtime, pairs, size=args.size, dst_mac=args.dst_mac,
                          window=args.window, swapped=not args.no_swap,
                          progress=progress if show_progress else None)
        queue_size = net.queue_size
        ring = net.device.ring_format
        in_order = net.device.has_feature(F_IN_ORDER)
    if show_progress:
        sys.stderr.write("\n")
    s = stats.summary()
    report = {
        "mode": args.mode,
        "size": args.size,
        "queues": pairs,
        "queue_size": queue_size,
        "ring": ring,
        "in_order": in_order,
        "runtime": args.runtime,
        "target": args.target,
        **s,
    }
    if args.mode != "echo":
        report.pop("latency_us")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"pyvirtio net bench: mode={args.mode} size={args.size} queues={pairs} queue_size={queue_size} "
              f"ring={ring}{'+in_order' if in_order else ''} seconds={s['seconds']} path={s['path']}")
        print(f"  packets/s: {s['pps']:,}   bits/s: {s['bps']:,}   frames: {s['frames']:,}")
        if args.mode == "echo":
            lat = s["latency_us"]
            print(f"  latency (us): mean {lat['mean']}  p50 {lat['p50']}  p99 {lat['p99']}  "
                  f"p99.9 {lat['p99.9']}  max {lat['max']}")
            print(f"  lost: {s['errors']}   mismatched: {s['verify_errors']}")
    return 1 if stats.verify_errors else 0


# -- pyvirtio serve net --------------------------------------------------------------


def add_serve_parser(devices: Any) -> None:
    """``pyvirtio serve net`` (registered by :mod:`pyvirtio.cli.serve`)."""
    p = devices.add_parser(
        "net",
        help="a virtio-net device: loopback (echo) or bridged to a TAP device",
        description="Serve a vhost-user-net device until SIGINT/SIGTERM. loopback: every frame sent is "
        "received back (--swap-mac swaps source and destination); tap: bridged to a Linux TAP device.",
    )
    add_serve_options(p, queues_help="queue pairs (default 1)")
    p.add_argument("--mode", choices=("loopback", "tap"), default="loopback")
    p.add_argument("--tap", default=None, metavar="NAME", help="TAP device name (default pyvirtio%%d)")
    p.add_argument("--swap-mac", action="store_true", help="loopback: swap source and destination MAC")
    p.add_argument("--mac", type=_mac_arg, default="02:70:79:76:00:01", help="the device's MAC")
    p.add_argument("--mtu", type=int, default=1500)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pyvirtio.backends.net import NetBackend
    from pyvirtio.drivers.net import parse_mac

    log = setup_logging(args.log_level)
    try:
        model = NetBackend(args.mode, pairs=args.queues, mac=parse_mac(args.mac), mtu=args.mtu,
                           swap_mac=args.swap_mac, tap=args.tap)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None

    def announce() -> None:
        log.info("virtio-net %s%s, %d pair(s) on %s", args.mode,
                 f" ({model.tap_name})" if model.tap_name else "", args.queues, args.socket)
        if model.tap_name:
            print(f"tap device: {model.tap_name}", file=sys.stderr, flush=True)

    try:
        return serve_model(args, model, announce)
    finally:
        model.close()


__all__ = ["add_serve_parser", "register", "write_pcap_header", "write_pcap_record"]
