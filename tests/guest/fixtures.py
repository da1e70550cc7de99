"""pytest fixtures of the guest stage (``pytest_plugins = ["guest.fixtures"]`` in a test module).

``guest_kernel`` (session): the Debian kernel, after checking QEMU and busybox;
a missing piece skips the test on a developer machine and fails it under
``CI=true`` (:func:`peers.missing_peer`, the one missing-peer rule).
``guest``: a :class:`~guest.harness.Guest` in the test's temporary directory,
its back ends stopped at teardown. Tests that share one boot between several
assertions build a module-scoped fixture on :class:`~guest.harness.Guest`
instead (see tests/test_guest_blk.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import missing_peer

from .harness import Guest, GuestUnavailable, require_guest
from .kernel import Kernel


@pytest.fixture(scope="session")
def guest_kernel() -> Kernel:
    try:
        return require_guest()
    except GuestUnavailable as exc:
        missing_peer(f"guest stage: {exc}")


@pytest.fixture
def guest(guest_kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    with Guest(guest_kernel, Path(tmp_path_factory.mktemp("guest"))) as g:
        yield g


__all__ = ["guest", "guest_kernel"]
