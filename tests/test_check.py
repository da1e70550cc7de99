"""``pyvirtio check``: each rule can fail, healthy back ends pass, and the CLI reports for CI.

* The faulty back end (tests/faulty_backend.py: pyvirtio's blk back end
  behind a relay with a switch per fault) makes exactly the rules of its
  fault FAIL or WEDGE, and every other rule of the same area PASS or SKIP.
  Each fault runs the areas it touches (the whole catalogue per fault costs
  ~30 s; run that way by hand, each fault broke exactly the rules listed in
  :data:`EXPECTED` and nothing else). The back end runs as a process that
  the runner starts (``--restart-cmd``), so a crash is a real one and the fd
  rule counts that process's fds.
* The same relay with no fault, and pyvirtio's own blk, scsi and net back
  ends (``pyvirtio serve``), pass every rule that applies: no FAIL, no WEDGED.
* The CLI: one line per rule, ``--json``, ``--junit`` (parsed as JUnit
  XML), and an exit status that is 0 only when no MUST rule broke.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyvirtio.conformance import CATALOGUE, Report, Runner, Settings, Severity, Status

pytest.register_assert_rewrite("faulty_backend", "peers")

from faulty_backend import CRASH_STATUS, FAULTS  # noqa: E402
from peers import Qsd, peer_binary  # noqa: E402

pytest_plugins = ["peers"]

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).resolve().parent
PY = sys.executable

#: fault -> (rule patterns run, the rules that must FAIL or WEDGE: exactly these).
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "ignore-need-reply": ("handshake.reply-ack.*", {"handshake.reply-ack.set-owner"}),
    "ack-unknown": ("handshake.unknown-request*,handshake.reply-ack.failure", {"handshake.unknown-request"}),
    "wrong-vring-base": ("ring.get-base.*,ring.restart,ring.base.*", {"ring.get-base.index", "ring.restart"}),
    "accept-outside-addr": ("ring.addr.*", {"ring.addr.desc-outside"}),
    "signal-always": ("ring.notify.*,ring.call.*", {"ring.notify.no-interrupt", "ring.notify.event-idx-suppressed"}),
    "crash-on-loop": ("hostile.desc-*,ring.restart,blk.read", {"hostile.desc-loop"}),
    "leak-fds": ("lifecycle.reconnect,lifecycle.disconnect-handshake,lifecycle.fd-growth", {"lifecycle.fd-growth"}),
}

FAST = Settings(timeout=1.0, quiet=0.15, connections=30)


def faulty_cmd(sock: str, *faults: str) -> str:
    return " ".join([PY, str(TESTS / "faulty_backend.py"), "--socket", sock, *(f"--fault {f}" for f in faults)])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(TESTS.parent / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def broken(report: Report) -> dict[str, Status]:
    return {r.rule.id: r.status for r in report.results if r.status in (Status.FAIL, Status.WEDGED)}


def errors(report: Report) -> list[str]:
    return [f"{r.rule.id}: {r.detail}" for r in report.results if r.status is Status.ERROR]


def test_every_fault_has_its_rules() -> None:
    assert set(EXPECTED) == set(FAULTS)
    ids = {r.id for r in CATALOGUE}
    for _patterns, rules in EXPECTED.values():
        assert rules <= ids


def test_catalogue_shape() -> None:
    """At least 60 rules, unique ids, each with a title, a spec section and a severity."""
    assert len(CATALOGUE) >= 60
    ids = [r.id for r in CATALOGUE]
    assert len(set(ids)) == len(ids)
    for r in CATALOGUE:
        assert r.title and r.section and isinstance(r.severity, Severity)
        assert r.section.startswith(("vhost-user.rst", "virtio 1.2", "SPC", "SBC", "resource")), r.section


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_fault_breaks_exactly_its_rule(fault: str, sockdir: str) -> None:
    patterns, expected = EXPECTED[fault]
    sock = f"{sockdir}/f.sock"
    report = Runner(sock, FAST, device="blk", rules=patterns.split(","), restart_cmd=faulty_cmd(sock, fault)).run()
    assert not errors(report)
    assert set(broken(report)) == expected, [f"{r.rule.id} {r.status.value} {r.detail}" for r in report.results]
    ran = {r.rule.id: r.status for r in report.results}
    assert all(ran[i] in (Status.PASS, Status.SKIP) for i in ran if i not in expected)
    assert sum(s is Status.PASS for s in ran.values()) >= 2  # the area really ran around the broken rule
    if fault == "crash-on-loop":
        (loop,) = [r for r in report.results if r.rule.id == "hostile.desc-loop"]
        assert loop.status is Status.WEDGED
        assert f"exited with status {CRASH_STATUS}" in loop.detail or "restarted" in loop.detail


def _run_all(sock: str, cmd: str, device: str = "auto") -> Report:
    return Runner(sock, Settings(timeout=2.0, quiet=0.15, connections=30), device=device, restart_cmd=cmd).run()


def test_healthy_relay_passes_every_rule(sockdir: str) -> None:
    sock = f"{sockdir}/f.sock"
    report = _run_all(sock, faulty_cmd(sock))
    assert report.device == "blk"
    assert not broken(report) and not errors(report)
    assert report.exit_status() == 0
    counts = report.counts()
    assert counts["PASS"] >= 90, counts


@pytest.mark.parametrize(
    ("device", "args", "min_pass"),
    [
        ("blk", "blk --size 16M", 90),
        ("scsi", "scsi --lun 16M", 60),
        ("net", "net --mode loopback", 50),
    ],
)
def test_own_backends_pass_every_rule(device: str, args: str, min_pass: int, sockdir: str) -> None:
    sock = f"{sockdir}/{device}.sock"
    cmd = f"{PY} -m pyvirtio serve {args} --socket {sock}"
    report = _run_all(sock, cmd)
    assert report.device == device  # auto-detected
    assert not broken(report) and not errors(report), [
        f"{r.rule.id} {r.status.value} {r.detail} {r.expected} {r.got}" for r in report.results
        if r.status in (Status.FAIL, Status.WEDGED, Status.ERROR)
    ]
    assert report.counts()["PASS"] >= min_pass, report.counts()


# -- the CLI ---------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "pyvirtio", *args], capture_output=True, text=True, timeout=timeout, env=env())


def test_cli_list() -> None:
    res = cli("check", "--list")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[-1] == f"{len(CATALOGUE)} rules"
    assert any(line.startswith("ring.get-base.index ") and " MUST " in line for line in lines)


def test_cli_junit_and_exit_status_when_a_must_rule_fails(sockdir: str) -> None:
    """A MUST rule broken: exit 1; the JUnit file names it as a failure; the text shows the exchange."""
    sock = f"{sockdir}/f.sock"
    junit = f"{sockdir}/check.xml"
    res = cli("check", sock, "--device", "blk", "--rules", "handshake.reply-ack.set-owner,handshake.get-features",
              "--timeout", "1", "--junit", junit, "--restart-cmd", faulty_cmd(sock, "ignore-need-reply"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "WEDGED handshake.reply-ack.set-owner" in res.stdout
    assert "PASS   handshake.get-features" in res.stdout
    assert "-> SET_OWNER [need_reply]" in res.stdout  # what was sent
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "2"
    cases = {str(c.get("name")).split(" [")[0]: c for c in suite.iter("testcase")}
    assert set(cases) == {"handshake.reply-ack.set-owner", "handshake.get-features"}
    bad = cases["handshake.reply-ack.set-owner"]
    assert bad.find("failure") is not None or bad.find("error") is not None
    assert not list(cases["handshake.get-features"])  # passed: no child element


def test_cli_json_exit_zero_when_only_a_robustness_rule_fails(sockdir: str) -> None:
    sock = f"{sockdir}/f.sock"
    res = cli("check", f"vhost-user:{sock}", "--device", "blk", "--json", "--timeout", "1",
              "--rules", "handshake.unknown-request,handshake.status", "--restart-cmd", faulty_cmd(sock, "ack-unknown"))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    by_id = {r["id"]: r for r in report["results"]}
    unknown = by_id["handshake.unknown-request"]
    assert unknown["status"] == "FAIL" and unknown["severity"] == "robustness"
    assert unknown["expected"] and unknown["got"] == "ack 0"
    assert by_id["handshake.status"]["status"] == "PASS"


def test_cli_nothing_listening(sockdir: str) -> None:
    res = cli("check", f"{sockdir}/none.sock", "--timeout", "0.5")
    assert res.returncode != 0
    assert "nothing answers" in (res.stdout + res.stderr)


# -- real peers: a one-shot back end, and a table against qemu-storage-daemon -------------------


@pytest.mark.peer
def test_one_shot_backend_virtiofsd(sockdir: str, tmp_path: Path) -> None:
    """virtiofsd serves one connection and exits: restarted before every rule, lifecycle rules skipped."""
    binary = peer_binary("PYVIRTIO_VIRTIOFSD", "/usr/lib/qemu/virtiofsd", "qemu-system-common")
    sock = f"{sockdir}/fs.sock"
    cmd = f"{binary} --socket-path={sock} -o source={tmp_path} -o cache=none"
    report = Runner(sock, FAST, device="fs", rules=["handshake.get-features", "fs.init", "lifecycle"],
                    restart_cmd=cmd).run()
    by_id = {r.rule.id: r for r in report.results}
    assert by_id["handshake.get-features"].status is Status.PASS
    assert by_id["fs.init"].status is Status.PASS
    for rid in ("lifecycle.reconnect", "lifecycle.die-mid-io", "lifecycle.fd-growth"):
        assert by_id[rid].status is Status.SKIP and "one frontend per process" in by_id[rid].detail
    assert report.restarts >= 2  # started again for each rule


@pytest.mark.peer
def test_check_qsd_prints_its_table(qsd_raw: Qsd) -> None:
    res = cli("check", qsd_raw.target, "--rules", "handshake.get-features,handshake.config.exact,blk.read,blk.write",
              "--timeout", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    for rid in ("handshake.get-features", "handshake.config.exact", "blk.read", "blk.write"):
        assert f"PASS   {rid}" in res.stdout
    assert "(device blk:" in res.stdout
    assert "4 rules: 4 passed" in res.stdout
