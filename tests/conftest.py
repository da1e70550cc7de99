"""Shared test configuration: Hypothesis profiles and small fixtures.

Profiles: "default" keeps the suite quick on a 2-core machine; "ci" (chosen
when the environment has CI=true, or by HYPOTHESIS_PROFILE) runs a few more
examples, still without deadlines (timing on shared CI runners is noisy).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings

from pyvirtio.memory import MemoryPool

# Helper modules imported by test modules (and by each other) get pytest's
# assertion rewriting whichever test module imports them first.
pytest.register_assert_rewrite("peers", "blk_checks", "hostile_frontend", "testpmd", "peers_restart")

from peers import in_ci  # noqa: E402 - after register_assert_rewrite, which must see it first

# When a Hypothesis test fails, its pytest plugin imports hypothesis.extra._patching,
# which imports libcst, which (with the mypy_extensions installed here) warns
# DeprecationWarning at import; under filterwarnings=error that turns the failure
# report into an INTERNALERROR that hides the real failure. Import it once now,
# with that warning silenced, so the later import is a cache hit.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # libcst not installed: nothing to pre-import
        pass

# No "explain" phase: on a failing state machine it re-runs thousands of
# variants (minutes) only to annotate the report.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(
    "default",
    phases=_PHASES,
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    phases=_PHASES,
    max_examples=100,
    deadline=None,
    print_blob=True,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci() else "default"))


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for socket paths (sun_path holds 108 bytes), removed with what is left in it."""
    d = tempfile.mkdtemp(prefix="pv", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def quiet_backend_logs() -> Iterator[None]:
    """Back-end log lines at ERROR only (tests that make back ends drop connections on purpose)."""
    logger = logging.getLogger("pyvirtio.backends")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def pool() -> Iterator[MemoryPool]:
    """A small private memory pool, closed after the test."""
    with MemoryPool(1 << 20, name="pyvirtio-test") as p:
        yield p
