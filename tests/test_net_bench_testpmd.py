"""`pyvirtio net bench --ring packed` against DPDK testpmd's vhost PMD (issue 12: the net engine on packed rings).

tx (the ring's stream) against rxonly, rx (the stream's bulk check with
NumPy) against txonly, echo (the general calls) against macswap, on a packed
ring with and without IN_ORDER; the report names the ring negotiated.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("testpmd")

pytest_plugins = ["testpmd"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(90)]


@pytest.mark.parametrize("in_order", ["off", "on"])
@pytest.mark.parametrize(("mode", "fwd"), [("tx", "rxonly"), ("rx", "txonly"), ("echo", "macswap")])
def test_net_bench_on_a_packed_ring(testpmd_factory, mode: str, fwd: str, in_order: str) -> None:
    pytest.importorskip("numpy")
    t = testpmd_factory(fwd)
    r = subprocess.run(
        [sys.executable, "-m", "pyvirtio", "net", "bench", t.sock, "--ring", "packed", "--in-order", in_order,
         "--mode", mode, "--runtime", "0.5", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["ring"] == "packed" and rep["in_order"] == (in_order == "on")
    assert rep["frames"] > 0 and rep["errors"] == 0
    if mode == "echo":
        assert rep["verify_errors"] == 0
