"""For a module split into parts: a module ``__getattr__`` that finds a private name in the parts, so code that
imported it from the old module keeps working (``probes._masked_logits``, ``study._claim``)."""

from __future__ import annotations

import importlib


def getattr_from_parts(module_name: str, package: str, parts: tuple[str, ...]):
    """The ``__getattr__`` of ``module_name``: looks ``name`` up in the sibling modules ``parts`` of ``package``."""

    def __getattr__(name: str):
        for part in parts:
            module = importlib.import_module(f".{part}", package)
            if name in vars(module):
                return getattr(module, name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
