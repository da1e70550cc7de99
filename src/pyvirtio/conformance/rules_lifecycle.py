"""The ``lifecycle`` rules: frontends that come and go.

Theory of operation
-------------------
A back end serves one frontend at a time and, when it leaves, must serve
the next (vhost-user.rst, Communication; reconnection): after a clean
disconnect, a disconnect with requests in flight, one during the handshake
and one in the middle of a message header. Each rule closes its probe's
socket and opens a fresh one
(:func:`~pyvirtio.conformance.catalogue.check_works`), so each needs a
back end that serves a second frontend in the same process
(``reconnects=True``: skipped for one that exits after one connection).

Resource hygiene (no spec section; ``pid=True``): the back end's open fds
(``/proc/PID/fd``) and shared file mappings (``/proc/PID/maps``) are
counted after a first reconnect, then again after ``settings.connections``
frontends that each set up the device and complete one request: 2 more
fds at most and no more shared mappings (polled for 2 s, for a back end
that closes late).
"""

from __future__ import annotations

import os
import time

from pyvirtio.conformance.catalogue import ROBUST, VU, check_works, one_request, raw, rule
from pyvirtio.conformance.devices import Device
from pyvirtio.conformance.harness import Probe
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec import blk as B

__all__: list[str] = []  # importing the module adds its rules to the catalogue; it exports nothing


@rule("lifecycle.die-mid-io", "a frontend that disconnects with requests in flight: the next one is served",
      f"{VU} Communication (reconnection)", ROBUST, reconnects=True)
def _die_mid_io(h: Probe, dev: Device) -> None:
    ring = dev.start(h)
    for _ in range(8):
        if dev.name == "blk":
            ring.post([(h.buf(B.OUTHDR.pack(B.T_IN, 0, 0)), 16, False), (h.buf(65536), 65536, True),
                       (h.buf(1), 1, True)], kick=False)
        else:
            ring.post([(h.buf(64), 64, False), (h.buf(256), 256, True)], kick=False)
    ring.kick()
    h.sock.close()
    check_works(h, dev)


@rule("lifecycle.reconnect", "a second frontend after a clean disconnect is served", f"{VU} Communication", ROBUST,
      reconnects=True)
def _reconnect(h: Probe, dev: Device) -> None:
    dev.start(h)
    dev.io(h)
    h.sock.close()
    check_works(h, dev)


@rule("lifecycle.disconnect-handshake", "a frontend that disconnects during the handshake: the next one is served",
      f"{VU} Communication", ROBUST, reconnects=True)
def _disconnect_early(h: Probe, dev: Device) -> None:
    h.sync()
    h.sock.close()
    check_works(h, dev)


@rule("lifecycle.partial-message", "a frontend that disconnects in the middle of a header: the next one is served",
      f"{VU} Communication", ROBUST, reconnects=True)
def _partial(h: Probe, dev: Device) -> None:
    h.send_raw(raw(vu.GET_FEATURES, b"")[:6])
    h.sock.close()
    check_works(h, dev)


def _count(pid: int) -> tuple[int, int]:
    """(open fds, shared file mappings) of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if " rw-s " in line or " r--s " in line)
    return fds, maps


@rule("lifecycle.fd-growth", "fds and shared mappings of the back end's process do not grow across connections",
      "resource hygiene", ROBUST, pid=True, reconnects=True)
def _fd_growth(h: Probe, dev: Device) -> None:
    pid = h.settings.pid
    assert pid is not None
    h.sock.close()
    check_works(h, dev)
    time.sleep(h.settings.quiet)
    before = _count(pid)
    for _ in range(h.settings.connections):
        with Probe(h.path, h.settings, h.info) as p:
            dev.start(p)
            one_request(p, dev, p.rings[dev.request_queue])
    deadline = time.monotonic() + 2.0
    after = _count(pid)
    while (after[0] > before[0] + 2 or after[1] > before[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _count(pid)
    h.expect(after[0] <= before[0] + 2 and after[1] <= before[1],
             f"at most {before[0] + 2} fds and {before[1]} shared mappings after {h.settings.connections} connections",
             f"{after[0]} fds (were {before[0]}), {after[1]} shared mappings (were {before[1]})")
