"""A search's methods before any model is loaded: names, budgets, fixed fields, what is searched.

Everything here is checked without a model, so a bad command line fails before the model loads and before
anything is written: unknown methods or parameters, a missing or refused budget, bad fixed values, an empty
search space. :meth:`Plan.space` then builds the :class:`~.space.SearchSpace` for a model, and
:meth:`Plan.methods` / :meth:`Plan.config` turn one trial's values into method objects / a config mapping.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence

from ..cliargs import UsageError, check_method
from ..registry import check_keywords, make_method, method_class
from . import space as space_mod
from .space import SearchSpace, Slot


@dataclass
class Plan:
    names: list[str]  # canonical method names, pipeline order
    prefixes: list[str]
    budgets: list[dict]  # per method: {"keep": k}, {"ratio": r} or {}
    fixed: list[dict]  # per method: fields set by the user (not searched)
    only: set[str] | None  # --params: the prefixed names searched (None: every declared one)

    def space(self, model_info) -> SearchSpace:
        """The search space for a model; an empty one (every field fixed or irrelevant here) is a UsageError."""
        slots = []
        for name, prefix, budget, fixed in zip(self.names, self.prefixes, self.budgets, self.fixed):
            cls = method_class(name)
            fields = space_mod.searchable(cls, prefix, fixed, self.only, model_info.family)
            kwargs = {**budget, **fixed}
            slots.append(Slot(prefix, make_method(name, **kwargs), kwargs, fields))
        space = SearchSpace(slots, model_info)
        if not space.names:
            raise UsageError(f"empty search space: {self.label} declares no field that matters for a "
                             f"{model_info.family} model once the fixed ones are left out; search another method "
                             "or fix fewer fields")
        return space

    @property
    def label(self) -> str:
        return "+".join(self.names)

    def methods(self, values: Sequence[dict] | None) -> list:
        """Method objects of one trial (``values`` per method; None: the defaults)."""
        values = values or [{} for _ in self.names]
        return [make_method(n, **b, **f, **v) for n, b, f, v in zip(self.names, self.budgets, self.fixed, values)]

    def config(self, values: Sequence[dict] | None, model_name: str | None) -> dict:
        """A ``configs/``-format mapping (one method, or ``pipeline:``) for ``prune(model, config=...)``."""
        values = values or [{} for _ in self.names]
        entries = [{"method": n, **b, **_plain(f), **_plain(v)}
                   for n, b, f, v in zip(self.names, self.budgets, self.fixed, values)]
        head = {"model": model_name} if model_name else {}
        if len(entries) == 1:
            method = entries[0].pop("method")
            return {"method": method, **head, **entries[0]}
        return {**head, "pipeline": entries}

    def signature(self) -> dict:
        """What makes two runs the same study (stored in the study; a rerun must match it)."""
        return {"methods": self.names, "budgets": self.budgets, "fixed": [_plain(f) for f in self.fixed],
                "params": sorted(self.only) if self.only is not None else None}


def _plain(values: dict) -> dict:
    """YAML / JSON-friendly values: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def method_names(method) -> list[str]:
    """``"a"``, ``"a,b"`` or a list of names -> canonical names (an unknown one is a UsageError)."""
    items = [m.strip() for m in method.split(",")] if isinstance(method, str) else list(method or [])
    if not items or not all(isinstance(m, str) and m for m in items):
        raise UsageError(f"--method {method!r}: name a method (or a comma-separated pipeline), e.g. --method vflowopt")
    out = []
    for m in items:
        try:
            out.append(method_class(m).name)
        except ValueError as err:
            raise UsageError(f"--method {m}: {err}") from None
    return out


def _per_method(value, n: int, flag: str) -> list:
    """One budget value per method: a scalar for one method, else a list of n (None = no budget)."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UsageError(f"{flag}: {len(value)} values for {n} methods; give one per method (- for none)")
        return list(value)
    if n != 1:
        raise UsageError(f"{flag}: a pipeline of {n} methods needs one value per method, e.g. {flag} 64,32 "
                         "(- for a method without a budget)")
    return [value]


def _budgets(names: Sequence[str], keep, ratio) -> list[dict]:
    keeps, ratios = _per_method(keep, len(names), "--keep"), _per_method(ratio, len(names), "--ratio")
    out = []
    for name, k, r in zip(names, keeps, ratios):
        cls = method_class(name)
        if k is not None and r is not None:
            raise UsageError(f"--keep and --ratio both given for {name}; the budget is one of them")
        budget = {"keep": k} if k is not None else {"ratio": r} if r is not None else {}
        if cls.has_budget and not cls.budget_optional and not budget:
            raise UsageError(f"--method {name} needs a budget (it is fixed, not searched): give --keep or --ratio")
        if budget and not cls.has_budget:
            raise UsageError(f"--method {name} has no ratio / keep budget (its schedule decides); "
                             "drop --keep / --ratio")
        out.append(budget)
    return out


def _split_fixed(names: Sequence[str], prefixes: Sequence[str], fixed: dict) -> list[dict]:
    """``{"layer": 3}`` (one method) or ``{"fastv.layer": 3}`` -> per-method fields; unknown ones are errors."""
    out: list[dict] = [{} for _ in names]
    by_prefix = {p or n: i for i, (p, n) in enumerate(zip(prefixes, names))}
    for key, value in (fixed or {}).items():
        head, dot, field = key.rpartition(".")
        i = by_prefix.get(head) if dot else (0 if len(names) == 1 else None)
        if i is None:
            methods = ", ".join(p or n for p, n in zip(prefixes, names))
            raise UsageError(f"--set {key}: unknown parameter; in a pipeline name the method, e.g. "
                             f"--set {prefixes[0]}.{field or key}=... (methods: {methods})")
        if field in ("keep", "ratio"):
            raise UsageError(f"--set {key}: the budget is fixed with --keep / --ratio, not --set")
        try:
            check_keywords(method_class(names[i]), [field])
        except ValueError as err:
            raise UsageError(f"--set {key}: unknown parameter ({err})") from None
        out[i][field] = value
    return out


def _only(names, prefixes, fixed, params) -> set[str] | None:
    if params is None:
        return None
    known = [(p + "." if p else "") + f for n, p, fx in zip(names, prefixes, fixed)
             for f in space_mod.searchable(method_class(n), p, fx, None, None)]
    wanted = [p.strip() for p in (params.split(",") if isinstance(params, str) else params) if p.strip()]
    bad = [p for p in wanted if p not in known]
    if bad:
        close = difflib.get_close_matches(bad[0], known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"--params {bad[0]}: unknown parameter{hint}; searchable: {', '.join(known) or 'none'}")
    return set(wanted)


def make_plan(method, keep=None, ratio=None, fixed: dict | None = None, params=None) -> Plan:
    """The model-free part of a search, checked; every problem is a one-line :class:`UsageError`."""
    names = method_names(method)
    prefixes = space_mod.prefixes(names)
    budgets = _budgets(names, keep, ratio)
    fixed_split = _split_fixed(names, prefixes, fixed or {})
    for name, budget, fx in zip(names, budgets, fixed_split):
        check_method(name, **budget, **fx)  # values and budget valid without a model
    only = _only(names, prefixes, fixed_split, params)
    plan = Plan(names, prefixes, budgets, fixed_split, only)
    declared = [f for n, p, fx in zip(names, prefixes, fixed_split)
                for f in space_mod.searchable(method_class(n), p, fx, only, None)]
    if not declared:
        none = [n for n in names if not space_mod.declared(method_class(n))]
        why = (f"{', '.join(none)} declares no searchable field" if none
               else "every searchable field is fixed by --set")
        raise UsageError(f"empty search space: {why}; search a method with knobs (e.g. --method vflowopt)")
    return plan


def describe(signature: dict) -> str:
    """A one-line description of a study signature (for mismatch errors)."""
    parts = []
    for name, budget in zip(signature.get("methods", []), signature.get("budgets", [])):
        parts.append(name + "".join(f" {k} {v}" for k, v in budget.items()))
    extra = {k: v for k, v in signature.items() if k not in ("methods", "budgets") and v not in (None, [], {}, [{}])}
    return " + ".join(parts) + ("".join(f", {k}={v}" for k, v in extra.items()))


def parse_budget_list(text: str, kind) -> Any:
    """``--keep 64`` -> 64; ``--keep 64,-`` -> [64, None] (``-`` or ``none``: no budget for that method)."""
    items = [x.strip() for x in str(text).split(",")]
    values = [None if x.lower() in ("-", "none", "") else kind(x) for x in items]
    return values[0] if len(values) == 1 else values
