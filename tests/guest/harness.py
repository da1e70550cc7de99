"""One guest test session: back ends started, a guest booted against them, everything stopped.

:class:`Guest` ties the pieces together for a test: :meth:`Guest.serve`
starts a ``pyvirtio serve`` back end (:mod:`guest.backends`),
:meth:`Guest.boot` builds an initramfs from a script, a module list and data
files (:mod:`guest.initramfs`) and runs QEMU with the given device arguments
(:mod:`guest.qemu`), and :meth:`Guest.close` (or leaving the ``with`` block)
stops every back end by its PID and records its exit status. Nothing in here
knows about a particular device type: the tests say which modules, devices
and checks they want, so the PCI transport's guest stage (pyvirtio itself
inside the guest, against QEMU's emulated devices) uses the same class with
other modules (``uio_pci_generic``, 9p) and other devices.

The host's root in the guest (``host_root=True``): the host's ``/`` is
shared read-only over 9p (``virtio-9p-pci`` at slot :data:`HOST_ROOT_SLOT`,
driven by the guest's own virtio-pci), and the script gets
:data:`HOST_ROOT_SH`: ``host_root`` mounts it on ``/host`` with proc, sys,
devtmpfs and a tmpfs on /tmp inside (with the checkout and the interpreter's
environment bound back when they live under the host's /tmp, as in a CI
clone), and ``in_host CMD...`` runs a command
chrooted there, so this checkout's Python and pytest run in the guest
unchanged (``host_python`` is this interpreter with ``PYTHONPATH`` set to
the checkout's ``src`` and ``tests``). What a test writes in ``/host/tmp``
stays in the guest.

:func:`require_guest` checks the pieces a guest run needs (QEMU, a static
busybox, the Debian kernel) and raises :class:`GuestUnavailable` naming the
missing one.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .backends import Served, start_serve
from .initramfs import build_initramfs, busybox_path
from .kernel import GuestUnavailable, Kernel, debian_kernel
from .qemu import GuestRun, qemu_binary, run_guest

#: Modules of the virtio-pci transport (the guest's own driver of the PCI function).
VIRTIO_PCI_MODULES = ("virtio_pci",)
BLK_MODULES = (*VIRTIO_PCI_MODULES, "virtio_blk")
SCSI_MODULES = (*VIRTIO_PCI_MODULES, "virtio_scsi", "sd_mod")
NET_MODULES = (*VIRTIO_PCI_MODULES, "virtio_net")
#: The host's root over 9p.
HOST_ROOT_MODULES = (*VIRTIO_PCI_MODULES, "9pnet_virtio", "9p")
#: PCI slot of the 9p device (clear of the slots tests give their devices, and of q35's own at 0x1f).
HOST_ROOT_SLOT = 0x1E
_CHECKOUT = Path(__file__).resolve().parents[2]
#: What the guest must still see of the host's /tmp once its own tmpfs is there: this
#: checkout and this interpreter's environment when they live under /tmp (CI clones there).
_KEEP_FROM_TMP = sorted(
    {str(p) for p in (_CHECKOUT, Path(sys.prefix).resolve()) if str(p).startswith("/tmp/")}
)
_KEEP_SH = "".join(
    f" &&\n        mkdir -p /host{p} && mount -o bind /hosttmp{p[len('/tmp'):]} /host{p}" for p in _KEEP_FROM_TMP
)

#: Shell helpers for a guest with the host's root (see the module docstring).
HOST_ROOT_SH = rf"""
host_root() {{
    mkdir -p /host /hosttmp &&
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host || return 1
    mount -o bind /host/tmp /hosttmp &&
    mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys && mount -t devtmpfs devtmpfs /host/dev &&
        mount -t tmpfs tmpfs /host/tmp{_KEEP_SH}
}}
in_host() {{ chroot /host /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp "$@"; }}
host_python() {{
    in_host PYTHONPATH={_CHECKOUT}/src:{_CHECKOUT}/tests PYTHONDONTWRITEBYTECODE=1 {sys.executable} "$@"
}}
"""


def host_root_devices() -> list[str]:
    """QEMU arguments sharing the host's root read-only over 9p (mount tag ``hostroot``)."""
    return [
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr=0x{HOST_ROOT_SLOT:x}",
    ]


def require_guest() -> Kernel:
    """The kernel, after checking QEMU and busybox; :class:`GuestUnavailable` names a missing piece."""
    qemu_binary()
    busybox_path()
    return debian_kernel()


class Guest:
    """Back ends and guest runs of one test, stopped together (see the module docstring)."""

    def __init__(self, kernel: Kernel, workdir: Path) -> None:
        self.kernel = kernel
        self.workdir = workdir
        self.backends: dict[str, Served] = {}
        #: Exit status of each back end, filled by :meth:`close`.
        self.exit_status: dict[str, int | None] = {}
        self.runs: list[GuestRun] = []

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def serve(self, name: str, device: str, *args: str) -> Served:
        """Start ``pyvirtio serve DEVICE ARGS`` as back end ``name`` (also its QEMU chardev id)."""
        if name in self.backends:
            raise ValueError(f"back end {name!r} started twice")
        served = start_serve(name, device, self.workdir, *args)
        self.backends[name] = served
        return served

    def boot(
        self,
        script: str,
        devices: Sequence[str] = (),
        *,
        modules: Sequence[str] = (),
        files: Mapping[str, bytes] | None = None,
        smp: int = 1,
        memory_mb: int = 512,
        timeout: float = 150.0,
        host_root: bool = False,
        machine: str = "pc",
        cmdline: str = "",
        cpu: str = "",
    ) -> GuestRun:
        """Build an initramfs running ``script`` (see :mod:`guest.initramfs`) and boot it with ``devices``.

        ``host_root``: share the host's root (module docstring); ``machine``,
        ``cmdline`` and ``cpu`` go to :func:`~guest.qemu.run_guest`.
        """
        n = len(self.runs)
        rundir = self.workdir / f"run{n}"
        rundir.mkdir(parents=True, exist_ok=True)
        initrd = rundir / "initramfs.cpio"
        if host_root:
            script = HOST_ROOT_SH + script
            modules = (*HOST_ROOT_MODULES, *modules)
            devices = (*devices, *host_root_devices())
        build_initramfs(initrd, self.kernel, script, modules=modules, files=files)
        run = run_guest(self.kernel, initrd, rundir, devices, memory_mb=memory_mb, smp=smp, timeout=timeout,
                        machine=machine, cmdline=cmdline, cpu=cpu)
        self.runs.append(run)
        return run

    def close(self) -> None:
        """Stop every back end by PID (SIGTERM, then SIGKILL) and record its exit status."""
        for name, served in self.backends.items():
            if name not in self.exit_status:
                self.exit_status[name] = served.stop()

    def backend_report(self) -> str:
        """Each back end's exit status and the tail of its log (for failure messages)."""
        parts = []
        for name, served in self.backends.items():
            status = self.exit_status.get(name, "running")
            parts.append(f"--- back end {name} ({' '.join(served.argv[3:])}), exit {status} ---\n"
                         + "\n".join(served.log_text().splitlines()[-30:]))
        return "\n".join(parts)


__all__ = [
    "BLK_MODULES",
    "HOST_ROOT_MODULES",
    "HOST_ROOT_SH",
    "HOST_ROOT_SLOT",
    "NET_MODULES",
    "SCSI_MODULES",
    "VIRTIO_PCI_MODULES",
    "Guest",
    "GuestUnavailable",
    "host_root_devices",
    "require_guest",
]
