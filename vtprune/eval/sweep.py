"""Sweeps of configurations for ``vtprune bench``: :class:`BenchConfig` (vanilla, or a method at one budget),
:class:`BenchSettings` (the run's flags), :func:`build_configs` (methods x budgets, config files) and the
``check_*`` functions that refuse a bad sweep before the model or data is loaded (``check_on_model`` after)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import methods as _methods  # noqa: F401  (registers the built-in methods)
from ..api import PIPELINE_OPTIONS
from ..cliargs import UsageError, check_method, check_model_spec, check_out_dir, check_prune
from ..loading import resolve_device, resolve_dtype
from ..registry import list_methods, make_method, method_class
from .checks import budget_errors as _budget_errors
from .checks import check_counts
from .tasks import DEFAULT_TASKS, TASKS
from .tasks.prompts import PROMPT_STYLES


REFERENCE_KEEPS = (192, 128, 64)  # LLaVA-1.5's standard budgets ...
REFERENCE_TOKENS = 576  # ... out of its 576 visual tokens


@dataclass(frozen=True)
class BenchConfig:
    """One point of the sweep: vanilla (``method=None``) or a method with a ``keep`` or ``ratio`` budget."""

    method: str | None = None
    keep: int | None = None
    ratio: float | None = None
    hyper: tuple = ()  # sorted (key, value) pairs of method hyper-parameters (--set, seed)
    source: str | None = None  # name of the --config file this point comes from
    fixed: tuple = ()  # that file's own (key, value) fields: named by ``source`` in the label, not listed
    options: tuple = ()  # that file's pipeline options (key, value), e.g. (("evict_early_kv", True),)
    pipeline: tuple = ()  # a pipeline config: ((method, ((key, value), ...)), ...), run as the file says

    @property
    def label(self) -> str:
        if self.method is None:
            return "vanilla"
        if self.pipeline:
            return f"{self.method}[{self.source}]"
        budget = (f"keep{self.keep}" if self.keep is not None else f"ratio{self.ratio:g}" if self.ratio is not None
                  else "schedule")
        extra = "".join(f",{k}={v}" for k, v in self.hyper if k != "seed")  # the run's --seed is in meta
        return f"{self.method}@{budget}{extra}" + (f"[{self.source}]" if self.source else "")

    def prune_kwargs(self) -> dict:
        kw = {**dict(self.fixed), **dict(self.hyper)}  # --set overrides a config file, as in prune(config=)
        if self.keep is not None:
            kw["keep"] = self.keep
        if self.ratio is not None:
            kw["ratio"] = self.ratio
        return kw

    def prune_args(self) -> tuple:
        """(method, keywords) of ``vtprune.prune(model, method, **keywords)`` for this point: the method's name
        with its fields and budget, or a pipeline's method objects; the pipeline options in both."""
        if self.pipeline:
            return [make_method(m, **dict(kwargs)) for m, kwargs in self.pipeline], dict(self.options)
        return self.method, {**self.prune_kwargs(), **dict(self.options)}


@dataclass
class BenchSettings:
    """Everything ``vtprune bench`` takes (CLI flags map 1:1 onto these fields)."""

    model: str | None = None  # local path or hub id; None = the embedded tiny LLaVA
    tasks: Sequence[str] = DEFAULT_TASKS
    data: dict = field(default_factory=dict)  # task -> folder; missing = embedded synthetic set
    methods: Sequence[str] | None = None  # None = default_methods() (none if ``configs`` are given)
    configs: Sequence[str] = ()  # method config files (or shipped names) run alongside ``methods``
    hyper: dict = field(default_factory=dict)  # method fields applied to every pruned configuration (--set)
    keeps: Sequence[int] | None = None  # None (and no ratios) = scaled_keeps(visual tokens)
    ratios: Sequence[float] | None = None
    limit: int | None = None  # questions per task (MME: whole images, subtasks interleaved)
    batch_size: int = 16
    max_new_tokens: int = 8
    prompt_style: str = "llava_v1"
    dtype: str = "auto"
    device: str = "auto"
    out: str | os.PathLike = "out/bench"
    seed: int = 0
    timing_samples: int = 4  # single-sample inputs for the timing pass (0 = no timing)
    timing_repeats: int = 5
    decode_tokens: int = 8  # tokens for decode ms/token (0 = skip)
    threads: int | None = None  # torch.set_num_threads for the run (restored afterwards)
    progress: bool = True

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {bad}; expected a subset of {TASKS}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {self.prompt_style!r}; expected one of {PROMPT_STYLES}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def default_methods(model_path: str | None = None) -> list[str]:
    """Every registered method that removes tokens (attention-modulation-only methods excluded) and can run on
    the model at ``model_path`` (default: the embedded tiny LLaVA) as it is, e.g. has its learned routers."""
    path = str(model_path if model_path is not None else tiny_llava_dir())
    return [name for name in list_methods() if method_class(name).prunes and method_class(name).available_for(path)]


def tiny_llava_dir():
    from ..embedded import tiny_llava

    return tiny_llava.DEFAULT_ASSET_DIR


def scaled_keeps(visual_tokens: int, reference: Sequence[int] = REFERENCE_KEEPS,
                 reference_tokens: int = REFERENCE_TOKENS) -> list[int]:
    """LLaVA's 192/128/64-of-576 budgets scaled to ``visual_tokens`` (144 -> 48/32/16), largest first."""
    keeps = [max(1, int(round(k * visual_tokens / reference_tokens))) for k in reference]
    return sorted(set(keeps), reverse=True)


def validate_methods(names: Sequence[str]) -> list[str]:
    """Canonical names; an unknown one raises the registry's ValueError (with close matches)."""
    return [method_class(n).name for n in names]


def _with_seed(name: str, kw: dict, seed: int, fixed: dict | None = None) -> tuple:
    """``kw`` plus ``seed`` for methods with a seed field (unless ``fixed`` sets one), as sorted pairs."""
    if "seed" in {f.name for f in dataclasses.fields(method_class(name))} and "seed" not in (fixed or {}):
        kw = {"seed": seed, **kw}
    return tuple(sorted(kw.items()))


def _variants(name: str, items: tuple) -> list[tuple]:
    """``items`` once per entry of the method's ``sweep_variants`` (ZipVL: each KV mode), unless ``items`` (--set)
    already fixes one of their fields; else ``items`` alone."""
    variants = method_class(name).sweep_variants
    given = dict(items)
    if not variants or any(k in given for v in variants for k in v):
        return [items]
    return [tuple(sorted({**given, **v}.items())) for v in variants]


def build_configs(methods: Sequence[str], keeps: Sequence[int] = (), ratios: Sequence[float] = (),
                  seed: int = 0, hyper: dict | None = None, files: Sequence = ()) -> list[BenchConfig]:
    """Vanilla first, then every method at every keep, then at every ratio, then the config ``files``
    (:func:`load_method_config` triples). Methods with a ``seed`` hyper-parameter get ``seed``; ``hyper`` maps
    method name -> extra keyword arguments."""
    configs = [BenchConfig()]
    for name in validate_methods(methods):
        for items in _variants(name, _with_seed(name, dict((hyper or {}).get(name, {})), seed)):
            if not method_class(name).has_budget:  # schedule-defined or learned: one point
                configs.append(BenchConfig(name, hyper=items))
                continue
            configs += [BenchConfig(name, keep=int(k), hyper=items) for k in keeps]
            configs += [BenchConfig(name, ratio=float(r), hyper=items) for r in ratios]
    for source, name, fields in files:
        options = tuple(sorted((k, fields[k]) for k in PIPELINE_OPTIONS if k in fields))
        if "pipeline" in fields:  # budgets are the file's own: one point
            configs.append(BenchConfig(name, source=source, pipeline=fields["pipeline"], options=options))
            continue
        fixed = {k: v for k, v in fields.items() if k not in ("keep", "ratio", *PIPELINE_OPTIONS)}
        items = _with_seed(name, dict((hyper or {}).get(name, {})), seed, fixed)
        own = dict(fixed=tuple(sorted(fixed.items())), source=source, hyper=items, options=options)
        cls = method_class(name)
        if "keep" in fields or "ratio" in fields or cls.budget_optional or not cls.has_budget:  # one point, as the file says
            configs.append(BenchConfig(name, keep=fields.get("keep"), ratio=fields.get("ratio"), **own))
        else:  # no budget in the file: swept like a method
            configs += [BenchConfig(name, keep=int(k), **own) for k in keeps]
            configs += [BenchConfig(name, ratio=float(r), **own) for r in ratios]
    return configs


def load_method_config(spec) -> tuple[str, str, dict]:
    """(label name, method, fields) of a method config: a YAML path or a shipped name such as
    ``flowcut/llava-1.5-7b``, read as ``vtprune.prune(model, config=spec)`` reads it (``model:`` ignored)."""
    from ..api import load_config

    try:
        data = dict(load_config(spec))
        data.pop("model", None)
        options = {k: data[k] for k in PIPELINE_OPTIONS if k in data}
        if "pipeline" in data:  # (label, "a+b", {"pipeline": ((method, sorted fields), ...)})
            steps = tuple((method_class(e["method"]).name, tuple(sorted((k, v) for k, v in e.items() if k != "method")))
                          for e in data["pipeline"])
            method, data = "+".join(m for m, _ in steps), {"pipeline": steps, **options}
        else:
            method = method_class(data.pop("method")).name
    except (OSError, ValueError, TypeError) as err:  # missing, not YAML, no method, unknown field (ConfigError)
        raise UsageError(f"--config {spec}: {err}") from None
    name = Path(str(spec)).name
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name, method, data


def check_settings(settings: BenchSettings) -> list:
    """Every check that needs no model (counts, device, budgets, methods and their fields, config files, --model,
    --out), so a bad command line fails before anything is loaded; returns the loaded config files."""
    check_counts(settings)
    resolve_device(settings.device)
    try:
        resolve_dtype(settings.dtype, torch.device("cpu"))
    except ValueError as err:
        raise UsageError(f"--dtype: {err}") from None
    problem = _budget_errors(settings.keeps or (), settings.ratios or ())
    if problem:
        raise UsageError(problem)
    check_model_spec(settings.model)
    check_out_dir(settings.out)
    files = [load_method_config(spec) for spec in settings.configs]
    methods = _methods_of(settings)
    check_configs(methods, files, settings.hyper, settings.keeps, settings.ratios, settings.seed)
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise UsageError(f"--methods {','.join(twice)} given twice; list each method once")
    named = [f"{method}[{name}]" for name, method, _ in files]  # label parts: equal ones would share results
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise UsageError(f"--config: two configs give {', '.join(twice)} (same method and file name); "
                         "drop the repeated one or rename a file")
    return files


def check_configs(methods: Sequence[str], files: Sequence, hyper: dict, keeps=None, ratios=None,
                  seed: int = 0) -> None:
    """A model-free dry run of every configuration of ``methods`` and the config ``files`` with the ``--set``
    fields ``hyper`` (the budget is a placeholder where it depends on the model): a bad field or value is a
    :class:`UsageError` naming the flag it comes from. Shared by bench and perf."""
    probe = build_configs(methods, list(keeps or [1]), list(ratios or []), seed,
                          {m: hyper for m in [*methods, *(f[1] for f in files)]}, files)
    pipelines = [source for source, _, fields in files if "pipeline" in fields]
    if pipelines and hyper:
        raise UsageError(f"--set does not apply to the pipeline config {pipelines[0]}; set the fields in that file")
    for config in probe[1:]:
        try:
            for method, kwargs in config.pipeline or ((config.method, config.prune_kwargs()),):
                check_method(method, **dict(kwargs))
        except UsageError as err:
            raise _refused(_flag_of(config), err, hyper) from None


def check_on_model(model, configs: Sequence[BenchConfig], hyper: dict) -> None:
    """Prune ``model`` with every configuration and unprune it at once (no forward, so it is cheap): what this
    model refuses (a layer beyond its depth, missing routers or sink dimensions) is a :class:`UsageError` naming
    the configuration, before anything runs. Shared by bench and perf."""
    for config in configs:
        if config.method is None:
            continue
        method, kwargs = config.prune_args()
        try:
            check_prune(model, method, **kwargs)
        except UsageError as err:
            raise _refused(f"{_flag_of(config)} ({config.label})", err, hyper) from None


def _flag_of(config: BenchConfig) -> str:
    """The flag a configuration comes from, as error messages name it."""
    return f"--config {config.source}" if config.source else f"--methods {config.method}"


def _refused(where: str, err, hyper: dict) -> UsageError:
    """A configuration's problem ``err`` as the one-line error naming ``where`` it comes from, pointing at
    ``--set`` too when the problem names one of its fields."""
    fix = " (or drop that --set field)" if any(k in str(err) for k in hyper) else ""
    return UsageError(f"{where}: {err}{fix}")


def _methods_of(settings: BenchSettings) -> list[str]:
    if settings.methods is not None:
        return validate_methods(settings.methods)
    return [] if settings.configs else default_methods(settings.model)
