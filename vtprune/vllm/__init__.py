"""vtprune on vLLM: LLaVA-1.5 served with exactly k visual tokens per image (pre-LLM methods only; spec
serving_eval.md §1). Needs the vLLM environment (``make vllm-env``); nothing here imports vLLM at import time.

    llm = vtprune.vllm.LLM("llava-hf/llava-1.5-7b-hf", method="visionzip", keep=64, max_model_len=4096)
    vtprune serve llava-hf/llava-1.5-7b-hf --method visionzip --keep 64 --port 8000

The entry point ``vllm.general_plugins: vtprune = vtprune.vllm:register`` registers the architecture in every vLLM
process; ``hf_overrides`` (built by :func:`overrides`) selects it and carries the method and budget.
"""

from __future__ import annotations

from .config import ARCH, METHODS, plan as overrides

__all__ = ["LLM", "register", "overrides", "ARCH", "METHODS"]


def register() -> None:
    """vLLM plugin entry point: idempotent (vLLM calls it in every process), lazy (no model import here)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "vtprune.vllm.model:VtpruneLlava")


def LLM(model: str, method: str | None, keep: int | None = None, ratio: float | None = None, fields: dict | None = None,
        **vllm_kwargs):
    """A ``vllm.LLM`` serving ``model`` pruned by ``method`` (``keep`` tokens per image, or ``ratio``; the method's
    other fields in ``fields``, so ``seed=`` stays vLLM's engine seed; ``None`` / ``"none"``: every token). Bad method / budget / model: a ConfigError
    before the engine starts. ``hf_overrides`` is set here and refused in ``vllm_kwargs``."""
    if "hf_overrides" in vllm_kwargs:
        from ..errors import ConfigError

        raise ConfigError("vtprune: vtprune.vllm.LLM sets hf_overrides itself (architecture + method); drop it")
    budget = {k: v for k, v in (("keep", keep), ("ratio", ratio)) if v is not None}
    hf_overrides = overrides(model, method, {**(fields or {}), **budget})
    import vllm

    register()  # also in this process, in case plugins are filtered with VLLM_PLUGINS
    return vllm.LLM(model=model, hf_overrides=hf_overrides, **vllm_kwargs)
