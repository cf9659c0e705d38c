"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (spec qwen_vl.md): dynamic resolution, 2x2 merge, 3-D M-RoPE, DeepStack.

Only ``<|image_pad|>`` tokens (``config.image_token_id``) are visual tokens; ``<|vision_start|>`` /
``<|vision_end|>`` and video tokens are text to vtprune (videos pass through unpruned, with their positions).
An image is ``t*h*w`` patch rows of ``pixel_values`` and one ``image_grid_thw`` row; it becomes ``t*h*w/4`` tokens,
so "one crop" per image and no CLS token. Positions reach the language model as ``[3|4, B, T]`` (t, h, w, and
under ``generate()`` the text row first); DeepStack features (Qwen3) are added after the first decoder layers.
Cuts and probes inside the vision tower are not offered (windowed, packed tower: ``vision_cuts`` is False).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PruneError
from .base import Adapter, VisualSpan


class QwenVLAdapter(Adapter):
    image_sizes_key = "image_grid_thw"  # what ``get_image_features`` / the forward take instead of image_sizes
    vision_cuts = False  # the packed, window-permuted tower has no [crops, 1+n, D] layout to cut or probe
    vision_layer_takes_mask = False
    pixel_mean = (0.48145466, 0.4578275, 0.40821073)  # Qwen2.5-VL's processor (CLIP statistics)
    pixel_std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model: nn.Module):  # no vision_tower / multi_modal_projector attributes on Qwen
        self.model = model
        self.config = model.config
        inner = model.model
        self.language_model = inner.language_model
        self.decoder_layers = inner.language_model.layers
        self.final_norm = inner.language_model.norm  # the norm before the LM head
        self.vision_tower = inner.visual
        self.projector = inner.visual.merger
        self.image_token_id = int(self.config.image_token_id)
        self.merge = int(self.config.vision_config.spatial_merge_size)

    # --- vision tower -------------------------------------------------------------------------------
    @property
    def vision_layers(self):
        return self.vision_tower.blocks

    def vision_attention(self, layer):
        return layer.attn

    @property
    def vision_feature_layer(self) -> int:
        return len(self.vision_layers) - 1  # the merger reads the last block's output

    @property
    def drops_cls(self) -> bool:
        return False

    @property
    def vision_seq_len(self) -> int:
        raise PruneError(f"vtprune: {self.family} has no fixed vision sequence (dynamic resolution)")

    def full_attention_block(self, block: int | None) -> int:
        """The vision block a received-attention score reads: ``block`` (checked) or the last full-attention one."""
        vc = self.config.vision_config
        full = list(getattr(vc, "fullatt_block_indexes", None) or range(len(self.vision_layers)))
        if block is None:
            return full[-1]
        if block not in full:
            raise PruneError(f"vtprune: vision block {block} of {self.family} attends within windows only, so its "
                             f"received attention is local; use a full-attention block: {full}")
        return block

    def vision_token_order(self, image_sizes) -> tuple[int, torch.Tensor]:
        """(patches per token, [U] position in the tower's block order of each merged token, images in batch
        order): Qwen2.5-VL's blocks run on window-permuted 2x2 units (argsort of the window index)."""
        grid = self._grid(image_sizes)
        n = int(grid.prod(1).sum()) // self.merge ** 2
        vc = self.config.vision_config
        if not hasattr(vc, "window_size"):
            return self.merge ** 2, torch.arange(n)
        from .. import compat

        window_index = compat.vision_window_index(grid, self.merge, vc.window_size, vc.patch_size)
        return self.merge ** 2, torch.argsort(window_index)

    def vision_token_offset(self, span: VisualSpan, image_sizes) -> int:
        """Index of the image's first merged token among all images' tokens (batch order)."""
        grid = self._grid(image_sizes)
        return int(grid[:span.image].prod(1).sum()) // self.merge ** 2

    # --- budgets: dynamic resolution ----------------------------------------------------------------
    @property
    def nominal_tokens(self) -> int:
        """The most tokens one image can have with the processor's default ``max_pixels`` (1280 tokens on
        Qwen2.5-VL, 16384*32*32 / (16*16*4) on Qwen3-VL); ``keep`` is per image and capped at its own count."""
        vc = self.config.vision_config
        return 1280 if vc.patch_size == 14 else 16384

    image_nominal = None  # keep= counts per image (capped at the image's tokens), never scaled by a nominal image

    # --- geometry -----------------------------------------------------------------------------------
    def _grid(self, image_sizes) -> torch.Tensor:
        if image_sizes is None:
            raise PruneError("vtprune: Qwen images need image_grid_thw (pass the processor's output whole)")
        return torch.as_tensor(image_sizes).reshape(-1, 3).long()

    def count_images(self, pixel_values, image_sizes) -> int:
        return int(self._grid(image_sizes).shape[0])

    def image_token_counts(self, n_images, image_sizes, run_lengths):
        return [int(g.prod()) // self.merge ** 2 for g in self._grid(image_sizes)]

    def crops_per_image(self, spans, image_sizes):
        return [1] * len(spans)

    def crop_counts(self, pixel_values, image_sizes):
        grid = self._grid(image_sizes)
        rows = int(grid.prod(1).sum())
        if pixel_values is not None and int(pixel_values.shape[0]) != rows:
            raise PruneError(f"vtprune: pixel_values hold {int(pixel_values.shape[0])} patch rows but image_grid_thw "
                             f"needs {rows}; pass the processor's output unchanged")
        return [1] * int(grid.shape[0])

    def _image_grid(self, span: VisualSpan, image_sizes) -> tuple[int, int, int]:
        t, h, w = (int(x) for x in self._grid(image_sizes)[span.image])
        return t, h // self.merge, w // self.merge

    def token_sources(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        """[N, 4]: token j's patches are rows 4j..4j+3 of its image (processor / merge-block order)."""
        per = self.merge ** 2
        return torch.arange(span.length * per).reshape(span.length, per)

    def projector_rows(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        return torch.arange(span.length)

    def token_grid(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        """[N, 3] (frame, row, col) of each token on its image's merged grid."""
        t, h, w = self._image_grid(span, image_sizes)
        j = torch.arange(span.length)
        return torch.stack([j // (h * w), j % (h * w) // w, j % w], 1)

    # --- LLM side: M-RoPE, q/k norms, DeepStack -------------------------------------------------------
    position_rows = 3  # rows of rotary positions (t, h, w)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """cos/sin from [B, T] (text: t = h = w), [3, B, T] or generate()'s [4, B, T] (text row first) ids."""
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, *position_ids.shape)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return self.language_model.rotary_emb(hidden, position_ids)

    def prompt_positions(self, batch: dict) -> torch.Tensor:
        """[3, B, T] the model's own M-RoPE positions of a batch (``get_rope_index``; needs mm_token_type_ids)."""
        if batch.get("mm_token_type_ids") is None:
            raise PruneError("vtprune: Qwen prompts need mm_token_type_ids (the processor returns them) for their "
                             "3-D positions")
        grid = batch.get("image_grid_thw")
        pos, _ = self.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=grid,
                                                 attention_mask=batch.get("attention_mask"))
        return pos

    def layer_position_ids(self, position_ids: torch.Tensor | None):
        """What the text model hands each layer as ``position_ids``: the text row of [4, B, T] ids, else None."""
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[0]
        return None

    def preview_qk(self, layer: int, hidden: torch.Tensor, position_embeddings, rows: slice = slice(None)):
        """As :meth:`Adapter.preview_qk`, with Qwen3's per-head ``q_norm`` / ``k_norm`` before RoPE."""
        from .. import compat

        block = self.decoder_layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        q = attn.q_proj(x[:, rows]).view(*x[:, rows].shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(*x.shape[:-1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        rotate = compat.rotary_function(attn)
        q, _ = rotate(q, q, cos[:, rows], sin[:, rows])
        _, k = rotate(k, k, cos, sin)
        return q, k, attn.scaling

    @property
    def deepstack_layers(self) -> int:
        """Decoder layers 0..n-1 after which DeepStack features are added (0 on Qwen2.5-VL)."""
        n = len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())
        return min(n, len(self.decoder_layers))  # the model adds after existing layers only

    def take_deepstack(self, kwargs: dict):
        """Pop the language model's DeepStack inputs: (visual_pos_masks [B, T], [n_visual, D] per layer) or None."""
        mask, embeds = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
        return None if mask is None or embeds is None else (mask, list(embeds))


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    pixel_mean = pixel_std = (0.5, 0.5, 0.5)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_classes = ("Qwen3VLMoeForConditionalGeneration",)
