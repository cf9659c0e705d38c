"""The method table and ``@register``: below vtprune/methods/ so each method file registers itself without a
circle. The lookups (``method_class``, ``list_methods``, ...) live in ``vtprune.registry``, above the methods, as
they import the built-in ones first."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..methods.base import Method

# name -> class; ``vtprune.registry._METHODS`` is this same dict
_METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a method under its ``name`` (a later class with the same name replaces it)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    _METHODS[cls.name] = cls
    return cls
