"""The guest harness itself: archive format, module metadata, load order, console parsing, the cache, timeouts.

All but the last test run without QEMU: they check the pieces the guest tests
rely on against independent readings (a newc reader written here, an ELF
built here). The last boots a guest whose script never ends and checks that
the timeout stops QEMU by its PID and says so.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest

from guest.harness import Guest
from guest.initramfs import INIT_EPILOGUE, TEST_PROLOGUE, Initramfs
from guest.kernel import GuestUnavailable, Kernel, debian_kernel, modinfo
from guest.qemu import GuestFailed, GuestRun

pytest_plugins = ["guest.fixtures"]


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, int]]:
    """name -> (mode, data, rdev) of a newc archive, up to the trailer (an independent reader)."""
    out: dict[str, tuple[int, bytes, int]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = f[1], f[6], f[9], f[10], f[11]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        assert data[name_at + namesize - 1] == 0
        data_at = (name_at + namesize + 3) & ~3
        body = data[data_at : data_at + filesize]
        pos = (data_at + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out[name] = (mode, body, (rdevmajor << 8) | rdevminor)


def test_initramfs_is_a_newc_archive_with_parents_first(tmp_path: Path) -> None:
    image = Initramfs()
    image.file("data/a/b.bin", b"xyz")  # parents created implicitly
    image.file("init", b"#!/bin/sh\n", executable=True)
    image.symlink("bin/sh", "busybox")
    image.chardev("dev/console", 5, 1)
    image.write(tmp_path / "i.cpio")
    raw = (tmp_path / "i.cpio").read_bytes()
    entries = read_newc(raw)
    names = list(entries)
    assert names.index("data") < names.index("data/a") < names.index("data/a/b.bin")
    assert stat.S_ISDIR(entries["data/a"][0])
    assert entries["data/a/b.bin"][:2] == (stat.S_IFREG | 0o644, b"xyz")
    assert entries["init"][0] == stat.S_IFREG | 0o755
    assert entries["bin/sh"][:2] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5 << 8) | 1


def test_initramfs_refuses_paths_outside_the_root() -> None:
    with pytest.raises(ValueError):
        Initramfs().file("../etc/passwd", b"")
    with pytest.raises(ValueError):
        Initramfs().file("/", b"")


def test_init_prints_the_end_marker_the_parser_reads() -> None:
    """The epilogue's marker and the prologue's result() lines are what GuestRun.parse understands."""
    assert 'echo "RESULT $1=$2"' in TEST_PROLOGUE
    line = INIT_EPILOGUE.split("echo ", 1)[1].split("\n", 1)[0].strip('"').replace("$status", "3")
    run = GuestRun.parse([], f"RESULT k=v\n{line}\n", "", 0, 1.0, False)
    assert run.status == 3 and run.results == {"k": "v"}


def elf_with_modinfo(fields: list[bytes]) -> bytes:
    """A minimal 64-bit little-endian ELF: sections null, .modinfo, .shstrtab."""
    modinfo_data = b"\0".join(fields) + b"\0"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body = modinfo_data + shstrtab
    shoff = 64 + len(body)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)
    sections = bytes(64)
    sections += struct.pack("<IIQQQQ", 1, 1, 0, 0, 64, len(modinfo_data)).ljust(64, b"\0")
    sections += struct.pack("<IIQQQQ", 10, 3, 0, 0, 64 + len(modinfo_data), len(shstrtab)).ljust(64, b"\0")
    return bytes(header) + body + sections


def test_modinfo_reads_name_and_depends() -> None:
    image = elf_with_modinfo([b"license=GPL", b"depends=virtio_ring,virtio", b"name=virtio_pci", b"alias=x"])
    info = modinfo(image)
    assert info["depends"] == "virtio_ring,virtio"
    assert info["name"] == "virtio_pci"
    with pytest.raises(ValueError):
        modinfo(b"not an elf file at all")


def fake_kernel(tmp_path: Path, modules: dict[str, list[str]], builtin: tuple[str, ...] = (),
                version: str = "6.1.0-1-amd64") -> Path:
    d = tmp_path / version
    d.mkdir(parents=True)
    index = {"format": 1, "version": version, "deb": "k.deb", "builtin": list(builtin),
             "modules": {n: {"path": f"kernel/{n}.ko", "depends": deps} for n, deps in modules.items()}}
    (d / "index.json").write_text(json.dumps(index))
    return d


def test_load_order_puts_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    k = Kernel(fake_kernel(tmp_path, {
        "virtio_net": ["virtio", "net_failover"], "net_failover": ["failover"], "failover": [],
        "virtio": ["virtio_ring"], "virtio_ring": [], "virtio_blk": ["virtio", "crc"],
    }, builtin=("crc",)))
    order = [m.name for m in k.load_order(["virtio_net", "virtio-blk"])]  # '-' and '_' are the same name
    assert order == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net", "virtio_blk"]


def test_load_order_names_unknown_modules_and_cycles(tmp_path: Path) -> None:
    k = Kernel(fake_kernel(tmp_path, {"a": ["b"], "b": ["a"]}))
    with pytest.raises(ValueError, match="no module 'nope'"):
        k.load_order(["nope"])
    with pytest.raises(ValueError, match="cycle"):
        k.load_order(["a"])


def test_a_cached_kernel_is_used_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline once cached: with no apt-cache on PATH the newest cached version is chosen."""
    fake_kernel(tmp_path, {"m": []}, version="6.1.0-9-amd64")
    fake_kernel(tmp_path, {"m": []}, version="6.1.0-10-amd64")
    monkeypatch.setenv("PYVIRTIO_GUEST_CACHE", str(tmp_path))
    monkeypatch.delenv("PYVIRTIO_GUEST_KERNEL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert debian_kernel().version == "6.1.0-10-amd64"  # 10 > 9 as numbers
    monkeypatch.setenv("PYVIRTIO_GUEST_KERNEL", "6.1.0-9-amd64")
    assert debian_kernel().version == "6.1.0-9-amd64"


def fake_tool(directory: Path, name: str, script: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(f"#!/bin/sh\n{script}\n")
    (directory / name).chmod(0o755)


def test_a_failed_download_falls_back_to_the_newest_cached_kernel(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """apt names a newer kernel than the cache holds, but cannot download it (offline): the cached one is used,
    unless a version was pinned."""
    cache, bin_dir = tmp_path / "cache", tmp_path / "bin"
    fake_kernel(cache, {"m": []}, version="6.1.0-9-amd64")
    fake_tool(bin_dir, "apt-cache", "echo 'linux-image-amd64'; echo '  Depends: linux-image-6.1.0-99-amd64'")
    fake_tool(bin_dir, "apt-get", "echo 'E: Failed to fetch' >&2; exit 100")
    fake_tool(bin_dir, "dpkg-deb", "exit 1")
    monkeypatch.setenv("PYVIRTIO_GUEST_CACHE", str(cache))
    monkeypatch.delenv("PYVIRTIO_GUEST_KERNEL", raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert debian_kernel().version == "6.1.0-9-amd64"
    with pytest.raises(GuestUnavailable, match="Failed to fetch"):
        debian_kernel("6.1.0-99-amd64")


def test_nothing_cached_and_no_apt_is_a_missing_piece(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRTIO_GUEST_CACHE", str(tmp_path))
    monkeypatch.delenv("PYVIRTIO_GUEST_KERNEL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestUnavailable, match="apt-cache"):
        debian_kernel()


def test_console_parser_keeps_first_values_and_ignores_spliced_lines() -> None:
    serial = "\n".join([
        "GUEST-BOOTED uptime=1.5",
        "GUEST-INSMOD-FAILED virtio_foo",
        "RESULT a=1",
        "RESULT a=2",
        "[    3.1] RESULT b=spliced into a kernel message",
        "RESULT c=with spaces = and equals\r",
        "RESULT nokey",
        "GUEST-END status=0",
    ])
    run = GuestRun.parse([], serial, "", 0, 2.0, False)
    assert run.booted and run.status == 0
    assert run.results == {"a": "1", "c": "with spaces = and equals"}
    assert run.duplicates == ["a"]
    assert run.insmod_failed == ["virtio_foo"]
    with pytest.raises(GuestFailed, match="virtio_foo"):
        run.check()  # a module that did not load fails the run even though the script ended with 0
    with pytest.raises(GuestFailed, match="reported no 'b'"):
        run.result("b")
    with pytest.raises(GuestFailed, match="not a number"):
        run.int_result("c")


def test_a_run_without_the_end_marker_fails() -> None:
    run = GuestRun.parse([], "GUEST-BOOTED uptime=1\nRESULT a=1\n", "qemu: oops", 1, 3.0, False)
    assert run.status is None
    with pytest.raises(GuestFailed, match="QEMU exited with status 1") as exc:
        run.check()
    assert "qemu: oops" in str(exc.value)


def command_lines() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # not a process, or gone
    return out


@pytest.mark.peer
@pytest.mark.timeout(120)
def test_a_guest_that_never_ends_is_stopped_at_the_timeout(guest: Guest) -> None:
    run = guest.boot("result started 1\nsleep 1000\n", timeout=15)
    assert run.booted, run.describe()
    assert run.results == {"started": "1"}, run.describe()
    assert run.timed_out and run.status is None
    assert run.returncode is not None  # QEMU was stopped and reaped
    with pytest.raises(GuestFailed, match="timed out"):
        run.check()
    # No QEMU of this run is left: its command line named this run's initramfs.
    assert not [argv for argv in command_lines() if str(guest.workdir / "run0") in argv]
    assert os.path.exists(guest.workdir / "run0" / "console.log")
