"""Fixtures shared by the bench tests: one torch thread, and a random-init tiny LLaVA saved as a checkpoint."""

import pytest
import torch

from vtprune.benchmarks import tiny_llava as TL


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core box they cost a lot."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny LLaVA saved like a real checkpoint (independent of the shipped one): (path, model, processor)."""
    model, processor = TL.build_untrained_tiny_llava(seed=0)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor
