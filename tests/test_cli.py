"""The ``pyvirtio`` command: size parsing, argument errors, and info / blk against qsd.

Expected failures print exactly one line ``pyvirtio: error: ...`` on stderr
and exit 1 (no traceback); bad arguments exit 2. Device commands run as
``python -m pyvirtio`` subprocesses against qemu-storage-daemon (peer-marked),
with a few in-process runs of :func:`pyvirtio.cli.main.main` for the
terminal-only output paths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pyvirtio import __version__
from pyvirtio.cli import blk as cli_blk
from pyvirtio.cli import common
from pyvirtio.cli.common import byte_arg, chunks, hexdump, parse_size, size_arg
from pyvirtio.cli.main import main
from pyvirtio.errors import InvalidArgument

if TYPE_CHECKING:
    from peers import Qsd

pytest_plugins = ["peers"]


def cli(*args: str, input: bytes | None = None, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtio", *args],
        capture_output=True,
        input=input,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[bytes], *needles: str, status: int = 1) -> str:
    err = res.stderr.decode()
    assert res.returncode == status, (res.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("pyvirtio: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# -- sizes and small parsers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("4k", 4096),
        ("4K", 4096),
        ("1M", 1 << 20),
        ("3M", 3 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("0x1000", 4096),
        ("0x10k", 16 << 10),
        (" 8k ", 8192),
        ("1073741824", 1 << 30),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
    assert size_arg(text) == value


@pytest.mark.parametrize(
    "text", ["", " ", "k", "-1", "1.5M", "1P", "1KB", "1 MiB", "abc", "4kk", "1e6", "0x"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(text)
    with pytest.raises(argparse.ArgumentTypeError):
        size_arg(text)


def test_byte_arg() -> None:
    assert byte_arg("0") == 0
    assert byte_arg("255") == 255
    assert byte_arg("0xaa") == 0xAA
    for bad in ("256", "-1", "x", "0x100"):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_arg(bad)


def test_chunks() -> None:
    assert list(chunks(0, 10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(chunks(512, 1024, 1 << 20)) == [(512, 1024)]
    assert list(chunks(0, 0, 4)) == []
    with pytest.raises(InvalidArgument):
        list(chunks(0, 1, 0))


def test_hexdump_matches_hexdump_c() -> None:
    data = b"hello world 1234" * 3 + b"abc"
    assert list(hexdump([data[:20], data[20:]], 0)) == [
        "00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64 20 31 32 33 34  |hello world 1234|",
        "*",
        "00000030  61 62 63                                          |abc|",
        "00000033",
    ]
    assert list(hexdump([bytes(32)], 0x200)) == [
        "00000200  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00000220",
    ]


# -- argument errors and failures without a device -----------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyvirtio {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: pyvirtio" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["blk", "read", "s.sock", "--offset", "1Q", "--length", "512"], "invalid size"),
        (["blk", "read", "s.sock", "--offset", "0"], "--length"),
        (["blk", "write", "s.sock", "--offset", "0", "--pattern", "300", "--length", "512"], "out of range"),
        (["blk", "write", "s.sock", "--offset", "0", "--pattern", "1", "--input", "f"], "not allowed"),
        (["blk", "frobnicate", "s.sock"], "invalid choice"),
        (["info"], "TARGET"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_pattern_without_length_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blk", "write", "/nonexistent.sock", "--offset", "0", "--pattern", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "pyvirtio: error: blk write: --pattern needs --length\n"


@pytest.mark.timeout(30)
def test_missing_socket_one_line_error(tmp_path: Path) -> None:
    sock = str(tmp_path / "nothing.sock")
    start = time.monotonic()
    res = cli("info", sock, "--connect-timeout", "0.2")
    assert time.monotonic() - start < 10
    assert_one_line_error(res, "cannot connect", sock)
    res = cli("blk", "read", f"vhost-user:{sock}", "--offset", "0", "--length", "512")
    assert_one_line_error(res, "No such file or directory")


def test_bad_target_kind_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "tcp:127.0.0.1:5000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyvirtio: error: unknown target kind") and err.count("\n") == 1


def test_run_reports_oserror_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise FileNotFoundError(2, "No such file or directory", "/x/y")

    assert common.run(boom, argparse.Namespace()) == 1
    assert capsys.readouterr().err == "pyvirtio: error: No such file or directory: /x/y\n"


def test_run_reports_multiline_message_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise InvalidArgument("first\nsecond")

    assert common.run(boom, argparse.Namespace()) == 1
    assert capsys.readouterr().err == "pyvirtio: error: first second\n"


# -- against qemu-storage-daemon ------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_info_human(qsd_raw: Qsd) -> None:
    res = cli("info", qsd_raw.target)
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert "\x1b[" not in out  # no terminal escapes into a pipe
    for needle in ("device type", "blk", "BLK_FLUSH", "CONFIG", "capacity", str(qsd_raw.size), "queue size"):
        assert needle in out, needle


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_info_json(qsd_null: Qsd) -> None:
    res = cli("info", "--json", qsd_null.sock)  # a plain socket path works too
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert {"vq_count", "vq_size", "type", "socket"} <= set(info["virtio"])
    assert info["virtio"]["type"] == "user"


@pytest.mark.peer
@pytest.mark.timeout(60)
def test_blk_commands_roundtrip(qsd_raw: Qsd, tmp_path: Path) -> None:
    assert qsd_raw.image is not None
    t = qsd_raw.target
    payload = os.urandom(3 << 20)
    src = tmp_path / "in.bin"
    src.write_bytes(payload)

    res = cli("blk", "write", t, "--offset", "1M", "--input", str(src), "--chunk", "256k")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().strip() == f"wrote {3 << 20} bytes at offset {1 << 20}"

    out = tmp_path / "out.bin"
    res = cli("blk", "read", t, "--offset", "1M", "--length", "3M", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == payload

    # Piped stdout gets the raw bytes; so does -o -.
    res = cli("blk", "read", t, "--offset", "1M", "--length", "64k", "--chunk", "4k")
    assert res.returncode == 0 and res.stdout == payload[: 64 << 10]
    res = cli("blk", "read", t, "--offset", "0x100000", "--length", "4k", "-o", "-")
    assert res.returncode == 0 and res.stdout == payload[:4096]

    # --hex: a hexdump with absolute offsets.
    res = cli("blk", "read", t, "--offset", "1M", "--length", "512", "--hex")
    lines = res.stdout.decode().splitlines()
    assert lines[0].startswith("00100000  " + " ".join(f"{b:02x}" for b in payload[:8]))
    assert lines[-1] == "00100200"

    res = cli("blk", "write", t, "--offset", "0", "--pattern", "0xa5", "--length", "8k")
    assert res.returncode == 0, res.stderr
    res = cli("blk", "write", t, "--offset", "8k", "--input", "-", input=b"\x5a" * 1024)
    assert res.returncode == 0, res.stderr
    res = cli("blk", "write-zeroes", t, "--offset", "2M", "--length", "4k", "--unmap")
    assert res.returncode == 0 and b"zeroed 4096 bytes" in res.stdout, res.stderr
    res = cli("blk", "discard", t, "--offset", "12M", "--length", "4M")
    assert res.returncode == 0 and b"discarded" in res.stdout, res.stderr
    res = cli("blk", "flush", t)
    assert res.returncode == 0 and res.stdout == b"flushed\n"
    res = cli("blk", "get-id", t)
    assert res.returncode == 0 and res.stdout == b"vhost_user_blk\n", res.stderr  # qemu-storage-daemon's id

    # Errors: one line, exit 1, nothing sent.
    assert_one_line_error(cli("blk", "read", t, "--offset", "100", "--length", "512"), "block size 512")
    res = cli("blk", "read", t, "--offset", "16M", "--length", "512")
    assert_one_line_error(res, "beyond the device capacity")
    res = cli("blk", "write", t, "--offset", "0", "--input", "-", input=b"x" * 100)
    assert_one_line_error(res, "not a multiple of the block size")

    qsd_raw.stop()
    with open(qsd_raw.image, "rb") as f:
        image = f.read()
    expected = bytearray(b"\xa5" * 8192 + b"\x5a" * 1024)
    assert image[: len(expected)] == expected
    assert image[1 << 20 : 4 << 20] == payload[: 1 << 20] + bytes(4096) + payload[(1 << 20) + 4096 :]


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_read_into_closed_pipe_is_quiet(qsd_null: Qsd) -> None:
    argv = ["blk", "read", qsd_null.target, "--offset", "0", "--length", "64M"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(4096)) == 4096
    proc.stdout.close()  # like `| head -c 4096`
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(20) == 1
    assert b"Traceback" not in err and err == b""


@pytest.mark.peer
@pytest.mark.timeout(30)
def test_terminal_output_paths(
    qsd_null: Qsd, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process, pretending stdout is a terminal: hexdump for read, rich tables for info.
    is_tty: Callable[[], bool] = lambda: True  # noqa: E731
    monkeypatch.setattr(cli_blk, "stdout_is_tty", is_tty)
    monkeypatch.setattr(common, "stdout_is_tty", is_tty)
    assert main(["blk", "read", qsd_null.target, "--offset", "4k", "--length", "4k"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "00001000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|",
        "*",
        "00002000",
    ]
    assert main(["info", qsd_null.target]) == 0
    out = capsys.readouterr().out
    for needle in ("Device", "blk", "Block device", "1073741824", "BLK_FLUSH"):
        assert needle in out, needle
