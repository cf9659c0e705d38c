"""vtprune/cli/known.py's torch-free copies (the built-in methods, perf's architectures) equal the real ones, and
its errors have the texts of the checks they run ahead of, so they can never drift."""

from __future__ import annotations

from dataclasses import fields

import pytest

from vtprune.cli import known
from vtprune.cliargs import UsageError
from vtprune.errors import ConfigError


def _registry():
    """The shipped methods (test files register test-only methods too, depending on collection order)."""
    from vtprune.registry import _registered

    return {name: cls for name, cls in _registered().items() if cls.__module__.startswith("vtprune.")}


def test_the_method_table_equals_the_registry():
    from vtprune.space import declared

    real = {name: known.Known(cls.has_budget, cls.budget_optional, cls.prunes,
                              tuple(sorted(f.name for f in fields(cls) if f.init)), tuple(declared(cls)))
            for name, cls in _registry().items()}
    assert {name: cls.name for name, cls in _registry().items()} == {name: name for name in real}
    assert known.BUILTIN == real


def test_the_arch_names_equal_perf_archs():
    from vtprune.perf.archs import ARCHS

    assert known.ARCH_NAMES == tuple(sorted(ARCHS))


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises((ConfigError, UsageError)) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("name", ["nosuch", "fastvv", "Visionzp", "vtc-clss", "flow"])
def test_an_unknown_method_has_the_registry_text(name):
    from vtprune.registry import method_class

    assert _message(known.known_method, name) == _message(method_class, name)


def test_known_method_takes_the_registry_spellings():
    from vtprune.registry import method_class

    for name in ("FastV", "vtc-cls", "VisionZip"):
        assert known.known_method(name)[0] == method_class(name).name


@pytest.mark.parametrize("method,keys", [("fastv", ["nosuch"]), ("fastv", ["layr", "zz"]), ("var", ["rhoo"])])
def test_an_unknown_field_has_the_registry_text(method, keys):
    from vtprune.registry import _registered, check_keywords

    assert _message(known.check_fields, method, keys) == _message(check_keywords, _registered()[method], keys)


@pytest.mark.parametrize("method,budget", [("fastv", {}), ("fastv", {"keep": 0}), ("fastv", {"ratio": 1.5}),
                                           ("fastv", {"keep": 4, "ratio": 0.5}), ("dyvte", {"keep": 16}),
                                           ("var", {"ratio": 0.5}), ("transprune", {"keep": 0})])
def test_a_bad_budget_has_the_method_text(method, budget):
    from vtprune.registry import make_method

    assert _message(known.check_budget, method, **budget) == _message(make_method, method, **budget)


@pytest.mark.parametrize("method,budget", [("fastv", {"keep": 4}), ("dyvte", {}), ("transprune", {}),
                                           ("vflowopt", {"ratio": 0.5})])
def test_a_good_budget_passes(method, budget):
    from vtprune.registry import make_method

    make_method(method, **budget)  # the method accepts it too
    known.check_budget(method, **budget)


def test_a_missing_config_has_the_load_config_text(tmp_path):
    from vtprune.api import load_config

    spec = str(tmp_path / "nope.yaml")
    assert _message(known.check_config_exists, spec) == f"--config {spec}: {_message(load_config, spec)}"
    known.check_config_exists("fastv/llava-1.5-7b")  # a shipped name, with or without .yaml
    known.check_config_exists("fastv/llava-1.5-7b.yaml")
    (tmp_path / "mine.yaml").write_text("method: fastv\n")
    known.check_config_exists(str(tmp_path / "mine.yaml"))


@pytest.mark.parametrize("method,params", [("random", None), ("fastv", "nosuch"), ("flowcut", "vit_shar"),
                                           ("fastv", ""), ("vflowopt", "cell,nosuch")])
def test_search_space_errors_have_the_plan_text(method, params):
    from vtprune.cli.search import _check_space_light
    from vtprune.search.plan import make_plan

    budget = {} if known.BUILTIN[method].budget_optional else {"keep": 4}
    expected = _message(make_plan, method, params=params, **budget)
    assert _message(_check_space_light, method, known.BUILTIN[method].searchable, params) == expected


@pytest.mark.parametrize("method,params", [("fastv", None), ("fastv", "layer"), ("flowcut", "vit_share,llm_layer")])
def test_a_good_search_space_passes(method, params):
    from vtprune.cli.search import _check_space_light
    from vtprune.search.plan import make_plan

    make_plan(method, keep=4, params=params)
    _check_space_light(method, known.BUILTIN[method].searchable, params)


def test_a_method_registered_in_this_process_is_known_too():
    """perf / bench called from a script that registered its own method: the early checks read the live class."""
    from typing import ClassVar
    from dataclasses import dataclass

    from vtprune import registry
    from vtprune.core.registration import _METHODS
    from vtprune.methods.base import Method

    @dataclass
    class Mine(Method):
        name: ClassVar[str] = "_test_known_mine"

    registry.register(Mine)
    try:
        name, info = known.known_method("_test_known_mine")
        assert name == "_test_known_mine" and info.has_budget == Mine.has_budget and "keep" in info.fields
        known.check_fields(name, ["keep"])
        assert _message(known.check_budget, name) == _message(registry.make_method, name)
    finally:
        _METHODS.pop("_test_known_mine", None)
    assert _message(known.known_method, "nosuch") == _message(registry.method_class, "nosuch")
