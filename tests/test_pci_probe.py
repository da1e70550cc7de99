"""PCI layouts against Linux's uapi headers: <linux/virtio_pci.h> (spec/pci.py) and <linux/vfio.h> (pci_vfio.py).

A small C program is generated from our constants, compiled with ``cc``
and run; it prints each macro value, ``sizeof`` and ``offsetof`` asked for,
and every one must equal ours. Without a C compiler or the headers the
module skips on a developer machine and fails under CI=true
(:func:`peers.missing_peer`).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from peers import missing_peer
from pyvirtio.spec import pci as P
from pyvirtio.transport import pci_vfio as V

INCLUDE = Path("/usr/include/linux")
HEADERS = ("virtio_pci.h", "vfio.h")

#: Our common-config names -> Linux's struct virtio_pci_common_cfg members (64-bit ones: the low half).
LINUX_COMMON = {
    "device_feature_select": "device_feature_select",
    "device_feature": "device_feature",
    "driver_feature_select": "guest_feature_select",
    "driver_feature": "guest_feature",
    "config_msix_vector": "msix_config",
    "num_queues": "num_queues",
    "device_status": "device_status",
    "config_generation": "config_generation",
    "queue_select": "queue_select",
    "queue_size": "queue_size",
    "queue_msix_vector": "queue_msix_vector",
    "queue_enable": "queue_enable",
    "queue_notify_off": "queue_notify_off",
    "queue_desc": "queue_desc_lo",
    "queue_driver": "queue_avail_lo",
    "queue_device": "queue_used_lo",
}
#: virtio 1.2 additions, as offset macros in newer headers: probed only if defined.
LINUX_MODERN_COMMON = {"queue_notify_data": "VIRTIO_PCI_COMMON_Q_NDATA", "queue_reset": "VIRTIO_PCI_COMMON_Q_RESET"}
LINUX_LEGACY = {
    "host_features": "VIRTIO_PCI_HOST_FEATURES",
    "guest_features": "VIRTIO_PCI_GUEST_FEATURES",
    "queue_pfn": "VIRTIO_PCI_QUEUE_PFN",
    "queue_num": "VIRTIO_PCI_QUEUE_NUM",
    "queue_sel": "VIRTIO_PCI_QUEUE_SEL",
    "queue_notify": "VIRTIO_PCI_QUEUE_NOTIFY",
    "status": "VIRTIO_PCI_STATUS",
    "isr": "VIRTIO_PCI_ISR",
    "config_msix_vector": "VIRTIO_MSI_CONFIG_VECTOR",
    "queue_msix_vector": "VIRTIO_MSI_QUEUE_VECTOR",
}


def expectations() -> dict[str, tuple[str, int]]:
    """probe key -> (C expression, our value)."""
    e: dict[str, tuple[str, int]] = {}

    def const(macro: str, value: int) -> None:
        e[macro] = (macro, value)

    for macro, value in [
        ("VIRTIO_PCI_CAP_COMMON_CFG", P.CAP_COMMON_CFG),
        ("VIRTIO_PCI_CAP_NOTIFY_CFG", P.CAP_NOTIFY_CFG),
        ("VIRTIO_PCI_CAP_ISR_CFG", P.CAP_ISR_CFG),
        ("VIRTIO_PCI_CAP_DEVICE_CFG", P.CAP_DEVICE_CFG),
        ("VIRTIO_PCI_CAP_PCI_CFG", P.CAP_PCI_CFG),
        ("VIRTIO_PCI_QUEUE_ADDR_SHIFT", P.LEGACY_QUEUE_ADDR_SHIFT),
        ("VIRTIO_PCI_VRING_ALIGN", P.LEGACY_VRING_ALIGN),
        ("VIRTIO_PCI_ISR_CONFIG", P.ISR_CONFIG),
        ("VIRTIO_MSI_NO_VECTOR", P.MSI_NO_VECTOR),
        ("VIRTIO_PCI_CONFIG_OFF(0)", P.LEGACY_CONFIG_OFFSET),
        ("VIRTIO_PCI_CONFIG_OFF(1)", P.LEGACY_CONFIG_OFFSET_MSIX),
        ("sizeof(struct virtio_pci_cap)", P.VIRTIO_CAP.size),
        ("sizeof(struct virtio_pci_notify_cap)", P.NOTIFY_CAP_SIZE),
        ("offsetof(struct virtio_pci_notify_cap, notify_off_multiplier)", P.NOTIFY_CAP_MULT),
        ("sizeof(struct virtio_pci_common_cfg)", P.COMMON_CFG_SIZE_V1),
    ]:
        const(macro, value)
    for member, off in [("cap_vndr", P.CAP_VNDR), ("cap_next", P.CAP_NEXT), ("cap_len", P.CAP_LEN),
                        ("cfg_type", P.CAP_CFG_TYPE), ("bar", P.CAP_BAR), ("id", P.CAP_ID),
                        ("offset", P.CAP_OFFSET), ("length", P.CAP_LENGTH)]:
        const(f"offsetof(struct virtio_pci_cap, {member})", off)
    for ours, theirs in LINUX_COMMON.items():
        off, fmt = P.COMMON_FIELDS[ours]
        const(f"offsetof(struct virtio_pci_common_cfg, {theirs})", off)
        if not theirs.endswith("_lo"):
            const(f"sizeof(((struct virtio_pci_common_cfg *)0)->{theirs})", struct.calcsize(fmt))
    for ours, macro in LINUX_LEGACY.items():
        const(macro, P.LEGACY_FIELDS[ours][0])
    for name in ["VFIO_API_VERSION", "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU",
                 "VFIO_GROUP_GET_STATUS", "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD",
                 "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO",
                 "VFIO_DEVICE_SET_IRQS", "VFIO_IOMMU_MAP_DMA", "VFIO_IOMMU_UNMAP_DMA", "VFIO_TYPE1_IOMMU",
                 "VFIO_TYPE1v2_IOMMU", "VFIO_GROUP_FLAGS_VIABLE", "VFIO_REGION_INFO_FLAG_MMAP",
                 "VFIO_PCI_CONFIG_REGION_INDEX", "VFIO_PCI_MSIX_IRQ_INDEX", "VFIO_IRQ_SET_DATA_NONE",
                 "VFIO_IRQ_SET_DATA_EVENTFD", "VFIO_IRQ_SET_ACTION_TRIGGER", "VFIO_DMA_MAP_FLAG_READ",
                 "VFIO_DMA_MAP_FLAG_WRITE"]:
        const(name, int(getattr(V, name)))
    for cstruct, ours in [("vfio_group_status", V.GROUP_STATUS), ("vfio_region_info", V.REGION_INFO),
                          ("vfio_irq_info", V.IRQ_INFO), ("vfio_irq_set", V.IRQ_SET),
                          ("vfio_iommu_type1_dma_map", V.DMA_MAP), ("vfio_iommu_type1_dma_unmap", V.DMA_UNMAP)]:
        const(f"sizeof(struct {cstruct})", ours.size)
    return e


def probe_source(exprs: list[str]) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", *(f"#include <linux/{h}>" for h in HEADERS), "",
             "int main(void) {"]
    lines += [f'    printf("%s=%lld\\n", "{x}", (long long)({x}));' for x in exprs]
    for ours, macro in LINUX_MODERN_COMMON.items():
        lines += [f"#ifdef {macro}", f'    printf("%s=%lld\\n", "modern {ours}", (long long){macro});', "#endif"]
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc")
    if cc is None:
        missing_peer("no C compiler (cc) on PATH (apt-get install gcc libc6-dev)")
    missing = [h for h in HEADERS if not (INCLUDE / h).is_file()]
    if missing:
        missing_peer(f"no {', '.join(missing)} in {INCLUDE} (apt-get install linux-libc-dev)")
    tmp = tmp_path_factory.mktemp("pci-probe")
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text(probe_source([x for x, _ in expectations().values()]))
    proc = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"probe did not compile:\n{proc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit("=", 1) for line in out.splitlines())}


@pytest.mark.parametrize("key", list(expectations()))
def test_layout_matches_the_linux_header(probed: dict[str, int], key: str) -> None:
    expr, ours = expectations()[key]
    assert probed[expr] == ours, f"{expr}: Linux says {probed[expr]}, pyvirtio {ours}"


def test_virtio_1_2_common_cfg_additions(probed: dict[str, int]) -> None:
    found = {k.removeprefix("modern "): v for k, v in probed.items() if k.startswith("modern ")}
    if not found:
        pytest.skip("these headers predate VIRTIO_PCI_COMMON_Q_NDATA / _Q_RESET")
    for ours in LINUX_MODERN_COMMON:
        assert found[ours] == P.COMMON_FIELDS[ours][0]
    assert max(found.values()) + 2 == P.COMMON_CFG_SIZE
