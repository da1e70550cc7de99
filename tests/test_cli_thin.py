"""The CLI's shape: serve sub-commands share one helper without an import circle, and no private names cross modules.

Static checks over the source (AST): what ``pyvirtio.cli`` and
``pyvirtio.bench`` import, and the parsers every ``pyvirtio serve`` device
sub-command builds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pyvirtio.cli import bench as cli_bench
from pyvirtio.cli.main import build_parser

SRC = Path(__file__).resolve().parent.parent / "src" / "pyvirtio"


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every import in ``path``, at any depth (name None for ``import module``)."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
    return out


@pytest.mark.parametrize("path", sorted([*SRC.glob("cli/*.py"), *SRC.glob("bench/*.py")]), ids=lambda p: p.name)
def test_no_private_name_is_imported_from_another_module(path: Path) -> None:
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found = [f"{m}.{n}" for m, n in _imports(path) if n is not None and private(n)]
    found += [m for m, _ in _imports(path) if any(private(part) for part in m.split("."))]
    assert found == [], f"{path.name} imports private names: {found}"


def test_serve_sub_commands_do_not_import_serve() -> None:
    """serve.py registers scsi's and net's sub-commands; they share cli/serving.py, never serve.py."""
    for name in ("scsi.py", "net.py", "serving.py", "bench.py", "common.py"):
        modules = {m for m, _ in _imports(SRC / "cli" / name)}
        assert "pyvirtio.cli.serve" not in modules, name
    assert {m for m, _ in _imports(SRC / "cli" / "serving.py")} & {"pyvirtio.cli.scsi", "pyvirtio.cli.net"} == set()


def test_bench_engines_do_not_import_the_cli() -> None:
    for path in SRC.glob("bench/*.py"):
        assert not [m for m, _ in _imports(path) if m.startswith("pyvirtio.cli")], path.name


@pytest.mark.parametrize("device,extra", [
    ("blk", ["--size", "1M"]),
    ("scsi", ["--lun", "1M"]),
    ("net", []),
])
def test_every_serve_device_takes_the_shared_options(device: str, extra: list[str]) -> None:
    args = build_parser().parse_args(
        ["serve", device, "--socket", "s.sock", "--queues", "2", "--log-level", "info", "--poll-us", "10",
         "--client", *extra]
    )
    assert (args.socket, args.queues, args.log_level, args.poll_us, args.client) == ("s.sock", 2, "info", 10.0, True)


def test_scsi_bench_and_bench_take_the_same_workload_options() -> None:
    """``pyvirtio scsi bench`` is ``pyvirtio bench --lun``: every workload option parses to the same values."""
    options = ["--verify", "--mode", "numpy", "--queues", "2", "--rw", "randrw", "--rwmixread", "60",
               "--reconnect", "5", "--server", "--device-signals", "off", "--event-idx", "off", "--queue-size",
               "512", "--seed", "1", "--bs", "8k", "--iodepth", "4", "--runtime", "2", "--json", "--no-progress",
               "--lun", "0:1"]
    bench = vars(build_parser().parse_args(["bench", "s.sock", *options]))
    scsi_bench = vars(build_parser().parse_args(["scsi", "bench", "s.sock", *options]))
    assert bench.pop("size") == 1 << 30  # the embedded blk back end's RAM disk: bench only
    assert scsi_bench.pop("scsi_command") == "bench"
    assert bench.pop("command") == "bench" and scsi_bench.pop("command") == "scsi"
    assert bench.pop("connect_timeout") == 5.0 and bench.pop("timeout") == 30.0
    assert scsi_bench.pop("connect_timeout") == 1.0 and scsi_bench.pop("timeout") == 10.0
    assert (bench.pop("func"), scsi_bench.pop("func")) == (cli_bench.run, cli_bench.run_lun)  # run: run_lun on --lun
    assert bench == scsi_bench
    assert bench["lun"] == (0, 1) and bench["bs"] == 8192 and bench["reconnect"] == 5.0
