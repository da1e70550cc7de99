"""The guest stage: a Linux guest under QEMU TCG drives pyvirtio's back ends with its own drivers.

Theory of operation. A real frontend is the strongest test of a back end:
QEMU sends the vhost-user messages in its own order and with its own
features, and the guest's Linux drivers (virtio_blk, virtio_scsi + sd,
virtio_net) build requests the way production guests do. The stage is
made of small parts, each usable alone:

* :mod:`guest.kernel`: Debian's kernel package, fetched with ``apt-get
  download`` once and cached by version (``~/.cache/pyvirtio-guest``); module
  dependencies read from the modules' own ``.modinfo``.
* :mod:`guest.initramfs`: a newc archive written in Python (busybox-static,
  the modules in load order, data files, ``/init`` and the test's
  ``/test.sh``).
* :mod:`guest.qemu`: QEMU under TCG with shared memfd RAM (vhost-user maps
  it), the serial console in a file, a timeout, stop by PID; the console's
  ``RESULT key=value`` lines parsed.
* :mod:`guest.backends`: ``python -m pyvirtio serve ...`` processes.
* :mod:`guest.harness`: :class:`~guest.harness.Guest` ties them together;
  :mod:`guest.fixtures` holds the pytest fixtures.

Why under tests/ and not ``pyvirtio.testing``: it runs apt-get, dpkg-deb
and QEMU and needs pytest; nothing in it is virtio, and a library user has
no use for it. ``pyvirtio.testing`` holds what drives virtio itself (mock
and hostile devices) for tests, fuzzers and benchmarks alike.

How to run it, how long it takes: docs/testing.md.
"""

import pytest

# The shared test classes assert; pytest rewrites their asserts only if told before the import.
pytest.register_assert_rewrite("guest.disks")
