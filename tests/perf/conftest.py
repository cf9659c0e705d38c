"""Fixtures shared by the perf tests: one torch thread (as for the bench tests they came from) and the bench
tests' registered method whose scoring fails."""

import pytest

from ..benchmarks.conftest import broken_method  # noqa: F401  (a fixture: the failing-configuration test uses it)


@pytest.fixture(autouse=True)
def _one_thread_for_every_perf_test(one_thread):
    """tests/conftest.py's ``one_thread`` for every perf test."""
    yield
