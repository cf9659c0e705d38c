"""Search spaces: declared next to a method's fields, sampled by an optuna trial.

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
This module imports no optuna: method files import it at ``import vtprune``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

from ..errors import ConfigError

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


def _value(bound, method, model):
    return bound(method, model) if callable(bound) else bound


# ------------------------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One pipeline entry: its parameter prefix ('' for a single method), the method built with the user's
    budget and fixed fields (``base``), those keywords, and the fields searched."""

    prefix: str
    base: Any
    kwargs: dict
    fields: dict  # field -> declaration, searched for this model

    def name(self, field: str) -> str:
        return f"{self.prefix}.{field}" if self.prefix else field


def prefixes(names: Sequence[str]) -> list[str]:
    """Parameter prefixes of a pipeline's methods ('' for a single method; a repeat gets 2, 3, ...)."""
    if len(names) == 1:
        return [""]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}{seen[n]}")
    return out


def searchable(cls, prefix: str, fixed: Mapping[str, Any], only: set[str] | None, family: str | None) -> dict:
    """The declared fields of ``cls`` that a search varies: not fixed, in ``only`` (prefixed names) when given,
    and relevant to the model ``family`` (None: not known yet, every family)."""
    out = {}
    for field, decl in declared(cls).items():
        name = f"{prefix}.{field}" if prefix else field
        if field in fixed or (only is not None and name not in only):
            continue
        if family is not None and decl.only_for is not None and family not in decl.only_for:
            continue
        out[field] = decl
    return out


class SearchSpace:
    """The parameters of a search over ``slots`` on a model (:class:`ModelInfo`)."""

    def __init__(self, slots: Sequence[Slot], model):
        self.slots, self.model = list(slots), model
        for slot in self.slots:
            for field, decl in slot.fields.items():
                for other in (decl.when or {}):
                    if other in slot.fields and slot.fields[other].when:
                        raise ConfigError(f"vtprune: {slot.name(field)} is conditional on {other}, itself "
                                          "conditional; one level of conditions is supported")

    @property
    def names(self) -> list[str]:
        """Field-level parameter names (a Seq is one name here, ``field[i]`` per element in optuna)."""
        return [slot.name(f) for slot in self.slots for f in slot.fields]

    def sample(self, suggest) -> list[dict]:
        """Field values per slot. ``suggest(name, kind, low, high, log, options, default)`` returns one value
        (optuna's trial, or the defaults for trial 0). Unconditional fields first, then the conditional ones."""
        values = []
        for slot in self.slots:
            chosen: dict = {}
            ordered = sorted(slot.fields.items(), key=lambda kv: kv[1].when is not None)
            for field, decl in ordered:
                if decl.when is not None and not self._holds(slot, decl.when, chosen):
                    continue
                chosen[field] = self._field(slot, field, decl, suggest)
            values.append({f: chosen[f] for f in slot.fields if f in chosen})
        return values

    def defaults(self) -> dict:
        """Trial 0's optuna parameters: each field's default, or what its derivation gives when it is None."""
        params: dict = {}

        def record(name, kind, low, high, log, options, default):
            params[name] = default
            return default

        self.sample(record)
        return params

    @staticmethod
    def _holds(slot: Slot, when: Mapping, chosen: dict) -> bool:
        for other, wanted in when.items():
            value = chosen[other] if other in chosen else getattr(slot.base, other)
            allowed = wanted if isinstance(wanted, tuple) else (wanted,)
            if not any(value == a and type(value) is type(a) for a in allowed):
                return False
        return True

    def _default(self, slot: Slot, field: str, decl) -> Any:
        value = getattr(slot.base, field)
        if value is None:
            if decl.derive is None:
                raise ConfigError(f"vtprune: {type(slot.base).__name__}.{field} defaults to None and declares no "
                                  "derive= for its search space")
            value = decl.derive(slot.base, self.model)
        return value

    def _field(self, slot: Slot, field: str, decl, suggest):
        name, default = slot.name(field), self._default(slot, field, decl)
        if isinstance(decl, Choice):
            return suggest(name, "choice", None, None, False, tuple(decl.options), default)
        if not isinstance(decl, Seq):
            low, high = self._bounds(slot, name, decl)
            return suggest(name, "int" if isinstance(decl, Int) else "float", low, high, decl.log, None, default)
        n = int(_value(decl.n, slot.base, self.model))
        default = tuple(default)
        if len(default) != n:
            raise ConfigError(f"vtprune: {name} defaults to {default!r}, not {n} values as its search space says")
        items, previous = [], None
        for i in range(n):
            low, high = self._bounds(slot, name, decl.item)
            if decl.order == "decreasing" and previous is not None:
                high = min(high, previous)
            elif decl.order == "increasing":
                low = max(low, previous + 1) if previous is not None else low
                high = high - (n - 1 - i)
            kind = "int" if isinstance(decl.item, Int) else "float"
            previous = suggest(f"{name}[{i}]", kind, low, high, decl.item.log, None, default[i])
            items.append(previous)
        return tuple(items)

    def _bounds(self, slot: Slot, name: str, decl) -> tuple:
        low, high = _value(decl.low, slot.base, self.model), _value(decl.high, slot.base, self.model)
        if low > high:
            raise ConfigError(f"vtprune: {name} has an empty range [{low}, {high}] for this model")
        return low, high


def trial_suggest(trial):
    """A ``suggest`` for :meth:`SearchSpace.sample` backed by an optuna trial."""

    def suggest(name, kind, low, high, log, options, default):
        if kind == "choice":
            return trial.suggest_categorical(name, list(options))
        if kind == "int":
            return trial.suggest_int(name, int(low), int(high), log=log)
        return trial.suggest_float(name, float(low), float(high), log=log)

    return suggest
