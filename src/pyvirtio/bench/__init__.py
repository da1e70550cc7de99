"""Benchmark engines: load generators on top of the drivers, and their shared statistics.

* :mod:`.block`: :class:`~pyvirtio.bench.block.BlockEngine`, fio-like load on
  one queue of a virtio-blk device or of the virtio-scsi host of a LUN, and
  :func:`~pyvirtio.bench.block.run_queues` (one engine per queue and thread);
* :mod:`.formats`: what one block request is on the ring, per device type
  (the command-format hook the block engine's loops use);
* :mod:`.loops`: the block engine's loops (plain Python, fused, NumPy);
* :mod:`.net`: transmit / receive / echo load on virtio-net queue pairs;
* :mod:`.stats`: counters, the log-linear latency histogram and the report
  shared by all of them.

Layering: the engines use the drivers (and, for speed, the ring's shared
arrays); the CLI (``pyvirtio bench``, ``pyvirtio scsi bench``,
``pyvirtio net bench``) uses the engines. Nothing below imports this package.
"""
