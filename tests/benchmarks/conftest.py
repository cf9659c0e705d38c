"""Fixtures shared by the bench tests: one torch thread, and a random-init tiny LLaVA saved as a checkpoint."""

import pytest

from vtprune.benchmarks import tiny_llava as TL


@pytest.fixture(autouse=True)
def _one_thread_for_every_bench_test(one_thread):
    """tests/conftest.py's ``one_thread`` for every bench test."""
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny LLaVA saved like a real checkpoint (independent of the shipped one): (path, model, processor)."""
    model, processor = TL.build_untrained_tiny_llava(seed=0)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor
