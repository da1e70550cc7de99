"""The conformance catalogue: every rule ``pyvirtio check`` knows, as data, in the order they run.

Theory of operation
-------------------
What a rule is (a record and a function of a few lines), its severities,
the registrar and the verbs rules are written in:
:mod:`pyvirtio.conformance.catalogue`. The rules themselves live in one
module per area (the ``handshake`` area in two), each citing the spec
sections it enforces:

* :mod:`~pyvirtio.conformance.rules_handshake`: messages, replies,
  REPLY_ACK, malformed messages (vhost-user.rst);
* :mod:`~pyvirtio.conformance.rules_setup`: config space, queues, memory
  tables and slots, status, reset, feature acceptance;
* :mod:`~pyvirtio.conformance.rules_ring`: ring life cycle and
  notifications (virtio 1.2 §2.7, §2.8);
* :mod:`~pyvirtio.conformance.rules_datapath`: the data path of blk,
  scsi, net and fs (virtio 1.2 §5.2, §5.6, §5.1, §5.11);
* :mod:`~pyvirtio.conformance.rules_hostile`: a frontend that breaks the
  rules (robustness);
* :mod:`~pyvirtio.conformance.rules_lifecycle`: frontends that come and go.

Importing an area module records its rules, in the order of its
decorators. This module imports them all and freezes what they recorded
into :data:`CATALOGUE`, area module by area module in the order of
:data:`AREAS`, whatever order they were first imported in; that order is
the order the runner runs them and the reports list them. The names
callers use (:data:`CATALOGUE`, :class:`Rule`, :class:`Severity`,
:func:`rule`) and the shared verbs can still be imported from here.
"""

from __future__ import annotations

from types import ModuleType

from pyvirtio.conformance import (
    rules_datapath,
    rules_handshake,
    rules_hostile,
    rules_lifecycle,
    rules_ring,
    rules_setup,
)
from pyvirtio.conformance.catalogue import Check as Check
from pyvirtio.conformance.catalogue import Rule, Severity, registered, rule
from pyvirtio.conformance.catalogue import check_works as check_works
from pyvirtio.conformance.catalogue import config_size as config_size
from pyvirtio.conformance.catalogue import one_request as one_request
from pyvirtio.conformance.catalogue import post_request as post_request
from pyvirtio.conformance.catalogue import raw as raw
from pyvirtio.conformance.catalogue import refused as refused
from pyvirtio.conformance.catalogue import rings_up as rings_up
from pyvirtio.conformance.catalogue import survived as survived

__all__ = ["CATALOGUE", "Rule", "Severity", "rule"]

AREAS: tuple[ModuleType, ...] = (
    rules_handshake, rules_setup, rules_ring, rules_datapath, rules_hostile, rules_lifecycle,
)
"""The modules of the rules, in the order their rules run."""

_POSITION = {m.__name__: i for i, m in enumerate(AREAS)}

CATALOGUE: tuple[Rule, ...] = tuple(
    sorted(registered(), key=lambda r: _POSITION.get(r.check.__module__, len(AREAS)))
)
"""Every rule, in the order they run (handshake, ring, per device, hostile, lifecycle)."""
