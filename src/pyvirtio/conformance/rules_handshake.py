"""The ``handshake`` rules on messages themselves: replies, REPLY_ACK, and messages a back end must not choke on.

Theory of operation
-------------------
The first connection's questions must be answered: GET_FEATURES with a
u64 offering VIRTIO_F_VERSION_1 (virtio 1.2 §6.2), GET_PROTOCOL_FEATURES
before SET_FEATURES, and the queries QEMU makes before SET_OWNER
(vhost-user.rst GET_FEATURES, GET_PROTOCOL_FEATURES; QEMU's
``vhost_user_backend_init``). Every reply carries version 1 and the reply
flag (vhost-user.rst, Header).

With REPLY_ACK negotiated, a request sent with need_reply gets exactly one
reply: 0 on success, non-zero on failure (vhost-user.rst, REPLY_ACK). Each
rule sends one set-up request that way, reads the ack and then checks that
nothing more arrives (``h.nothing_more``), so a missing ack WEDGEs and a
doubled one FAILs. A request with a reply of its own (GET_FEATURES) gets
that reply and no extra ack ("no behavioural change"); a request for a ring
the device does not have, or with an unknown code, must not be acked 0
(:func:`~pyvirtio.conformance.catalogue.refused`: a non-zero ack or a closed
connection both refuse).

The robustness rules send what no frontend should, built by hand with
:func:`~pyvirtio.conformance.catalogue.raw`: an unknown code without
need_reply, version bits 2, a payload shorter than its request needs
(vhost-user.rst, Payload), a size field of 2 GiB followed by a disconnect.
The back end may drop the connection or go on answering
(:func:`~pyvirtio.conformance.catalogue.survived`); it may not crash or
hang.
"""

from __future__ import annotations

import struct
import time

from pyvirtio.conformance.catalogue import MUST, PROTOCOL, REPLY_ACK, ROBUST, SHOULD, VU, raw, refused, rule, survived
from pyvirtio.conformance.devices import Device
from pyvirtio.conformance.harness import Probe, SplitRing
from pyvirtio.errors import ConnectionLost
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import F_VERSION_1

__all__: list[str] = []  # importing the module adds its rules to the catalogue; it exports nothing


@rule("handshake.get-features", "GET_FEATURES is answered with a well-formed u64", f"{VU} GET_FEATURES", MUST)
def _get_features(h: Probe, dev: Device) -> None:
    h.u64(h.codec.get_features())


@rule("handshake.version-1", "VIRTIO_F_VERSION_1 is offered", "virtio 1.2 §6.2", MUST)
def _version_1(h: Probe, dev: Device) -> None:
    offered = h.sync()
    h.expect(bool(offered >> F_VERSION_1 & 1), "feature bit 32 (VERSION_1) offered", f"features 0x{offered:x}")


@rule("handshake.protocol-features", "GET_PROTOCOL_FEATURES is answered before SET_FEATURES",
      f"{VU} GET_PROTOCOL_FEATURES", MUST, features=PROTOCOL)
def _protocol_features(h: Probe, dev: Device) -> None:
    h.u64(h.codec.get_protocol_features())


@rule("handshake.queries-before-owner", "GET_FEATURES, GET_PROTOCOL_FEATURES and GET_QUEUE_NUM are answered "
      "before SET_OWNER (QEMU's order)", f"{VU} Communication; QEMU vhost_user_backend_init", SHOULD)
def _queries_before_owner(h: Probe, dev: Device) -> None:
    h.hello(owner=False)
    if h.protocol >> vu.PROTOCOL_F_MQ & 1:
        h.u64(h.codec.get_queue_num())


@rule("handshake.reply-flags", "every reply carries version 1 and the reply flag", f"{VU} Header", MUST)
def _reply_flags(h: Probe, dev: Device) -> None:
    for out in (h.codec.get_features(), h.codec.get_features()):
        h.send(out)
        msg = h.reply(out)
        h.expect(msg.version == vu.VERSION and msg.is_reply, "flags with version 1 and bit 2 (reply)",
                 f"flags 0x{msg.flags:x}")


def _acked(h: Probe, out: vu.Outgoing) -> None:
    value = h.ack(out)
    h.expect(value == 0, f"ack 0 for {out.name}", f"ack {value}")
    h.nothing_more(f"exactly one reply to {out.name}")


@rule("handshake.reply-ack.set-owner", "SET_OWNER with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_owner(h: Probe, dev: Device) -> None:
    h.hello(owner=False)
    _acked(h, h.codec.set_owner(need_reply=True))


@rule("handshake.reply-ack.set-features", "SET_FEATURES with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_features(h: Probe, dev: Device) -> None:
    h.hello()
    _acked(h, h.codec.set_features(h.features, need_reply=True))


@rule("handshake.reply-ack.set-mem-table", "SET_MEM_TABLE with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_mem_table(h: Probe, dev: Device) -> None:
    h.hello()
    regions, fds = h.regions()
    _acked(h, h.codec.set_mem_table(regions, fds, need_reply=True))


@rule("handshake.reply-ack.ring-setup", "SET_VRING_NUM, SET_VRING_BASE and SET_VRING_ADDR with need_reply "
      "each get exactly one reply, 0", f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_ring_setup(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = SplitRing(h, dev.request_queue, 64)
    h.rings[dev.request_queue] = ring
    _acked(h, h.codec.set_vring_num(ring.index, 64, need_reply=True))
    _acked(h, h.codec.set_vring_base(ring.index, 0, need_reply=True))
    _acked(h, h.codec.set_vring_addr(ring.addr(), need_reply=True))


@rule("handshake.reply-ack.kick-call", "SET_VRING_KICK and SET_VRING_CALL with need_reply each get exactly one "
      "reply, 0", f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_kick_call(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = h.ring(dev.request_queue, kick=False, call=False, enable=False)
    _acked(h, h.codec.set_vring_call(ring.index, ring.call_fd, need_reply=True))
    _acked(h, h.codec.set_vring_kick(ring.index, ring.kick_fd, need_reply=True))


@rule("handshake.reply-ack.enable", "SET_VRING_ENABLE with need_reply gets exactly one reply, 0",
      f"{VU} REPLY_ACK", MUST, protocol=REPLY_ACK)
def _ack_enable(h: Probe, dev: Device) -> None:
    h.hello()
    h.mem_table()
    ring = h.ring(dev.request_queue, enable=False)
    _acked(h, h.codec.set_vring_enable(ring.index, True, need_reply=True))


@rule("handshake.reply-ack.natural-reply", "GET_FEATURES with need_reply gets its one reply (the features), "
      "no extra ack", f"{VU} REPLY_ACK (\"no behavioural change\")", MUST, protocol=REPLY_ACK)
def _ack_natural(h: Probe, dev: Device) -> None:
    h.hello()
    out = vu.Outgoing(vu.GET_FEATURES, raw(vu.GET_FEATURES, b"", flags=vu.VERSION | vu.NEED_REPLY), expects_reply=True)
    value = h.u64(out)
    h.expect(value == h.info.features if h.info else True, "the offered features", f"0x{value:x}")
    h.nothing_more("exactly one reply to GET_FEATURES")


@rule("handshake.reply-ack.failure", "a ring request for a ring the device does not have is not acked as "
      "success", f"{VU} REPLY_ACK (\"non-zero on failure\")", SHOULD, protocol=REPLY_ACK)
def _ack_failure(h: Probe, dev: Device) -> None:
    h.hello()
    refused(h, h.codec.set_vring_num(255, 64, need_reply=True), "SET_VRING_NUM for ring 255")


@rule("handshake.unknown-request", "an unknown request code with need_reply is refused, not acked",
      f"{VU} REPLY_ACK", ROBUST, protocol=REPLY_ACK)
def _unknown_need_reply(h: Probe, dev: Device) -> None:
    h.hello()
    out = vu.Outgoing(0xF0, raw(0xF0, bytes(8), flags=vu.VERSION | vu.NEED_REPLY), expects_reply=True)
    try:
        h.send(out)
        msg = h.reply(out)
    except ConnectionLost:
        return
    value = struct.unpack_from("=Q", msg.payload.ljust(8, b"\0"))[0]
    h.expect(value != 0, "a non-zero ack (or the connection closed)", "ack 0")


@rule("handshake.unknown-request.no-reply", "an unknown request code without need_reply does not crash or hang "
      "the back end", VU, ROBUST)
def _unknown(h: Probe, dev: Device) -> None:
    h.hello()
    h.send_raw(raw(0xF1, bytes(8)))
    survived(h)


@rule("handshake.bad-version", "a header with version bits 2 does not crash or hang the back end", f"{VU} Header",
      ROBUST)
def _bad_version(h: Probe, dev: Device) -> None:
    h.send_raw(raw(vu.GET_FEATURES, b"", flags=2))
    survived(h)


@rule("handshake.short-payload", "SET_VRING_NUM with a 4-byte payload is refused or dropped, not misread",
      f"{VU} Payload", ROBUST)
def _short_payload(h: Probe, dev: Device) -> None:
    h.hello()
    h.send_raw(raw(vu.SET_VRING_NUM, struct.pack("=I", dev.request_queue)))
    survived(h)


@rule("handshake.oversized", "a size field of 2 GiB followed by a disconnect does not crash or hang the back end",
      f"{VU} Header", ROBUST)
def _oversized(h: Probe, dev: Device) -> None:
    h.send_raw(raw(vu.SET_FEATURES, bytes(8), size=0x7FFF_FFFF))
    time.sleep(h.settings.quiet)
