"""Device drivers built on VirtioDevice: virtio-blk (and later scsi, net)."""
