"""``pyvirtio check``: a conformance checker for vhost-user back ends, without a VM.

The package plays a vhost-user frontend that does what each rule says, good
or bad, and judges what the back end does:

* :mod:`~pyvirtio.conformance.rules`: the catalogue, as data (one record and
  a few lines per rule), gathered in run order from one module per area
  (``rules_handshake``, ``rules_setup``, ``rules_ring``, ``rules_datapath``,
  ``rules_hostile``, ``rules_lifecycle``);
* :mod:`~pyvirtio.conformance.catalogue`: what a rule is (the record, the
  registrar, severities) and the verbs rules share;
* :mod:`~pyvirtio.conformance.harness`: the probing frontend (one
  connection, raw rings, a transcript of everything sent and seen);
* :mod:`~pyvirtio.conformance.devices`: device types (rings, one request of
  each kind, auto-detection);
* :mod:`~pyvirtio.conformance.runner`: runs the catalogue against a back
  end (verdicts, restarts, "must serve the next frontend");
* :mod:`~pyvirtio.conformance.report`: text, JSON and JUnit XML.

It sits at layer 3 of docs/architecture.md, beside ``transport/`` and
``backends/``: it speaks vhost-user over sockets itself, on the codec
(layer 2), the memory pool (1), the raw ring writers of ``testing/`` (3)
and the tracer's message descriptions (``trace/``, 3). It must not use the
device layer or the drivers (4, 5): they refuse to send what a hostile
rule sends, and their own checks would stand between the back end and the
verdict.
"""

from pyvirtio.conformance.devices import DEVICES, Device, detect
from pyvirtio.conformance.harness import BackendInfo, Probe, Settings
from pyvirtio.conformance.report import to_json, to_junit, to_text
from pyvirtio.conformance.rules import CATALOGUE, Rule, Severity, rule
from pyvirtio.conformance.runner import Report, Result, Runner, Status, select_rules

__all__ = [
    "CATALOGUE",
    "DEVICES",
    "BackendInfo",
    "Device",
    "Probe",
    "Report",
    "Result",
    "Rule",
    "Runner",
    "Settings",
    "Severity",
    "Status",
    "detect",
    "rule",
    "select_rules",
    "to_json",
    "to_junit",
    "to_text",
]
