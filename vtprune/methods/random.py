"""Random pruning baseline: drop a seeded random subset of each image's visual tokens before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.registration import register
from .base import ImageView, Method


@register
@dataclass
class RandomPrune(Method):
    """Keep a uniformly random subset. The draw for an image depends only on ``seed``, the image's place in
    its own sample and its token count, so a prompt gives the same kept set alone or inside any batch."""

    seed: int = 0
    positions: str = "renumber"

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "Seeded uniformly random visual tokens kept, cut after the projector (baseline)."

    def check_fields(self) -> None:
        if not 0 <= self.seed < 2**32:  # keeps the per-image generator seed in torch's 64-bit range
            raise self.field_error("seed", "an integer in [0, 2**32)")

    def score(self, image: ImageView) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + image.index_in_sample * 7919 + image.n_tokens)
        return torch.rand(image.n_tokens, generator=gen)[image.index.cpu()].to(image.embeds.device)
