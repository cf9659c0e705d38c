"""Fixtures shared by the bench tests: one torch thread, a random-init tiny LLaVA saved as a checkpoint, and a
registered method whose scoring fails."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from vtprune import registry
from vtprune.benchmarks import tiny_llava as TL
from vtprune.methods.base import Method


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


@pytest.fixture
def broken_method():
    """The name of a method registered for the test whose ``score`` raises RuntimeError("boom") at the forward."""
    @dataclass
    class Broken(Method):
        name: ClassVar[str] = "_test_broken"

        def score(self, image):
            raise RuntimeError("boom")

    registry.register(Broken)
    try:
        yield Broken.name
    finally:
        registry._METHODS.pop(Broken.name)
