"""The data checks every guest disk gets, whatever driver shows it (virtio_blk's vdX, sd's sdX).

Theory of operation. Before boot the host writes random data into two regions
of a disk's backing file (:func:`prepare_disk`): one the guest only reads,
one it discards, with a guard block either side. The guest's
:data:`EXERCISE_SH` function ``exercise TAG DEV`` then, on ``/dev/DEV``:

* reports the size in 512-byte sectors and the logical block size;
* reads the host's region with O_DIRECT once pinned to each vCPU in turn
  (``taskset -p``; on a multi-queue disk each vCPU submits to its own queue)
  and reports its SHA-256;
* writes its own pattern (a data file of the initramfs) at block 0 and over
  the last blocks, and a short pattern with 512-byte blocks at an odd
  sector, all O_DIRECT + fsync;
* discards the second region (``blkdiscard``);
* reads back, past the page cache, what it wrote and what it discarded.

Every line is ``RESULT TAG_key=value``. After the guest and the back end have
stopped, :class:`DiskTests` compares the reports with the host's data and
reads the backing file: what the guest wrote must be there, exactly where
it was written (the neighbouring sectors untouched), the discarded blocks
zero (the embedded back ends promise zeroes after a discard), the guard
blocks intact. A test module subclasses :class:`DiskTests` and provides the
``disks`` fixture (a :class:`DiskOutcome`) and ``tag = tag_fixture(tags)``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness import Guest
from .qemu import GuestRun

BLOCK = 4096
READ_BLOCK, READ_COUNT = 256, 64  # host-written, read by the guest
DISCARD_BLOCK, DISCARD_COUNT = 1024, 64  # host-written, discarded by the guest (plus a guard block each side)
PATTERN_BLOCKS = 32  # guest-written at block 0 and over the last 32 blocks
SMALL_SECTOR, SMALL_BYTES = 20001, 1536  # guest-written with 512-byte blocks at an odd sector
#: The smallest disk the layout fits on.
MIN_SIZE = (DISCARD_BLOCK + DISCARD_COUNT + 1 + PATTERN_BLOCKS) * BLOCK

EXERCISE_SH = rf"""
# exercise TAG DEV: the disk checks of tests/guest/disks.py on /dev/DEV; results are TAG_key=value.
exercise() {{
    t=$1; d=$2
    result ${{t}}_disk $d
    sectors=$(cat /sys/block/$d/size)
    result ${{t}}_sectors $sectors
    result ${{t}}_logical_block $(cat /sys/block/$d/queue/logical_block_size)
    cpus=$(grep -c ^processor /proc/cpuinfo)
    cpu=0
    while [ $cpu -lt $cpus ]; do
        taskset -p $((1 << cpu)) $$ >/dev/null
        result ${{t}}_read_cpu$cpu $(sha $d {READ_BLOCK} {READ_COUNT})
        cpu=$((cpu + 1))
    done
    taskset -p $(((1 << cpus) - 1)) $$ >/dev/null
    last=$((sectors / 8 - {PATTERN_BLOCKS}))
    put /data/$t.bin $d 0 && put /data/$t.bin $d $last && \
        dd if=/data/$t.small of=/dev/$d bs=512 seek={SMALL_SECTOR} oflag=direct conv=fsync 2>/dev/null
    result ${{t}}_write_status $?
    blkdiscard -o $(({DISCARD_BLOCK} * 4096)) -l $(({DISCARD_COUNT} * 4096)) /dev/$d
    result ${{t}}_discard_status $?
    sync
    result ${{t}}_readback_first $(sha $d 0 {PATTERN_BLOCKS})
    result ${{t}}_readback_last $(sha $d $last {PATTERN_BLOCKS})
    result ${{t}}_readback_discarded $(sha $d {DISCARD_BLOCK} {DISCARD_COUNT})
}}
"""


@dataclass
class Disk:
    """A backing file and the data host and guest put on it."""

    tag: str
    image: Path
    size: int
    host_read: bytes  # what the host wrote where the guest reads
    host_discard: bytes  # what the host wrote where the guest discards, with a guard block either side
    pattern: bytes  # what the guest writes at the start and the end
    small: bytes  # what the guest writes at SMALL_SECTOR

    def region(self, offset: int, length: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length)


def prepare_disk(tag: str, image: Path, size: int, rng: random.Random) -> Disk:
    """Create ``image`` (``size`` bytes, zero) with the host's two regions written."""
    if size < MIN_SIZE:
        raise ValueError(f"a guest test disk needs at least {MIN_SIZE} bytes")
    d = Disk(tag, image, size, rng.randbytes(READ_COUNT * BLOCK), rng.randbytes((DISCARD_COUNT + 2) * BLOCK),
             rng.randbytes(PATTERN_BLOCKS * BLOCK), rng.randbytes(SMALL_BYTES))
    with open(image, "wb") as f:
        f.truncate(size)
        f.seek(READ_BLOCK * BLOCK)
        f.write(d.host_read)
        f.seek((DISCARD_BLOCK - 1) * BLOCK)
        f.write(d.host_discard)
    return d


def disk_files(disks: dict[str, Disk]) -> dict[str, bytes]:
    """The initramfs data files ``exercise`` writes: ``data/TAG.bin`` and ``data/TAG.small``."""
    files = {}
    for tag, d in disks.items():
        files[f"data/{tag}.bin"] = d.pattern
        files[f"data/{tag}.small"] = d.small
    return files


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class DiskOutcome:
    """One guest run over some disks, after the guest and the back ends stopped."""

    run: GuestRun
    guest: Guest
    disks: dict[str, Disk] = field(default_factory=dict)
    cpus: int = 2

    def context(self) -> str:
        """The guest's console and the back ends' logs, for assertion messages."""
        return f"{self.run.describe()}\n{self.guest.backend_report()}"


def tag_fixture(tags: Iterable[str]) -> Callable[[pytest.FixtureRequest], str]:
    """The ``tag`` fixture of a test module: one parameter per disk tag (``tag = tag_fixture(DISKS)``)."""

    @pytest.fixture(name="tag", params=list(tags))
    def tag(request: pytest.FixtureRequest) -> str:
        value: str = request.param
        return value

    return tag


class DiskTests:
    """Tests for every disk of a ``disks`` fixture (:class:`DiskOutcome`), parametrised by ``tag``."""

    def test_guest_script_ran_to_its_end(self, disks: DiskOutcome) -> None:
        disks.run.check()
        assert not disks.run.duplicates, disks.context()

    def test_guest_sees_the_disk_size(self, disks: DiskOutcome, tag: str) -> None:
        run, d = disks.run, disks.disks[tag]
        assert run.result(f"{tag}_disk") != "none", disks.context()
        assert run.int_result(f"{tag}_sectors") == d.size // 512, disks.context()
        assert run.int_result(f"{tag}_logical_block") == 512, disks.context()

    def test_guest_reads_what_the_host_wrote(self, disks: DiskOutcome, tag: str) -> None:
        want = sha(disks.disks[tag].host_read)
        for cpu in range(disks.cpus):
            assert disks.run.result(f"{tag}_read_cpu{cpu}") == want, disks.context()

    def test_guest_writes_reach_the_backing_file(self, disks: DiskOutcome, tag: str) -> None:
        d = disks.disks[tag]
        assert disks.run.int_result(f"{tag}_write_status") == 0, disks.context()
        last = d.size - PATTERN_BLOCKS * BLOCK
        assert d.region(0, len(d.pattern)) == d.pattern
        assert d.region(last, len(d.pattern)) == d.pattern
        small = SMALL_SECTOR * 512
        assert d.region(small, SMALL_BYTES) == d.small
        # The sectors around the short write stay zero (the host never wrote there).
        assert d.region(small - 512, 512) == bytes(512)
        assert d.region(small + SMALL_BYTES, 512) == bytes(512)
        # The guest read back through the device what it wrote.
        assert disks.run.result(f"{tag}_readback_first") == sha(d.pattern), disks.context()
        assert disks.run.result(f"{tag}_readback_last") == sha(d.pattern), disks.context()
        # What the host wrote for the guest to read is unchanged.
        assert d.region(READ_BLOCK * BLOCK, len(d.host_read)) == d.host_read

    def test_guest_discard_zeroes_the_range(self, disks: DiskOutcome, tag: str) -> None:
        d = disks.disks[tag]
        assert disks.run.int_result(f"{tag}_discard_status") == 0, disks.context()
        zeros = bytes(DISCARD_COUNT * BLOCK)
        assert d.region(DISCARD_BLOCK * BLOCK, len(zeros)) == zeros
        assert disks.run.result(f"{tag}_readback_discarded") == sha(zeros), disks.context()
        # The guard blocks either side were not discarded.
        assert d.region((DISCARD_BLOCK - 1) * BLOCK, BLOCK) == d.host_discard[:BLOCK]
        assert d.region((DISCARD_BLOCK + DISCARD_COUNT) * BLOCK, BLOCK) == d.host_discard[-BLOCK:]

    def test_back_ends_saw_no_fault_and_exited_cleanly(self, disks: DiskOutcome) -> None:
        for name, served in disks.guest.backends.items():
            assert disks.guest.exit_status[name] == 0, disks.context()
            assert served.faults() == [], disks.context()


__all__ = [
    "BLOCK",
    "EXERCISE_SH",
    "Disk",
    "DiskOutcome",
    "DiskTests",
    "disk_files",
    "prepare_disk",
    "sha",
    "tag_fixture",
]
