"""The fuzz suite's shared settings: no example database (it would write a .hypothesis folder into the repository)
and a per-example deadline as the time bound (generous: CI's 2 cores also run other jobs)."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings for a reader fuzz test: ``max_examples`` examples, each bounded to 10 s."""
    return settings(
        max_examples=max_examples,
        deadline=timedelta(seconds=10),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
