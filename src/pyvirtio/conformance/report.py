"""Reports of a ``pyvirtio check`` run: a text table, JSON, JUnit XML.

Sans-I/O: each function takes a :class:`~pyvirtio.conformance.runner.Report`
(or one :class:`~pyvirtio.conformance.runner.Result`) and returns a string;
the CLI writes it. The text form is one line per rule (status, id,
severity, title) with, under a FAIL, what was sent, what came back and
what the rule expected, and under a SKIP / WEDGED / ERROR the reason; a
summary line ends it. :func:`rich_table` renders the same with ``rich``
when it is installed and the output is a terminal. JUnit XML follows the
schema CI systems read (one ``testsuite``, one ``testcase`` per rule with
``classname`` = area; FAIL -> ``failure``, WEDGED and ERROR -> ``error``,
SKIP -> ``skipped``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from pyvirtio.conformance.devices import DEVICES
from pyvirtio.conformance.runner import Report, Result, Status
from pyvirtio.protocol.vhost_user import protocol_feature_names
from pyvirtio.spec.features import device_feature_names

__all__ = ["header_lines", "result_lines", "summary_line", "to_json", "to_junit", "to_text"]

_INDENT = "      "


def _device_id(report: Report) -> int:
    device = DEVICES.get(report.device)
    return 0 if device is None else device.device_id


def header_lines(report: Report) -> list[str]:
    info = report.info
    lines = [
        f"pyvirtio check {report.target}  (device {report.device}: {report.device_reason})",
        f"  features 0x{info.features:x}: {' '.join(device_feature_names(_device_id(report), info.features))}",
    ]
    if info.protocol_features:
        lines.append(f"  protocol features 0x{info.protocol_features:x}: "
                     f"{' '.join(protocol_feature_names(info.protocol_features))}")
    extra = []
    if info.queue_num is not None:
        extra.append(f"queues {info.queue_num}")
    if info.max_mem_slots is not None:
        extra.append(f"memory slots {info.max_mem_slots}")
    if info.config is not None:
        extra.append(f"config {len(info.config)} bytes")
    if extra:
        lines.append("  " + ", ".join(extra))
    return lines


def result_lines(result: Result) -> list[str]:
    """One line for the verdict, and the evidence under it."""
    r = result.rule
    lines = [f"{result.status.value:<6} {r.id:<44} {r.severity.value:<10} {r.title}"]
    if result.status in (Status.FAIL, Status.WEDGED) and (result.expected or result.transcript):
        for s in result.transcript:
            lines.append(f"{_INDENT}| {s}")
        if result.got:
            lines.append(f"{_INDENT}got:      {result.got}")
        if result.expected:
            lines.append(f"{_INDENT}expected: {result.expected}")
    if result.detail and result.status is not Status.PASS:
        lines.append(f"{_INDENT}{'why' if result.status is Status.SKIP else 'detail'}: {result.detail.strip()}")
    if result.status in (Status.FAIL, Status.WEDGED):
        lines.append(f"{_INDENT}section:  {r.section}")
    return lines


def summary_line(report: Report) -> str:
    c = report.counts()
    text = (
        f"{len(report.results)} rules: {c['PASS']} passed, {c['FAIL']} failed, {c['WEDGED']} wedged, "
        f"{c['SKIP']} skipped"
    )
    if c["ERROR"]:
        text += f", {c['ERROR']} checker errors"
    text += f"; {report.must_failures} MUST rule(s) broken; {report.seconds:.1f} s"
    if report.restarts:
        text += f"; back end restarted {report.restarts} time(s)"
    return text


def to_text(report: Report) -> str:
    lines = header_lines(report)
    for result in report.results:
        lines.extend(result_lines(result))
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"


def rich_table(report: Report) -> Any:
    """The results as a ``rich`` Table (raises ImportError without rich)."""
    from rich.table import Table

    colour = {"PASS": "green", "FAIL": "red", "WEDGED": "magenta", "SKIP": "dim", "ERROR": "yellow"}
    table = Table(title=header_lines(report)[0], show_lines=False)
    for column in ("status", "rule", "severity", "title / evidence"):
        table.add_column(column)
    for result in report.results:
        lines = result_lines(result)
        status = result.status.value
        table.add_row(f"[{colour[status]}]{status}[/]", result.rule.id, result.rule.severity.value,
                      "\n".join([result.rule.title] + [line.strip() for line in lines[1:]]))
    table.caption = summary_line(report)
    return table


def _result_json(result: Result) -> dict[str, Any]:
    r = result.rule
    out: dict[str, Any] = {
        "id": r.id,
        "area": r.area,
        "title": r.title,
        "section": r.section,
        "severity": r.severity.value,
        "status": result.status.value,
        "seconds": round(result.seconds, 3),
    }
    if result.detail:
        out["detail"] = result.detail.strip()
    if result.status in (Status.FAIL, Status.WEDGED):
        out.update(transcript=list(result.transcript), got=result.got, expected=result.expected)
    return out


def to_json(report: Report) -> str:
    info = report.info
    doc = {
        "target": report.target,
        "device": report.device,
        "device_reason": report.device_reason,
        "started": report.started,
        "seconds": round(report.seconds, 3),
        "restarts": report.restarts,
        "features": f"0x{info.features:x}",
        "protocol_features": f"0x{info.protocol_features:x}",
        "queue_num": info.queue_num,
        "max_mem_slots": info.max_mem_slots,
        "config": None if info.config is None else info.config.hex(),
        "counts": report.counts(),
        "must_failures": report.must_failures,
        "exit_status": report.exit_status(),
        "results": [_result_json(r) for r in report.results],
    }
    return json.dumps(doc, indent=2) + "\n"


def to_junit(report: Report) -> str:
    c = report.counts()
    suite = ET.Element(
        "testsuite",
        name=f"pyvirtio-check {report.device}",
        tests=str(len(report.results)),
        failures=str(c["FAIL"]),
        errors=str(c["WEDGED"] + c["ERROR"]),
        skipped=str(c["SKIP"]),
        time=f"{report.seconds:.3f}",
        timestamp=report.started,
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="target", value=report.target)
    ET.SubElement(props, "property", name="features", value=f"0x{report.info.features:x}")
    for result in report.results:
        r = result.rule
        case = ET.SubElement(suite, "testcase", classname=f"{r.area}", name=f"{r.id} [{r.severity.value}]",
                             time=f"{result.seconds:.3f}")
        evidence = "\n".join(line.strip() for line in result_lines(result)[1:])
        if result.status is Status.FAIL:
            failure = ET.SubElement(case, "failure", message=f"expected {result.expected}; got {result.got}",
                                    type=r.severity.value)
            failure.text = evidence
        elif result.status in (Status.WEDGED, Status.ERROR):
            error = ET.SubElement(case, "error", message=f"{result.status.value}: {result.detail.strip()[:200]}",
                                  type=result.status.value)
            error.text = evidence
        elif result.status is Status.SKIP:
            ET.SubElement(case, "skipped", message=result.detail)
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
