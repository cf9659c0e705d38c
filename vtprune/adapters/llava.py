"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP crop per image, N = (image_size/patch)^2 tokens."""

from __future__ import annotations

import torch

from .base import Adapter, VisualSpan, clip_encoder_layers


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def vision_layers(self):
        return clip_encoder_layers(self.vision_tower)

    def vision_attention(self, layer):
        return layer.self_attn

    @property
    def nominal_tokens(self) -> int:
        return self.vision_seq_len - (1 if self.drops_cls else 0)

    def image_token_counts(self, n_images, image_sizes, run_lengths):
        return [self.nominal_tokens] * n_images

    def crops_per_image(self, spans, image_sizes):
        return [1] * len(spans)

    def token_sources(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        offset = 1 if self.drops_cls else 0  # position 0 of the CLIP sequence is CLS
        return (torch.arange(span.length) + offset).unsqueeze(1)

    def projector_rows(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        return torch.arange(span.length)
