"""Search-space declarations: every method's space samples values its check_fields (and prune()) accept; the
conditional, ordered and model-dependent parts; trial 0's recorded defaults; pipeline prefixes."""

from __future__ import annotations

import dataclasses
import math

import pytest

import vtprune
from vtprune.adapters import get_adapter
from vtprune.cli import UsageError
from vtprune.core.plan import model_info
from vtprune.methods.base import ModelInfo
from vtprune.registry import list_methods, method_class
from vtprune.search import space as space_mod
from vtprune.search.plan import make_plan

from ..conftest import collate, make_prompt

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")

# what the fields need beyond the budget to install on the tiny test models (not searched)
EXTRA = {"var": {"sink_dims": (1, 2)}, "cdpruner": {"relevance": "llm"}}  # no CLIP checkpoint offline
BUDGET = {"fastv": {"keep": 16}, "visionzip": {"keep": 16}, "vtc_cls": {"keep": 16}, "flowcut": {"keep": 16},
          "vflowopt": {"keep": 16}, "transprune": {"keep": 16}, "random": {"keep": 16},
          "dart": {"keep": 16}, "divprune": {"keep": 16}, "cdpruner": {"keep": 16},
          "pdrop": {"keep": 16}, "sparsevlm": {"keep": 16}}
BUILTIN = sorted(n for n in list_methods() if method_class(n).__module__.startswith("vtprune.methods."))
SEARCHED = [n for n in BUILTIN if space_mod.declared(method_class(n))]
TINY = ModelInfo(family="llava", vision_layers=4, feature_layer=2, llm_layers=4, nominal_tokens=144, hidden_size=256)


def _samples(space, n: int, seed: int = 0) -> list[tuple[dict, list[dict]]]:
    """n (optuna params, field values per method) from a random sampler (nothing evaluated)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        values = space.sample(space_mod.trial_suggest(trial))
        out.append((dict(trial.params), values))
        study.tell(trial, 0.0)
    return out


def test_every_method_with_knobs_declares_a_space_and_random_none():  # random and divprune have none
    assert set(SEARCHED) == set(BUILTIN) - {"random", "divprune"} and len(BUILTIN) == 16  # divprune: budget only
    assert space_mod.declared(method_class("random")) == {}


@pytest.mark.parametrize("name", SEARCHED)
def test_none_defaults_declare_a_derivation_and_budgets_are_never_searched(name):
    cls = method_class(name)
    for f in dataclasses.fields(cls):
        decl = f.metadata.get(space_mod.SEARCH_KEY)
        assert f.name not in ("ratio", "keep") or decl is None
        if decl is not None and f.default is None:
            assert decl.derive is not None, f"{name}.{f.name}"


@pytest.mark.filterwarnings("ignore:vtprune. vflowopt cannot average")  # a searched schedule may miss the budget
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
@pytest.mark.parametrize("name", SEARCHED)
def test_sampled_values_pass_check_fields_and_install(models, dyvte_routers, family, name):
    model = models(family)
    info = model_info(get_adapter(model))
    fixed = {**EXTRA.get(name, {}), **({"routers": dyvte_routers(family)} if name == "dyvte" else {})}
    plan = make_plan(name, keep=BUDGET.get(name, {}).get("keep"), fixed=fixed)
    space = plan.space(info)
    for params, values in _samples(space, 12):
        (method,) = plan.methods(values)  # check_fields ran at construction
        for field, value in values[0].items():
            assert getattr(method, field) == value
        with vtprune.pruned(model, [method]):
            pass  # cuts, probes and layers validated against this model


def test_only_for_fields_are_searched_on_their_family_only(models):
    llava, nxt = (model_info(get_adapter(models(f))) for f in ("llava", "llava_next"))
    plan = make_plan("flowcut", keep=16)
    assert plan.space(llava).names == ["cumulative_weight", "semantic_scaling"]
    assert plan.space(nxt).names == ["cumulative_weight", "semantic_scaling", "vit_share", "llm_layer"]
    assert make_plan("visionzip", keep=16).space(llava).names == ["dominant_fraction"]


def test_model_dependent_bounds_follow_the_model():
    deep = dataclasses.replace(TINY, llm_layers=32)
    for info, top in ((TINY, 3), (deep, 8)):  # FastV's K: 1 .. max(3, L / 4), below the last layer
        seen = {v[0]["layer"] for _, v in _samples(make_plan("fastv", keep=16).space(info), 40)}
        assert seen <= set(range(1, top + 1)) and max(seen) == top and min(seen) == 1


def test_a_conditional_field_is_sampled_only_when_its_condition_holds():
    space = make_plan("vflowopt", keep=16).space(TINY)
    samples = _samples(space, 40)
    assert {p["recycle"] for p, _ in samples} == {True, False}
    for params, values in samples:
        assert ("cell" in params) == params["recycle"]
        assert ("cell" in values[0]) == values[0]["recycle"]
    fixed_off = make_plan("vflowopt", keep=16, fixed={"recycle": False}).space(TINY)
    assert all("cell" not in p for p, _ in _samples(fixed_off, 5))


def test_ordered_sequences():
    deep = dataclasses.replace(TINY, llm_layers=32)
    for params, values in _samples(make_plan("transprune", keep=16).space(deep), 30):
        ratios, layers = values[0]["keep_ratios"], values[0]["layers"]
        assert all(a >= b for a, b in zip(ratios, ratios[1:])) and all(0.05 <= r <= 1 for r in ratios)
        assert all(a < b for a, b in zip(layers, layers[1:])) and 1 <= layers[0] and layers[-1] <= 31
        assert [params[f"layers[{i}]"] for i in range(3)] == list(layers)
    tiny = _samples(make_plan("transprune", keep=16).space(TINY), 3)
    assert all(v[0]["layers"] == (1, 2, 3) for _, v in tiny)  # four layers leave one schedule


def test_vflowopt_budgeted_search_has_one_llm_ratio_and_a_retention_the_budget_can_reach():
    for params, values in _samples(make_plan("vflowopt", keep=16).space(TINY), 30):
        assert len(values[0]["llm_ratios"]) == 1
        # stage layers of a 4-layer LLM: 1, 3; the average of 16 of 144 tokens needs n0 <= 4 * 16
        assert 0.2 * 4 * 16 / 144 <= values[0]["retention"] <= 4 * 16 / 144 + 1e-12
    free = make_plan("vflowopt").space(TINY)
    assert all(len(v[0]["llm_ratios"]) == 2 for _, v in _samples(free, 5))


def test_trial_zero_records_the_defaults_and_what_vflowopt_derives_from_its_budget():
    assert make_plan("fastv", keep=16).space(TINY).defaults() == {"layer": 2}
    assert make_plan("flowcut", keep=16).space(TINY).defaults() == {"cumulative_weight": 0.5,
                                                                    "semantic_scaling": "none"}
    got = make_plan("vflowopt", keep=16).space(TINY).defaults()
    f = 16 / 144  # released settings at 10 % and 25 %: (t, a, rho, r1), interpolated linearly in the budget
    w = (f - 0.10) / 0.15
    low, high = (39.265, 17.387, 0.11662, 1.0), (34.760, 15.581, 0.26510, 0.98334)
    t, a, rho, r1 = ((1 - w) * x + w * y for x, y in zip(low, high))
    expected = {"threshold": t, "cell": a * 12 / 27, "entropy_weight": 0.0, "retention": rho, "llm_ratios[0]": r1,
                "recycle": True}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k


def test_trial_zero_values_reproduce_the_defaults(models):
    """Trial 0 evaluates the defaults; its recorded (derived) values must stand for the same configuration."""
    import torch

    model = models("llava")
    info = model_info(get_adapter(model))
    plan = make_plan("vflowopt", keep=16)
    space = plan.space(info)
    values = space.sample(lambda name, kind, low, high, log, options, default: default)
    batch = collate([make_prompt(model, "llava", 6, seed) for seed in range(2)])
    kept = []
    for methods in (plan.methods(None), plan.methods(values)):
        with vtprune.pruned(model, methods), torch.no_grad():
            model(**batch)
            kept.append([[s.kept_index for s in img.stages] for img in model.vtprune.stats.images])
    assert kept[0] == kept[1]


def test_pipeline_union_is_prefixed_by_method(models):
    info = model_info(get_adapter(models("llava")))
    space = make_plan("visionzip,fastv", keep=[48, 16]).space(info)
    assert space.names == ["visionzip.dominant_fraction", "fastv.layer"]
    params, values = _samples(space, 1)[0]
    assert set(params) == {"visionzip.dominant_fraction", "fastv.layer"}
    assert set(values[0]) == {"dominant_fraction"} and set(values[1]) == {"layer"}
    twice = make_plan("fastv,fastv", keep=[32, 16], fixed={"fastv2.layer": 3}).space(info)
    assert twice.names == ["fastv.layer"]
    assert make_plan("fastv,fastv", keep=[32, 16]).space(info).names == ["fastv.layer", "fastv2.layer"]
    config = make_plan("visionzip,fastv", keep=[48, 16]).config(values, "m")
    assert config == {"model": "m", "pipeline": [{"method": "visionzip", "keep": 48, **values[0]},
                                                  {"method": "fastv", "keep": 16, **values[1]}]}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nosuch", keep=16), r"--method nosuch: .*unknown method"),
    (dict(method="random", keep=16), r"empty search space: random declares no searchable field"),
    (dict(method="fastv", keep=16, fixed={"layer": 3}), r"empty search space: every searchable field is fixed"),
    (dict(method="fastv", keep=16, fixed={"layr": 3}), r"--set layr: unknown parameter"),
    (dict(method="fastv", keep=16, params=["layr"]), r"--params layr: unknown parameter \(did you mean 'layer'\?\)"),
    (dict(method="fastv"), r"--method fastv needs a budget"),
    (dict(method="var", keep=16), r"--method var has no ratio / keep budget"),
    (dict(method="fastv,visionzip", keep=16), r"--keep: a pipeline of 2 methods needs one value per method"),
    (dict(method="fastv", keep=16, fixed={"keep": 3}), r"--set keep: the budget is fixed with --keep"),
    (dict(method="fastv", keep=16, fixed={"layer": 0}), r"fastv layer=0 is out of range"),
])
def test_bad_plans_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as err:
        make_plan(**kwargs)
    assert "\n" not in str(err.value)


def test_float_bounds_cover_the_paper_defaults():
    """Every concrete default lies inside its declared range on a LLaVA-1.5-7B-shaped model."""
    llava7b = ModelInfo(family="llava", vision_layers=24, feature_layer=22, llm_layers=32, nominal_tokens=576,
                        hidden_size=4096)
    for name in SEARCHED:
        plan = make_plan(name, keep=BUDGET.get(name, {}).get("keep"), fixed=EXTRA.get(name, {}))
        space = plan.space(llava7b)

        def check(pname, kind, low, high, log, options, default):
            if kind == "choice":
                assert default in options, pname
            else:
                assert low <= default <= high or math.isclose(default, high), (pname, low, default, high)
            return default

        space.sample(check)
