"""Pure data from the virtio 1.2 specification: no I/O, no state.

``common`` holds status bits, device-independent feature bits and device
IDs; ``ring`` the split-ring layout; ``blk``, ``scsi`` and ``net`` each
device's feature bits, config layout and request formats.
"""

from pyvirtio.spec import blk, common, net, ring, scsi

__all__ = ["blk", "common", "net", "ring", "scsi"]
