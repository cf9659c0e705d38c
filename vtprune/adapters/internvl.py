"""InternVL (``InternVLForConditionalGeneration``): tiles of 448 px, CLS dropped, 2x2 pixel shuffle.

Only ``<IMG_CONTEXT>`` tokens (the config's ``image_token_id``) are visual tokens; the ``<img>``/``</img>``
delimiters around them are text and are never pruned. Each LLM token comes from 4 vision patches; the map is
asked from the model's own ``pixel_shuffle`` applied to a tensor of patch indices.
"""

from __future__ import annotations

import torch

from ..errors import PruneError
from .base import Adapter, VisualSpan


class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self._tile_sources: torch.Tensor | None = None

    @property
    def vision_layers(self):
        return self.vision_tower.encoder.layer

    def vision_attention(self, layer):
        return layer.attention

    @property
    def tokens_per_tile(self) -> int:
        return int(self.config.image_seq_length)

    @property
    def nominal_tokens(self) -> int:
        return self.tokens_per_tile

    vision_layer_takes_mask = False
    # OpenGVLab's InternVL preprocessing normalises with the ImageNet statistics
    pixel_mean = (0.485, 0.456, 0.406)
    pixel_std = (0.229, 0.224, 0.225)

    @property
    def cls_in_projector_space(self) -> bool:
        return False

    def patch_units(self) -> torch.Tensor:
        per_tile = self._per_tile()  # [tokens, 4] vision-sequence positions (CLS = 0) of each token's patches
        offset = 1 if self.drops_cls else 0
        units = torch.empty(self.vision_seq_len - 1, dtype=torch.long)
        units[(per_tile - offset).flatten()] = torch.arange(per_tile.shape[0]).repeat_interleave(per_tile.shape[1])
        return units

    def count_images(self, pixel_values, image_sizes):
        return None  # pixel_values hold tiles; each <IMG_CONTEXT> run is one image

    def crops_per_image(self, spans, image_sizes):
        out = []
        for s in spans:
            if s.length % self.tokens_per_tile:
                raise PruneError(
                    f"vtprune: an InternVL image has {s.length} <IMG_CONTEXT> tokens, not a multiple of "
                    f"image_seq_length={self.tokens_per_tile}; check the processor's expansion of image tokens"
                )
            out.append(s.length // self.tokens_per_tile)
        return out

    def _per_tile(self) -> torch.Tensor:
        if self._tile_sources is None:
            side = int(round((self.vision_seq_len - 1) ** 0.5))
            offset = 1 if self.drops_cls else 0
            ids = (torch.arange(side * side, dtype=torch.float64) + offset).reshape(1, side, side, 1)
            shuffled = self.model.model.pixel_shuffle(ids, scale_factor=self.config.downsample_ratio)
            self._tile_sources = shuffled.reshape(-1, shuffled.shape[-1]).round().long()
        return self._tile_sources

    def token_sources(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        per_tile = self._per_tile()
        n_tiles = span.length // per_tile.shape[0]
        offsets = torch.arange(n_tiles).repeat_interleave(per_tile.shape[0]) * self.vision_seq_len
        return per_tile.repeat(n_tiles, 1) + offsets[:, None]

    def projector_rows(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        return torch.arange(span.length)
