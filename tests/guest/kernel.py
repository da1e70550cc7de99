"""A Debian kernel and its modules for the test guest, fetched once and cached.

Theory of operation. The guest runs Debian's own kernel (the package the
``linux-image-amd64`` metapackage depends on, e.g. ``linux-image-6.1.0-57-amd64``),
so what is tested is the stock Linux virtio drivers, not a kernel built for us.
:func:`debian_kernel` finds that package's name with ``apt-cache depends``,
fetches it with ``apt-get download`` (root or not; CI has run ``apt-get
update``) into a cache directory keyed by the kernel version, and reads the
``.deb`` once as a stream (``dpkg-deb --fsys-tarfile``):

* ``vmlinuz`` is kept;
* every module's ``.modinfo`` ELF section is read for its name and ``depends=``
  list, and ``modules.builtin`` for what is compiled in; the result is
  ``index.json`` (the package ships no ``modules.dep``: depmod writes it at
  install time, and this machine need not have kmod);
* the ``.deb`` is kept, and module files are extracted from it on demand
  (:meth:`Kernel.modules`), so the cache holds ~75 MB instead of the 400 MB
  of an unpacked package.

Once cached, nothing needs the network or apt: if apt cannot name the current
package (no apt, no lists), or names one that cannot be downloaded, the newest
cached kernel is used.
``PYVIRTIO_GUEST_KERNEL`` (a version such as ``6.1.0-57-amd64``) pins one.
The cache is ``$PYVIRTIO_GUEST_CACHE``, else ``$XDG_CACHE_HOME/pyvirtio-guest``
(``~/.cache/pyvirtio-guest``), else a directory under the temporary directory;
writers take an ``flock`` on the version's directory and files appear by
rename, so concurrent test runs share it safely.

A missing piece (no apt-get or dpkg-deb, a failed download, nothing cached)
raises :class:`GuestUnavailable`: the fixtures turn it into a skip on a
developer machine and a failure under ``CI=true``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: The metapackage whose dependency names the current kernel package.
METAPACKAGE = "linux-image-amd64"
_PACKAGE_RE = re.compile(r"^linux-image-(\d[\w.+-]*-amd64)$")
_INDEX_FORMAT = 1


class GuestUnavailable(Exception):
    """A piece the guest stage needs is missing on this machine (a tool, a package, the network)."""


@dataclass(frozen=True)
class ModuleInfo:
    """One loadable module of the kernel package."""

    name: str
    path: str  # relative to lib/modules/<version>/
    depends: tuple[str, ...]


def cache_root() -> Path:
    """Where kernels are cached (see the module docstring)."""
    env = os.environ.get("PYVIRTIO_GUEST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(xdg) / "pyvirtio-guest"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"pyvirtio-guest-{os.getuid()}"


class Kernel:
    """A cached kernel: ``vmlinuz`` plus on-demand module extraction (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        with open(directory / "index.json") as f:
            index = json.load(f)
        if index.get("format") != _INDEX_FORMAT:
            raise GuestUnavailable(f"{directory}/index.json has an unknown format; remove {directory}")
        self.version: str = index["version"]
        self.deb = directory / index["deb"]
        self.vmlinuz = directory / "vmlinuz"
        self.builtin: frozenset[str] = frozenset(index["builtin"])
        self.index: dict[str, ModuleInfo] = {
            name: ModuleInfo(name, m["path"], tuple(m["depends"])) for name, m in index["modules"].items()
        }

    def __repr__(self) -> str:
        return f"Kernel({self.version!r}, {str(self.dir)!r})"

    def load_order(self, names: Iterable[str]) -> list[ModuleInfo]:
        """``names`` and everything they depend on, dependencies first; built-in modules are left out.

        An unknown name is a mistake in the caller's list (``ValueError``), not a missing piece.
        """
        order: list[ModuleInfo] = []
        done: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = _norm(name)
            if name in done or name in self.builtin:
                return
            if name in chain:
                raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            info = self.index.get(name)
            if info is None:
                raise ValueError(f"kernel {self.version} has no module {name!r}")
            for dep in info.depends:
                visit(dep, (*chain, name))
            done.add(name)
            order.append(info)

        for n in names:
            visit(n, ())
        return order

    def modules(self, names: Iterable[str]) -> list[tuple[ModuleInfo, Path]]:
        """The modules of :meth:`load_order` with their files, extracting from the ``.deb`` what is not cached."""
        order = self.load_order(names)
        root = self.dir / "modules"
        missing = {m.path for m in order if not (root / m.path).exists()}
        if missing:
            with _locked(self.dir):
                missing = {p for p in missing if not (root / p).exists()}
                if missing:
                    if not self.deb.exists():
                        raise GuestUnavailable(f"{self.deb} is gone; remove {self.dir} to fetch the kernel again")
                    with _deb_members(self.deb) as members:
                        for rel, f in members:
                            if rel.startswith("kernel/") and rel in missing:
                                _write_atomic(root / rel, f.read())
                                missing.discard(rel)
                    if missing:
                        raise GuestUnavailable(f"{self.deb} lacks {sorted(missing)}")
        return [(m, root / m.path) for m in order]


def debian_kernel(version: str | None = None) -> Kernel:
    """The current Debian kernel (or ``version``), from the cache or fetched into it."""
    root = cache_root()
    version = version or os.environ.get("PYVIRTIO_GUEST_KERNEL") or None
    pinned = version is not None
    if version is None:
        try:
            version = current_version()
        except GuestUnavailable as exc:
            cached = _cached_versions(root)
            if not cached:
                raise GuestUnavailable(f"{exc}; and no kernel is cached in {root}") from None
            version = cached[-1]
    directory = root / version
    if (directory / "index.json").exists():
        return Kernel(directory)
    try:
        with _locked(directory):
            if not (directory / "index.json").exists():
                _fetch(version, directory)
    except GuestUnavailable:
        cached = _cached_versions(root)
        if not cached or pinned:
            raise
        return Kernel(root / cached[-1])  # offline after apt learnt of a newer kernel: use the newest we have
    return Kernel(directory)


def current_version() -> str:
    """The kernel version ``linux-image-amd64`` depends on, as apt knows it (no network needed)."""
    if shutil.which("apt-cache") is None:
        raise GuestUnavailable("apt-cache is not installed (the guest kernel comes from Debian's packages)")
    proc = subprocess.run(
        ["apt-cache", "depends", METAPACKAGE], capture_output=True, text=True, timeout=60, check=False
    )
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        m = _PACKAGE_RE.match(value.strip())
        if key == "Depends" and m:
            return m.group(1)
    raise GuestUnavailable(
        f"apt-cache depends {METAPACKAGE} names no kernel package (run apt-get update?): "
        f"{(proc.stdout + proc.stderr).strip()[-300:]}"
    )


def _cached_versions(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if (p / "index.json").exists()]
    return sorted(found, key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)])


def _fetch(version: str, directory: Path) -> None:
    """Download ``linux-image-<version>`` into ``directory`` and write vmlinuz and index.json."""
    for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} is not installed ({pkg}); it fetches the guest kernel")
    package = f"linux-image-{version}"
    with tempfile.TemporaryDirectory(dir=directory, prefix="dl") as tmp:
        try:
            proc = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True,
                                  timeout=240, check=False)
        except subprocess.TimeoutExpired:
            raise GuestUnavailable(f"apt-get download {package} took more than 240 s") from None
        debs = [p for p in Path(tmp).iterdir() if p.suffix == ".deb"]
        if proc.returncode != 0 or len(debs) != 1:
            raise GuestUnavailable(
                f"apt-get download {package} failed (status {proc.returncode}): {(proc.stdout + proc.stderr)[-500:]}"
            )
        deb = directory / debs[0].name
        os.replace(debs[0], deb)
    modules: dict[str, dict[str, object]] = {}
    builtin: list[str] = []
    vmlinuz = b""
    with _deb_members(deb) as members:
        for rel, f in members:
            if rel == f"/boot/vmlinuz-{version}":
                vmlinuz = f.read()
            elif rel == "modules.builtin":
                builtin = [_norm(os.path.basename(line.strip())[:-3]) for line in f.read().decode().splitlines()
                           if line.strip().endswith(".ko")]
            elif rel.startswith("kernel/") and rel.endswith(".ko"):
                info = modinfo(f.read())
                name = _norm(info.get("name") or os.path.basename(rel)[:-3])
                deps = [_norm(d) for d in info.get("depends", "").split(",") if d]
                modules[name] = {"path": rel, "depends": deps}
    if not vmlinuz or not modules:
        raise GuestUnavailable(f"{deb.name} has no /boot/vmlinuz-{version} or no modules")
    _write_atomic(directory / "vmlinuz", vmlinuz)
    index = {"format": _INDEX_FORMAT, "version": version, "deb": deb.name, "builtin": sorted(builtin),
             "modules": modules}
    _write_atomic(directory / "index.json", json.dumps(index, indent=0, sort_keys=True).encode())


@contextmanager
def _deb_members(deb: Path) -> Iterator[Iterator[tuple[str, IO[bytes]]]]:
    """Stream the regular files of a kernel ``.deb``: ``(name, file)``, where a name under
    ``lib/modules/<version>/`` is given relative to it and any other as an absolute path."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None

    def members(tar: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.lstrip(".")
            if name.startswith("/usr/lib/"):
                name = name[4:]  # merged /usr
            m = re.match(r"^/lib/modules/[^/]+/(.*)$", name)
            rel = m.group(1) if m else name
            if ".." in rel.split("/"):
                continue
            f = tar.extractfile(member)
            if f is not None:
                yield rel, f

    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield members(tar)
    finally:
        proc.stdout.close()
        err = ""
        if proc.stderr is not None:
            err = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
        if proc.wait() not in (0, -13):  # -13: SIGPIPE when we stop reading early
            raise GuestUnavailable(f"dpkg-deb --fsys-tarfile {deb} failed: {err.strip()[-300:]}")


def modinfo(image: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a 64-bit little-endian ELF module as a dict (``depends``, ``name``...)."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", image, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx][4]
    for sh_name, _type, _flags, _addr, offset, size in sections:
        end = image.index(b"\0", strtab + sh_name)
        if image[strtab + sh_name : end] == b".modinfo":
            out: dict[str, str] = {}
            for item in image[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep and key not in out:
                    out[key] = value
            return out
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["GuestUnavailable", "Kernel", "ModuleInfo", "cache_root", "current_version", "debian_kernel", "modinfo"]
