"""The search space of a study: which declared fields (:mod:`vtprune.space`, made next to a method's fields) a
search varies for a pipeline on a model, and how an optuna trial samples them.

The declarations (``tuned``, ``Float``, ``Int``, ``Choice``, ``Seq``, ``declared``, ``SEARCH_KEY``) live in
:mod:`vtprune.space` so the method files import nothing from the search tool; they are re-exported here so
``from vtprune.search.space import Float`` keeps working. This module imports no optuna.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from ..space import SEARCH_KEY, Bound, Choice, Declaration, Float, Int, Seq, declared, tuned

__all__ = ["SEARCH_KEY", "Bound", "Choice", "Declaration", "Float", "Int", "Seq", "declared", "tuned", "Slot",
           "prefixes", "searchable", "SearchSpace", "trial_suggest"]


def _value(bound, method, model):
    return bound(method, model) if callable(bound) else bound


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
