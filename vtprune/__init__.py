"""vtprune: training-free visual-token pruning for Hugging Face vision-language models.

    model = vtprune.prune(model, "fastv", ratio=0.75)
    vtprune.unprune(model)

``import vtprune`` is light: the exports that need torch and transformers (``prune``, ``Method``, ...) and the
built-in methods are imported on first use (PEP 562), so ``vtprune -h`` does not pay for them.
"""

from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__  # noqa: F401  (re-exported)
from .errors import ConfigError, PruneError
from .core.registration import register
from .search import search  # the function; it shadows the vtprune.search package as an attribute (no optuna yet)

__all__ = ["prune", "unprune", "pruned", "method", "list_methods", "list_configs", "load_config", "register", "Method", "ImageView",
           "Selection", "PruneError", "ConfigError", "search"]

# export -> the submodule defining it; imported with the built-in methods the first time the name is read
_LAZY = {**dict.fromkeys(("prune", "unprune", "pruned", "method", "list_methods", "list_configs", "load_config"), "api"),
         **dict.fromkeys(("Method", "ImageView", "Selection"), "methods.base")}


def __getattr__(name: str):
    """A lazy export, or a submodule not imported yet (``vtprune.methods``: what the eager package offered)."""
    if name in _LAZY:
        importlib.import_module(".methods", __name__)  # registers the built-in methods before any lookup
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later reads skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
