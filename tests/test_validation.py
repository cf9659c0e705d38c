"""Every field of every registered method is validated when the method is built (= ``prune()`` time): types from
the annotations (numpy scalars accepted and converted), then each method's ``check_fields`` range checks."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import vtprune
from vtprune.errors import ConfigError, PruneError, UnknownFieldError
from vtprune.registry import make_method, method_class

NUMPY = {int: np.int64, float: np.float32, bool: np.bool_}


def _fields():
    for name in vtprune.list_methods():
        cls = method_class(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and (cls.has_budget or f.name not in ("ratio", "keep")):  # no budget: refused, tested below
                yield pytest.param(name, f, hints[f.name], id=f"{name}.{f.name}")


FIELDS = list(_fields())


def _types(hint) -> tuple:
    """The members of a union (``int | None`` -> int, None); any other hint, tuples included, as itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _budget(method: str, field: str) -> dict:
    """A valid budget that leaves ``field`` free to be set (none for methods without a budget)."""
    if not method_class(method).has_budget:
        return {}
    return {"ratio": None, "keep": 4} if field == "ratio" else {"ratio": 0.5, "keep": None}


@pytest.mark.parametrize("method, f, hint", FIELDS)
def test_wrong_type_names_method_field_value_and_expected_type(method, f, hint):
    wrong = 3 if str in _types(hint) else "abc"
    expected = re.escape(f"vtprune: {method} {f.name}={wrong!r} has the wrong type: expected")
    with pytest.raises(ConfigError, match=expected):
        make_method(method, **{**_budget(method, f.name), f.name: wrong})


@pytest.mark.parametrize("method, f, hint", [p for p in FIELDS if {int, bool} & set(_types(p.values[2]))])
def test_bool_is_not_an_int_and_an_int_is_not_a_bool(method, f, hint):
    wrong = True if int in _types(hint) else 1
    with pytest.raises(ConfigError, match=re.escape(f"{f.name}={wrong!r} has the wrong type")):
        make_method(method, **{**_budget(method, f.name), f.name: wrong})


@pytest.mark.parametrize("method, f, hint", [p for p in FIELDS if set(NUMPY) & set(_types(p.values[2]))])
def test_numpy_scalars_are_accepted_as_python_numbers(method, f, hint):
    base = next(t for t in _types(hint) if t in NUMPY)
    value = f.default if f.default is not None else {int: 1, float: 0.5, bool: True}[base]
    budget = {"ratio": None, "keep": None} if f.name in ("ratio", "keep") else _budget(method, "")
    scalar = NUMPY[base](value)
    m = make_method(method, **{**budget, f.name: scalar})
    assert type(getattr(m, f.name)) is base and getattr(m, f.name) == scalar.item()  # 0.7 as float32 is 0.69999...


def test_keep_as_numpy_int_and_int_for_float_fields():
    m = make_method("fastv", keep=np.int64(8))
    assert m.keep == 8 and type(m.keep) is int
    m = make_method("flowcut", ratio=0, vit_share=1, cumulative_weight=np.int64(1))
    assert (m.ratio, m.vit_share, m.cumulative_weight) == (0.0, 1.0, 1.0)
    assert all(type(v) is float for v in (m.ratio, m.vit_share, m.cumulative_weight))


@pytest.mark.parametrize(
    "method, kwargs, expected",
    [
        ("fastv", dict(layer=0), "an LLM layer K >= 1"),
        ("fastv", dict(layer=-3), "an LLM layer K >= 1"),
        ("random", dict(seed=-1), "an integer in [0, 2**32)"),
        ("random", dict(seed=2**32), "an integer in [0, 2**32)"),
        ("flowcut", dict(vit_share=0.0), "a number in (0, 1]"),
        ("flowcut", dict(vit_share=-0.5), "a number in (0, 1]"),
        ("flowcut", dict(vit_share=1.01), "a number in (0, 1]"),
        ("flowcut", dict(cumulative_weight=-0.1), "a number in [0, 1]"),
        ("flowcut", dict(cumulative_weight=1.5), "a number in [0, 1]"),
        ("flowcut", dict(semantic_scaling="sqrt"), "'none' (official code) or 'sqrt_d'"),
        ("flowcut", dict(llm_layer=0), "an LLM layer >= 1"),
        ("paint", dict(alpha=-0.1), "a boost factor in [0, 100]"),
        ("paint", dict(beta=-1.0), "a boost factor in [0, 100]"),
    ],
)
def test_range_checks(method, kwargs, expected):
    (field, value), = kwargs.items()
    match = re.escape(f"vtprune: {method} {field}={value!r} is out of range; expected {expected}")
    budget = {"ratio": 0.5} if method_class(method).has_budget else {}
    with pytest.raises(ConfigError, match=match):
        make_method(method, **budget, **kwargs)


def _float_fields():
    for param in FIELDS:
        name, f, hint = param.values
        if float in _types(hint) or any(float in typing.get_args(t) for t in _types(hint)):
            yield param


@pytest.mark.parametrize("method, f, hint", list(_float_fields()))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_in_every_float_field(method, f, hint, value):
    """NaN passes no comparison and inf passes one-sided ones: both are refused before any range check."""
    tuple_field = any(typing.get_origin(t) is tuple for t in _types(hint))
    kwargs = {**_budget(method, f.name), f.name: (value,) if tuple_field else value}
    if f.name == "ratio":
        kwargs["keep"] = None
    with pytest.raises(ConfigError, match=re.escape(f"vtprune: {method} {f.name}=") + ".*is not a finite number"):
        make_method(method, **kwargs)


@pytest.mark.parametrize("kwargs, fragment", [(dict(keep=-5), "keep must be a positive integer"),
                                              (dict(ratio=1.0), "ratio must be a number in [0, 1)"),
                                              (dict(ratio=0.5, positions="shuffled"), "positions must be one of")])
def test_budget_and_positions_errors_name_the_method(kwargs, fragment):
    with pytest.raises(ConfigError, match=re.escape(f"vtprune: visionzip {fragment}")):
        make_method("visionzip", **kwargs)


@pytest.mark.parametrize("name", sorted(vtprune.list_methods()))
def test_defaults_and_the_edges_of_the_ranges_are_valid(name):
    if not method_class(name).has_budget:  # schedule-defined or learned: a budget is refused, by name
        make_method(name)
        with pytest.raises(ConfigError, match=f"{name} has no ratio / keep budget"):
            make_method(name, ratio=0.5)
        return
    make_method(name, ratio=0.5)
    make_method(name, keep=1)
    make_method(name, ratio=0.0)


def test_flowcut_and_fastv_range_edges_are_valid():
    make_method("flowcut", ratio=0.5, vit_share=1.0, cumulative_weight=0.0, llm_layer=1, semantic_scaling="sqrt_d")
    make_method("fastv", ratio=0.5, layer=1)
    make_method("random", ratio=0.5, seed=2**32 - 1)


# Finite but absurd values that overflowed, divided by zero or gave NaN logits; each bound is the range named.
ABSURD = [
    ("paint", "alpha", 1e39, "a boost factor in [0, 100]"),  # NaN logits / overflow inside the forward
    ("paint", "alpha", 1e38, "a boost factor in [0, 100]"),
    ("paint", "alpha", 100.5, "a boost factor in [0, 100]"),
    ("paint", "beta", 1e300, "a boost factor in [0, 100]"),
    ("vflowopt", "entropy_weight", 1e300, "a weight in [-1000, 1000]"),  # NaN logits
    ("vflowopt", "entropy_weight", -1e39, "a weight in [-1000, 1000]"),
    ("vflowopt", "entropy_weight", 1000.5, "a weight in [-1000, 1000]"),
    ("vflowopt", "cell", 1e-200, "a cell size in [0.01, 10000]"),  # ZeroDivisionError at prune()
    ("vflowopt", "cell", 1e300, "a cell size in [0.01, 10000]"),  # OverflowError at prune()
    ("vflowopt", "cell", 0.009, "a cell size in [0.01, 10000]"),
    ("vflowopt", "cell", 0.0, "a cell size in [0.01, 10000]"),
]


@pytest.mark.parametrize("method, field, value, expected", ABSURD, ids=lambda v: str(v))
def test_finite_but_absurd_values_are_refused_at_construction(method, field, value, expected):
    match = re.escape(f"vtprune: {method} {field}={value!r} is out of range; expected {expected}")
    with pytest.raises(ConfigError, match=match):
        make_method(method, **{field: value})


# the paper defaults (left out), the bounds' edges and values just inside them
EDGES = [("paint", dict(alpha=100.0, beta=100.0)), ("paint", dict(alpha=0.0, beta=0.0)),
         ("vflowopt", dict(ratio=0.5, entropy_weight=1000.0, cell=0.01)),
         ("vflowopt", dict(keep=16, entropy_weight=-1000.0, cell=10000.0)),
         ("vflowopt", dict(ratio=0.5, recycle=True, cell=1.0, entropy_weight=0.5))]


@pytest.mark.parametrize("method, kwargs", EDGES)
def test_the_bounds_edges_build_and_give_finite_logits(models, method, kwargs):
    """The edges are safe, not only accepted: pruned with them, a forward of the tiny LLaVA is finite."""
    from .conftest import collate, make_prompt

    make_method(method)  # the paper defaults
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 0), make_prompt(model, "llava", 8, 1)])
    with vtprune.pruned(model, make_method(method, **kwargs)), torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def _numeric(hint) -> set:
    """int / float in a field's annotation, also as a tuple's items."""
    kinds = {k for t in _types(hint) for k in (typing.get_args(t) if typing.get_origin(t) is tuple else (t,))}
    return kinds & {int, float}


def _extreme(method: str, f, value):
    """``value`` in field ``f``'s shape: a tuple of the length the method expects, else the value itself."""
    if not any(typing.get_origin(t) is tuple for t in _types(typing.get_type_hints(method_class(method))[f.name])):
        return value
    lengths = {("vflowopt", "llm_layers"): 2, ("transprune", "layers"): 3}
    n = len(f.default) if isinstance(f.default, tuple) else lengths.get((method, f.name), 1)
    return (value,) * n


@pytest.mark.filterwarnings("ignore:vtprune. vflowopt cannot average")  # tiny llm_ratios: the budget is missed
@pytest.mark.parametrize("method, f, hint", [p for p in FIELDS if _numeric(p.values[2])
                                             and p.values[1].name not in ("ratio", "keep")
                                             and method_class(p.values[0]).__module__.startswith("vtprune.")])
def test_every_numeric_field_refuses_or_survives_finite_extremes(models, dyvte_routers, method, f, hint):
    """The audit behind the bounds: in every int / float field of a shipped method (not the test-only methods
    other test files register, which bound nothing) a finite extreme (+-1e300, +-1e38, 1e-200; 2**62,
    -2**62) is refused with a ConfigError / PruneError at construction or prune(), or the pruned forward is
    finite. Never a crash of another type, an error inside the forward or NaN logits."""
    from .conftest import collate, make_prompt

    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 0)])
    base = {"var": dict(sink_dims=(1,)), "dyvte": dict(routers=dyvte_routers("llava"))}.get(method, {})
    values = [1e300, -1e300, 1e38, -1e38, 1e-200] if float in _numeric(hint) else []
    values += [2**62, -2**62] if int in _numeric(hint) else []
    for value in values:
        kwargs = {**_budget(method, f.name), **base, f.name: _extreme(method, f, value)}
        try:
            vtprune.prune(model, make_method(method, **kwargs))
        except PruneError:  # ConfigError is one too
            assert not hasattr(model, "vtprune")
            continue
        try:
            with torch.no_grad():
                assert torch.isfinite(model(**batch).logits).all(), f"{method} {f.name}={value!r}: non-finite logits"
        finally:
            if hasattr(model, "vtprune"):
                vtprune.unprune(model)


def test_unknown_keyword_is_a_value_error_naming_valid_fields():
    with pytest.raises(ValueError, match="unknown keyword.*layr.*did you mean 'layer'.*valid keywords: keep, layer"):
        make_method("fastv", ratio=0.5, layr=2)
    with pytest.raises(TypeError):  # still what Python raises for a bad keyword
        make_method("fastv", ratio=0.5, layr=2)
    with pytest.raises(UnknownFieldError):
        make_method("fastv", ratio=0.5, layr=2)


@dataclass
class _Probe(vtprune.Method):
    width: int = 3
    sizes: tuple[int, ...] = (1, 2)
    mode: str | None = None
    pair: tuple[int, float] = (1, 0.5)

    name: ClassVar[str] = "_probe"
    seen: ClassVar[list] = []

    def check_fields(self) -> None:
        self.seen.append(type(self.width))
        if self.width > 10:
            raise self.field_error("width", "<= 10")


def test_check_fields_hook_runs_after_the_type_checks():
    _Probe.seen.clear()
    p = _Probe(ratio=0.5, width=np.int64(4), sizes=[np.int64(3), 4], pair=[2, 3])
    assert _Probe.seen == [int] and p.width == 4 and p.sizes == (3, 4) and p.pair == (2, 3.0)
    assert type(p.pair[1]) is float
    with pytest.raises(ConfigError, match=re.escape("_probe width=11 is out of range; expected <= 10")):
        _Probe(ratio=0.5, width=11)
    with pytest.raises(ConfigError, match=re.escape("_probe width='4' has the wrong type: expected int")):
        _Probe(ratio=0.5, width="4")
    assert _Probe.seen == [int, int]  # not reached for the wrong type
    with pytest.raises(ConfigError, match=re.escape("sizes=('a',) has the wrong type: expected a tuple of int")):
        _Probe(ratio=0.5, sizes=("a",))
    with pytest.raises(ConfigError, match=re.escape("pair=(1,) has the wrong type: expected a tuple (int, float")):
        _Probe(ratio=0.5, pair=(1,))
    with pytest.raises(ConfigError, match=re.escape("mode=3 has the wrong type: expected str or None")):
        _Probe(ratio=0.5, mode=3)
    assert _Probe(ratio=0.5, mode="x").mode == "x"


@pytest.mark.parametrize("method, kwargs, setting", [
    ("fastv", dict(ratio=0.5, layer=99), "fastv layer=99"),
    ("flowcut", dict(ratio=0.5, llm_layer=9), "flowcut llm_layer=9"),
    ("paint", dict(local_layer=-1), "paint local_layer=-1"),
    ("paint", dict(start=99), "start=99"),
    ("var", dict(layers=(99,), sink_dims=(1,)), "var layers=(99,)"),
    ("vflowopt", dict(ratio=0.5, vision_layer=7), "vflowopt vision_layer=7"),
    ("transprune", dict(layers=(1, 2, 9)), "transprune layers=(1, 2, 9)"),
])
def test_layers_beyond_the_model_name_the_method_field_and_value(models, method, kwargs, setting):
    """Checked once the model is known (at prune()): the error says which setting to change, the model is left
    unpruned and works."""
    model = models("llava")  # 3 vision layers (features after layer 1), 4 LLM layers
    with pytest.raises(ConfigError, match=re.escape(setting)):
        vtprune.prune(model, method, **kwargs)
    assert not hasattr(model, "vtprune")
