"""A Linux guest's virtio_scsi + sd drivers on ``pyvirtio serve scsi`` through QEMU's ``vhost-user-scsi-pci``.

One guest boot (2 vCPUs), one back end with two LUNs over files (target 0,
LUN 0, 16 MiB and LUN 1, 24 MiB) and two request queues, as many as QEMU
gives the device when ``num_queues`` is left at its default (one per vCPU;
QEMU 7.2 does not compare it with the back end's GET_QUEUE_NUM), and the
device with QEMU's stock options
(``-device vhost-user-scsi-pci,chardev=...``: QEMU 7.2 acks
VIRTIO_SCSI_F_CHANGE in SET_FEATURES whether or not the back end offered it,
PEERS.md). The guest's SCSI scan must find both LUNs with their sizes (READ
CAPACITY), and each gets the data checks of :mod:`guest.disks` (the host's
data read in the guest, the guest's writes and its discard — an UNMAP, as
sd picks from the Block Limits VPD page — found in the backing file).

Then the controller is unbound from the guest's virtio-pci driver and bound
again: QEMU 7.2 stops the rings (SET_VRING_ENABLE 0, GET_VRING_BASE), sends
RESET_DEVICE (vhost-user-scsi resets the back end when the device resets,
PROTOCOL_F_RESET_DEVICE being offered) and starts afresh; the new scan must
find both LUNs again, and a write to each after the rebind must reach its
backing file.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from guest.disks import BLOCK, EXERCISE_SH, DiskOutcome, DiskTests, disk_files, prepare_disk, sha, tag_fixture
from guest.harness import SCSI_MODULES, Guest
from guest.kernel import Kernel

pytest_plugins = ["guest.fixtures"]
pytestmark = [pytest.mark.peer, pytest.mark.timeout(300)]

#: tag -> (target, LUN, size); the sizes differ so a swapped LUN shows.
LUNS = {"t0l0": (0, 0, 16 << 20), "t0l1": (0, 1, 24 << 20)}
#: Written to each LUN after the rebind, at a 4 KiB block clear of the data checks' regions.
REBIND_BLOCK, REBIND_BYTES = 3000, 64 << 10
REBIND_DATA = random.Random(0x5C52).randbytes(REBIND_BYTES)

SCRIPT = EXERCISE_SH + rf"""
# The SCSI scan runs asynchronously: wait (at most 20 s) for the disks.
i=0
while [ "$(ls /sys/block | grep -c '^sd')" -lt {len(LUNS)} ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
result scsi_disks $(ls /sys/block | grep -c '^sd')
for s in /sys/block/sd*; do
    [ -e "$s" ] || continue
    a=$(basename "$(readlink -f "$s/device")")  # host:channel:target:lun
    lun=${{a##*:}}; rest=${{a%:*}}; target=${{rest##*:}}
    t=t${{target}}l${{lun}}
    result ${{t}}_vendor "$(cat "$s/device/vendor")"
    result ${{t}}_provisioning "$(cat "$s"/device/scsi_disk/*/provisioning_mode)"
    exercise $t "$(basename "$s")"
done
v=$(basename /sys/bus/pci/devices/0000:00:06.0/virtio*)
result request_irqs "$(irqs $v-request | tr '\n' ' ')"
# Driver unbind and rebind: the device is reset and scanned anew.
echo 0000:00:06.0 > /sys/bus/pci/drivers/virtio-pci/unbind
result rebind_gone $(ls /sys/block | grep -c '^sd')
echo 0000:00:06.0 > /sys/bus/pci/drivers/virtio-pci/bind
i=0
while [ "$(ls /sys/block | grep -c '^sd')" -lt {len(LUNS)} ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
result rebind_disks $(ls /sys/block | grep -c '^sd')
for s in /sys/block/sd*; do
    [ -e "$s" ] || continue
    a=$(basename "$(readlink -f "$s/device")")
    lun=${{a##*:}}; rest=${{a%:*}}; target=${{rest##*:}}
    t=t${{target}}l${{lun}}; d=$(basename "$s")
    put /data/rebind.bin $d {REBIND_BLOCK}
    result ${{t}}_rebind_write_status $?
    result ${{t}}_rebind_readback $(sha $d {REBIND_BLOCK} {REBIND_BYTES // 4096})
done
"""


@pytest.fixture(scope="module")
def disks(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskOutcome]:
    rng = random.Random(0x5C51)
    with Guest(guest_kernel, tmp_path_factory.mktemp("guest-scsi")) as g:
        images = {}
        args = []
        for tag, (target, lun, size) in LUNS.items():
            images[tag] = d = prepare_disk(tag, g.workdir / f"{tag}.img", size, rng)
            args += ["--lun", f"{target}:{lun}=file:{d.image}"]
        # QEMU sizes the request queues by the vCPU count (num_queues left at its default): 2 here.
        served = g.serve("scsi", "scsi", "--queues", "2", *args)
        devices = [*served.qemu_chardev(), "-device", "vhost-user-scsi-pci,chardev=scsi,addr=06"]
        files = {**disk_files(images), "data/rebind.bin": REBIND_DATA}
        run = g.boot(SCRIPT, devices, modules=SCSI_MODULES, files=files, smp=2)
        g.close()
        yield DiskOutcome(run, g, images, cpus=2)


tag = tag_fixture(LUNS)


class TestScsiGuest(DiskTests):
    def test_guest_finds_both_luns(self, disks: DiskOutcome) -> None:
        assert disks.run.int_result("scsi_disks") == len(LUNS), disks.context()

    def test_both_request_queues_completed_requests(self, disks: DiskOutcome) -> None:
        """Reads pinned to each vCPU go to that vCPU's request queue: each queue's MSI-X vector fired."""
        counts = disks.run.result("request_irqs").split()
        assert len(counts) == 2, disks.context()
        assert all(int(c) > 0 for c in counts), disks.context()

    def test_guest_reads_the_inquiry_data_and_uses_unmap(self, disks: DiskOutcome, tag: str) -> None:
        """INQUIRY's vendor field, and sd's discard mode from the logical block provisioning VPD pages."""
        assert disks.run.result(f"{tag}_vendor") == "PYVIRTIO", disks.context()
        assert disks.run.result(f"{tag}_provisioning") == "unmap", disks.context()

    def test_luns_serve_again_after_driver_unbind_and_rebind(self, disks: DiskOutcome, tag: str) -> None:
        run, d = disks.run, disks.disks[tag]
        assert run.int_result("rebind_gone") == 0, disks.context()  # unbound: the disks had gone
        assert run.int_result("rebind_disks") == len(LUNS), disks.context()
        assert run.int_result(f"{tag}_rebind_write_status") == 0, disks.context()
        assert run.result(f"{tag}_rebind_readback") == sha(REBIND_DATA), disks.context()
        assert d.region(REBIND_BLOCK * BLOCK, REBIND_BYTES) == REBIND_DATA
        assert d.region(REBIND_BLOCK * BLOCK - BLOCK, BLOCK) == bytes(BLOCK)
        assert d.region(REBIND_BLOCK * BLOCK + REBIND_BYTES, BLOCK) == bytes(BLOCK)
