"""Torch-free facts about the built-in methods, the shipped configs and ``perf --arch`` names, so that a command
rejects an unknown method, field, budget, config or architecture at once, before torch is imported
(``tests/test_cli_imports.py``). :data:`BUILTIN` and :data:`ARCH_NAMES` are copies, proved equal to the registry
and to ``vtprune.perf.archs.ARCHS`` by ``tests/cli/test_known.py``; the errors keep the texts of the checks
they run ahead of (the registry's, ``Method.__post_init__``'s, ``api._resolve_config``'s), which the heavy
checks still repeat after torch is imported (they also check field values). A method registered in this process
(a script calling ``@register`` before a command's ``main``) is read from its class, already imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import NamedTuple

from ..budget import validate_budget
from ..cliargs import UsageError
from ..errors import ConfigError

__all__ = ["Known", "BUILTIN", "ARCH_NAMES", "known_method", "check_fields", "check_budget", "check_light",
           "check_config_exists", "check_set_fields"]


class Known(NamedTuple):
    """What a command checks about a method without importing it: its budget kind, whether it removes tokens,
    its keyword names (the dataclass init fields) and the fields it declares searchable (``space.declared``)."""
    has_budget: bool
    budget_optional: bool
    prunes: bool
    fields: tuple[str, ...]
    searchable: tuple[str, ...]


BUILTIN: dict[str, Known] = {
    "cdpruner": Known(True, False, True, ("anyres", "clip", "instruction", "keep", "negate", "positions", "ratio",
                                          "relevance", "strip", "tokenizer"),
                 ("negate", "anyres")),
    "dart": Known(True, False, True, ("count", "keep", "layer", "pivot_image", "pivot_order", "pivot_text",
                                      "positions", "ratio"),
                 ("layer", "pivot_image", "pivot_text")),
    "divprune": Known(True, True, True, ("keep", "positions", "ratio", "subset_ratio"),
                 ()),
    "dyvte": Known(False, False, True, ("keep", "positions", "ratio", "routers", "threshold"),
                 ("threshold",)),
    "fastv": Known(True, False, True, ("keep", "layer", "positions", "ratio"),
                 ("layer",)),
    "flowcut": Known(True, False, True, ("cumulative_weight", "keep", "llm_layer", "positions", "ratio",
                                         "semantic_scaling", "shared_prune_count", "vit_share"),
                 ("cumulative_weight", "semantic_scaling", "vit_share", "llm_layer")),
    "paint": Known(False, False, False, ("alpha", "beta", "keep", "local_layer", "local_ratio", "positions",
                                         "ratio", "spatial_ratio", "start"),
                 ("alpha", "beta", "local_ratio", "start")),
    "pdrop": Known(True, True, True, ("keep", "layers", "positions", "ratio", "ratios"),
                 ("layers", "ratios")),
    "random": Known(True, False, True, ("keep", "positions", "ratio", "seed"),
                 ()),
    "sparsevlm": Known(True, True, True, ("bias", "convention", "keep", "layers", "min_gravity", "positions",
                                          "priority_heads", "ratio", "scale", "schedule", "table", "version"),
                 ("version", "layers")),
    "transprune": Known(True, True, True, ("alpha", "direction", "keep", "keep_ratios", "layers", "positions",
                                           "ratio", "softmax_over_batch"),
                 ("layers", "keep_ratios", "alpha", "direction")),
    "var": Known(False, False, False, ("keep", "layers", "min_image_mass", "p", "positions", "ratio", "rho",
                                       "sink_dims", "tau"),
                 ("tau", "rho", "p", "min_image_mass")),
    "vflowopt": Known(True, True, True, ("cell", "entropy_weight", "keep", "llm_layers", "llm_ratios", "positions",
                                         "ratio", "recycle", "retention", "threshold", "vision_layer"),
                 ("threshold", "cell", "entropy_weight", "retention", "llm_ratios", "recycle")),
    "visionzip": Known(True, False, True, ("anyres", "dominant_fraction", "keep", "positions", "ratio",
                                           "vision_block"),
                 ("dominant_fraction", "anyres")),
    "vtc_cls": Known(True, False, True, ("keep", "positions", "ratio", "start_layer", "vision_block"),
                 ("start_layer",)),
    "zipvl": Known(False, False, False, ("bits", "force_last", "keep", "kv_mode", "n_random", "n_recent", "norm",
                                         "positions", "ratio", "recompress_every", "seed", "tau"),
                 ("tau", "n_recent", "n_random")),
}

# vtprune.perf.archs.ARCHS's keys, sorted
ARCH_NAMES = ("internvl2-8b", "llava-1.5-13b", "llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "qwen3-vl-8b")

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # api.CONFIG_DIR


def _methods() -> dict[str, Known]:
    """The built-in methods, plus those registered in this process (a script or test that imported the registry
    and called ``@register``: their classes are imported already, so reading them costs nothing)."""
    registration = sys.modules.get("vtprune.core.registration")  # never imported here: it would bring torch
    extra = {k: c for k, c in getattr(registration, "_METHODS", {}).items() if k not in BUILTIN}
    if not extra:
        return BUILTIN
    from ..space import declared

    return {**BUILTIN, **{k: Known(c.has_budget, c.budget_optional, c.prunes,
                                   tuple(sorted(f.name for f in dataclasses.fields(c) if f.init)),
                                   tuple(declared(c))) for k, c in extra.items()}}


def known_method(name: str) -> tuple[str, Known]:
    """(canonical name, facts) of a method; else ConfigError with the registry's text (close matches)."""
    methods = _methods()
    key = name.lower().replace("-", "_")
    if key in methods:
        return key, methods[key]
    close = difflib.get_close_matches(str(name).lower(), list(methods), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"vtprune: unknown method {name!r}.{hint} Available: {', '.join(sorted(methods))}")


def check_fields(name: str, keys) -> None:
    """ConfigError with ``registry.check_keywords``'s text when a keyword is not a field of method ``name``."""
    valid = list(known_method(name)[1].fields)
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        close = {k: difflib.get_close_matches(k, valid, n=1, cutoff=0.6) for k in unknown}
        hints = "".join(f" ({k}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
        raise ConfigError(f"vtprune: method {name!r} got unknown keyword(s) {', '.join(unknown)}{hints}; "
                          f"valid keywords: {', '.join(valid)}")


def check_budget(name: str, keep=None, ratio=None) -> None:
    """The budget check of ``Method.__post_init__`` (same texts), without building the method."""
    info = known_method(name)[1]
    if info.has_budget and not (info.budget_optional and ratio is None and keep is None):
        validate_budget(ratio, keep, name)
    elif ratio is not None or keep is not None:
        raise ConfigError(f"vtprune: {name} has no ratio / keep budget (its schedule decides); drop them")


def check_light(name: str, **kwargs) -> str:
    """``cliargs.check_method`` minus the field values: the name, the keywords and the budget; a UsageError with
    the same text. Returns the canonical name."""
    try:
        name, _ = known_method(name)
        check_fields(name, kwargs)
        check_budget(name, kwargs.get("keep"), kwargs.get("ratio"))
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return name


def check_config_exists(spec) -> None:
    """``--config``: a file or a shipped name (``api._resolve_config``'s text), before torch is imported."""
    if Path(spec).is_file():
        return
    shipped = sorted(f"{p.parent.name}/{p.stem}" for p in _CONFIG_DIR.glob("*/*.yaml"))
    if os.fspath(spec).removesuffix(".yaml") not in shipped:
        raise UsageError(f"--config {spec}: vtprune: config {os.fspath(spec)!r} is neither a file nor a shipped "
                         f"config; shipped: {', '.join(shipped)} (vtprune.api.list_configs())")


def check_set_fields(methods, hyper: dict) -> None:
    """Every ``--set`` field is a field of every method named by ``--methods`` (``eval.sweep.check_configs``'s
    text, without building a method)."""
    for name in methods:
        try:
            check_fields(name, hyper)
        except ConfigError as err:
            fix = " (or drop that --set field)" if any(k in str(err) for k in hyper) else ""
            raise UsageError(f"--methods {name}: {err}{fix}") from None
