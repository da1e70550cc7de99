"""Shared test configuration: Hypothesis profiles and small fixtures.

Profiles: "default" keeps the suite quick on a 2-core machine; "ci" (chosen
when the environment has CI=true, or by HYPOTHESIS_PROFILE) runs a few more
examples, still without deadlines (timing on shared CI runners is noisy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from pyvirtio.memory import MemoryPool

settings.register_profile(
    "default",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    print_blob=True,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI", "").lower() == "true" else "default")
)



@pytest.fixture
def pool() -> Iterator[MemoryPool]:
    """A small private memory pool, closed after the test."""
    with MemoryPool(1 << 20, name="pyvirtio-test") as p:
        yield p
