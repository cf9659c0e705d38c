"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"), spec §3.

Algorithm: run LLM layers 0..K-1 on the full sequence; inside layer K-1 take the attention probabilities of
the last prompt token, average over heads, slice the image block, keep the top ``round(N (1 - R))`` visual
tokens; from layer K on the dropped tokens are gone (in-place variant), kept tokens keep their original
position ids. Prefill only: decoding reuses the kept set through the compacted cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.probes import LLMAttention
from ..core.registration import register
from ..space import Int, tuned
from .base import Cut, ImageView, Method


@register
@dataclass
class FastV(Method):
    """``layer`` = K (paper headline K=2; the official lmms-eval KV-cache variant uses K=3)."""

    layer: int = tuned(2, Int(1, lambda _, model: min(model.llm_layers - 1, max(3, model.llm_layers // 4))))  # K <= L/4
    positions: str = "original"

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "Last-token attention at LLM layer K-1, keep the top visual tokens from layer K on."

    def check_fields(self) -> None:
        if self.layer < 1:  # layer 0 has no earlier layer to score at; the upper bound is checked at install
            raise self.field_error("layer", "an LLM layer K >= 1 (scores at K-1, cuts before K)")

    def cuts(self, model):
        return (Cut("llm", self.layer),)

    def probes(self, model):
        return (LLMAttention(self.layer - 1),)

    def score(self, image: ImageView) -> torch.Tensor:
        return image[LLMAttention(self.layer - 1)].mean(0)  # [H, n] -> [n], head average
