"""Real VLM architectures with random weights, built from configs only (offline), for efficiency measurements.

``ARCHS`` holds the published dimensions of four models; :func:`build_arch` builds one (seeded random weights,
widths unchanged, optionally fewer layers) directly on a device in a dtype, and :func:`arch_inputs` makes a
prompt of the right shape for it (the model's own image-token count, random text around it)::

    from vtprune.perf.archs import build_arch, arch_inputs
    model = build_arch("llava-1.5-7b", dtype=torch.bfloat16, device="cuda")   # full depth, seconds on a GPU
    inputs = arch_inputs(model, text_tokens=56)                                # 56 text + 576 image tokens
    with vtprune.pruned(model, "fastv", keep=64):
        model(**inputs)

Random weights produce meaningless text but the same shapes, kernels and FLOPs as the trained model, which is
all latency, memory and KV-cache measurements need.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from .qwen_archs import QWEN3_TEXT, QWEN3_VISION, QWEN25_TEXT, QWEN25_VISION, QWEN_TOP, qwen_config, qwen_inputs

__all__ = ["Arch", "ARCHS", "arch_config", "build_arch", "arch_inputs"]


@dataclass(frozen=True)
class Arch:
    """One architecture: its family and the keyword arguments of its transformers configs (full depth).

    ``image_delimiters``: (start, end) ids around InternVL's ``<IMG_CONTEXT>`` run, None for LLaVA."""

    family: str  # "llava" | "llava_next" | "internvl" | "qwen2_5_vl" | "qwen3_vl"
    description: str
    vision: dict[str, Any]
    text: dict[str, Any]
    top: dict[str, Any] = field(default_factory=dict)
    image_delimiters: tuple[int, int] | None = None

    @property
    def vision_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", self.vision.get("depth")))

    @property
    def llm_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def feature_layer(self) -> int:
        return int(self.top.get("vision_feature_layer", -1))  # Qwen-VL: the merger reads the last block


# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336, as in llava-hf): 24 x 1024, MLP 4096, 16 heads,
# (336/14)^2 = 576 patches + CLS
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
# Vicuna-7B v1.5 (Llama-2-7B shape); llava-hf pads the vocabulary from 32000 to 32064 (image + pad tokens)
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2)
# Vicuna-13B v1.5 (Llama-2-13B shape)
VICUNA_13B = dict(VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40)
# LLaVA-1.5: features from the second-to-last CLIP layer, CLS dropped ("default"), 2-layer GELU MLP projector
LLAVA_TOP = dict(image_token_index=32000, image_seq_length=576, vision_feature_layer=-2,
                 vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
                 tie_word_embeddings=False)
# InternViT-300M-448px: 24 x 1024, MLP 4096, 16 heads, qkv bias, layer scale 0.1, (448/14)^2 = 1024 patches + CLS;
# InternVL's 2x2 pixel shuffle (downsample_ratio 0.5) turns them into 256 LLM tokens per tile
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, hidden_act="gelu", attention_bias=True, use_qk_norm=False,
                      norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1)
# InternLM2-chat-7B as a Llama: 32 x 4096, 32 heads / 8 KV heads (GQA), FFN 14336, vocab 92553, rope theta 1e6
INTERNLM2_7B = dict(vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=1, eos_token_id=2)

ARCHS: dict[str, Arch] = {
    "llava-1.5-7b": Arch("llava", "LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B, 576 image tokens",
                         CLIP_L_336, VICUNA_7B, LLAVA_TOP),
    "llava-1.5-13b": Arch("llava", "LLaVA-1.5-13B: CLIP ViT-L/14-336 + Vicuna-13B, 576 image tokens",
                          CLIP_L_336, VICUNA_13B, LLAVA_TOP),
    # llava-v1.6-vicuna-7b: same tower and LLM, anyres crops of 336 px on these canvases (height, width)
    "llava-next-7b": Arch("llava_next", "LLaVA-NeXT-7B (llava-v1.6-vicuna-7b): anyres, 672x672 -> 5 crops, 2928 tokens",
                          CLIP_L_336, VICUNA_7B,
                          dict(LLAVA_TOP, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                [336, 1008]])),
    # <img> 92544, </img> 92545, <IMG_CONTEXT> 92546 in InternVL2's InternLM2 tokenizer
    "internvl2-8b": Arch("internvl", "InternVL2-8B: InternViT-300M-448px + InternLM2-7B (as Llama), 256 tokens/tile",
                         INTERNVIT_300M, INTERNLM2_7B,
                         dict(image_token_id=92546, image_seq_length=256, downsample_ratio=0.5,
                              vision_feature_layer=-1, vision_feature_select_strategy="default",
                              projector_hidden_act="gelu", tie_word_embeddings=False),
                         image_delimiters=(92544, 92545)),
    "qwen2.5-vl-7b": Arch("qwen2_5_vl", "Qwen2.5-VL-7B: windowed ViT (4 full blocks) + Qwen2-7B LLM, 672x672 -> "
                          "576 tokens", QWEN25_VISION, QWEN25_TEXT, QWEN_TOP),
    "qwen3-vl-8b": Arch("qwen3_vl", "Qwen3-VL-8B: ViT with DeepStack (3 layers) + Qwen3-8B LLM, 768x768 -> 576 "
                        "tokens", QWEN3_VISION, QWEN3_TEXT, QWEN_TOP),
}


def _arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def _depth(name: str, what: str, value: int | None, low: int, high: int, why: str = "") -> int:
    if value is None:
        return high
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} for {name} must be an integer in {low}..{high}{why}, got {value!r}")
    return value


def arch_config(name: str, *, vision_layers: int | None = None, llm_layers: int | None = None, attn: str = "sdpa"):
    """The transformers config of ``name`` with the given depths (None = the published depth)."""
    from transformers import (CLIPVisionConfig, InternVLConfig, InternVLVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaNextConfig)

    arch = _arch(name)
    # a negative feature layer -k reads hidden_states[-k]: the tower needs k layers for that to be a layer's output
    low = max(1, -arch.feature_layer)
    v = _depth(name, "vision_layers", vision_layers, low, arch.vision_layers,
               f" (features are read from hidden_states[{arch.feature_layer}])" if low > 1 else "")
    t = _depth(name, "llm_layers", llm_layers, 1, arch.llm_layers)
    if arch.family.startswith("qwen"):
        cfg = qwen_config(arch.family, arch.vision, arch.text, arch.top, v, t)
        return _finish(cfg, name, attn)
    text = LlamaConfig(**dict(arch.text, num_hidden_layers=t))
    if arch.family == "internvl":
        cfg = InternVLConfig(vision_config=InternVLVisionConfig(**dict(arch.vision, num_hidden_layers=v)),
                             text_config=text, **arch.top)
    else:
        cls = LlavaNextConfig if arch.family == "llava_next" else LlavaConfig
        cfg = cls(vision_config=CLIPVisionConfig(**dict(arch.vision, num_hidden_layers=v)), text_config=text,
                  **arch.top)
    return _finish(cfg, name, attn)


def _finish(cfg, name: str, attn: str):
    cfg = copy.deepcopy(cfg)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    cfg._name_or_path = f"arch:{name}"
    return cfg


def _model_class(family: str):
    from transformers import (InternVLForConditionalGeneration, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen3VLForConditionalGeneration)

    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
            "internvl": InternVLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration}[family]


def _skip_default_init():
    """Construct without torch's default init (nn.Linear's kaiming_uniform_ etc.), which the model's own
    ``init_weights`` overwrites anyway: half the build time of a 7B. Without the helper, init runs twice."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older / newer transformers: correct, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def build_arch(name: str, *, vision_layers: int | None = None, llm_layers: int | None = None,
               dtype: torch.dtype = torch.float32, device="cpu", attn: str = "sdpa", seed: int = 0):
    """``name``'s model with seeded random weights, built directly on ``device`` in ``dtype`` (no CPU / fp32 copy
    first), in eval mode. ``vision_layers`` / ``llm_layers`` keep that many layers (None = all); widths never
    change. generate() always emits the requested number of tokens (no EOS, greedy, pad id 0)."""
    cfg = arch_config(name, vision_layers=vision_layers, llm_layers=llm_layers, attn=attn)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    with torch.device(device):
        with _skip_default_init():
            model = _model_class(ARCHS[name].family)._from_config(cfg, dtype=dtype)
        model.init_weights()  # the model's own init, once (a no-op on the meta device)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.do_sample = None, 0, False
    return model


# ---------------------------------------------------------------------------------------------------------------
# inputs
def _family(model) -> str:
    from ..adapters import get_adapter

    return get_adapter(model).family


def _largest_canvas(model) -> tuple[int, int]:
    """LLaVA-NeXT: the pinpoint canvas of largest area (672x672 for llava-v1.6: a 2x2 grid + base = 5 crops)."""
    pins = model.config.image_grid_pinpoints
    h, w = max(pins, key=lambda p: p[0] * p[1])
    return int(h), int(w)


def _delimiters(model) -> tuple[int, int]:
    """InternVL's <img> / </img> ids: the table's for an ``arch:`` model, else the two ids below <IMG_CONTEXT>
    (the layout of both the InternVL2 and the InternVL3-hf tokenizers)."""
    path = str(getattr(model.config, "_name_or_path", ""))
    arch = ARCHS.get(path[len("arch:"):]) if path.startswith("arch:") else None
    if arch is not None and arch.image_delimiters is not None:
        return arch.image_delimiters
    image = int(model.config.image_token_id)
    return image - 2, image - 1


def _pixels(model, family: str, g: torch.Generator, batch: int, image_size, tiles: int):
    """(pixel_values for ``batch`` images on the model's device and dtype, image_sizes or None)."""
    vc = model.config.vision_config
    side = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
    param = next(model.parameters())
    sizes = None
    if family == "llava_next":
        from ..adapters import get_adapter

        hw = tuple(image_size) if image_size is not None else _largest_canvas(model)
        crops = get_adapter(model).crop_counts(None, [hw])[0]
        shape, sizes = (batch, crops, 3, side, side), torch.tensor([list(hw)] * batch, device=param.device)
    elif family == "internvl":
        shape = (batch * tiles, 3, side, side)
    else:
        shape = (batch, 3, side, side)
    return torch.randn(shape, generator=g).to(param.device, param.dtype), sizes


@torch.no_grad()
def _image_tokens(model, family: str, pixel_values, image_sizes, tiles: int) -> int:
    """Visual tokens of the first image, asked from the model's own get_image_features (all of its tiles)."""
    if family == "llava_next":
        feats = model.model.get_image_features(pixel_values=pixel_values[:1], image_sizes=image_sizes[:1])
    else:
        feats = model.model.get_image_features(pixel_values=pixel_values[: tiles if family == "internvl" else 1])
    feats = feats.pooler_output
    if isinstance(feats, torch.Tensor) and feats.dim() == 3:
        feats = list(feats)
    return sum(int(f.shape[0]) for f in feats)


def _text_ids(model, n: int, g: torch.Generator) -> list[int]:
    """``n`` random ordinary text ids: below every special id the prompt uses (image, delimiters, BOS/EOS)."""
    tc = model.config.get_text_config()
    top = min(int(model.config.image_token_id), int(tc.vocab_size))
    if _family(model) == "internvl":
        top = min(top, *_delimiters(model))
    # 0-2 are pad / BOS / EOS in Llama vocabularies, whatever the config says
    specials = [tc.bos_token_id, tc.eos_token_id, tc.pad_token_id, 0, 1, 2]
    low = 1 + max(int(x) for x in specials if isinstance(x, int))
    if low >= top:
        raise ValueError(f"no ordinary text ids below the special ids (vocab {tc.vocab_size}, image id {top})")
    return torch.randint(low, top, (n,), generator=g).tolist()


def arch_inputs(model, *, text_tokens: int = 56, seed: int = 0, batch: int = 1,
                image_size: tuple[int, int] | None = None, tiles: int = 1) -> dict:
    """A LLaVA-style prompt for ``model`` (any LLaVA / LLaVA-NeXT / InternVL model, e.g. from :func:`build_arch`),
    one image per sample, ``batch`` samples of equal length (no padding).

    Each sample is ``text_tokens`` non-image tokens (BOS, random text ids, InternVL's ``<img>`` / ``</img>``)
    around the model's image placeholders: BOS and about 1/8 of the text before the image, the rest after, as
    in "USER: <image>\\n question ASSISTANT:". The placeholder count is asked from the model itself.
    ``image_size`` (NeXT, height x width; default the largest pinpoint canvas) and ``tiles`` (InternVL) set the
    image's crops. Returns input_ids / attention_mask [batch, T], pixel_values (model device and dtype) and,
    for NeXT, image_sizes [batch, 2]."""
    family = _family(model)
    if family.startswith("qwen"):  # dynamic resolution: image_size in pixels, patch rows + image_grid_thw
        return qwen_inputs(model, torch.Generator().manual_seed(seed), text_tokens, batch, image_size)
    extra = 2 if family == "internvl" else 0  # <img> and </img>
    if text_tokens < 1 + extra:
        raise ValueError(f"text_tokens must be >= {1 + extra} (BOS{' and <img> </img>' if extra else ''}), "
                         f"got {text_tokens}")
    if batch < 1 or tiles < 1:
        raise ValueError(f"batch and tiles must be >= 1, got batch={batch}, tiles={tiles}")
    g = torch.Generator().manual_seed(seed)
    pixel_values, image_sizes = _pixels(model, family, g, batch, image_size, tiles)
    n_image = _image_tokens(model, family, pixel_values, image_sizes, tiles)
    image = [int(model.config.image_token_id)] * n_image
    if family == "internvl":
        start, end = _delimiters(model)
        image = [start] + image + [end]
    n_text = text_tokens - 1 - extra
    before = n_text // 8
    bos = model.config.get_text_config().bos_token_id
    rows = [[bos if bos is not None else 1] + _text_ids(model, before, g) + image + _text_ids(model, n_text - before, g)
            for _ in range(batch)]
    device = pixel_values.device
    input_ids = torch.tensor(rows, device=device)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
    if image_sizes is not None:
        out["image_sizes"] = image_sizes
    return out
