"""Fixtures shared by the embedded-default tests: one torch thread (as for the bench tests they came from)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_for_every_embedded_test(one_thread):
    """tests/conftest.py's ``one_thread`` for every embedded test."""
    yield
