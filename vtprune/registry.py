"""Name -> method class. ``@register`` adds a method; unknown names are answered with close matches.

``register`` and the table live in ``vtprune.core.registration`` (below the methods, which register themselves);
the lookups here import the built-in methods first."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import TYPE_CHECKING

from .core.registration import _METHODS, register
from .errors import ConfigError, UnknownFieldError

if TYPE_CHECKING:
    from .methods.base import Method

__all__ = ["register", "method_class", "method_fields", "check_keywords", "make_method", "list_methods"]


def _registered() -> dict[str, type["Method"]]:
    """Every method, the built-in ones included: ``import vtprune`` is lazy, so they may not be imported yet."""
    from . import methods  # noqa: F401  (importing the package registers them; a no-op after the first time)

    return _METHODS


def method_class(name: str) -> type["Method"]:
    _registered()
    if not isinstance(name, str):
        raise ConfigError(f"vtprune: a method name is a string such as 'fastv', got {name!r}; see vtprune.list_methods()")
    key = name.lower().replace("-", "_")
    if key in _METHODS:
        return _METHODS[key]
    close = difflib.get_close_matches(str(name).lower(), list(_METHODS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"vtprune: unknown method {name!r}.{hint} Available: {', '.join(sorted(_METHODS))}")


def method_fields(cls: type["Method"]) -> list[str]:
    """The keywords a method accepts: its dataclass init fields (hyperparameters, budget, positions)."""
    return sorted(f.name for f in fields(cls) if f.init)


def check_keywords(cls: type["Method"], keys) -> None:
    """Raise UnknownFieldError (a ValueError and TypeError) naming unknown keywords, close names and valid ones."""
    valid = method_fields(cls)
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        close = {k: difflib.get_close_matches(k, valid, n=1, cutoff=0.6) for k in unknown}
        hints = "".join(f" ({k}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
        raise UnknownFieldError(
            f"vtprune: method {cls.name!r} got unknown keyword(s) {', '.join(unknown)}{hints}; "
            f"valid keywords: {', '.join(valid)}"
        )


def make_method(name: str, **kwargs) -> "Method":
    """Build a method; every field is validated at construction (``Method.__post_init__``)."""
    cls = method_class(name)
    check_keywords(cls, kwargs)
    return cls(**kwargs)


def list_methods() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    return {name: cls.description for name, cls in sorted(_registered().items())}
