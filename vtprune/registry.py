"""Name -> method class. ``@register`` adds a method; unknown names are answered with close matches."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .methods.base import Method

_METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    _METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type["Method"]:
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key in _METHODS:
        return _METHODS[key]
    close = difflib.get_close_matches(str(name).lower(), list(_METHODS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"vtprune: unknown method {name!r}.{hint} Available: {', '.join(sorted(_METHODS))}")


def make_method(name: str, **kwargs) -> "Method":
    cls = method_class(name)
    valid = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"vtprune: method {cls.name!r} got unknown keyword(s) {', '.join(unknown)}; "
            f"valid keywords: {', '.join(sorted(valid))}"
        )
    return cls(**kwargs)


def list_methods() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    return {name: cls.description for name, cls in sorted(_METHODS.items())}
