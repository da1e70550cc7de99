"""The PCI transport's register sequences and decisions, against in-memory device models (tests/pci_model.py).

Modern (virtio 1.2 §4.1.4): features in 32-bit halves through the select
registers, the ring addresses as low/high halves then queue_enable, the kick
as one 16-bit store at queue_notify_off x notify_off_multiplier, a reset
waited for (bounded), a queue of size 0 answered with FAILED and a clear
error, config reads retried while the generation moves (§2.5.1), a device
reset under the driver noticed. Legacy (§4.1.5): 32-bit features seen as a
1.0 device, the queue's page frame number, the fixed queue size. Memory: the
device addresses the transport's pool gives, and pagemap's "frame 0"
refused with its cause.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pci_model import (
    ADDRESS,
    IOVA_BASE,
    NOTIFY_MULTIPLIER,
    CommonModel,
    FakeBinding,
    LegacyModel,
    ModelTransport,
    config_space,
    modern,
)
from pyvirtio.device import VirtioDevice
from pyvirtio.errors import (
    ConnectionLost,
    DeviceNeedsReset,
    DeviceProtocolError,
    InvalidArgument,
    NegotiationError,
    PciSetupError,
    TransportTimeout,
)
from pyvirtio.memory import MemoryPool, Region
from pyvirtio.spec import net as N
from pyvirtio.spec import pci as P
from pyvirtio.spec.common import (
    F_ACCESS_PLATFORM,
    F_ANY_LAYOUT,
    F_RING_PACKED,
    F_RING_RESET,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
)
from pyvirtio.spec.ring import PACKED_INITIAL_BASE
from pyvirtio.targets import target_device_type
from pyvirtio.transport.base import QueueSetup
from pyvirtio.transport.pci import parse_pci_target
from pyvirtio.transport.pci_sysfs import PciFunction, parse_address, virtio_functions
from pyvirtio.transport.pci_uio import PAGEMAP_PRESENT, pagemap_addresses

V1 = 1 << F_VERSION_1
BLK_FEATURES = V1 | 1 << 9 | 1 << 35  # VERSION_1, FLUSH, a bit in the upper half


def started(features: int = BLK_FEATURES, sizes: tuple[int, ...] = (256,), **kw: object
            ) -> tuple[VirtioDevice, ModelTransport, FakeBinding]:
    transport, binding, _common = modern(features, list(sizes), **kw)
    dev = VirtioDevice("pci-test", transport, pool=transport.pool)
    dev.reset(features)
    dev.start(len(sizes))
    return dev, transport, binding


# -- modern register sequences ------------------------------------------------


def test_features_are_read_and_written_in_32_bit_halves() -> None:
    transport, _binding, common = modern(BLK_FEATURES | 1 << F_ACCESS_PLATFORM, [128])
    try:
        assert transport.get_features() == BLK_FEATURES | 1 << F_ACCESS_PLATFORM
        assert common.log[-4:] == [
            ("w", "device_feature_select", 0), ("r", "device_feature", (BLK_FEATURES | 1 << 33) & 0xFFFFFFFF),
            ("w", "device_feature_select", 1), ("r", "device_feature", (BLK_FEATURES | 1 << 33) >> 32),
        ]
        common.log.clear()
        transport.set_features(V1 | 1 << 35)
        # ACCESS_PLATFORM is the transport's to accept (its addresses are the binding's), and it says so.
        want = V1 | 1 << 35 | 1 << F_ACCESS_PLATFORM
        assert common.writes()[-4:] == [("driver_feature_select", 0), ("driver_feature", want & 0xFFFFFFFF),
                                        ("driver_feature_select", 1), ("driver_feature", want >> 32)]
        assert common.driver_feature_bits() == want
        assert transport.info()["transport_features"] == ["ACCESS_PLATFORM"]
    finally:
        transport.close()


def test_queue_setup_programs_device_addresses_as_halves_then_enables() -> None:
    dev, transport, binding = started()
    common = binding.common
    assert common is not None
    try:
        vq = dev.queue(0)
        ring = vq.ring
        q = common.queues[0]
        # The addresses the device got are device addresses (IOVA scheme), not process addresses.
        assert (q["desc"], q["driver"], q["device"]) == (ring.desc_addr, ring.avail_addr, ring.used_addr)
        assert IOVA_BASE <= q["desc"] < IOVA_BASE + (1 << 30)
        assert transport.pool is not None
        transport.pool.translate(q["desc"], 16 * 256)  # and they are the pool's
        writes = common.writes()
        i = writes.index(("queue_desc_lo", q["desc"] & 0xFFFFFFFF))
        assert writes[i : i + 6] == [
            ("queue_desc_lo", q["desc"] & 0xFFFFFFFF), ("queue_desc_hi", q["desc"] >> 32),
            ("queue_driver_lo", q["driver"] & 0xFFFFFFFF), ("queue_driver_hi", q["driver"] >> 32),
            ("queue_device_lo", q["device"] & 0xFFFFFFFF), ("queue_device_hi", q["device"] >> 32),
        ]
        enable = writes.index(("queue_enable", 1))
        assert enable > i + 5 and ("queue_size", 256) in writes[:i]
        assert writes.index(("device_status", STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                                               | STATUS_DRIVER_OK)) > enable
        assert common.status & STATUS_DRIVER_OK
    finally:
        dev.close()


def test_the_kick_is_one_16_bit_store_of_the_index_at_its_notify_offset() -> None:
    transport, binding, _common = modern(BLK_FEATURES, [64, 64, 64], notify_offs=[0, 5, 9])
    dev = VirtioDevice("pci-test", transport, pool=transport.pool)
    try:
        dev.reset(BLK_FEATURES)
        dev.start(3)
        notify = 0x3000
        assert binding.bar_bytes(4, notify, 0x40) == bytes(0x40)
        transport.notify_queue(2)
        transport.notifier(1)()
        assert binding.bar_bytes(4, notify + 9 * NOTIFY_MULTIPLIER, 2) == struct.pack("<H", 2)
        assert binding.bar_bytes(4, notify + 5 * NOTIFY_MULTIPLIER, 2) == struct.pack("<H", 1)
        assert binding.bar_bytes(4, notify, 2) == bytes(2)  # queue 0 not kicked
    finally:
        dev.close()


def test_a_notify_offset_outside_the_notify_structure_fails_the_device() -> None:
    transport, _binding, common = modern(BLK_FEATURES, [64], notify_offs=[0x400])
    dev = VirtioDevice("pci-test", transport, pool=transport.pool)
    try:
        dev.reset(BLK_FEATURES)
        with pytest.raises(DeviceProtocolError, match="outside the 0x1000-byte notify structure"):
            dev.start(1)
        assert common.status & STATUS_FAILED
    finally:
        dev.close()


def test_a_queue_of_size_0_is_the_devices_fault_and_sets_failed() -> None:
    transport, _binding, common = modern(BLK_FEATURES, [128, 0])
    dev = VirtioDevice("pci-test", transport, pool=transport.pool)
    try:
        dev.reset(BLK_FEATURES)
        with pytest.raises(DeviceProtocolError, match="queue 1 has size 0 although the device reports 2 queues"):
            dev.start(2)
        # FAILED was written; then queue 0's ring was taken back with a device reset (its memory is freed).
        failed = [i for i, (n, v) in enumerate(common.writes()) if n == "device_status" and v & STATUS_FAILED]
        assert failed and ("device_status", 0) in common.writes()[failed[0]:]
    finally:
        dev.close()


def test_a_ring_larger_than_the_device_takes_is_the_callers_fault() -> None:
    transport, _binding, _common = modern(BLK_FEATURES, [128])
    try:
        transport.set_features(BLK_FEATURES)
        with pytest.raises(InvalidArgument, match="at most 128"):
            transport.setup_queue(QueueSetup(0, 256, 0x1000, 0x2000, 0x3000))
        with pytest.raises(InvalidArgument, match="initial ring state"):
            transport.setup_queue(QueueSetup(0, 128, 0x1000, 0x2000, 0x3000, base=5))
    finally:
        transport.close()


def test_reset_waits_for_status_0_and_gives_up_after_its_timeout() -> None:
    transport, _binding, common = modern(BLK_FEATURES, [64], reset_reads=3)
    try:
        transport.set_status(STATUS_ACKNOWLEDGE)
        common.log.clear()
        transport.set_status(0)
        assert common.log == [("w", "device_status", 0), *[("r", "device_status", 1)] * 3, ("r", "device_status", 0)]
    finally:
        transport.close()
    transport, _binding, common = modern(BLK_FEATURES, [64], reset_reads=-1)
    transport.timeout = 0.05
    try:
        transport.set_status(STATUS_ACKNOWLEDGE)
        with pytest.raises(TransportTimeout, match="still 0x01"):
            transport.set_status(0)
    finally:
        common.reset_reads = 0
        transport.close()


def test_config_reads_are_retried_until_the_generation_holds() -> None:
    transport, binding, common = modern(BLK_FEATURES, [64])
    try:
        binding.regions[4].view[0x2000:0x2008] = struct.pack("<Q", 123456)
        assert transport.read_config(0, 8) == struct.pack("<Q", 123456)
        gens = [n for op, n, v in common.log if n == "config_generation"]
        assert len(gens) == 2  # before and after: equal at once
        common.generation_step = 1
        with pytest.raises(DeviceProtocolError, match="config generation changed"):
            transport.read_config(0, 8)
        assert common.status & STATUS_FAILED
        with pytest.raises(InvalidArgument, match="outside"):
            transport.read_config(0x1000 - 4, 8)
    finally:
        transport.close()


def test_a_reset_under_the_driver_and_needs_reset_are_noticed() -> None:
    dev, transport, binding = started()
    common = binding.common
    assert common is not None
    try:
        transport.check_alive()
        common.status |= STATUS_NEEDS_RESET
        with pytest.raises(DeviceNeedsReset, match="DEVICE_NEEDS_RESET"):
            transport.wait_queue(0, 0.0)
        common.status = 0
        with pytest.raises(DeviceNeedsReset, match="reset under the driver"):
            transport.check_alive()
        common.status = 0xFF
        with pytest.raises(ConnectionLost, match="all-ones"):
            transport.check_alive()
        common.status = 0
    finally:
        dev.close()


def test_a_queue_deleted_with_ring_reset_is_reset_alone() -> None:
    features = BLK_FEATURES | 1 << F_RING_RESET
    transport, _binding, common = modern(features, [64, 64])
    try:
        transport.set_features(features)
        assert transport.driver_features >> F_RING_RESET & 1
        transport.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        pool = transport.pool
        assert pool is not None
        for i in range(2):
            buf = pool.allocate(4096 * 4, 4096)
            transport.setup_queue(QueueSetup(i, 64, buf.addr, buf.addr + 1024, buf.addr + 4096))
        transport.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        transport.del_queue(1)
        assert common.queues[1]["reset"] == 1 and common.queues[0]["reset"] == 0
        assert common.status & STATUS_DRIVER_OK  # the device kept running
        # Without RING_RESET the whole device is reset before a ring's memory may go.
        transport.driver_features &= ~(1 << F_RING_RESET)
        transport.del_queue(0)
        assert common.status == 0
    finally:
        transport.close()


def test_close_resets_the_device_and_frees_its_memory() -> None:
    dev, transport, binding = started()
    common = binding.common
    assert common is not None
    dev.close()
    transport.close()
    assert common.status == 0 and binding.closed
    assert binding.addressing.detached == binding.addressing.attached != []


def test_wrong_device_type_and_a_pool_not_the_transports() -> None:
    common_binding = FakeBinding(config_space(), common=None)
    with pytest.raises(InvalidArgument, match="virtio-blk device, not virtio-net"):
        ModelTransport(ADDRESS, binding=common_binding, device_type=1)
    transport, _binding, _common = modern(BLK_FEATURES, [64])
    try:
        with MemoryPool(1 << 20) as other, pytest.raises(InvalidArgument, match="transport's own pool"):
            transport.set_memory(other)
    finally:
        transport.close()


def test_a_bar_capability_outside_its_bar_fails_the_transport_before_any_mapping() -> None:
    cfg = config_space(caps=[(P.CAP_COMMON_CFG, 4, 0x3F00, 0x1000), (P.CAP_NOTIFY_CFG, 4, 0x3000, 0x100),
                             (P.CAP_ISR_CFG, 4, 0x1000, 4)])
    binding = FakeBinding(cfg)
    with pytest.raises(DeviceProtocolError, match="common capability at 0x.. points outside BAR 4"):
        ModelTransport(ADDRESS, binding=binding)
    assert binding.regions == {} and binding.closed


# -- legacy ----------------------------------------------------------------------


def legacy(features: int, sizes: list[int], device_id: int = 0x1001,
           config: bytes = bytes(8)) -> tuple[ModelTransport, LegacyModel]:
    model = LegacyModel(features, sizes, config)
    binding = FakeBinding(config_space(device_id=device_id), legacy=model)
    return ModelTransport(ADDRESS, binding=binding, legacy=True), model


def test_legacy_features_are_32_bits_seen_as_version_1() -> None:
    transport, model = legacy(1 << 9 | 1 << F_ANY_LAYOUT, [128])
    try:
        assert transport.get_features() == V1 | 1 << 9 | 1 << F_ANY_LAYOUT
        transport.set_features(V1 | 1 << 9)
        assert model.guest_features == 1 << 9 | 1 << F_ANY_LAYOUT  # VERSION_1 out, ANY_LAYOUT in
        assert transport.info()["interface"] == "legacy"
        with pytest.raises(InvalidArgument, match="32 feature bits"):
            transport.regs.set_features(1 << 33)
    finally:
        transport.close()


def test_legacy_queue_gets_its_page_frame_number_and_the_kick_is_a_port_write() -> None:
    transport, model = legacy(1 << 9, [128])
    dev = VirtioDevice("pci-legacy", transport, pool=transport.pool)
    try:
        dev.reset(1 << 9)
        dev.start(1)
        ring = dev.queue(0).ring
        assert model.pfns[0] == ring.desc_addr >> 12 and ring.desc_addr % 4096 == 0
        transport.notify_queue(0)
        assert model.notified == [0]
        assert transport.read_config(0, 8) == bytes(8)
    finally:
        dev.close()
    assert model.status == 0 and model.pfns == [0]


def test_legacy_refuses_a_ring_that_is_not_its_fixed_size_or_not_contiguous() -> None:
    transport, _model = legacy(0, [128])
    try:
        with pytest.raises(InvalidArgument, match="fixed size 128"):
            transport.setup_queue(QueueSetup(0, 64, 0x10000, 0x10800, 0x11000))
        with pytest.raises(InvalidArgument, match="contiguous 4096-aligned"):
            transport.setup_queue(QueueSetup(0, 128, 0x10000, 0x20000, 0x30000))
    finally:
        transport.close()


def test_packed_rings_go_in_the_same_registers_and_not_over_legacy() -> None:
    transport, _binding, common = modern(BLK_FEATURES | 1 << F_RING_PACKED, [64])
    try:
        transport.setup_queue(QueueSetup(0, 64, 0x10000, 0x20000, 0x30000, PACKED_INITIAL_BASE, "packed"))
        assert (common.queues[0]["desc"], common.queues[0]["driver"], common.queues[0]["device"]) == (
            0x10000, 0x20000, 0x30000)
        with pytest.raises(InvalidArgument, match="initial ring state"):
            transport.setup_queue(QueueSetup(0, 64, 0x10000, 0x20000, 0x30000, 0, "packed"))
    finally:
        transport.close()
    transport, _model = legacy(0, [64])
    try:
        with pytest.raises(InvalidArgument, match="split rings only"):
            transport.setup_queue(QueueSetup(0, 64, 0x10000, 0x10400, 0x11000, PACKED_INITIAL_BASE, "packed"))
    finally:
        transport.close()


def test_legacy_net_without_mrg_rxbuf_is_refused() -> None:
    transport, _model = legacy(1 << N.F_MRG_RXBUF, [256, 256], device_id=0x1000)
    try:
        with pytest.raises(NegotiationError, match="MRG_RXBUF"):
            transport.set_features(V1)
        transport.set_features(V1 | 1 << N.F_MRG_RXBUF)
    finally:
        transport.close()


def test_legacy_asked_of_a_modern_only_function_is_refused() -> None:
    binding = FakeBinding(config_space(), legacy=LegacyModel(0, [64]))
    with pytest.raises(DeviceProtocolError, match="not transitional"):
        ModelTransport(ADDRESS, binding=binding, legacy=True)


# -- memory: device addresses ------------------------------------------------------


def test_pagemap_frame_0_is_refused_naming_the_cause(tmp_path: Path) -> None:
    pagemap = tmp_path / "pagemap"
    base = 0x7F0000000000
    entries = {base // 4096: PAGEMAP_PRESENT | 0x1234, base // 4096 + 1: PAGEMAP_PRESENT, base // 4096 + 2: 0}
    with open(pagemap, "wb") as f:
        for page, entry in entries.items():
            f.seek(page * 8)
            f.write(struct.pack("<Q", entry))
    assert pagemap_addresses(base, 4096, 4096, str(pagemap)) == [0x1234 * 4096]
    with pytest.raises(PciSetupError, match="CAP_SYS_ADMIN"):
        pagemap_addresses(base, 8192, 4096, str(pagemap))
    with pytest.raises(PciSetupError, match="not present"):
        pagemap_addresses(base + 2 * 4096, 4096, 4096, str(pagemap))
    with pytest.raises(PciSetupError, match="no entry"):
        pagemap_addresses(base + 3 * 4096, 4096, 4096, str(pagemap))


class SegmentedAddressing:
    """Pages at scattered 'physical' addresses: segments 0,1 contiguous, 2 and 3 elsewhere."""

    kind = "physical"

    def create_region(self, size: int, name: str) -> Region:
        return Region.create(4 * 65536, name)

    def attach(self, region: Region) -> None:
        region.set_segments(65536, [0x100000, 0x110000, 0x500000, 0x300000])

    def detach(self, region: Region) -> None:
        pass


def test_segmented_memory_never_gives_a_buffer_across_a_physical_gap() -> None:
    with MemoryPool(4 * 65536, max_regions=1, addressing=SegmentedAddressing()) as pool:
        a = pool.allocate(100000, 4096)  # fits in segments 0+1, which are contiguous
        assert a.addr == 0x100000
        b = pool.allocate(40000, 4096)  # would straddle 1|2: moved to segment 2
        assert b.addr == 0x500000 and b.region.contiguous(b.offset, b.size)
        c = pool.allocate(4096, 4096)
        assert pool.translate(c.addr, 4096).nbytes == 4096
        c.view[:4] = b"abcd"
        assert bytes(pool.translate(c.addr, 4)) == b"abcd"
        with pytest.raises(InvalidArgument, match="outside pool"):
            pool.translate(0x110000 + 65536 - 8, 16)  # runs past a segment into a gap
    with MemoryPool(4 * 65536, max_regions=2, addressing=SegmentedAddressing()) as pool:
        with pytest.raises(InvalidArgument, match="one contiguous block"):
            pool.allocate(3 * 65536, 4096)


# -- targets, addresses, sysfs --------------------------------------------------------


def test_pci_targets_and_addresses() -> None:
    assert parse_pci_target("00:04.0,legacy,irq,vfio") == (
        "0000:00:04.0", {"legacy": True, "interrupts": True, "binding": "vfio"})
    assert parse_address("0000:0A:1f.7") == "0000:0a:1f.7"
    with pytest.raises(InvalidArgument, match="unknown pci target option 'fast'"):
        parse_pci_target("0000:00:04.0,fast")
    with pytest.raises(InvalidArgument, match="not a PCI address"):
        parse_address("0000:00:04")


def fake_sysfs(root: Path, address: str, vendor: int, device: int, resource: str, driver: str | None) -> Path:
    d = root / "bus/pci/devices" / address
    d.mkdir(parents=True)
    (d / "vendor").write_text(f"0x{vendor:04x}\n")
    (d / "device").write_text(f"0x{device:04x}\n")
    (d / "resource").write_text(resource)
    if driver:
        drv = root / "bus/pci/drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (d / "driver").symlink_to(drv)
    return d


def test_sysfs_lists_virtio_functions_and_their_bars(tmp_path: Path) -> None:
    resource = ("0x000000000000c000 0x000000000000c03f 0x0000000000040101\n"
                "0x00000000fe000000 0x00000000fe000fff 0x0000000000040200\n"
                + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 2
                + "0x00000000fd000000 0x00000000fd003fff 0x000000000014220c\n"
                + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n")
    fake_sysfs(tmp_path, "0000:00:04.0", 0x1AF4, 0x1001, resource, "virtio-pci")
    fake_sysfs(tmp_path, "0000:00:05.0", 0x1AF4, 0x1048, resource, "uio_pci_generic")
    fake_sysfs(tmp_path, "0000:00:06.0", 0x8086, 0x100E, resource, None)
    fns = virtio_functions(str(tmp_path))
    assert [f.address for f in fns] == ["0000:00:04.0", "0000:00:05.0"]
    assert fns[0].describe() == {"address": "0000:00:04.0", "vendor": "1af4", "device": "1001", "type": "blk",
                                 "interface": "transitional", "driver": "virtio-pci", "iommu_group": None}
    assert fns[1].describe()["type"] == "scsi" and fns[1].describe()["interface"] == "modern"
    bars = PciFunction("0000:00:04.0", str(tmp_path)).bars()
    assert [(b.index, b.size, b.io) for b in bars] == [
        (0, 0x40, True), (1, 0x1000, False), (2, 0, False), (3, 0, False), (4, 0x4000, False), (5, 0, False)]
    with pytest.raises(PciSetupError, match="no PCI function 0000:00:07.0"):
        PciFunction("0000:00:07.0", str(tmp_path)).require()


def test_a_pci_target_says_its_device_type(tmp_path: Path) -> None:
    fake_sysfs(tmp_path, "0000:00:07.0", 0x1AF4, 0x1041, "", None)
    fake_sysfs(tmp_path, "0000:00:06.0", 0x1AF4, 0x1004, "", None)
    assert target_device_type("pci:0000:00:07.0,vfio", root=str(tmp_path)) == 1
    assert target_device_type("pci:00:06.0", root=str(tmp_path)) == 8
    assert target_device_type("vhost-user:/tmp/x.sock") is None
    with pytest.raises(PciSetupError, match="no PCI function"):
        target_device_type("pci:0000:00:08.0", root=str(tmp_path))


def command(binding: FakeBinding) -> int:
    value: int = struct.unpack("<H", binding.config_read(P.CFG_COMMAND, 2))[0]
    return value


@pytest.mark.parametrize("interrupts", [False, True])
def test_bus_master_on_and_intx_off_unless_an_intx_binding_waits_for_it(interrupts: bool) -> None:
    binding = FakeBinding(config_space(), common=CommonModel(BLK_FEATURES, [64]))
    struct.pack_into("<H", binding.config, P.CFG_COMMAND, P.COMMAND_INTX_DISABLE if interrupts else 0)
    transport = ModelTransport(ADDRESS, binding=binding, interrupts=interrupts)
    try:
        cmd = command(binding)
        assert cmd & P.COMMAND_MASTER and cmd & P.COMMAND_MEMORY
        # FakeBinding has no MSI-X: with interrupts it stands for uio's INTx, which must stay enabled.
        assert bool(cmd & P.COMMAND_INTX_DISABLE) is not interrupts
        assert transport.info()["interrupts"] == ("intx" if interrupts else "poll")
    finally:
        transport.close()


def test_an_intx_wait_that_drains_the_fd_also_unmasks_the_line() -> None:
    """uio masks INTx when it fires: a wait that consumed the interrupt must unmask, or the next is lost."""
    common = CommonModel(BLK_FEATURES, [64])
    binding = FakeBinding(config_space(), common=common)
    transport = ModelTransport(ADDRESS, binding=binding, interrupts=True)
    dev = VirtioDevice("pci-test", transport, pool=transport.pool)
    try:
        dev.reset(BLK_FEATURES)
        dev.start(1)
        fd = transport.queue_fd(0)
        assert fd is not None and fd == binding.irq_fds[0]
        os.eventfd_write(fd, 1)  # the interrupt (the ISR reads 0: it does not say "look again" first)
        binding.irq_log.clear()
        assert transport.wait_queue(0, 1.0)
        assert binding.irq_log[-2:] == ["drain", "unmask"]
        assert not transport.wait_queue(0, 0.0)  # consumed
    finally:
        dev.close()
