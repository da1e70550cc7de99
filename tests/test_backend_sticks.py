"""The embedded back end against a frontend that is not pyvirtio's: the raw measuring stick.

``shared/bench/raw_vhost_blk.py`` (beside the repository: ``<repo>/../shared``)
is a bare vhost-user-blk loop written without pyvirtio: fixed 3-descriptor
chains, no EVENT_IDX, busy polling, kicks gated on the used ring's
NO_NOTIFY flag. It runs for one second of random reads and one of random
writes against ``pyvirtio serve blk`` (a subprocess, as users run it); every
I/O must succeed. When the stick is not there the test fails under CI=true and
is skipped on a developer machine (peers.missing_peer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import missing_peer

REPO = Path(__file__).resolve().parent.parent
#: Where the workplace keeps its measuring sticks: $PYVIRTIO_STICKS, beside the
#: repository (../shared/bench, as bench/compare.py expects), or /work/shared/bench.
_STICK_DIRS = [Path(d) for d in (os.environ.get("PYVIRTIO_STICKS"),) if d]
_STICK_DIRS += [REPO.parent / "shared" / "bench", Path("/work/shared/bench")]
STICK = next((d / "raw_vhost_blk.py" for d in _STICK_DIRS if (d / "raw_vhost_blk.py").is_file()),
             _STICK_DIRS[0] / "raw_vhost_blk.py")

pytestmark = [pytest.mark.timeout(60), pytest.mark.peer]


@pytest.fixture(scope="module", autouse=True)
def stick_present() -> None:
    if not STICK.is_file():
        where = ", ".join(str(d) for d in _STICK_DIRS)
        missing_peer(f"the measuring stick raw_vhost_blk.py is in none of {where} (set PYVIRTIO_STICKS)")


def serve_command() -> list[str]:
    """``pyvirtio serve`` once pyvirtio.cli.main registers it; until then the module itself."""
    import contextlib
    import io

    from pyvirtio.cli import main as cli_main

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli_main.build_parser().parse_args(["serve", "blk", "--socket", "s", "--size", "1M"])
        return [sys.executable, "-m", "pyvirtio", "serve"]
    except SystemExit:
        return [sys.executable, "-m", "pyvirtio.cli.serve"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sock = str(tmp_path_factory.mktemp("stick") / "blk.sock")
    proc = subprocess.Popen(
        [*serve_command(), "blk", "--socket", sock, "--size", "256M"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the server did not create its socket"
            time.sleep(0.02)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert not os.path.exists(sock)


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_raw_stick(server: str, rw: str) -> None:
    res = subprocess.run(
        [sys.executable, str(STICK), server, "--rw", rw, "--seconds", "1", "--json"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr.decode()
    result = json.loads(res.stdout)
    assert result["rw"] == rw
    assert result["ios"] > 0
    assert result["errors"] == 0
