"""The frontend's memory, as a back end maps it: regions checked, mapped and shared.

Theory of operation
-------------------
A vhost-user frontend hands its memory over as regions, each an fd with a
guest address, a size, the frontend's own address and an offset into the
fd (SET_MEM_TABLE sends them all at once, ADD_MEM_REG one at a time with
CONFIGURE_MEM_SLOTS). The control plane (:mod:`pyvirtio.backends.control`)
decides when a request may come and stops and restarts the rings around a
change of memory; this module decides whether a region is acceptable and
maps it into a :class:`~pyvirtio.memory.MemoryTable`, the bounds-checked
translation every ring address then goes through. Every failure is a
:class:`~pyvirtio.errors.ProtocolViolation` (the connection is dropped), and
every fd handed to a function here is owned by it from then on: kept by the
mapping, or closed.

Memory: each region is mapped with :class:`~pyvirtio.memory.Region` after
checking that its fd is a regular file (memfd, hugetlbfs, tmpfs) at least
``mmap_offset + memory_size`` long, and sealed against shrinking when the
memfd allows sealing. A frontend that truncates an *unsealed* file after
handing it over can still make an access fault (SIGBUS); pure Python cannot
catch that, so it is a documented limit, as for every mmap-based back end.

Regions added one by one (CONFIGURE_MEM_SLOTS) may come more than once.
vhost-user.rst, "Multiple queue support": "As all queues share one
connection, the front-end uses a unique index for each queue"; QEMU (7.2 and
later) drives a multi-queue vhost-user-net device as one ``vhost_dev`` per
queue pair over that one connection, and each ``vhost_dev`` keeps its own
shadow of the regions it sent (hw/virtio/vhost-user.c,
``vhost_user_add_remove_regions``): every queue pair sends ADD_MEM_REG for
the same guest RAM, and REM_MEM_REG for it when its own view of memory
changes. libvhost-user of that time appends the duplicate and removes every
identical copy at the first REM_MEM_REG. Here, tolerant where it is safe:
an ADD_MEM_REG identical to a region already mapped (guest address, size,
user address, mmap offset, and an fd on the same file: same st_dev and
st_ino, hence the same memory) takes one more reference to that mapping
and its fd is closed (:func:`add_region`); each REM_MEM_REG naming it
(vhost-user.rst: "identified by its guest address, user address and size.
The mmap offset is ignored.") drops one, and the mapping goes with the last,
so a queue pair still running never loses its memory to another's removal.
Strict where safety needs it: a region that overlaps a mapped one in guest
address without being identical (other memory, or the same memory at
another offset) stays a protocol violation, as does a REM_MEM_REG that
names no mapped region. A duplicate takes no memory slot; at most
:data:`MAX_MEM_SLOTS` distinct regions are mapped.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Sequence

from pyvirtio.backends.ringstate import close_fd
from pyvirtio.errors import ProtocolViolation
from pyvirtio.memory import PAGE_SIZE, MemoryTable, Region
from pyvirtio.protocol import vhost_user as vu

log = logging.getLogger("pyvirtio.backends")

__all__ = ["MAX_MEM_SLOTS", "add_region", "map_table"]

#: GET_MAX_MEM_SLOTS answer (qemu-storage-daemon's value).
MAX_MEM_SLOTS = 32


def _seal_shrink(fd: int) -> None:
    """Forbid shrinking a memfd that allows sealing, so the mapping cannot fault later."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            raise


def _map_region(region: vu.MemRegion, fd: int) -> Region:
    """Check and map one region; takes ownership of ``fd`` (closed on failure)."""
    try:
        size = region.memory_size
        offset = region.mmap_offset
        if size == 0:
            raise ProtocolViolation("memory region of size 0")
        for what, start in (("guest", region.guest_phys_addr), ("frontend", region.userspace_addr)):
            if start + size > 1 << 64:
                raise ProtocolViolation(f"memory region at {what} address 0x{start:x}+{size} wraps")
        if offset % PAGE_SIZE:
            raise ProtocolViolation(f"memory region mmap_offset 0x{offset:x} is not page aligned")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolViolation("memory region fd is not a regular file (memfd, tmpfs, hugetlbfs)")
        if st.st_size < offset + size:
            raise ProtocolViolation(
                f"memory region of {size} bytes at offset {offset} exceeds its file ({st.st_size} bytes)"
            )
        _seal_shrink(fd)
        try:
            mapped = Region(fd, size, fd_offset=offset, guest_addr=region.guest_phys_addr, owns_fd=True)
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolViolation(f"cannot map memory region: {exc}") from None
    except BaseException:
        close_fd(fd)
        raise
    return mapped


def _add_mapping(table: MemoryTable, region: vu.MemRegion, fd: int) -> None:
    """Map ``region`` (:func:`_map_region`) and add it to ``table``; takes ownership of ``fd``."""
    mapped = _map_region(region, fd)
    try:
        table.add(mapped, region.guest_phys_addr, region.userspace_addr)
    except BaseException:
        mapped.close()
        raise


def map_table(regions: Sequence[vu.MemRegion], fds: list[int]) -> MemoryTable:
    """SET_MEM_TABLE's regions, mapped into a new table; takes the fds out of ``fds`` (all closed on failure)."""
    table = MemoryTable(ProtocolViolation)
    try:
        taken = fds[:]
        fds.clear()
        for i, region in enumerate(regions):
            fd = taken[i]
            taken[i] = -1
            _add_mapping(table, region, fd)
    except BaseException:
        for fd in taken:
            if fd >= 0:
                close_fd(fd)
        table.close()
        raise
    return table


def add_region(table: MemoryTable, value: vu.MemRegion, fd: int) -> None:
    """ADD_MEM_REG: map ``value`` into ``table``, or share the identical mapping there; takes ownership of ``fd``."""
    # A region identical to one mapped (the same memory: see the module docstring)
    # is another reference to it; the duplicate fd is closed unused.
    try:
        shared = table.share(value.guest_phys_addr, value.memory_size, value.userspace_addr, value.mmap_offset, fd)
    except BaseException:
        close_fd(fd)
        raise
    if shared is not None:
        close_fd(fd)
        log.debug("ADD_MEM_REG at gpa 0x%x: already mapped, %d references", shared.guest_phys_addr, shared.refs)
        return
    if len(table) >= MAX_MEM_SLOTS:
        close_fd(fd)
        raise ProtocolViolation(f"ADD_MEM_REG beyond {MAX_MEM_SLOTS} memory slots")
    _add_mapping(table, value, fd)
