"""Tiny random-init models of the three supported families, built from configs (no hub access)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit runs: before vtprune.kernels is imported

from dataclasses import dataclass, field

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

IMAGE_TOKEN = 100
IMG_START, IMG_END = 101, 102
FAMILIES = ("llava", "llava_next", "internvl")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # tests/qwen_fixtures.py


def _text_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                  max_position_embeddings=1024)
    return Qwen2Config(**common) if family == "internvl" else LlamaConfig(**common)


def build_model(family: str, seed: int = 0, attn: str = "sdpa"):
    from transformers import (
        CLIPVisionConfig,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=32, patch_size=4)
    if family == "llava":
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=_text_config(family),
                          image_token_index=IMAGE_TOKEN, image_seq_length=64, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
        cls = LlavaForConditionalGeneration
    elif family == "llava_next":
        cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=_text_config(family),
                              image_token_index=IMAGE_TOKEN, image_seq_length=64, vision_feature_layer=-2,
                              vision_feature_select_strategy="default",
                              image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
        cls = LlavaNextForConditionalGeneration
    elif family in QWEN_FAMILIES:
        from .qwen_fixtures import model_class, qwen_config

        cfg, cls = qwen_config(family), model_class(family)
    elif family == "internvl":
        cfg = InternVLConfig(vision_config=InternVLVisionConfig(**vision), text_config=_text_config(family),
                             image_token_id=IMAGE_TOKEN, image_seq_length=16, downsample_ratio=0.5,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
        cls = InternVLForConditionalGeneration
    else:
        raise ValueError(family)
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


@dataclass
class Prompt:
    """One sample: its token ids, its images and (NeXT) their sizes."""

    input_ids: torch.Tensor  # [T]
    pixel_values: torch.Tensor  # LLaVA/InternVL [n, 3, H, W]; NeXT [n, crops, 3, H, W]
    image_sizes: list | None = None
    extra: dict = field(default_factory=dict)


NEXT_SIZES = [(30, 50), (60, 40), (40, 40)]


def image_token_counts(model, family, pixel_values, image_sizes=None) -> list[int]:
    """Ask the model itself (not vtprune) how many tokens each image becomes."""
    with torch.no_grad():
        if family == "llava_next":
            feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=torch.tensor(image_sizes)).pooler_output
        else:
            feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    if isinstance(feats, torch.Tensor) and feats.dim() == 3:
        feats = list(feats)
    return [int(f.shape[0]) for f in feats]


def make_prompt(model, family: str, text_len: int, seed: int, n_images: int = 1) -> Prompt:
    if family in QWEN_FAMILIES:
        from .qwen_fixtures import make_qwen_prompt

        return make_qwen_prompt(model, text_len, seed, n_images)
    g = torch.Generator().manual_seed(seed)
    tiles = 1
    if family == "llava_next":
        sizes = [NEXT_SIZES[(seed + i) % len(NEXT_SIZES)] for i in range(n_images)]
        pv = torch.randn(n_images, 5, 3, 32, 32, generator=g)
    elif family == "internvl":
        tiles = 1 + seed % 2
        sizes = None
        pv = torch.randn(n_images * tiles, 3, 32, 32, generator=g)
    else:
        sizes = None
        pv = torch.randn(n_images, 3, 32, 32, generator=g)
    counts = image_token_counts(model, family, pv, sizes)
    if family == "internvl":  # one image = its tiles' tokens
        counts = [sum(counts[i * tiles:(i + 1) * tiles]) for i in range(n_images)]
    ids = [1] + torch.randint(3, 99, (text_len,), generator=g).tolist()
    for n in counts:
        if family == "internvl":
            ids += [IMG_START] + [IMAGE_TOKEN] * n + [IMG_END]
        else:
            ids += [IMAGE_TOKEN] * n
        ids += torch.randint(3, 99, (3,), generator=g).tolist()
    return Prompt(torch.tensor(ids), pv, sizes)


def collate(prompts: list[Prompt]) -> dict:
    """Left-pad a list of prompts into one batch (pad id 0, 2-D attention mask)."""
    T = max(p.input_ids.numel() for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = p.input_ids.numel()
        ids[i, T - n:] = p.input_ids
        mask[i, T - n:] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([p.pixel_values for p in prompts])}
    if prompts[0].image_sizes is not None:
        batch["image_sizes"] = torch.tensor([s for p in prompts for s in p.image_sizes])
    if "image_grid_thw" in prompts[0].extra:
        from .qwen_fixtures import qwen_batch

        batch = qwen_batch(batch, prompts)
    return batch


@pytest.fixture(scope="session")
def models():
    cache = {}

    def get(family: str, attn: str = "sdpa"):
        key = (family, attn)
        if key not in cache:
            cache[key] = build_model(family, attn=attn)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def dyvte_routers(models, tmp_path_factory):
    """``get(family, seed=0)``: a DyVTE router file (seeded Xavier-initialised routers) for that tiny model."""
    from vtprune.methods.dyvte import Routers, save_routers

    cache = {}

    def get(family: str, seed: int = 0):
        if (family, seed) not in cache:
            cfg = models(family).config.text_config
            torch.manual_seed(seed)
            path = tmp_path_factory.mktemp(f"routers-{family}-{seed}") / "dyvte_routers.safetensors"
            save_routers(Routers(cfg.hidden_size, cfg.num_hidden_layers), path, {"model_id": f"tiny-{family}"})
            cache[family, seed] = str(path)
        return cache[family, seed]

    return get


@pytest.fixture(scope="session")
def eager_copy(models):
    """``get(family)``: an eager-attention copy of ``models(family)`` (same weights), for references."""
    cache = {}

    def get(family: str):
        if family not in cache:
            eager = build_model(family, attn="eager")
            eager.load_state_dict(models(family).state_dict())
            cache[family] = eager
        return cache[family]

    return get


@pytest.fixture
def one_thread():
    """One torch thread for the test: the tiny models gain nothing from a second, and lose a lot when another job
    holds a core. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (or autouse in a conftest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model(monkeypatch):
    """The untrained tiny LLaVA as every CLI's model (``vtprune.loading.load_model`` returns it), and the list its forward
    calls are appended to: CLI tests check that an error came before any forward."""
    from vtprune import loading
    from vtprune.benchmarks import tiny_llava

    model, processor = tiny_llava.build_untrained_tiny_llava(seed=0)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, processor, {"name": "tiny"}))
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    return model, forwards
