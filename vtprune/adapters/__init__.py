"""Adapters for the supported model families; :func:`get_adapter` picks one from the model class."""

from __future__ import annotations

from .base import Adapter, VisualSpan, find_runs
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter, Qwen25VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, InternVLAdapter, Qwen25VLAdapter, Qwen3VLAdapter,
                                       Qwen3VLMoeAdapter)


def supported_model_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def get_adapter(model) -> Adapter:
    """The adapter of the first supported transformers class in the model's MRO (subclasses are accepted)."""
    by_name = {name: adapter for adapter in ADAPTERS for name in adapter.model_classes}
    for cls in type(model).__mro__:
        # MRO order: the most derived supported class wins; a user class that merely shares a name is skipped
        if cls.__name__ in by_name and cls.__module__.startswith("transformers."):
            return by_name[cls.__name__](model)
    name = type(model).__name__
    raise TypeError(
        f"vtprune: unsupported model {name}. Supported classes: {', '.join(supported_model_classes())}. "
        "Load the model with one of these transformers classes (e.g. LlavaForConditionalGeneration)."
    )


__all__ = ["Adapter", "VisualSpan", "find_runs", "get_adapter", "supported_model_classes", "ADAPTERS"]
