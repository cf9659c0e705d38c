"""Model adapters: every model-family fact vtprune needs, behind one small interface.

Methods never import transformers model classes; they see visual tokens through the adapter:
where each image's tokens sit (found from the config's image token id), which vision-tower positions each
LLM-side visual token comes from, the vision layer LLaVA-style models read features from, and the LLM layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import compat


@dataclass(frozen=True)
class VisualSpan:
    """One image's visual tokens in one sample, in the original (unpruned) sequence layout."""

    sample: int  # batch row
    image: int  # image index in batch order (the order of pixel_values)
    index_in_sample: int  # 0 for the first image of its sample, 1 for the second, ...
    start: int  # first position in input_ids
    length: int  # number of visual tokens N (context tokens only)


class Adapter:
    """Base class. Subclasses set the attributes in ``__init__`` and implement the geometry methods."""

    family: str = ""
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.language_model: nn.Module = inner.language_model
        self.decoder_layers: nn.ModuleList = inner.language_model.layers
        self.final_norm: nn.Module = inner.language_model.norm  # the norm before the LM head
        self.vision_tower: nn.Module = inner.vision_tower
        self.projector: nn.Module = inner.multi_modal_projector
        self.image_token_id: int = int(self.config.image_token_id)

    # --- vision tower -------------------------------------------------------------------------------
    @property
    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    @property
    def vision_feature_layer(self) -> int:
        """Index (0-based) of the vision encoder layer whose output the model reads as image features."""
        vfl = self.config.vision_feature_layer
        if not isinstance(vfl, int):
            raise NotImplementedError("vtprune: multi-layer vision_feature_layer is not supported yet")
        n = len(self.vision_layers)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i-1.
        return n + vfl if vfl < 0 else vfl - 1

    @property
    def drops_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    @property
    def vision_seq_len(self) -> int:
        """Tokens per crop in the vision tower, CLS included."""
        vc = self.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
        return (size // patch) ** 2 + 1

    # --- LLM side -----------------------------------------------------------------------------------
    @property
    def nominal_tokens(self) -> int:
        """Visual tokens of one standard image; the reference for ``keep=`` budgets."""
        raise NotImplementedError

    @property
    def image_nominal(self) -> int | None:
        """What ``keep=`` refers to for one image (``ImageView.nominal``); None on dynamic-resolution models, where
        ``keep`` is a count per image, capped at the image's tokens."""
        return self.nominal_tokens

    image_sizes_key = "image_sizes"  # the model's keyword for image geometry (Qwen: image_grid_thw)
    vision_cuts = True  # the tower runs crops as [crops, 1+n, D]: vision cuts and vision probes are offered
    deepstack_layers = 0  # decoder layers after which the model adds per-token vision features (Qwen3-VL)

    def prompt_positions(self, batch: dict) -> torch.Tensor:
        """The position ids the language model gives a right-padded batch of prompts (training tools): [B, T]."""
        ids = batch["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)

    def layer_position_ids(self, position_ids):
        """The ``position_ids`` the language model hands each decoder layer for these model-level ids."""
        return position_ids

    def take_deepstack(self, kwargs: dict):
        """Pop the language model's per-layer visual features (models with DeepStack); None here."""
        return None

    def decoder_sublayer(self, layer: int, part: str) -> nn.Module:
        """The attention (``"attn"``) or FFN (``"mlp"``) sublayer of decoder layer ``layer``."""
        return getattr(self.decoder_layers[layer], {"attn": "self_attn", "mlp": "mlp"}[part])

    def preview_qk(self, layer: int, hidden: torch.Tensor, position_embeddings, rows: slice = slice(None)):
        """(q [B, H, r, d] of ``rows``, k [B, H_kv, T, d], scaling): what decoder layer ``layer`` would compute from
        ``hidden`` [B, T, D] (its input norm, q/k projections and the model's own RoPE), without running it."""
        block = self.decoder_layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        cos, sin = position_embeddings
        q = attn.q_proj(x[:, rows]).view(*x[:, rows].shape[:-1], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)
        rotate = compat.rotary_function(attn)
        q, _ = rotate(q, q, cos[:, rows], sin[:, rows])
        _, k = rotate(k, k, cos, sin)
        return q, k, attn.scaling

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    # --- geometry -----------------------------------------------------------------------------------
    def image_token_counts(self, n_images: int, image_sizes, run_lengths: list[int]) -> list[int] | None:
        """Expected visual-token count of each image (batch order), or None when runs are one image each."""
        return None

    def crops_per_image(self, spans: list[VisualSpan], image_sizes) -> list[int]:
        """How many vision-tower crops (rows of the flattened pixel batch) each image uses."""
        raise NotImplementedError

    def crop_counts(self, pixel_values: torch.Tensor, image_sizes) -> list[int]:
        """Vision crops of each image, from the pixel inputs alone (before input_ids are seen)."""
        return [1] * int(pixel_values.shape[0])

    def count_images(self, pixel_values: torch.Tensor, image_sizes) -> int:
        return int(pixel_values.shape[0])

    def token_sources(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        """[N, S] positions in this image's vision-tower sequences (crop * seq_len + pos) feeding each token;
        -1 pads rows with fewer sources (e.g. LLaVA-NeXT newline tokens have none)."""
        raise NotImplementedError

    def projector_rows(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        """[N] flat index into this image's projector input rows (crop * tokens_per_crop + t); -1 where the
        token has no projector input (newline tokens)."""
        raise NotImplementedError

    def anyres_geometry(self, span: VisualSpan, image_sizes) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(order, tokens), each [crops, P] over every crop's P patches, for anyres models (base image plus a
        high-res crop grid); None for single-crop images and for tiles packed one after another (InternVL).
        order: rank of each patch in the model's packing with nothing unpadded and no newline tokens.
        tokens: index (0..N-1) of the image token the patch becomes, -1 where the model drops it (unpadding)."""
        return None

    def token_grid(self, span: VisualSpan, image_sizes) -> torch.Tensor:
        """[N, 3] (grid, row, col) of each token on its image's token grid: one grid per crop / tile, coordinates
        of the token's vision patches divided by the pooling (2 for a 2x2 pixel shuffle)."""
        src = self.token_sources(span, image_sizes)
        offset = 1 if self.drops_cls else 0
        side = int(round((self.vision_seq_len - 1) ** 0.5))
        pool = int(round(src.shape[1] ** 0.5))
        first = src.clamp(min=0).min(1).values  # the token's top-left patch
        crop, patch = first // self.vision_seq_len, first % self.vision_seq_len - offset
        return torch.stack([crop, patch // side // pool, patch % side // pool], 1)

    # de-normalisation of pixel_values (the processor's image_mean / image_std; CLIP's unless an adapter says)
    pixel_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    vision_layer_takes_mask: bool = True  # CLIP layers accept an attention mask; InternVL's do not

    def patch_units(self) -> torch.Tensor:
        """[S-1] id of the LLM-side token each vision patch of a crop feeds (patches are their own tokens unless
        the model pools them, as InternVL's pixel shuffle does)."""
        return torch.arange(self.vision_seq_len - 1)

    @property
    def cls_in_projector_space(self) -> bool:
        """Whether the vision CLS vector can be fed to the projector (true when the projector reads raw
        vision hidden states, false after InternVL's pixel shuffle)."""
        return True


def find_runs(row: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token_id`` in a 1-D tensor."""
    is_tok = (row == token_id).to(torch.int8)
    if not bool(is_tok.any()):
        return []
    diff = torch.diff(torch.nn.functional.pad(is_tok, (1, 1)))
    starts = torch.nonzero(diff == 1).flatten().tolist()
    ends = torch.nonzero(diff == -1).flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def clip_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """CLIP encoder layers; ``CLIPVisionModel`` lost its ``vision_model`` wrapper in transformers 5."""
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers
