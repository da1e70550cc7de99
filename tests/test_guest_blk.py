"""A Linux guest's virtio_blk driver on ``pyvirtio serve blk`` through QEMU's ``vhost-user-blk-pci``.

One guest boot (2 vCPUs) with two disks, each its own back end over a file:
``q1`` (``num-queues=1``, PCI slot 04) and ``q2`` (``num-queues=2`` and
``--queues 2``, slot 05). Each disk gets the data checks of
:mod:`guest.disks` (the host's data read in the guest, the guest's writes and
discard found in the backing file); here also the serial (a GET_ID request),
the queue count blk-mq uses, and per-queue interrupt counts showing that
both queues of ``q2`` completed requests. Stock device options; see
docs/testing.md for the stage as a whole.

Then ``q2`` is unbound from the guest's virtio-pci driver and bound again
(what a driver reload does): QEMU 7.2 stops the device (SET_STATUS 0,
SET_VRING_ENABLE 0, GET_VRING_BASE) and starts it afresh (SET_FEATURES,
status FEATURES_OK, every ring's SET_VRING_* from index 0, SET_VRING_ENABLE
1, DRIVER_OK), keeping the memory table (nothing re-sent: its shadow of the
regions did not change). The re-bound disk must serve a write that is then
found in the backing file.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from guest.disks import BLOCK, EXERCISE_SH, DiskOutcome, DiskTests, disk_files, prepare_disk, sha, tag_fixture
from guest.harness import BLK_MODULES, Guest
from guest.kernel import Kernel

pytest_plugins = ["guest.fixtures"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(300)]

#: tag -> (PCI slot, disk size, request queues); the sizes differ so a swapped disk shows.
DISKS = {"q1": ("04", 32 << 20, 1), "q2": ("05", 48 << 20, 2)}
#: Written to q2 after the rebind, at a 4 KiB block clear of the data checks' regions.
REBIND_BLOCK, REBIND_BYTES = 3000, 64 << 10
REBIND_DATA = random.Random(0x4EB1).randbytes(REBIND_BYTES)

SCRIPT = EXERCISE_SH + rf"""
for spec in {" ".join(f'"{t} {slot}"' for t, (slot, _s, _q) in DISKS.items())}; do
    set -- $spec; t=$1
    d=$(disk_at $2 vd) || {{ result ${{t}}_disk none; continue; }}
    result ${{t}}_serial "$(cat /sys/block/$d/serial)"
    result ${{t}}_hw_queues $(ls /sys/block/$d/mq | wc -l)
    exercise $t $d
    v=$(basename "$(readlink -f /sys/block/$d/device)")
    result ${{t}}_irq_q0 "$(irqs $v-req.0)"
    result ${{t}}_irq_q1 "$(irqs $v-req.1)"
done
# Driver unbind and rebind of q2: the device is stopped, reset and started again.
fn=0000:00:{DISKS["q2"][0]}.0
echo $fn > /sys/bus/pci/drivers/virtio-pci/unbind
result rebind_gone "$(disk_at {DISKS["q2"][0]} vd || echo yes)"
echo $fn > /sys/bus/pci/drivers/virtio-pci/bind
i=0; while ! d=$(disk_at {DISKS["q2"][0]} vd) && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
result rebind_sectors "$(cat /sys/block/$d/size)"
put /data/rebind.bin $d {REBIND_BLOCK}
result rebind_write_status $?
result rebind_readback $(sha $d {REBIND_BLOCK} {REBIND_BYTES // 4096})
"""


@pytest.fixture(scope="module")
def disks(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskOutcome]:
    rng = random.Random(0x9B1C)
    with Guest(guest_kernel, tmp_path_factory.mktemp("guest-blk")) as g:
        images = {}
        devices: list[str] = []
        for tag, (slot, size, queues) in DISKS.items():
            images[tag] = d = prepare_disk(tag, g.workdir / f"{tag}.img", size, rng)
            served = g.serve(tag, "blk", "--file", str(d.image), "--queues", str(queues))
            devices += [*served.qemu_chardev(),
                        "-device", f"vhost-user-blk-pci,chardev={tag},num-queues={queues},addr={slot}"]
        files = {**disk_files(images), "data/rebind.bin": REBIND_DATA}
        run = g.boot(SCRIPT, devices, modules=BLK_MODULES, files=files, smp=2)
        g.close()
        yield DiskOutcome(run, g, images, cpus=2)


tag = tag_fixture(DISKS)


class TestBlkGuest(DiskTests):
    def test_guest_reads_the_serial_and_uses_the_queues(self, disks: DiskOutcome, tag: str) -> None:
        """The serial comes from a GET_ID request; blk-mq runs as many hardware queues as the device has."""
        assert disks.run.result(f"{tag}_serial") == "pyvirtio", disks.context()
        assert disks.run.int_result(f"{tag}_hw_queues") == DISKS[tag][2], disks.context()

    def test_both_queues_of_the_two_queue_disk_completed_requests(self, disks: DiskOutcome) -> None:
        """Reads pinned to each vCPU go to that vCPU's queue: each queue's MSI-X vector fired."""
        assert disks.run.int_result("q2_irq_q0") > 0, disks.context()
        assert disks.run.int_result("q2_irq_q1") > 0, disks.context()
        assert disks.run.int_result("q1_irq_q0") > 0, disks.context()
        assert disks.run.result("q1_irq_q1") == "", disks.context()  # one queue: no second vector


def test_the_disk_serves_again_after_driver_unbind_and_rebind(disks: DiskOutcome) -> None:
    run, d = disks.run, disks.disks["q2"]
    assert run.result("rebind_gone") == "yes", disks.context()  # unbound: the disk had gone
    assert run.int_result("rebind_sectors") == d.size // 512, disks.context()
    assert run.int_result("rebind_write_status") == 0, disks.context()
    assert run.result("rebind_readback") == sha(REBIND_DATA), disks.context()
    assert d.region(REBIND_BLOCK * BLOCK, REBIND_BYTES) == REBIND_DATA
    # The blocks either side are untouched (zero: nothing else writes there).
    assert d.region(REBIND_BLOCK * BLOCK - BLOCK, BLOCK) == bytes(BLOCK)
    assert d.region((REBIND_BLOCK * BLOCK) + REBIND_BYTES, BLOCK) == bytes(BLOCK)
