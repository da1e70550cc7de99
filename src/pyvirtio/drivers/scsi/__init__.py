"""The virtio-scsi driver (virtio 1.2 §5.6; SPDK's bdev_virtio_scsi), one module per idea.

* :mod:`.requests`: :class:`ScsiRequest` and the request queues' hooks
  (slot layout, building and completing commands, UNIT ATTENTION retries)
  on the shared request engine (:mod:`pyvirtio.drivers.requests`);
* :mod:`.scan`: REPORT LUNS / INQUIRY / VPD / READ CAPACITY, :class:`LunInfo`;
* :mod:`.driver`: :class:`VirtioScsi` (negotiation, the config, kept in the
  frontend when the back end has none, events, task management);
* :mod:`.disk`: :class:`ScsiDisk`, one LUN as a block device (the block
  facade, :mod:`pyvirtio.drivers.block`).

The LUN benchmark is the block engine's (:mod:`pyvirtio.bench.block`).

CDB builders and the decoding of what commands return are spec data:
:mod:`pyvirtio.spec.t10_cdb` (sense: :mod:`pyvirtio.spec.t10`). The errors
(:class:`ScsiError`, :class:`LunNotFound`) live in :mod:`pyvirtio.errors`.
"""

from pyvirtio.drivers.scsi.disk import ScsiDisk
from pyvirtio.drivers.scsi.driver import (
    DRIVER_FEATURES,
    EVENT_BUFFERS,
    FRONTEND_CONFIG_DEFAULTS,
    ScsiEvent,
    VirtioScsi,
    frontend_config,
)
from pyvirtio.drivers.scsi.requests import (
    HEADER_PAGE,
    MAX_CDB_SIZE,
    MAX_SENSE_SIZE,
    UA_RETRIES,
    ScsiRequest,
    slot_stride,
)
from pyvirtio.drivers.scsi.scan import MAX_ATTEMPTS, LunInfo, LunScanner
from pyvirtio.errors import LunNotFound, ScsiError
from pyvirtio.spec.t10_cdb import inquiry_cdb, read_capacity_16_cdb, report_luns_cdb, rw_cdb

__all__ = [
    "DRIVER_FEATURES",
    "EVENT_BUFFERS",
    "FRONTEND_CONFIG_DEFAULTS",
    "HEADER_PAGE",
    "MAX_ATTEMPTS",
    "MAX_CDB_SIZE",
    "MAX_SENSE_SIZE",
    "UA_RETRIES",
    "LunInfo",
    "LunNotFound",
    "LunScanner",
    "ScsiDisk",
    "ScsiError",
    "ScsiEvent",
    "ScsiRequest",
    "VirtioScsi",
    "frontend_config",
    "inquiry_cdb",
    "read_capacity_16_cdb",
    "report_luns_cdb",
    "rw_cdb",
    "slot_stride",
]
