"""Running the catalogue against one back end: connections, verdicts, restarts.

Theory of operation
-------------------
:class:`Runner` first asks the back end what it offers (features,
protocol features, queue count, memory slots, config: :class:`BackendInfo`)
and settles the device type (given, or :func:`~pyvirtio.conformance.devices.detect`).
Then, for each selected rule of :data:`~pyvirtio.conformance.rules.CATALOGUE`:

1. a rule whose needs the back end does not meet (device type, offered
   features, ``--pid``) is SKIPped without a connection;
2. the back end must be reachable; a back end started by ``--restart-cmd``
   that exited (virtiofsd serves one connection, then exits) is started
   again first;
3. the rule runs on a fresh :class:`~pyvirtio.conformance.harness.Probe`:
   it returns (PASS), raises :class:`~pyvirtio.errors.RuleFailed` (FAIL) or
   :class:`~pyvirtio.errors.RuleSkipped` (SKIP); a
   :class:`~pyvirtio.errors.TransportTimeout` means the back end stopped
   answering (WEDGED); an unexpected close of the connection where the rule
   did not expect one is a FAIL; anything else is a bug of the checker
   (ERROR, with the exception);
4. afterwards the back end must accept a new frontend and answer
   GET_FEATURES ("must serve the next frontend"). If it does not, the rule
   becomes WEDGED (a process of ours that died by a signal or with a
   non-zero status is named in the detail); with ``restart_cmd`` the back end
   is stopped and started again and the run goes on, without it the
   remaining rules are SKIPped. A back end of ours that exited cleanly after
   the connection (one connection per process, by design) is simply
   started again.

Processes: the restart command runs as ``/bin/sh -c "exec CMD"`` in a
session of its own, so its pid is the back end's (``--pid`` defaults to
it; a compound command, ``cd DIR && exec CMD``, runs as given and should
exec the back end last); it is stopped by SIGTERM to that process group (SIGKILL after 5 s)
before a restart and at the end of the run. A back end that was already
running when the run began is never signalled.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import signal
import stat
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pyvirtio.conformance.devices import DEVICES, Device, detect
from pyvirtio.conformance.harness import WANTED_PROTOCOL, BackendInfo, Probe, Settings, connect
from pyvirtio.conformance.rules import CATALOGUE, Rule, Severity
from pyvirtio.errors import (
    ConnectionLost,
    DeviceError,
    PyvirtioError,
    RuleFailed,
    RuleSkipped,
    TransportError,
    TransportTimeout,
    UsageError,
)
from pyvirtio.protocol import vhost_user as vu
from pyvirtio.spec.common import VHOST_USER_F_PROTOCOL_FEATURES

__all__ = ["BackendProcess", "Report", "Result", "Runner", "Status", "select_rules"]


class Status(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    WEDGED = "WEDGED"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Result:
    """The verdict on one rule."""

    rule: Rule
    status: Status
    detail: str = ""  # why skipped / wedged / errored
    expected: str = ""
    got: str = ""
    transcript: tuple[str, ...] = ()  # the exchange that led to a FAIL / WEDGED, most recent last
    seconds: float = 0.0

    @property
    def blocking(self) -> bool:
        """A MUST rule that failed or wedged: the run's exit status is 1."""
        return self.rule.severity is Severity.MUST and self.status in (Status.FAIL, Status.WEDGED)


@dataclass(slots=True)
class Report:
    """A whole run: what was checked, against what, and every verdict."""

    target: str
    device: str
    device_reason: str
    info: BackendInfo
    started: str
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    restarts: int = 0

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for r in self.results:
            out[r.status.value] += 1
        return out

    @property
    def must_failures(self) -> int:
        return sum(1 for r in self.results if r.blocking)

    def exit_status(self) -> int:
        """0 when no MUST rule failed or wedged, else 1 (CI reads this)."""
        return 1 if self.must_failures else 0


def select_rules(patterns: Sequence[str] | None) -> list[Rule]:
    """The rules whose id matches one of the shell ``patterns`` (an area name matches the whole area)."""
    if not patterns:
        return list(CATALOGUE)
    chosen = []
    for r in CATALOGUE:
        for p in patterns:
            if fnmatch.fnmatchcase(r.id, p) or ("." not in p and fnmatch.fnmatchcase(r.area, p)):
                chosen.append(r)
                break
    if not chosen:
        raise UsageError(f"no rule matches {', '.join(patterns)} (see pyvirtio check --list)")
    return chosen


def _connectable(path: str, timeout: float = 1.0) -> bool:
    try:
        connect(path, timeout).close()
        return True
    except ConnectionLost:
        return False


class BackendProcess:
    """The back end started by ``--restart-cmd`` (see the module docstring)."""

    def __init__(self, command: str, path: str, *, startup: float = 15.0) -> None:
        self.command = command
        self.path = path
        self.startup = startup
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        self.stop()
        try:  # a socket file left by the last process (virtiofsd needs it gone)
            if stat.S_ISSOCK(os.lstat(self.path).st_mode) and not _connectable(self.path, 0.2):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        # A simple command is exec'd, so the pid is the back end's; a compound one
        # ("cd DIR && exec CMD") should exec the back end last itself.
        simple = not any(op in self.command for op in ("&&", "||", ";", "|", "\n", "&"))
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {self.command}" if simple else self.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.starts += 1
        # Wait for the socket file, without connecting: a one-shot back end would spend
        # its only connection on the probe.
        deadline = time.monotonic() + self.startup
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise TransportError(f"--restart-cmd exited with status {self.proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise TransportError(f"--restart-cmd did not serve {self.path} within {self.startup:g} s")
            time.sleep(0.02)

    def exit_status(self, wait: float = 0.0) -> int | None:
        """None while running (after waiting up to ``wait`` s); the exit status (negative: the signal) once ended."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=wait) if wait else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _exit_text(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


class Runner:
    """Run rules against the back end at ``path`` (see the module docstring)."""

    def __init__(
        self,
        path: str,
        settings: Settings | None = None,
        *,
        device: str = "auto",
        rules: Sequence[str] | None = None,
        restart_cmd: str | None = None,
        progress: Callable[[Result], None] | None = None,
        started: Callable[[Report], None] | None = None,
    ) -> None:
        if device != "auto" and device not in DEVICES:
            raise UsageError(f"--device must be auto or one of {', '.join(DEVICES)}, not {device!r}")
        self.path = path
        self.rules = select_rules(rules)
        self.process = BackendProcess(restart_cmd, path) if restart_cmd else None
        self.settings = settings or Settings()
        self.device_name = device
        self.progress = progress
        self.started = started
        #: The back end serves one connection per process (found out on the first one).
        self.one_shot = False
        self._gone = ""

    # -- the back end's availability ------------------------------------------------------

    def _effective(self) -> Settings:
        """The settings, with the pid of the process we started when none was given."""
        s = self.settings
        if s.pid is None and self.process is not None and self.process.pid is not None:
            return replace(s, pid=self.process.pid)
        return s

    def _ensure_up(self) -> None:
        """The back end is there: a process of ours still runs (not probed: it may serve one
        connection only), or one not ours accepts a connection; else ours is (re)started."""
        process = self.process
        if process is not None:
            if not process.running:
                process.start()
            return
        if not _connectable(self.path, self.settings.timeout):
            raise TransportError(f"nothing answers on {self.path}")

    def _serving(self) -> bool:
        """A new frontend gets a GET_FEATURES answered."""
        try:
            with Probe(self.path, self._effective()) as probe:
                probe.sync()
            return True
        except (ConnectionLost, TransportTimeout, RuleFailed, OSError):
            return False

    def _info(self) -> BackendInfo:
        with Probe(self.path, self._effective()) as h:
            features = h.sync()
            protocol = 0
            if features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
                protocol = h.u64(h.codec.get_protocol_features())
            h.hello(protocol=WANTED_PROTOCOL)
            queue_num = h.u64(h.codec.get_queue_num()) if protocol >> vu.PROTOCOL_F_MQ & 1 else None
            slots = None
            if protocol >> vu.PROTOCOL_F_CONFIGURE_MEM_SLOTS & 1:
                slots = h.u64(h.codec.get_max_mem_slots())
            config = None
            if protocol >> vu.PROTOCOL_F_CONFIG & 1:
                for size in (256, 72, 60, 40, 36, 24, 8):
                    try:
                        value = h.call(h.codec.get_config(0, size))
                    except DeviceError:
                        continue  # refused (empty reply): try a smaller size
                    if isinstance(value, vu.ConfigSpace):
                        config = value.data
                        break
            return BackendInfo(features, protocol, queue_num, slots, config)

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> Report:
        t0 = time.monotonic()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            self._ensure_up()
            info = self._info()
            if self.process is not None:
                self.one_shot = self.process.exit_status(min(1.0, self.settings.timeout)) is not None
            if self.device_name == "auto":
                device, why = detect(info)
            else:
                device, why = DEVICES[self.device_name], "given"
            report = Report(f"vhost-user:{self.path}", device.name, why, info, stamp)
            if self.started is not None:
                self.started(report)
            for r in self.rules:
                result = self._one(r, device, info)
                report.results.append(result)
                if self.progress is not None:
                    self.progress(result)
            report.seconds = time.monotonic() - t0
            report.restarts = max(0, self.process.starts - 1) if self.process else 0
            return report
        finally:
            if self.process is not None:
                self.process.stop()

    def _needs(self, r: Rule, device: Device, info: BackendInfo) -> str | None:
        if r.devices and device.name not in r.devices:
            return f"applies to {', '.join(sorted(r.devices))} only"
        missing = [b for b in r.features if not info.offers(b)]
        if missing:
            return f"feature bit(s) {', '.join(map(str, missing))} not offered"
        missing = [b for b in r.protocol if not info.offers_protocol(b)]
        if missing:
            names = ', '.join(vu.PROTOCOL_FEATURE_NAMES.get(b, str(b)) for b in missing)
            return f"protocol feature(s) {names} not offered"
        if r.pid and self.settings.pid is None and self.process is None:
            return "needs --pid (or --restart-cmd)"
        if r.reconnects and self.one_shot:
            return "the back end serves one frontend per process (its exit after each is checked instead)"
        return None

    def _one(self, r: Rule, device: Device, info: BackendInfo) -> Result:
        why = self._needs(r, device, info)
        if why is not None:
            return Result(r, Status.SKIP, why)
        if self._gone:
            return Result(r, Status.SKIP, self._gone)
        try:
            self._ensure_up()
        except TransportError as exc:
            self._gone = f"back end unavailable: {exc}"
            return Result(r, Status.SKIP, self._gone)
        t = time.monotonic()
        result = self._verdict(r, device, info)
        result = self._after(result)
        return Result(result.rule, result.status, result.detail, result.expected, result.got, result.transcript,
                      time.monotonic() - t)

    def _probe(self, info: BackendInfo) -> Probe:
        """A connection for the next rule; a process of ours still exiting after its last session is waited
        for and started again."""
        try:
            return Probe(self.path, self._effective(), info)
        except ConnectionLost:
            process = self.process
            if process is None:
                raise
            process.exit_status(self.settings.timeout)
            process.start()
            return Probe(self.path, self._effective(), info)

    def _verdict(self, r: Rule, device: Device, info: BackendInfo) -> Result:
        probe: Probe | None = None
        try:
            probe = self._probe(info)
            r.check(probe, device)
            return Result(r, Status.PASS)
        except RuleFailed as exc:
            return Result(r, Status.FAIL, "", exc.expected, exc.got, exc.transcript)
        except RuleSkipped as exc:
            return Result(r, Status.SKIP, str(exc))
        except TransportTimeout as exc:
            sent = tuple(probe.transcript[-8:]) if probe else ()
            return Result(r, Status.WEDGED, str(exc), transcript=sent)
        except ConnectionLost as exc:
            sent = tuple(probe.transcript[-8:]) if probe else ()
            return Result(r, Status.FAIL, "", "the connection kept open", str(exc), sent)
        except (PyvirtioError, OSError, AssertionError, ValueError, TypeError, KeyError, IndexError) as exc:
            return Result(r, Status.ERROR, f"checker error: {exc!r}: {traceback.format_exc(limit=3)}")
        finally:
            if probe is not None:
                probe.close()

    def _after(self, result: Result) -> Result:
        """Must serve the next frontend: restart a one-shot back end, report a dead or hung one."""
        process = self.process
        detail = ""
        if process is not None:
            if self.one_shot:
                status = process.exit_status(self.settings.timeout)
                if status is not None and status >= 0:
                    return result  # its session ended, as one-shot back ends do: started again for the next rule
            else:
                if process.running and self._serving():
                    return result
                status = process.exit_status(self.settings.quiet)
            what = "stopped answering" if status is None else _exit_text(status)
            detail = f"after this rule the back end {what}; restarted"
            process.stop()
        elif self._serving():
            return result
        else:
            detail = "after this rule the back end no longer accepts a frontend"
            self._gone = "the back end stopped answering (no --restart-cmd)"
        if result.detail:
            detail = f"{result.detail}; {detail}"
        return Result(result.rule, Status.WEDGED, detail, result.expected, result.got, result.transcript)
