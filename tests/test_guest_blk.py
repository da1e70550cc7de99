"""A Linux guest's virtio_blk driver on ``pyvirtio serve blk`` through QEMU's ``vhost-user-blk-pci``.

One guest boot (2 vCPUs) with two disks, each its own back end over a file:
``q1`` (1 request queue, PCI slot 04) and ``q2`` (``num-queues=2`` and
``--queues 2``, slot 05). The host fills regions of the backing files before
boot; the guest reads them (O_DIRECT, once pinned to each vCPU, so on ``q2``
both queues carry requests), writes its own patterns at the start, the end and
an odd sector, discards a range, and reports checksums, sizes, the serial
(GET_ID) and per-queue interrupt counts. After the guest powered off and the
back ends were stopped, the host reads the backing files. Stock device
options; see docs/testing.md for the stage as a whole.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest.harness import BLK_MODULES, Guest
from guest.kernel import Kernel
from guest.qemu import GuestRun

pytest_plugins = ["guest.fixtures"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(300)]

BLOCK = 4096
#: tag -> (PCI slot, disk size, request queues); the sizes differ so a swapped disk shows.
DISKS = {"q1": ("04", 32 << 20, 1), "q2": ("05", 48 << 20, 2)}
READ_BLOCK, READ_COUNT = 256, 64  # host-written, read by the guest
DISCARD_BLOCK, DISCARD_COUNT = 1024, 64  # host-written, discarded by the guest
PATTERN_BLOCKS = 32  # guest-written at block 0 and at the last 32 blocks
SMALL_SECTOR, SMALL_BYTES = 20001, 1536  # guest-written with 512-byte blocks at an odd sector

SCRIPT = rf"""
for spec in {" ".join(f'"{t} {slot}"' for t, (slot, _s, _q) in DISKS.items())}; do
    set -- $spec; t=$1
    d=$(disk_at $2 vd) || {{ result ${{t}}_disk none; continue; }}
    result ${{t}}_disk $d
    sectors=$(cat /sys/block/$d/size)
    result ${{t}}_sectors $sectors
    result ${{t}}_serial "$(cat /sys/block/$d/serial)"
    result ${{t}}_hw_queues $(ls /sys/block/$d/mq | wc -l)
    for cpu in 1 2; do
        taskset -p $cpu $$ >/dev/null
        result ${{t}}_read_cpu$cpu $(sha $d {READ_BLOCK} {READ_COUNT})
    done
    taskset -p 3 $$ >/dev/null
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
    v=$(basename "$(readlink -f /sys/block/$d/device)")
    result ${{t}}_irq_q0 "$(irqs $v-req.0)"
    result ${{t}}_irq_q1 "$(irqs $v-req.1)"
done
"""


@dataclass
class Disk:
    tag: str
    image: Path
    size: int
    host_read: bytes  # what the host wrote where the guest reads
    host_discard: bytes  # what the host wrote where the guest discards, with one guard block either side
    pattern: bytes  # what the guest writes at the start and the end
    small: bytes  # what the guest writes at SMALL_SECTOR


@dataclass
class BlkOutcome:
    run: GuestRun
    disks: dict[str, Disk]
    guest: Guest

    def context(self) -> str:
        return f"{self.run.describe()}\n{self.guest.backend_report()}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def region(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture(scope="module")
def blk(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlkOutcome]:
    rng = random.Random(0x9B1C)
    with Guest(guest_kernel, tmp_path_factory.mktemp("guest-blk")) as g:
        disks: dict[str, Disk] = {}
        devices: list[str] = []
        files: dict[str, bytes] = {}
        for tag, (slot, size, queues) in DISKS.items():
            d = Disk(tag, g.workdir / f"{tag}.img", size, rng.randbytes(READ_COUNT * BLOCK),
                     rng.randbytes((DISCARD_COUNT + 2) * BLOCK), rng.randbytes(PATTERN_BLOCKS * BLOCK),
                     rng.randbytes(SMALL_BYTES))
            with open(d.image, "wb") as f:
                f.truncate(size)
                f.seek(READ_BLOCK * BLOCK)
                f.write(d.host_read)
                f.seek((DISCARD_BLOCK - 1) * BLOCK)
                f.write(d.host_discard)
            disks[tag] = d
            files[f"data/{tag}.bin"] = d.pattern
            files[f"data/{tag}.small"] = d.small
            served = g.serve(tag, "blk", "--file", str(d.image), "--queues", str(queues))
            devices += [*served.qemu_chardev(),
                        "-device", f"vhost-user-blk-pci,chardev={tag},num-queues={queues},addr={slot}"]
        run = g.boot(SCRIPT, devices, modules=BLK_MODULES, files=files, smp=2)
        g.close()
        yield BlkOutcome(run, disks, g)


def test_guest_script_ran_to_its_end(blk: BlkOutcome) -> None:
    blk.run.check()
    assert not blk.run.duplicates, blk.context()


@pytest.mark.parametrize("tag", DISKS)
def test_guest_sees_the_disk(blk: BlkOutcome, tag: str) -> None:
    """Capacity (config), serial (GET_ID request) and the queue count the guest's blk-mq uses."""
    run, d = blk.run, blk.disks[tag]
    assert run.result(f"{tag}_disk") != "none", blk.context()
    assert run.int_result(f"{tag}_sectors") == d.size // 512, blk.context()
    assert run.result(f"{tag}_serial") == "pyvirtio", blk.context()
    assert run.int_result(f"{tag}_hw_queues") == DISKS[tag][2], blk.context()


@pytest.mark.parametrize("tag", DISKS)
def test_guest_reads_what_the_host_wrote(blk: BlkOutcome, tag: str) -> None:
    want = sha(blk.disks[tag].host_read)
    for cpu in (1, 2):
        assert blk.run.result(f"{tag}_read_cpu{cpu}") == want, blk.context()


@pytest.mark.parametrize("tag", DISKS)
def test_guest_writes_reach_the_backing_file(blk: BlkOutcome, tag: str) -> None:
    d = blk.disks[tag]
    assert blk.run.int_result(f"{tag}_write_status") == 0, blk.context()
    last = d.size - PATTERN_BLOCKS * BLOCK
    assert region(d.image, 0, len(d.pattern)) == d.pattern
    assert region(d.image, last, len(d.pattern)) == d.pattern
    assert region(d.image, SMALL_SECTOR * 512, SMALL_BYTES) == d.small
    # The sectors around the small write are untouched (still zero: the host never wrote there).
    assert region(d.image, SMALL_SECTOR * 512 - 512, 512) == bytes(512)
    assert region(d.image, SMALL_SECTOR * 512 + SMALL_BYTES, 512) == bytes(512)
    # The guest read back what it wrote, through the device.
    assert blk.run.result(f"{tag}_readback_first") == sha(d.pattern), blk.context()
    assert blk.run.result(f"{tag}_readback_last") == sha(d.pattern), blk.context()
    # What the host wrote for the guest to read is still there.
    assert region(d.image, READ_BLOCK * BLOCK, len(d.host_read)) == d.host_read


@pytest.mark.parametrize("tag", DISKS)
def test_guest_discard_zeroes_the_range(blk: BlkOutcome, tag: str) -> None:
    d = blk.disks[tag]
    assert blk.run.int_result(f"{tag}_discard_status") == 0, blk.context()
    zeros = bytes(DISCARD_COUNT * BLOCK)
    assert region(d.image, DISCARD_BLOCK * BLOCK, len(zeros)) == zeros
    assert blk.run.result(f"{tag}_readback_discarded") == sha(zeros), blk.context()
    # The guard blocks on either side were not discarded.
    assert region(d.image, (DISCARD_BLOCK - 1) * BLOCK, BLOCK) == d.host_discard[:BLOCK]
    assert region(d.image, (DISCARD_BLOCK + DISCARD_COUNT) * BLOCK, BLOCK) == d.host_discard[-BLOCK:]


def test_both_queues_of_the_two_queue_disk_completed_requests(blk: BlkOutcome) -> None:
    """Reads pinned to each vCPU go to that vCPU's queue: each queue's MSI-X vector fired."""
    assert blk.run.int_result("q2_irq_q0") > 0, blk.context()
    assert blk.run.int_result("q2_irq_q1") > 0, blk.context()
    assert blk.run.int_result("q1_irq_q0") > 0, blk.context()
    assert blk.run.result("q1_irq_q1") == "", blk.context()  # one queue: no second vector


def test_back_ends_saw_no_fault_and_exited_cleanly(blk: BlkOutcome) -> None:
    for tag, served in blk.guest.backends.items():
        assert blk.guest.exit_status[tag] == 0, blk.context()
        assert served.faults() == [], blk.context()
