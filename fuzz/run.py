"""Run the fuzz targets: ``python -m fuzz.run TARGET... --seconds N`` (docs/fuzzing.md).

Engines:

* ``atheris`` (coverage-guided libFuzzer; ``pip install -e .[fuzz]``): each
  target runs in a child process (libFuzzer exits its process when done)
  with ``pyvirtio`` instrumented, the seed corpus in ``fuzz/corpus/<target>``
  read-only and a working corpus in ``fuzz/work/<target>``. A crash (an
  undeclared exception, a broken invariant, a timeout, an RSS above the
  limit) writes ``fuzz/crashes/<target>/crash-*``; with ``--keep-going``
  the child is restarted for the rest of the budget.
* ``hypothesis`` (no extra dependency): ``st.binary()`` plus seeds mutated
  byte-wise, the corpus as explicit examples; a per-input time limit from
  ``SIGALRM``; a failure is shrunk and written to ``fuzz/crashes/`` too.

``auto`` (the default) picks atheris when it imports. Every run writes
``fuzz/results/<target>.json`` (engine, seconds, inputs, crashes); ``--report``
prints them as a Markdown table and ``--update-docs`` puts that table into
docs/fuzzing.md between its ``last-run`` markers. ``--replay TARGET FILE...``
runs saved inputs once each (crash triage). Exit status: 1 if any target
crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
WORK = ROOT / "work"
CRASHES = ROOT / "crashes"
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs" / "fuzzing.md"
MAX_LEN = 8192
#: Seconds one input may take (the server target waits up to 10 s for a stuck back end).
DEFAULT_TIMEOUT = 25
RSS_LIMIT_MB = 2048
TARGET_NAMES = (
    "vu_decode_request",
    "vu_parse_reply",
    "vu_backend_channel",
    "split_reap",
    "fixed_reap",
    "device_pop",
    "blk_handle",
    "scsi_handle",
    "net_handle",
    "spec_parsers",
    "blk_driver",
    "scsi_driver",
    "net_driver",
    "server",
    "packed_reap",
    "packed_device_pop",
    "server_packed",
    "packed_stream",
)


class InputTimeout(Exception):
    """One input ran longer than the per-input limit: a hang."""


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def limit_memory(mb: int = 4 * RSS_LIMIT_MB) -> None:
    """Cap the address space so a runaway input fails instead of starving the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = mb << 20
    if hard == resource.RLIM_INFINITY or hard > want:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def load_targets() -> dict[str, Callable[[bytes], int]]:
    from fuzz.targets import TARGETS

    return TARGETS


def corpus_files(target: str) -> list[Path]:
    d = CORPUS / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def run_one(fn: Callable[[bytes], int], data: bytes, timeout: float) -> int:
    """Run one input under a wall-clock limit (SIGALRM; main thread only).

    An alarm that was already set (pytest-timeout's, say) is put back
    afterwards with the time it had left.
    """

    def expired(_sig: int, _frame: object) -> None:
        raise InputTimeout(f"input took longer than {timeout} s")

    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, expired)
    outer, _interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn(data)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


def save_crash(target: str, data: bytes) -> Path:
    d = CRASHES / target
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


def replay_corpus(target: str, timeout: float = DEFAULT_TIMEOUT) -> list[tuple[Path, int]]:
    """Every seed of ``target`` once; returns (file, result). Raises what a seed raises."""
    from fuzz.targets import quiet_logs

    fn = load_targets()[target]
    with quiet_logs():
        return [(p, run_one(fn, p.read_bytes(), timeout)) for p in corpus_files(target)]


# -- Hypothesis engine -------------------------------------------------------------


def _mutations(seeds: list[bytes]) -> Any:
    from hypothesis import strategies as st

    if not seeds:
        return st.binary(max_size=MAX_LEN)
    edit = st.tuples(st.sampled_from(("set", "insert", "delete", "flip")), st.integers(0, MAX_LEN), st.integers(0, 255))

    def apply(args: tuple[bytes, list[tuple[str, int, int]], int | None]) -> bytes:
        seed, edits, cut = args
        out = bytearray(seed)
        for kind, pos, value in edits:
            i = pos % (len(out) + 1)
            if kind == "insert":
                out[i:i] = bytes([value])
            elif not out:
                continue
            elif kind == "set":
                out[i % len(out)] = value
            elif kind == "flip":
                out[i % len(out)] ^= 1 << (value % 8)
            else:
                del out[i % len(out)]
        return bytes(out if cut is None else out[:cut])

    mutated = st.tuples(
        st.sampled_from(seeds), st.lists(edit, max_size=8), st.none() | st.integers(0, MAX_LEN)
    ).map(apply)
    return st.one_of(mutated, st.binary(max_size=MAX_LEN))


def run_hypothesis(
    target: str,
    seconds: float,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    keep_going: bool = False,
    examples_per_round: int = 500,
    seed_examples: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fuzz ``target`` for about ``seconds`` with Hypothesis; returns the run's record."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import HypothesisException

    from fuzz.targets import quiet_logs

    fn = load_targets()[target]
    seeds = [p.read_bytes() for p in corpus_files(target)]
    count = 0
    crashes: list[str] = []
    failing: list[bytes] = []
    start = time.monotonic()
    deadline = start + seconds
    first = True
    while True:
        # The explicit seeds run in the first round only; later rounds explore.
        phases = [Phase.explicit, Phase.generate, Phase.shrink] if first else [Phase.generate, Phase.shrink]

        @settings(
            max_examples=examples_per_round,
            deadline=None,
            database=None,
            phases=phases,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
                HealthCheck.large_base_example,
            ],
            print_blob=False,
            report_multiple_bugs=False,
        )
        @given(_mutations(seeds))
        def fuzz(data: bytes) -> None:
            nonlocal count
            count += 1
            try:
                run_one(fn, data, timeout)
            except BaseException:
                failing.append(data)
                raise

        if first and seed_examples:
            from hypothesis import example

            for s in seeds:
                fuzz = example(s)(fuzz)
        first = False
        try:
            with quiet_logs():
                fuzz()
        except HypothesisException:
            raise
        except Exception as exc:
            data = failing[-1] if failing else b""
            path = save_crash(target, data)
            crashes.append(str(path.relative_to(ROOT.parent)))
            if not quiet:
                print(f"[{target}] CRASH {exc!r} -> {path}", file=sys.stderr)
                traceback.print_exception(exc, file=sys.stderr)
            if not keep_going:
                break
        failing.clear()
        if time.monotonic() >= deadline:
            break
    return {
        "target": target,
        "engine": "hypothesis",
        "seconds": round(time.monotonic() - start, 1),
        "inputs": count,
        "crashes": crashes,
        "corpus": len(seeds),
    }


# -- atheris engine ------------------------------------------------------------------


def atheris_child(target: str, libfuzzer_args: list[str]) -> None:
    """In a child process: instrument pyvirtio, hand the target to libFuzzer (which exits)."""
    import atheris

    with atheris.instrument_imports(include=["pyvirtio"]):
        import pyvirtio.backends.blk
        import pyvirtio.backends.scsi
        import pyvirtio.backends.server
        import pyvirtio.drivers.blk
        import pyvirtio.drivers.scsi
        import pyvirtio.memory
        import pyvirtio.protocol.vhost_user
        import pyvirtio.ring.device_side
        import pyvirtio.ring.fixed
        import pyvirtio.ring.split
        import pyvirtio.spec.t10
        import pyvirtio.transport.loopback  # noqa: F401

        fn = load_targets()[target]
        import pyvirtio.backends.inflight
        import pyvirtio.backends.net
        import pyvirtio.drivers.net  # noqa: F401

        if target in ("blk_driver", "scsi_driver", "net_driver"):
            import fuzz._drivers  # noqa: F401
        if target == "server":
            import fuzz._server  # noqa: F401

    def one(data: bytes) -> None:
        fn(data)

    logging.getLogger("pyvirtio").setLevel(logging.CRITICAL + 1)  # a log line per rejected request otherwise
    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


_DONE = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_atheris(
    target: str,
    seconds: float,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    keep_going: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fuzz ``target`` with libFuzzer in child processes for ``seconds``; returns the run's record."""
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    crash_dir = CRASHES / target
    crash_dir.mkdir(parents=True, exist_ok=True)
    log_path = WORK / f"{target}.log"
    start = time.monotonic()
    inputs = 0
    crashes: list[str] = []
    with open(log_path, "w") as log:
        while True:
            left = int(seconds - (time.monotonic() - start))
            if left < 1:
                break
            args = [
                str(work),
                str(CORPUS / target),
                f"-max_total_time={left}",
                f"-timeout={int(timeout)}",
                f"-rss_limit_mb={RSS_LIMIT_MB}",
                f"-max_len={MAX_LEN}",
                f"-artifact_prefix={crash_dir}/",
                "-print_final_stats=1",
                "-print_pcs=0",
            ]
            cmd = [sys.executable, "-m", "fuzz.run", "--atheris-child", target, "--", *args]
            env = dict(os.environ, PYTHONHASHSEED="0")
            proc = subprocess.run(cmd, cwd=ROOT.parent, env=env, capture_output=True, text=True, errors="replace")
            out = proc.stdout + proc.stderr
            log.write(out)
            log.flush()
            m = _DONE.findall(out)
            if m:
                inputs += int(m[-1])
            found = _ARTIFACT.findall(out)
            for path in found:
                crashes.append(str(Path(path).resolve().relative_to(ROOT.parent)))
                if not quiet:
                    tail = out[out.rfind("=== Uncaught") :] if "=== Uncaught" in out else out[-3000:]
                    print(f"[{target}] CRASH -> {path}\n{tail[:4000]}", file=sys.stderr)
            if not found and proc.returncode != 0:
                crashes.append(f"exit status {proc.returncode} (see {log_path.relative_to(ROOT.parent)})")
                if not quiet:
                    print(f"[{target}] child exited with {proc.returncode}:\n{out[-3000:]}", file=sys.stderr)
            if not crashes or not keep_going:
                break
            if len(crashes) >= 20:
                break
    return {
        "target": target,
        "engine": "atheris",
        "seconds": round(time.monotonic() - start, 1),
        "inputs": inputs,
        "crashes": crashes,
        "corpus": len(corpus_files(target)),
        "working_corpus": len(list(work.iterdir())),
    }


# -- reporting ------------------------------------------------------------------------


def known_log(target: str) -> Path:
    """Where the targets count the known issues they tolerated (FUZZ_KNOWN_LOG), fresh for a run."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{target}.known"
    path.write_text("")
    os.environ["FUZZ_KNOWN_LOG"] = str(path)
    return path


def known_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().split():
        counts[line] = counts.get(line, 0) + 1
    return counts


def save_result(record: dict[str, Any], results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    record = dict(record, finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    (results / f"{record['target']}.json").write_text(json.dumps(record, indent=2) + "\n")


def report(results: Path = RESULTS) -> str:
    rows = []
    for name in TARGET_NAMES:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        crashes = len(r["crashes"])
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0
        known = ", ".join(f"{k} ×{n}" for k, n in sorted(r.get("known", {}).items())) or "-"
        rows.append(
            f"| `{name}` | {r['engine']} | {r['seconds']:.0f} | {r['inputs']:,} | {rate:,.0f} | "
            f"{r.get('working_corpus', r['corpus'])} | {crashes} | {known} | {r.get('finished', '')} |"
        )
    head = (
        "| target | engine | seconds | inputs | inputs/s | corpus | crashes | known issues met | finished |\n"
        "|---|---|---:|---:|---:|---:|---:|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def update_docs(table: str, path: Path = DOCS) -> None:
    text = path.read_text()
    begin, end = "<!-- last-run:begin -->", "<!-- last-run:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} / {end} markers")
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--atheris-child"]:
        target = argv[1]
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        atheris_child(target, rest)
        return 0
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help=f"targets (default: all): {', '.join(TARGET_NAMES)}")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)))
    p.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds one input may take")
    p.add_argument("--keep-going", action="store_true", help="go on after a crash until the budget is spent")
    p.add_argument("--replay", action="store_true", help="run the given files (after the target) once each")
    p.add_argument("--report", action="store_true", help="print the last results as a Markdown table")
    p.add_argument("--update-docs", action="store_true", help="write that table into docs/fuzzing.md")
    p.add_argument("--verbose", action="store_true", help="with --replay: keep pyvirtio's log output")
    p.add_argument("--results", type=Path, default=RESULTS, help="directory of the per-target result files")
    args, extra = p.parse_known_args(argv)
    if args.report or args.update_docs:
        table = report(args.results)
        print(table)
        if args.update_docs:
            update_docs(table)
        return 0
    if args.replay:
        target, files = args.targets[0], args.targets[1:] + extra
        fn = load_targets()[target]
        status = 0
        if args.verbose:
            logging.basicConfig(level=logging.DEBUG, format="%(threadName)s %(name)s: %(message)s")
        else:
            logging.getLogger("pyvirtio").setLevel(logging.CRITICAL + 1)
        for f in files:
            try:
                result = run_one(fn, Path(f).read_bytes(), args.timeout)
                print(f"{f}: ok ({result})")
            except Exception:
                status = 1
                print(f"{f}: CRASH")
                traceback.print_exc()
        return status
    targets = args.targets or list(TARGET_NAMES)
    unknown = [t for t in targets if t not in TARGET_NAMES]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {', '.join(TARGET_NAMES)}")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    limit_memory()
    status = 0
    for target in targets:
        print(f"[{target}] {engine}, {args.seconds:.0f} s", file=sys.stderr, flush=True)
        log = known_log(target)
        if engine == "atheris":
            record = run_atheris(target, args.seconds, timeout=args.timeout, keep_going=args.keep_going)
        else:
            record = run_hypothesis(target, args.seconds, timeout=args.timeout, keep_going=args.keep_going)
        record["known"] = known_counts(log)
        save_result(record, args.results)
        print(
            f"[{target}] {record['inputs']} inputs in {record['seconds']} s, {len(record['crashes'])} crash(es)",
            file=sys.stderr,
            flush=True,
        )
        if record["crashes"]:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
