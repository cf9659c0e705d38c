"""What the vLLM plugin serves, checked before any engine starts (spec serving_eval.md §1.3, §1.5).

Only pre-LLM, image-only methods map onto vLLM: its paged KV cache has one layout for every layer (no in-LLM cut),
its attention kernels return no probabilities, and each image's placeholder count is fixed from the image size
before encoding. ``plan`` checks the method, its fields, the budget and the model, and returns the
``hf_overrides`` that select the plugin's architecture and carry the method into every vLLM process.
Needs no vLLM (runs in the main environment as well).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..methods.base import Method, ModelInfo
from ..registry import make_method, method_class
from .select import kept_count

ARCH = "VtpruneLlavaForConditionalGeneration"
METHODS = ("random", "visionzip", "vtc_cls", "divprune")  # pre-LLM and decided by the image alone
MODELS = {"llava": ARCH}  # model_type -> the plugin's architecture
UNPRUNED = (None, "none")  # every visual token, through the plugin's loader (baselines)
OVERRIDE_KEY = "vtprune"  # hf_config attribute holding {"method": name, **fields}


def plan(model: str, method: str | None, fields: dict | None = None) -> dict:
    """``hf_overrides`` for vLLM serving ``model`` with ``method`` (fields: ``keep`` / ``ratio`` and the method's
    own; ``None`` / ``"none"``: unpruned); a ConfigError names the problem and what works."""
    fields = dict(fields or {})
    info = model_info(read_config(model), model)
    if method in UNPRUNED:  # a baseline through the same loader (transformers-5 checkpoints, extra weight files)
        if fields:
            raise ConfigError(f"vtprune: method {method!r} serves every visual token; drop {', '.join(fields)}")
        return {"architectures": [ARCH], OVERRIDE_KEY: {"method": None}}
    built = checked_method(method, fields)
    kept_count(built, info)  # a budget above the image's tokens is refused here (budget.check_keep)
    built.probes(info)  # layer fields beyond the tower are refused here
    return {"architectures": [ARCH], OVERRIDE_KEY: {"method": method, **fields}}


def checked_method(name: str, fields: dict) -> Method:
    """The method, if the plugin can serve it; else one ConfigError saying why and what it serves."""
    cls = method_class(name)  # an unknown name: the registry's close-match error
    if name not in METHODS:
        raise ConfigError(f"vtprune: {name} {_refusal(cls)}: the vLLM plugin serves {', '.join(METHODS)}; run {name} "
                          "with vtprune.prune on transformers (or lmms-eval) instead")
    return make_method(name, **fields)


def _refusal(cls) -> str:
    """Why the plugin cannot serve ``cls``, from where it cuts and what it reads on LLaVA-1.5-7B's shape."""
    if not cls.prunes:
        return "modulates attention, which vLLM's attention kernels do not expose"
    cut_points, probes = _cut_points_and_probes(cls)
    if "vision" in cut_points:
        return "prunes inside the vision tower, which the plugin does not override"
    if "llm" in cut_points:
        return "prunes inside the LLM, and vLLM's paged KV cache has one layout for all layers"
    if "Instruction" in probes:
        return ("selects with the prompt's instruction, which vLLM's image encoder never sees (an image is encoded "
                "once, whatever prompt holds it)")
    return "is not served by the plugin yet"


def _cut_points_and_probes(cls) -> tuple[set[str], set[str]]:
    """Where a method cuts and the names of its probes on LLaVA-1.5-7B's shape (only to word the refusal)."""
    try:
        built = cls() if cls.budget_optional or not cls.has_budget else cls(ratio=0.5)
        info = ModelInfo("llava", 24, 22, 32, 576, 4096)
        return {c.where for c in built.cuts(info)}, {type(p).__name__ for p in built.probes(info)}
    except Exception:
        return set(), set()


def read_config(model: str) -> dict:
    """config.json of a local folder, else transformers' (offline cache) as a dict."""
    path = Path(model) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as e:  # a missing folder or an uncached hub id
        raise ConfigError(f"vtprune: cannot read the config of model {model!r} ({type(e).__name__}); give a "
                          "LLaVA-1.5 checkpoint folder or a cached hub id") from None


def model_info(config: dict, model: str = "") -> ModelInfo:
    """The model's shape for the method (LLaVA-1.5 with a CLIP tower read at one layer, CLS dropped)."""
    kind = config.get("model_type")
    vision = config.get("vision_config") or {}
    layer = config.get("vision_feature_layer", -2)
    if kind not in MODELS or vision.get("model_type") not in (None, "clip_vision_model"):
        raise ConfigError(f"vtprune: the vLLM plugin serves LLaVA-1.5 (model_type 'llava' with a CLIP tower); "
                          f"{model or 'the model'} is {kind!r}: LLaVA-NeXT, InternVL and Qwen-VL run with "
                          "vtprune.prune on transformers")
    if config.get("vision_feature_select_strategy", "default") != "default" or not isinstance(layer, int):
        raise ConfigError("vtprune: the vLLM plugin needs vision_feature_select_strategy='default' and one "
                          f"vision_feature_layer; {model or 'the model'} has "
                          f"{config.get('vision_feature_select_strategy')!r} / {layer!r}")
    n_layers = int(vision.get("num_hidden_layers", 24))
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    text = config.get("text_config") or {}
    return ModelInfo(family="llava", vision_layers=n_layers, feature_layer=layer % n_layers,
                     llm_layers=int(text.get("num_hidden_layers", 32)), nominal_tokens=side * side,
                     hidden_size=int(text.get("hidden_size", 4096)), name_or_path=model)
