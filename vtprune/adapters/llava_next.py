"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops packed with ``image_newline`` tokens.

The token layout of an image (base crop, then the unpadded crop grid with one newline per row) is asked from
the model itself: its own ``pack_image_features`` is run on a tensor of vision-sequence indices, so vtprune
always agrees with the installed transformers version on where every token comes from. The same call with
the grid's own pixel size as image size (nothing to unpad) and no newline gives the packing order the
official VisionZip LLaVA-NeXT code uses (``anyres_geometry``).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..errors import PruneError
from .base import VisualSpan
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self._layout_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._geometry_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def count_images(self, pixel_values, image_sizes) -> int:
        return int(len(image_sizes)) if image_sizes is not None else int(pixel_values.shape[0])

    def _num_crops(self, size) -> int:
        return int(
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
        )

    def _layout(self, size) -> torch.Tensor:
        """[N] vision-sequence index (crop * seq_len + pos) of each packed token; -1 for newline tokens."""
        key = (int(size[0]), int(size[1]))
        if key not in self._layout_cache:
            self._layout_cache[key] = self._pack(self._num_crops(key), key, newline=True)
        return self._layout_cache[key]

    def _pack(self, n_crops: int, size, newline: bool) -> torch.Tensor:
        """The model's own ``pack_image_features`` run on vision-sequence indices of ``n_crops`` crops."""
        seq = self.vision_seq_len
        pos = torch.arange(seq, dtype=torch.float64)
        if self.drops_cls:
            pos = pos[1:]
        ids = (torch.arange(n_crops, dtype=torch.float64)[:, None] * seq + pos[None, :]).unsqueeze(-1)
        packed, _ = self.model.model.pack_image_features(
            [ids],
            torch.tensor([[int(size[0]), int(size[1])]]),
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=torch.full((1,), -1.0, dtype=torch.float64) if newline else None,
        )
        packed = packed[0] if isinstance(packed, (list, tuple)) else packed
        return packed.reshape(-1).round().long()

    def anyres_geometry(self, span: VisualSpan, image_sizes):
        """Patch ranks of the packing without unpadding (image size = the grid's own pixel size, so nothing
        is cut) and without newlines; token index of each patch from the real (unpadded) layout."""
        key = (int(image_sizes[span.image][0]), int(image_sizes[span.image][1]))
        if key not in self._geometry_cache:
            self._geometry_cache[key] = self._geometry(key)
        return self._geometry_cache[key]

    def _geometry(self, size: tuple[int, int]):
        n_crops, seq = self._num_crops(size), self.vision_seq_len
        if n_crops < 2:
            return None
        crop_px = self.config.vision_config.image_size
        rows, cols = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, crop_px)
        full = self._pack(n_crops, (rows * crop_px, cols * crop_px), newline=False)
        order = torch.full((n_crops * seq,), -1, dtype=torch.long)
        order[full] = torch.arange(full.numel())
        layout = self._layout(size)
        tokens = torch.full((n_crops * seq,), -1, dtype=torch.long)
        tokens[layout[layout >= 0]] = torch.nonzero(layout >= 0).flatten()
        return order.view(n_crops, seq)[:, 1:], tokens.view(n_crops, seq)[:, 1:]

    def token_grid(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        """Grid 0: the base crop (side x side); grid 1: the packed high-res canvas, rows of W tokens including the
        newline column (as the official anyres code counts them)."""
        layout = self._layout(image_sizes[span.image])
        seq, side = self.vision_seq_len, int(round((self.vision_seq_len - 1) ** 0.5))
        base = (layout >= 0) & (layout < seq)
        n_base = int(base.sum())
        grid = torch.zeros(layout.numel(), 3, dtype=torch.long)
        patch = layout[:n_base] - (1 if self.drops_cls else 0)
        grid[:n_base, 1], grid[:n_base, 2] = patch // side, patch % side
        canvas = torch.arange(layout.numel() - n_base)
        newlines = torch.nonzero(layout[n_base:] < 0).flatten()
        width = int(newlines[0]) + 1 if newlines.numel() else max(1, canvas.numel())
        grid[n_base:, 0], grid[n_base:, 1], grid[n_base:, 2] = 1, canvas // width, canvas % width
        return grid

    def crop_counts(self, pixel_values, image_sizes):
        return [self._num_crops(s) for s in image_sizes]

    def image_token_counts(self, n_images, image_sizes, run_lengths):
        if image_sizes is None:
            raise PruneError("vtprune: LLaVA-NeXT needs image_sizes (the processor returns them)")
        return [int(self._layout(s).numel()) for s in image_sizes]

    def crops_per_image(self, spans, image_sizes):
        return [self._num_crops(image_sizes[s.image]) for s in spans]

    def token_sources(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        return self._layout(image_sizes[span.image]).unsqueeze(1)

    def projector_rows(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        src = self._layout(image_sizes[span.image])
        seq = self.vision_seq_len
        offset = 1 if self.drops_cls else 0
        rows = (src // seq) * (seq - offset) + (src % seq) - offset
        return torch.where(src >= 0, rows, torch.full_like(rows, -1))
