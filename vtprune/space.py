"""Search-space declarations, made next to a method's fields (sampled by :mod:`vtprune.search.space`).

A method declares what a search may vary with :func:`tuned` in place of a plain default::

    layer: int = tuned(2, Int(1, lambda method, model: model.llm_layers - 1))
    cell: float | None = tuned(None, Float(1.0, 12.0, when={"recycle": True}, derive=...))

``Float(low, high, log=False)``, ``Int(low, high, log=False)``, ``Choice(options)`` and ``Seq(item, n, order)``
(a tuple field: one ``item`` per element; ``order="decreasing"`` bounds each element by the one before it,
``"increasing"`` keeps them strictly increasing). Bounds and ``n`` are numbers or functions of
``(method, model)``: the method as the user's budget (and fixed fields) build it, and the model's
:class:`~vtprune.methods.base.ModelInfo`. Options shared by all four:

* ``when={"field": value or (values, ...)}``: sampled only when that field of the same method has one of them
  (a conditional choice; otherwise the field keeps its default).
* ``only_for=("llava_next", ...)``: model families where the field matters (elsewhere it is not searched).
* ``derive=f(method, model)``: for a field whose default is None (the method derives the value), what that
  derivation gives for a standard image. Trial 0 of every search evaluates the method's defaults; it records
  these values as its parameters so the samplers see a full point.

The budget (``ratio`` / ``keep``) is never searched. A pipeline searches every method's space, with the
parameter names prefixed by the method (``fastv.layer``; a repeated method: ``fastv2.layer``).
This module imports no optuna and no torch: method files import it at ``import vtprune``. It lives beside the
method layer (not in :mod:`vtprune.search`) so methods import nothing from the search tool; the spaces of a
search and their sampling by a trial are :mod:`vtprune.search.space`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union


SEARCH_KEY = "vtprune.search"  # dataclasses.field metadata key of a declaration
Bound = Union[float, int, Callable[[Any, Any], Any]]


@dataclass(frozen=True, kw_only=True, eq=False)
class _Declared:
    when: Mapping[str, Any] | None = None
    only_for: tuple[str, ...] | None = None
    derive: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True, eq=False)
class Float(_Declared):
    low: Bound
    high: Bound
    log: bool = False


@dataclass(frozen=True, eq=False)
class Int(_Declared):
    low: Bound
    high: Bound
    log: bool = False


@dataclass(frozen=True, eq=False)
class Choice(_Declared):
    options: tuple


@dataclass(frozen=True, eq=False)
class Seq(_Declared):
    item: Float | Int
    n: int | Callable[[Any, Any], int]
    order: str | None = None  # None, "decreasing" (non-increasing floats) or "increasing" (strictly, ints)


Declaration = Union[Float, Int, Choice, Seq]


def tuned(default, space: Declaration):
    """A dataclass field with ``default`` whose search space is ``space`` (see the module docstring)."""
    if not isinstance(space, (Float, Int, Choice, Seq)):
        raise TypeError(f"tuned(): the space must be Float, Int, Choice or Seq, got {space!r}")
    return dataclasses.field(default=default, metadata={SEARCH_KEY: space})


def declared(cls) -> dict[str, Declaration]:
    """field -> declaration of a method class, in field order."""
    return {f.name: f.metadata[SEARCH_KEY] for f in dataclasses.fields(cls) if SEARCH_KEY in f.metadata}
