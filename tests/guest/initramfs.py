"""The guest's initramfs: busybox, kernel modules, data files and an ``/init`` script.

Theory of operation. Linux unpacks an initramfs in the "newc" cpio format
(Documentation/driver-api/early-userspace/buffer-format.rst) into its root
tmpfs and runs ``/init``. :class:`Initramfs` collects entries (directories,
files, symlinks, device nodes) and :meth:`Initramfs.write` serialises them
itself, so no ``cpio`` program, root rights or ``mknod`` are needed (the
``/dev/console`` node, which the kernel opens for ``/init``'s standard
streams before devtmpfs is mounted, is just a header). The archive is left
uncompressed: it is a few MB and QEMU loads it from memory.

:func:`build_initramfs` assembles the usual image: a static busybox
(package busybox-static) as ``/bin/busybox``, the requested modules and their
dependencies (:meth:`guest.kernel.Kernel.modules`)
under ``/modules`` with their load order in ``/modules/order``, extra files,
``/test.sh`` = :data:`TEST_PROLOGUE` + the caller's script, and ``/init`` =
:data:`INIT_PROLOGUE` + ``sh /test.sh`` + :data:`INIT_EPILOGUE`. The init
prologue mounts proc, sys, devtmpfs and a tmpfs on /tmp, installs the
busybox applets and loads the modules in order; the script runs as its own
shell (so ``$$`` is its PID, e.g. for ``taskset -p``), and the epilogue
prints the end marker (see :mod:`guest.qemu`) with the script's exit status
and powers the guest off.

The script reports with ``result KEY VALUE`` (defined by the test prologue),
which prints ``RESULT KEY=VALUE`` on the console.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .kernel import GuestUnavailable, Kernel

#: Where busybox-static puts its binary on Debian.
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")

#: The shell run first: mounts, applets, modules, the ``result`` helper.
INIT_PROLOGUE = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
# The kernel asks /sbin/modprobe for crypto helpers it can do without; there is no modules.dep here.
echo /bin/true > /proc/sys/kernel/modprobe
echo "GUEST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
while read -r mod; do
    insmod "/modules/$mod.ko" || echo "GUEST-INSMOD-FAILED $mod"
done < /modules/order
"""

#: The start of ``/test.sh``, the caller's script (run by ``/init`` as ``sh /test.sh``).
TEST_PROLOGUE = r"""#!/bin/sh
# result KEY VALUE: one finding, as a console line the host parses.
result() { echo "RESULT $1=$2"; }
# wait_for PATH [TENTHS]: until PATH exists (default 10 s).
wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt "${2:-100}" ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
# disk_at SLOT PREFIX: the block device named PREFIX* whose PCI function is 0000:00:SLOT.0.
disk_at() {
    for d in /sys/block/$2*; do
        case "$(readlink -f "$d/device")" in *"/0000:00:$1.0/"*) basename "$d"; return 0;; esac
    done
    return 1
}
# sha DEV BLOCK4K COUNT4K: sha256 of COUNT 4 KiB blocks of DEV from block BLOCK, read past the page cache.
sha() { dd if="/dev/$1" bs=4096 skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }
# put FILE DEV BLOCK4K: write FILE to DEV at 4 KiB block BLOCK, synchronously.
put() { dd if="$1" of="/dev/$2" bs=4096 seek="$3" oflag=direct conv=fsync 2>/dev/null; }
# irqs NAME: interrupts taken by the /proc/interrupts line ending in NAME, summed over CPUs.
irqs() {
    awk -v n="$1" '$NF == n { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts
}
"""

#: The shell run last: the end marker with the script's exit status, then power off.
INIT_EPILOGUE = r"""
echo "GUEST-END status=$status uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""


def busybox_path() -> str:
    """The static busybox binary, or :class:`GuestUnavailable`."""
    for p in BUSYBOX_PATHS:
        if os.path.exists(p):
            if _elf_interpreter(Path(p).read_bytes()):
                raise GuestUnavailable(f"{p} is dynamically linked; apt-get install busybox-static")
            return p
    raise GuestUnavailable("busybox is not installed (apt-get install busybox-static)")


def _elf_interpreter(image: bytes) -> bool:
    """Does a 64-bit ELF executable name a program interpreter (PT_INTERP), i.e. is it dynamically linked?"""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        return True  # not an x86-64 executable: not usable as the guest's busybox either
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    return any(struct.unpack_from("<I", image, phoff + i * phentsize)[0] == 3 for i in range(phnum))


class Initramfs:
    """Entries of a newc cpio archive, written by :meth:`write`."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: int = 0) -> None:
        path = path.strip("/")
        if not path or ".." in path.split("/"):
            raise ValueError(f"bad archive path {path!r}")
        parent = os.path.dirname(path)
        if parent and parent not in self._entries:
            self.mkdir(parent)
        self._entries[path] = (mode, data, rdev)

    def mkdir(self, path: str) -> None:
        self._add(path, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, *, executable: bool = False) -> None:
        self._add(path, stat.S_IFREG | (0o755 if executable else 0o644), data)

    def symlink(self, path: str, target: str) -> None:
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int) -> None:
        self._add(path, stat.S_IFCHR | 0o600, rdev=(major << 8) | minor)

    def write(self, path: Path) -> None:
        """The archive (parents before children, then the trailer)."""
        with open(path, "wb") as f:
            for ino, (name, (mode, data, rdev)) in enumerate(sorted(self._entries.items()), start=1):
                nlink = 2 if stat.S_ISDIR(mode) else 1
                _entry(f.write, name, ino=ino, mode=mode, nlink=nlink, data=data, rdev=rdev)
            _entry(f.write, "TRAILER!!!", ino=0, mode=0, nlink=1, data=b"", rdev=0)


def _entry(write: Callable[[bytes], object], name: str, *, ino: int, mode: int, nlink: int, data: bytes,
           rdev: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    write(header + encoded + bytes(-(len(header) + len(encoded)) % 4))
    write(data + bytes(-len(data) % 4))


def build_initramfs(
    path: Path,
    kernel: Kernel,
    script: str,
    *,
    modules: Iterable[str] = (),
    files: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Write an initramfs to ``path`` that loads ``modules`` and runs ``script``; returns the load order."""
    image = Initramfs()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "modules"):
        image.mkdir(d)
    image.chardev("dev/console", 5, 1)
    image.chardev("dev/null", 1, 3)
    image.file("bin/busybox", Path(busybox_path()).read_bytes(), executable=True)
    image.symlink("bin/sh", "busybox")
    order = []
    for info, file in kernel.modules(modules):
        image.file(f"modules/{info.name}.ko", file.read_bytes())
        order.append(info.name)
    image.file("modules/order", "".join(f"{m}\n" for m in order).encode())
    for name, data in (files or {}).items():
        image.file(name, data)
    image.file("test.sh", (TEST_PROLOGUE + script + "\n").encode(), executable=True)
    image.file("init", (INIT_PROLOGUE + "sh /test.sh\nstatus=$?\n" + INIT_EPILOGUE).encode(), executable=True)
    image.write(path)
    return order


__all__ = ["INIT_EPILOGUE", "INIT_PROLOGUE", "Initramfs", "build_initramfs", "busybox_path"]
