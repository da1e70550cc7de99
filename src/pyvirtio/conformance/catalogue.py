"""What a conformance rule is: the record, the registrar, the severities, and the verbs rules are written in.

Theory of operation
-------------------
A rule is a :class:`Rule` record (id, one-line title, the spec section it
comes from, severity, the area it belongs to, the device types and features
it needs) and a function of a few lines that drives a fresh
:class:`~pyvirtio.conformance.harness.Probe` (one new connection per rule)
and either returns (PASS), raises :class:`~pyvirtio.errors.RuleFailed`
through ``h.fail`` / ``h.expect`` (FAIL: what was sent, what came back,
what was expected), raises :class:`~pyvirtio.errors.RuleSkipped` (SKIP), or
lets :class:`~pyvirtio.errors.TransportTimeout` escape (the back end stopped
answering: WEDGED). The runner (:mod:`pyvirtio.conformance.runner`) skips a
rule whose needs (``devices``, ``features``, ``protocol``, ``pid``) the back
end does not meet before running it, and after every rule checks that the
back end still accepts a new frontend (a back end that dies or hangs after
a rule has that rule's verdict turned into WEDGED).

:func:`rule` records a check in the order the decorators run and refuses a
duplicate id; :mod:`pyvirtio.conformance.rules` imports the area modules and
freezes what they recorded (:func:`registered`) into the catalogue, in the
order the areas run.

Adding a rule is a decorator line and a function, in the module of its area::

    @rule("blk.flush", "FLUSH completes with status OK and used length 1",
          "virtio 1.2 §5.2.6", MUST, devices="blk", features=(B.F_FLUSH,))
    def _(h: Probe, dev: Device) -> None:
        ring = dev.start(h, 1 << B.F_FLUSH)
        status, used, _ = blk_request(h, ring, B.T_FLUSH)
        h.expect(status == B.S_OK and used == 1, "status OK, used length 1", f"status {status}, used {used}")

Severities: MUST and SHOULD are the specs' words (vhost-user.rst, virtio
1.2); "robustness" rules ask what no spec demands but every back end facing
a misbehaving or dying frontend needs: no crash, no hang, the next frontend
served. ``pyvirtio check`` exits non-zero only when a MUST rule fails or
wedges. Rule ids are ``area.name`` (``--rules`` takes shell patterns on
them). The areas and their modules: ``handshake`` (messages and replies:
:mod:`~pyvirtio.conformance.rules_handshake`; config, queues, memory,
status: :mod:`~pyvirtio.conformance.rules_setup`), ``ring`` (ring life
cycle and notifications: :mod:`~pyvirtio.conformance.rules_ring`),
``blk`` / ``scsi`` / ``net`` / ``fs`` (data path per device type:
:mod:`~pyvirtio.conformance.rules_datapath`), ``hostile`` (a frontend that
breaks the rules: :mod:`~pyvirtio.conformance.rules_hostile`),
``lifecycle`` (frontends that come and go:
:mod:`~pyvirtio.conformance.rules_lifecycle`).

Refusals (:func:`refused`): the spec lets a back end refuse with a non-zero
REPLY_ACK or by closing the connection (vhost-user.rst, Communication: "If
back-end detects some error ... it may also close the connection"); both
pass a "refused" rule, an ack of 0 fails it. Without REPLY_ACK an accepted
request cannot be told from an ignored one, and such a rule is skipped
unless the connection closed.

The other verbs every area uses: :func:`survived` (after abuse, the back
end dropped the connection or still answers), :func:`post_request` and
:func:`one_request` (one harmless request of the device type),
:func:`check_works` (a fresh frontend is served), :func:`rings_up` (every
ring of the device set up), :func:`raw` (a message built by hand, malformed
on request) and :func:`config_size`; and the names the records share
(:data:`VU` for vhost-user.rst, the protocol features a rule needs).
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirtio.conformance.devices import Device, blk_request, fuse_init, fuse_post, net_frame, net_tx, scsi_command
from pyvirtio.conformance.harness import PackedRing, Probe, SplitRing
from pyvirtio.errors import ConnectionLost
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B
from pyvirtio.spec import net as N
from pyvirtio.spec import scsi as S
from pyvirtio.spec import t10 as T
from pyvirtio.spec.common import VHOST_USER_F_PROTOCOL_FEATURES

__all__ = [
    "CONFIG",
    "MEM_SLOTS",
    "MUST",
    "PROTOCOL",
    "REPLY_ACK",
    "ROBUST",
    "SHOULD",
    "VU",
    "Check",
    "Rule",
    "Severity",
    "check_works",
    "config_size",
    "one_request",
    "post_request",
    "raw",
    "refused",
    "registered",
    "rings_up",
    "rule",
    "survived",
]


class Severity(enum.Enum):
    MUST = "MUST"
    SHOULD = "SHOULD"
    ROBUSTNESS = "robustness"


MUST, SHOULD, ROBUST = Severity.MUST, Severity.SHOULD, Severity.ROBUSTNESS

Check = Callable[[Probe, Device], None]


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of the catalogue (see the module docstring)."""

    id: str
    title: str
    section: str
    severity: Severity
    check: Check
    devices: frozenset[str] = frozenset()  # empty: every device type
    features: tuple[int, ...] = ()  # device / ring feature bits the back end must offer
    protocol: tuple[int, ...] = ()  # protocol feature bits the back end must offer
    pid: bool = False  # needs the back end's process id
    #: Needs a second frontend served by the same back-end process: skipped for a back end that
    #: serves one connection per process (virtiofsd; the runner restarts it for every rule).
    reconnects: bool = False

    @property
    def area(self) -> str:
        return self.id.partition(".")[0]


_RULES: list[Rule] = []


def rule(
    id: str,
    title: str,
    section: str,
    severity: Severity,
    *,
    devices: str = "",
    features: Sequence[int] = (),
    protocol: Sequence[int] = (),
    pid: bool = False,
    reconnects: bool = False,
) -> Callable[[Check], Check]:
    """Add the decorated check to the catalogue with this record."""

    def add(check: Check) -> Check:
        if any(r.id == id for r in _RULES):
            raise ValueError(f"duplicate rule id {id}")
        _RULES.append(
            Rule(id, title, section, severity, check, frozenset(devices.split()), tuple(features), tuple(protocol), pid,
                 reconnects)
        )
        return check

    return add


def registered() -> tuple[Rule, ...]:
    """Every rule recorded so far, in the order :func:`rule` recorded them."""
    return tuple(_RULES)


VU = "vhost-user.rst"
REPLY_ACK = (vu.PROTOCOL_F_REPLY_ACK,)
CONFIG = (vu.PROTOCOL_F_CONFIG,)
MEM_SLOTS = (vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS,)
PROTOCOL = (VHOST_USER_F_PROTOCOL_FEATURES,)


# -- helpers shared by the rules -------------------------------------------------------------


def refused(h: Probe, out: vu.Outgoing, what: str) -> None:
    """``out`` (with need_reply when acks are on) must be refused: a non-zero ack or a closed connection."""
    outcome = h.outcome(out)
    if outcome in ("nack", "closed"):
        return
    if outcome == "ack":
        raise h.fail(f"{what} refused (non-zero ack, or the connection closed)", "ack 0: accepted")
    raise h.skip("REPLY_ACK not negotiated: an accepted request cannot be told from an ignored one")


def survived(h: Probe) -> None:
    """After abuse: the back end either dropped the connection or still answers (no hang)."""
    time.sleep(h.settings.quiet)
    if h.closed:
        return
    try:
        h.sync()
    except ConnectionLost:
        return


def post_request(h: Probe, dev: Device, ring: SplitRing | PackedRing, *, kick: bool = True) -> int:
    """Post one harmless request of the device type (not waited for); its head."""
    if dev.name == "blk":
        parts = [(h.buf(B.OUTHDR.pack(B.T_IN, 0, 0)), 16, False), (h.buf(512), 512, True), (h.buf(b"\xee"), 1, True)]
    elif dev.name == "scsi":
        req = S.CMD_REQ_HDR.pack(S.lun_address(0, 0), 1, 0, 0, 0) + bytes(S.CDB_SIZE)  # TEST UNIT READY
        parts = [(h.buf(req), S.CMD_REQ_SIZE, False), (h.buf(S.CMD_RESP_SIZE), S.CMD_RESP_SIZE, True)]
    elif dev.name == "net":
        frame = bytes(N.HDR_SIZE) + net_frame()
        parts = [(h.buf(frame), len(frame), False)]
    else:
        return fuse_post(h, ring, kick=kick)
    return ring.post(parts, kick=kick)


def one_request(h: Probe, dev: Device, ring: SplitRing | PackedRing) -> None:
    """One harmless request of the device type, waited for."""
    if dev.name == "blk":
        blk_request(h, ring, B.T_IN, 0, in_len=512)
    elif dev.name == "scsi":
        scsi_command(h, ring, bytes([T.TEST_UNIT_READY]))
    elif dev.name == "net":
        net_tx(h, ring, net_frame())
    else:
        fuse_init(h, ring)


def check_works(h: Probe, dev: Device) -> None:
    """A fresh connection to the back end serves a normal request (the device's ``io``)."""
    try:
        again = Probe(h.path, h.settings, h.info)
    except ConnectionLost as exc:
        raise h.fail("a new frontend accepted after the previous one left", str(exc)) from None
    with again:
        dev.start(again)
        dev.io(again)


def rings_up(h: Probe, dev: Device) -> None:
    """Set up every ring of the device in the memory given so far, then DRIVER_OK (when STATUS) and sync."""
    for q in dev.queues:
        h.ring(q)
    h.go()


def raw(request: int, payload: bytes, *, flags: int = vu.VERSION, size: int | None = None) -> bytes:
    return struct.pack("=III", request, flags, len(payload) if size is None else size) + payload


def config_size(h: Probe, dev: Device) -> int:
    return len(h.info.config) if h.info is not None and h.info.config else dev.config_size


