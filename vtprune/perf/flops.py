"""Analytic FLOPs and KV-cache bytes of one sample, each layer with its own token count. ::

    from vtprune.perf.flops import breakdown, cache_tokens_per_layer, kv_bytes, shape_of
    with vtprune.pruned(model, "fastv", keep=64):
        model(**inputs)                                   # one prompt (batch of 1)
        stats = model.vtprune.stats
    flops = breakdown(model, inputs, stats)               # .vision .projector .llm_prefill .decode_step .prefill
    kv = kv_bytes(shape_of(model), cache_tokens_per_layer(model, inputs, stats), bytes_per_element=2)

FLOPs are 2 x multiply-accumulates of the matmuls; norms, activations, softmax, RoPE and residual adds are
left out (they are O(n·d), negligible next to the matmuls). Dimensions: ``d`` LLM hidden size, ``m`` FFN width,
``d_q = heads·head_dim``, ``d_kv = kv_heads·head_dim``, ``V`` vocabulary; ``D`` / ``M`` vision hidden size /
MLP width, ``s`` patch size, ``P`` patches per crop.

LLM decoder layer, ``n`` query tokens attending to ``c`` keys::

    2·n·d·(d_q + 2·d_kv)      q, k, v projections
  + 2·n·d_q·d                 output projection
  + 4·n·c·d_q                 scores q·kᵀ and the weighted sum of values
  + 2·n·d·m·g                 MLP: g = 3 for a gated (SwiGLU, Llama-style) MLP, 2 otherwise

Prefill: ``c = n`` and the full n x n square is counted (causal kernels may skip about half of it). The LM head
costs ``2·d·V`` per row of logits; a prefill computes one row (vtprune calls the forward with
``logits_to_keep=1``). A decode step runs one token per layer against that layer's cache plus itself
(``n = 1``, ``c = cached + 1``) and one LM-head row.

Vision layer on ``p`` tokens (non-gated MLP)::

    2·p·D·3D + 2·p·D·D + 4·p²·D + 2·p·D·M·2

plus the patch embedding ``2·P·(3·s²)·D`` per crop / tile. Every layer of the tower is counted: in transformers
5.24 LLaVA, LLaVA-NeXT and InternVL run the whole encoder and then pick ``hidden_states[feature_layer]``, so
LLaVA's last CLIP layer runs although its output is unused. Costs are per crop (LLaVA: 1 per image; LLaVA-NeXT:
base + high-res crops; InternVL: tiles).

Projector on ``n`` rows: ``2·n·D_in·d + 2·n·d·d`` (two linear layers). LLaVA feeds one row per patch
(``D_in = D``; CLS too with the "full" strategy); InternVL pixel-shuffles 2x2 patches into one row
(``D_in = 4·D``, a LayerNorm first, left out).

Qwen-VL (dynamic resolution, no CLS, no crops): per image frame of ``P = h·w`` patches (``image_grid_thw``), the
patch embedding ``2·P·(3·T·s²)·D`` (T = 2 frames per temporal patch), and per block
``2·P·D·3D + 2·P·D·D + 2·P·D·M·g + 4·A·D`` with ``g`` = 3 for Qwen2.5-VL's SwiGLU blocks, 2 for Qwen3-VL's, and
``A = Σ n_w²`` over the attention segments: the 8x8-patch windows (edge windows smaller) in windowed blocks,
``P²`` in full-attention blocks (Qwen2.5-VL's ``fullatt_block_indexes``; every block on Qwen3-VL). The 2x2
merger (the projector) on ``P/4`` rows: ``2·(P/4)·4D·4D + 2·(P/4)·4D·d``, once for the output and once per
DeepStack layer (Qwen3-VL), whose additions to the LLM's hidden states are O(n·d) and left out.

KV cache after the prefill: ``sum over layers of 2·kv_heads·head_dim·tokens_l·bytes_per_element·batch``, with
``tokens_l`` the tokens layer ``l`` caches (:func:`cache_tokens_per_layer`: those it processed, or the last
layer's after ``evict_early_kv``). The decode step attends to the same caches.

Pruning (:func:`breakdown`, from vtprune's ``PruneStats`` of the pruned forward): LLM layer ``l`` processes the
prompt's tokens with each image's visual tokens replaced by its count at ``l`` (``pre_llm`` stages count from
layer 0, ``llm`` stage k from layer k, as :func:`vtprune.perf.timing.layer_token_counts`). A vision stage
before vision layer ``j`` sets the crop's tokens from layer ``j`` on (CLS always stays); vtprune reports it in
patches of the image's first crop, and every crop of the image is counted with that number (FlowCut, with its
default ``shared_prune_count``, cuts every crop of an image to the same count). The projector is counted on the
rows left after the last vision cut, rounded up to whole rows after a pixel shuffle: what a pruned model needs
(vtprune itself scatters the survivors back onto the full grid, so the installed model still runs its projector
on every row; for LLaVA-1.5-7B that is ~24 GFLOPs next to ~8 TFLOPs of LLM prefill).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "Shape",
    "shape_of",
    "vision_layer_flops",
    "vision_flops",
    "qwen_vision_flops",
    "merger_flops",
    "projector_flops",
    "llm_layer_flops",
    "lm_head_flops",
    "llm_prefill_flops",
    "decode_step_flops",
    "kv_bytes",
    "FlopsBreakdown",
    "llm_tokens_per_layer",
    "cache_tokens_per_layer",
    "breakdown",
]


@dataclass(frozen=True)
class Shape:
    """Every dimension the FLOPs count needs. Vision numbers are per crop / tile."""

    # vision tower
    vision_layers: int  # layers the tower runs (all of them)
    vision_hidden: int  # D
    vision_mlp: int  # M
    vision_heads: int
    patch: int  # s, pixels
    image: int  # crop side, pixels
    patches: int  # P per crop
    has_cls: bool  # a CLS token in the tower's sequence (p = P + 1)
    # projector
    projector: str  # "mlp" (LLaVA) | "shuffle_mlp" (InternVL: pixel shuffle, LayerNorm, 2-layer MLP)
    projector_in: int  # D_in
    projector_pool: int  # patches per projector row (1, or 4 after a 2x2 pixel shuffle)
    projector_cls: bool  # CLS is fed to the projector too ("full" feature strategy)
    # LLM
    llm_layers: int
    hidden: int  # d
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # m
    gated: bool  # SwiGLU-style MLP (gate, up, down)
    vocab: int  # V
    # Qwen-VL towers (dynamic resolution): windows, full-attention blocks, gated vision MLP, 2x2 merger, DeepStack
    window: int = 0  # window side in patches (0: every block attends over the whole frame)
    full_blocks: tuple[int, ...] = ()  # blocks attending over the whole frame when windows exist
    vision_gated: bool = False
    merge: int = 1  # patches per side of one merged token
    temporal_patch: int = 1  # frames per patch
    deepstack: int = 0  # DeepStack mergers run besides the final one

    @property
    def vision_tokens(self) -> int:
        """Tokens per crop entering the tower's first layer (patches + CLS)."""
        return self.patches + int(self.has_cls)

    @property
    def projector_rows(self) -> int:
        """Projector rows per crop without pruning."""
        return self.patches // self.projector_pool + int(self.projector_cls)


def _side(value) -> int:
    return int(value if isinstance(value, int) else value[0])


def shape_of(model) -> Shape:
    """The :class:`Shape` of a LLaVA / LLaVA-NeXT / InternVL model, from its config (and whether its MLP is
    gated, from the decoder's modules; works on the meta device)."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    if adapter.family.startswith("qwen"):
        return _qwen_shape(model, adapter)
    cfg, vc, tc = model.config, model.config.vision_config, model.config.get_text_config()
    image, patch = _side(vc.image_size), _side(vc.patch_size)
    if adapter.family == "internvl":
        pool = round(1 / cfg.downsample_ratio) ** 2  # 2x2 patches per row at ratio 0.5
        projector, d_in, fed_cls = "shuffle_mlp", vc.hidden_size * pool, False
    else:
        layers = cfg.vision_feature_layer
        pool, projector = 1, "mlp"
        d_in = vc.hidden_size * (1 if isinstance(layers, int) else len(layers))  # feature layers concatenated
        fed_cls = not adapter.drops_cls
    heads = int(tc.num_attention_heads)
    return Shape(
        vision_layers=len(adapter.vision_layers), vision_hidden=int(vc.hidden_size),
        vision_mlp=int(vc.intermediate_size), vision_heads=int(vc.num_attention_heads), patch=patch, image=image,
        patches=(image // patch) ** 2, has_cls=adapter.vision_seq_len > (image // patch) ** 2,  # CLIP, InternViT: CLS
        projector=projector, projector_in=int(d_in), projector_pool=pool, projector_cls=fed_cls,
        llm_layers=int(tc.num_hidden_layers), hidden=int(tc.hidden_size), heads=heads,
        kv_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(tc, "head_dim", None) or tc.hidden_size // heads), ffn=int(tc.intermediate_size),
        gated=hasattr(adapter.decoder_sublayer(0, "mlp"), "gate_proj"), vocab=int(tc.vocab_size),
    )


def _llm_dims(model, adapter) -> dict:
    tc = model.config.get_text_config()
    heads = int(tc.num_attention_heads)
    return dict(llm_layers=int(tc.num_hidden_layers), hidden=int(tc.hidden_size), heads=heads,
                kv_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(tc, "head_dim", None) or tc.hidden_size // heads), ffn=int(tc.intermediate_size),
                gated=hasattr(adapter.decoder_sublayer(0, "mlp"), "gate_proj"), vocab=int(tc.vocab_size))


def _qwen_shape(model, adapter) -> Shape:
    """Qwen-VL: per-frame numbers come from each image's grid (``image``/``patches`` are 0 here)."""
    vc = model.config.vision_config
    D, merge = int(vc.hidden_size), int(vc.spatial_merge_size)
    window = int(getattr(vc, "window_size", 0) or 0) // int(vc.patch_size)
    return Shape(
        vision_layers=len(adapter.vision_layers), vision_hidden=D, vision_mlp=int(vc.intermediate_size),
        vision_heads=int(vc.num_heads), patch=int(vc.patch_size), image=0, patches=0, has_cls=False,
        projector="merger", projector_in=D * merge ** 2, projector_pool=merge ** 2, projector_cls=False,
        **_llm_dims(model, adapter), window=window,
        full_blocks=tuple(getattr(vc, "fullatt_block_indexes", None) or ()),
        vision_gated=hasattr(adapter.vision_layers[0].mlp, "gate_proj"), merge=merge,
        temporal_patch=int(vc.temporal_patch_size), deepstack=adapter.deepstack_layers,
    )


def _chunks(n: int, size: int) -> list[int]:
    return [size] * (n // size) + ([n % size] if n % size else [])


def qwen_vision_flops(shape: Shape, frames: int, h: int, w: int) -> float:
    """A Qwen-VL tower on one image of ``frames`` x ``h`` x ``w`` patches (module doc), merger(s) excluded."""
    P, D, M = h * w, float(shape.vision_hidden), float(shape.vision_mlp)
    full = float(P) ** 2
    windowed = (sum(r * r for r in _chunks(h, shape.window)) * sum(c * c for c in _chunks(w, shape.window))
                if shape.window else full)
    per_block = 2 * P * D * 3 * D + 2 * P * D * D + 2 * P * D * M * (3 if shape.vision_gated else 2)
    blocks = sum(per_block + 4.0 * D * (full if (not shape.window or j in shape.full_blocks) else windowed)
                 for j in range(shape.vision_layers))
    embed = 2.0 * P * 3 * shape.temporal_patch * shape.patch ** 2 * D
    return frames * (embed + blocks)


def merger_flops(shape: Shape, rows: int) -> float:
    """The 2x2 merger (RMS/LayerNorm left out) on ``rows`` merged tokens, with every DeepStack merger."""
    d_in, d = float(shape.projector_in), float(shape.hidden)
    return (1 + shape.deepstack) * (2.0 * rows * d_in * d_in + 2.0 * rows * d_in * d)


# ---------------------------------------------------------------------------------------------------------------
# per stage
def _per_layer(values: Sequence[int], n_layers: int, what: str) -> list[int]:
    values = [int(v) for v in values]
    if len(values) != n_layers:
        raise ValueError(f"{what} needs one token count per layer ({n_layers} layers), got {len(values)}")
    return values


def vision_layer_flops(shape: Shape, p: int) -> float:
    """One vision layer on ``p`` tokens of one crop."""
    D, M = float(shape.vision_hidden), float(shape.vision_mlp)
    return 2 * p * D * 3 * D + 2 * p * D * D + 4.0 * p * p * D + 2 * p * D * M * 2


def vision_flops(shape: Shape, crops: int, tokens_per_layer: Sequence[int] | None = None) -> float:
    """Vision tower on ``crops`` crops / tiles: patch embedding plus every layer. ``tokens_per_layer``: tokens
    per crop entering each of the ``vision_layers`` layers (CLS included; default all patches + CLS)."""
    if tokens_per_layer is None:
        tokens_per_layer = [shape.vision_tokens] * shape.vision_layers
    tokens = _per_layer(tokens_per_layer, shape.vision_layers, "vision_flops")
    embed = 2.0 * shape.patches * 3 * shape.patch**2 * shape.vision_hidden
    return crops * (embed + sum(vision_layer_flops(shape, p) for p in tokens))


def projector_flops(shape: Shape, n_tokens: int) -> float:
    """Projector on ``n_tokens`` rows (LLaVA: patches fed; InternVL: tokens after the pixel shuffle)."""
    d = float(shape.hidden)
    return 2.0 * n_tokens * shape.projector_in * d + 2.0 * n_tokens * d * d


def llm_layer_flops(shape: Shape, n: int, c: int) -> float:
    """One decoder layer: ``n`` query tokens attending to ``c`` keys."""
    d, m = float(shape.hidden), float(shape.ffn)
    dq, dkv = float(shape.heads * shape.head_dim), float(shape.kv_heads * shape.head_dim)
    mlp = 2 * n * d * m * (3 if shape.gated else 2)
    return 2 * n * d * (dq + 2 * dkv) + 2 * n * dq * d + 4.0 * n * c * dq + mlp


def lm_head_flops(shape: Shape, rows: int = 1) -> float:
    return 2.0 * shape.hidden * shape.vocab * rows


def llm_prefill_flops(shape: Shape, tokens_per_layer: Sequence[int]) -> float:
    """Every decoder layer on its own token count (full square attention) plus one LM-head row."""
    tokens = _per_layer(tokens_per_layer, shape.llm_layers, "llm_prefill_flops")
    return sum(llm_layer_flops(shape, n, n) for n in tokens) + lm_head_flops(shape)


def decode_step_flops(shape: Shape, cache_per_layer: Sequence[int]) -> float:
    """One decode step: one token per layer attending to that layer's cache plus itself, one LM-head row."""
    cache = _per_layer(cache_per_layer, shape.llm_layers, "decode_step_flops")
    return sum(llm_layer_flops(shape, 1, c + 1) for c in cache) + lm_head_flops(shape)


def kv_bytes(shape: Shape, tokens_per_layer: Sequence[int], bytes_per_element: int, batch: int = 1) -> int:
    """Keys + values cached by every layer: ``sum_l 2·kv_heads·head_dim·tokens_l·bytes·batch``."""
    tokens = _per_layer(tokens_per_layer, shape.llm_layers, "kv_bytes")
    return int(sum(2 * shape.kv_heads * shape.head_dim * t * bytes_per_element * batch for t in tokens))


# ---------------------------------------------------------------------------------------------------------------
# one sample of a (pruned) model
@dataclass
class FlopsBreakdown:
    """FLOPs of one sample: vision tower, projector, LLM prefill (with its LM-head row), one decode step."""

    vision: float
    projector: float
    llm_prefill: float
    decode_step: float

    @property
    def prefill(self) -> float:
        return self.vision + self.projector + self.llm_prefill

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill": self.prefill}


def _one_sample(inputs: dict) -> None:
    rows = int(inputs["input_ids"].shape[0])
    if rows != 1:
        raise ValueError(f"FLOPs are counted per sample: pass the inputs of one prompt (batch of 1), got {rows} rows")


def _without_vision_stages(stats):
    """``stats`` with the vision stages dropped: their layers are vision layers, not LLM layers (the LLM-input
    cut they imply is a stage of its own)."""
    if stats is None:
        return None
    images = [dataclasses.replace(img, stages=[s for s in img.stages if s.stage != "vision"]) for img in stats.images]
    return dataclasses.replace(stats, images=images)


def llm_tokens_per_layer(model, inputs: dict, stats=None) -> list[int]:
    """Tokens each LLM layer of one sample processes: the prompt's tokens (``attention_mask`` sum) with each
    image's visual tokens at that layer from ``stats`` (``model.vtprune.stats`` after the pruned forward; None =
    unpruned). Its KV cache holds as many, except after ``evict_early_kv`` (:func:`cache_tokens_per_layer`)."""
    from .timing import layer_token_counts

    _one_sample(inputs)
    mask = inputs.get("attention_mask")
    n = int(mask.sum()) if mask is not None else int(inputs["input_ids"].shape[1])
    layers = shape_of(model).llm_layers
    return layer_token_counts(_without_vision_stages(stats), [n], layers)[0]


def cache_tokens_per_layer(model, inputs: dict, stats=None) -> list[int]:
    """Tokens each LLM layer's KV cache holds after the prefill of one sample: what the layer processed
    (:func:`llm_tokens_per_layer`), except after ``evict_early_kv`` (``stats.evicted_early_kv``), which cuts the
    cache of every layer to the last layer's tokens."""
    tokens = llm_tokens_per_layer(model, inputs, stats)
    if getattr(stats, "evicted_early_kv", False):
        return [tokens[-1]] * len(tokens)
    return tokens


def _vision_tokens(shape: Shape, image_stats) -> tuple[list[int], int]:
    """(tokens per crop entering each vision layer, patches per crop left at the end of the tower)."""
    tokens, patches = [shape.vision_tokens] * shape.vision_layers, shape.patches
    for st in image_stats.stages if image_stats is not None else ():
        if st.stage == "vision":  # before vision layer st.layer, in patches of the image's first crop
            patches = int(st.tokens_out)
            for j in range(int(st.layer), shape.vision_layers):
                tokens[j] = patches + int(shape.has_cls)
    return tokens, patches


def _images(model, inputs: dict) -> list[tuple[int, int]]:
    """(image index in batch order, crops / tiles) of every image of the sample."""
    from ..adapters import get_adapter
    from ..core.spans import find_spans

    if inputs.get("pixel_values") is None:
        return []
    adapter, sizes = get_adapter(model), inputs.get("image_sizes")
    spans = find_spans(adapter, inputs["input_ids"], inputs["pixel_values"], sizes)
    return [(s.image, c) for s, c in zip(spans, adapter.crops_per_image(spans, sizes))]


def breakdown(model, inputs: dict, stats=None) -> FlopsBreakdown:
    """FLOPs of one sample (``inputs`` of one prompt) through ``model``, pruned as ``stats`` says
    (``model.vtprune.stats`` after the pruned forward; None = unpruned)."""
    _one_sample(inputs)
    shape = shape_of(model)
    by_image = {img.image: img for img in stats.images} if stats is not None else {}
    vision = projector = 0.0
    grids = inputs.get("image_grid_thw") if shape.projector == "merger" and inputs.get("pixel_values") is not None else None
    for t, h, w in grids.tolist() if grids is not None else ():  # Qwen-VL: each image's own grid, no vision cuts
        vision += qwen_vision_flops(shape, t, h, w)
        projector += merger_flops(shape, t * h * w // shape.projector_pool)
    for image, crops in _images(model, inputs) if shape.projector != "merger" else ():
        tokens, patches = _vision_tokens(shape, by_image.get(image))
        vision += vision_flops(shape, crops, tokens)
        rows = math.ceil(patches / shape.projector_pool) + int(shape.projector_cls)
        projector += projector_flops(shape, crops * rows)
    llm = llm_tokens_per_layer(model, inputs, stats)
    return FlopsBreakdown(vision=vision, projector=projector, llm_prefill=llm_prefill_flops(shape, llm),
                          decode_step=decode_step_flops(shape, cache_tokens_per_layer(model, inputs, stats)))
