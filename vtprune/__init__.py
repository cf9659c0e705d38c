"""vtprune: training-free visual-token pruning for Hugging Face vision-language models.

    model = vtprune.prune(model, "fastv", ratio=0.75)
    vtprune.unprune(model)
"""

from . import methods  # noqa: F401  (registers the built-in methods)
from .api import list_configs, list_methods, load_config, method, prune, pruned, unprune
from .errors import ConfigError, PruneError
from .methods.base import ImageView, Method, Selection
from .registry import register
from .search import search  # the function; it shadows the vtprune.search package as an attribute

__version__ = "0.1.0"

__all__ = ["prune", "unprune", "pruned", "method", "list_methods", "list_configs", "load_config", "register", "Method", "ImageView",
           "Selection", "PruneError", "ConfigError", "search"]
