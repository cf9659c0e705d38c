"""The benchmark runner behind ``vtprune bench``: vanilla + pruning methods x budgets on MME / GQA / POPE.

One process (or one ``torchrun`` job) loads the model once and, for every configuration (vanilla, then each
method at each budget), prunes the model, answers every question with greedy decoding (left-padded batches),
unprunes it, and scores the answers with :mod:`.mme` / :mod:`.gqa` / :mod:`.pope`. A separate timing pass
(:mod:`.perf`) measures prefill latency, decode ms/token, KV bytes and analytic FLOPs on a few single-sample
inputs, so the speed-ups are ratios measured in the same process. Rank 0 writes ``results.json``, ``results.csv`` and
``results.png`` (plus eval-tool style prediction files) into the output folder. ::

    from vtprune.benchmarks.runner import BenchSettings, run_bench
    results = run_bench(BenchSettings(tasks=("gqa",), methods=["fastv"], keeps=[32], limit=20))

Data-parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank takes the global batches ``rank,
rank + world, ...`` (the same batches a single process would run, so results are identical), and the
predictions are gathered on rank 0, which scores them and writes the outputs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import methods as _methods  # noqa: F401  (registers the built-in methods)
from ..adapters import get_adapter
from ..api import PIPELINE_OPTIONS, prune, unprune
from ..cliargs import UsageError, check_method, check_model_spec, check_out_dir, check_prune
from ..registry import list_methods, make_method, method_class
from . import gqa as gqa_mod
from . import mme as mme_mod
from . import perf
from ..embedded import synthetic
from . import pope as pope_mod
from .cli import budget_errors as _budget_errors
from .cli import check_counts
from .prompts import PROMPT_STYLES, build_prompt
from .tasks import DEFAULT_TASKS, TASKS

__all__ = [
    "TASKS",
    "DEFAULT_TASKS",
    "REFERENCE_KEEPS",
    "BenchConfig",
    "BenchSettings",
    "TaskData",
    "TokenCounts",
    "default_methods",
    "scaled_keeps",
    "build_configs",
    "validate_methods",
    "load_method_config",
    "check_counts",
    "check_settings",
    "check_configs",
    "check_on_model",
    "check_model_spec",
    "quiet_hf_logging",
    "load_model",
    "default_data_dir",
    "detect_task",
    "load_task",
    "limit_mme",
    "prediction_ids",
    "generate_answers",
    "score_task",
    "task_score",
    "prompt_benchmark",
    "run_bench",
    "format_table",
    "write_outputs",
]

REFERENCE_KEEPS = (192, 128, 64)  # LLaVA-1.5's standard budgets ...
REFERENCE_TOKENS = 576  # ... out of its 576 visual tokens
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_DATA = {"mme": ASSETS_DIR / "synthetic_mme", "gqa": ASSETS_DIR / "synthetic_gqa",
              "pope": ASSETS_DIR / "synthetic_pope"}


# ------------------------------------------------------------------------------------------------------------
# configurations
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


def build_configs(methods: Sequence[str], keeps: Sequence[int] = (), ratios: Sequence[float] = (),
                  seed: int = 0, hyper: dict | None = None, files: Sequence = ()) -> list[BenchConfig]:
    """Vanilla first, then every method at every keep, then at every ratio, then the config ``files``
    (:func:`load_method_config` triples). Methods with a ``seed`` hyper-parameter get ``seed``; ``hyper`` maps
    method name -> extra keyword arguments."""
    configs = [BenchConfig()]
    for name in validate_methods(methods):
        items = _with_seed(name, dict((hyper or {}).get(name, {})), seed)
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


# ------------------------------------------------------------------------------------------------------------
# model
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` = cuda if available, else cpu; a name torch does not know or a device this machine lacks
    is a :class:`UsageError`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu (or install a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise UsageError(f"--device {device}: not available on this machine; use cpu or cuda")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, float16 or bfloat16")
    return table[dtype]


@contextlib.contextmanager
def quiet_hf_logging():
    """transformers' info logs and progress bars (its "Loading weights" bar) off inside the ``with``; restored
    after. A CLI's stderr then holds only its own lines (a user error stays one line)."""
    from transformers.utils import logging as hf_logging

    old_verbosity, old_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old_verbosity)
        if old_bars:
            hf_logging.enable_progress_bar()


def load_model(spec: str | None = None, dtype: str = "auto", device: str = "auto"):
    """(model, processor, description). ``spec`` None = the shipped tiny LLaVA, or a random-init one (with a
    warning) while no trained checkpoint is shipped; else a local folder or a hub id (offline: cached only).
    A ``spec`` that does not load is a :class:`UsageError`. transformers' logs and bars are off meanwhile."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with quiet_hf_logging():
        model, processor, desc = _load(spec, dt)
    model = model.to(dev).eval()
    desc.update({"class": type(model).__name__, "dtype": str(dt).replace("torch.", ""), "device": str(dev),
                 "parameters": int(sum(p.numel() for p in model.parameters()))})
    return model, processor, desc


def _load(spec: str | None, dt: torch.dtype):
    """(model, processor, description) of :func:`load_model`, on the CPU."""
    if spec is None:
        from ..embedded import tiny_llava

        try:
            model, processor = tiny_llava.load_tiny_llava(dtype=dt)
            desc = {"name": "tiny-llava", "path": str(tiny_llava.DEFAULT_ASSET_DIR), "trained": True}
        except FileNotFoundError as err:
            warnings.warn(f"vtprune bench: {err}; using a random-init tiny LLaVA instead (scores are meaningless)",
                          stacklevel=3)  # the caller of load_model
            model, processor = tiny_llava.build_untrained_tiny_llava(seed=0)
            model = model.to(dt)
            desc = {"name": "tiny-llava (untrained: no shipped checkpoint)", "path": None, "trained": False}
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_model_spec(spec)
        local = Path(spec).expanduser().is_dir()
        spec = str(Path(spec).expanduser()) if local else spec
        offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        try:
            model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dt, local_files_only=offline)
            processor = AutoProcessor.from_pretrained(spec, local_files_only=offline)
        except (OSError, ValueError) as err:  # no config.json, an unknown architecture, not cached offline
            raise UsageError(f"--model {spec}: cannot load it as an image-text model ({err})") from None
        desc = {"name": Path(spec).name if local else spec, "path": str(Path(spec).resolve()) if local else spec}
    return model, processor, desc


def visual_tokens_of(model) -> int:
    """Visual tokens of one standard image for this model (the reference for ``keep``)."""
    return int(get_adapter(model).nominal_tokens)


# ------------------------------------------------------------------------------------------------------------
# data
@dataclass
class TaskData:
    name: str  # "mme", "gqa" or "pope"
    root: Path
    questions: list

    @property
    def metric(self) -> str:
        if self.name == "gqa":
            return "GQA accuracy (%)"
        if self.name == "pope":
            return "POPE F1 (%, LLaVA eval_pope, mean of categories)"
        return "MME Perception+Cognition" if _has_cognition(self.questions) else "MME Perception"


def _has_cognition(questions) -> bool:
    return any(q.subtask in mme_mod.COGNITION_SUBTASKS for q in questions)


def _cache_dir() -> Path:
    env = os.environ.get("VTPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vtprune"


def default_data_dir(task: str) -> Path:
    """The embedded synthetic set of ``task``: ``vtprune/assets/synthetic_<task>``, or (while it is not shipped)
    the same set generated once, deterministically, into the vtprune cache folder."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    shipped = ASSET_DATA[task]
    if shipped.is_dir() and any(shipped.iterdir()):
        return shipped
    sizes = {"mme": 30, "pope": 20, "gqa": 200}
    seeds = {"mme": synthetic.MME_SEED, "pope": synthetic.POPE_SEED, "gqa": synthetic.GQA_SEED}
    return cached_synthetic_set(f"synthetic_{task}", task, seeds[task], sizes[task])


def cached_synthetic_set(name: str, task: str, seed: int, size: int) -> Path:
    """The synthetic ``task`` set drawn with ``seed`` (``size``: MME images per subtask, POPE images, GQA
    questions), generated once into ``<vtprune cache>/<name>``; written to a temporary folder and renamed, so
    concurrent ranks / workers never see a half-written set."""
    target = _cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if task == "mme":
            synthetic.write_mme(tmp, seed=seed, per_subtask=size)
        elif task == "pope":
            synthetic.write_pope(tmp, seed=seed, n_images=size)
        else:
            synthetic.write_gqa(tmp, seed=seed, n_questions=size)
        try:
            tmp.rename(target)  # atomic: concurrent ranks / workers never see a half-written set
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def detect_task(root: str | os.PathLike) -> str:
    """``gqa`` for a folder with a ``*questions*.json`` file, ``pope`` for one with a ``*pope*.json[l]`` (or a
    ``.jsonl``) question file, ``mme`` for one with subtask folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"vtprune bench: data folder {root} does not exist")
    if (root / gqa_mod.QUESTIONS_FILE).is_file():
        return "gqa"
    if pope_mod.is_pope_folder(root):
        return "pope"
    if any(root.glob("*questions*.json")):
        return "gqa"
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "mme"
    raise ValueError(f"vtprune bench: {root} is neither an MME release folder (one folder per subtask), a "
                     f"GQA folder ({gqa_mod.QUESTIONS_FILE} + images/) nor a POPE folder "
                     "(coco_pope_{random,popular,adversarial}.json or a *pope*.jsonl, + images/)")


def limit_mme(questions: Sequence, limit: int | None) -> list:
    """The first ``ceil(limit / 2)`` images taken round-robin over subtasks (both questions of each image, so
    acc+ stays defined), in the loader's order."""
    if limit is None:
        return list(questions)
    images: dict[str, list[tuple[int, str]]] = {}
    for i, q in enumerate(questions):
        keys = images.setdefault(q.subtask, [])
        if not keys or keys[-1][1] != q.image_name:
            keys.append((i, q.image_name))
    want = (limit + 1) // 2
    chosen: set[tuple[str, str]] = set()
    queues = [list(v) for v in images.values()]
    depth = 0
    while len(chosen) < want and any(depth < len(qs) for qs in queues):
        for subtask, qs in zip(images, queues):
            if depth < len(qs) and len(chosen) < want:
                chosen.add((subtask, qs[depth][1]))
        depth += 1
    return [q for q in questions if (q.subtask, q.image_name) in chosen]


def load_task(task: str, root: str | os.PathLike | None = None, limit: int | None = None) -> TaskData:
    """The questions of ``task`` (the first ``limit``, as each task selects them) from ``root`` (default: the
    embedded synthetic set). Every image they use is decoded once here, so a broken file is a ValueError naming
    it (:class:`~.datachecks.ImageDecodeError`) before any model work."""
    from .datachecks import check_images

    root = Path(root) if root is not None else default_data_dir(task)
    if task == "mme":
        questions = limit_mme(mme_mod.load_mme(root), limit)
    elif task == "gqa":
        questions = gqa_mod.load_gqa(root, limit=limit)
    elif task == "pope":
        questions = pope_mod.limit_pope(pope_mod.load_pope(root), limit)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    check_images(q.image_path for q in questions)
    return TaskData(task, root, questions)


def prediction_ids(task: str, questions: Sequence) -> list[str]:
    if task == "mme":
        return [f"{q.question_id}#{q.index}" for q in questions]
    if task == "pope":
        return [q.key for q in questions]
    return [str(q.question_id) for q in questions]


# ------------------------------------------------------------------------------------------------------------
# distributed helpers
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the ``torchrun`` process group (gloo) when ``WORLD_SIZE`` > 1; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), owns)


def shard_batches(n_items: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Global batches of consecutive indices; rank r takes batches r, r + world, ... (strided, deterministic)."""
    batches = [list(range(i, min(i + batch_size, n_items))) for i in range(0, n_items, batch_size)]
    return batches[rank::world]


def gather_to_main(obj, info: DistInfo):
    """List of every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` in a single process."""
    if info.world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world if info.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# answering
@dataclass
class TokenCounts:
    """Visual-token totals over answered images (divide by ``images`` for per-image means)."""

    images: int = 0
    visual: float = 0.0
    kept: float = 0.0
    equivalent: float = 0.0

    def add(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(self.images + other.images, self.visual + other.visual, self.kept + other.kept,
                           self.equivalent + other.equivalent)

    def per_image(self) -> dict:
        n = max(1, self.images)
        return {"visual_tokens": self.visual / n, "kept_tokens": self.kept / n,
                "equivalent_tokens": self.equivalent / n}


def _to_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _open_image(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def encode(processor, image_paths: Sequence, prompts: Sequence[str], model) -> dict:
    """Left-padded processor batch on the model's device and dtype."""
    tok = getattr(processor, "tokenizer", processor)
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = processor(images=[_open_image(p) for p in image_paths], text=list(prompts), return_tensors="pt",
                        padding=True)
    finally:
        tok.padding_side = old
    return _to_device(dict(enc), next(model.parameters()).device, _model_dtype(model))


def _token_counts(model, inputs: dict) -> TokenCounts:
    session = getattr(model, "vtprune", None)
    stats = getattr(session, "stats", None)
    if stats is not None and stats.images:
        return TokenCounts(len(stats.images), float(stats.visual_tokens), float(stats.kept_tokens),
                           float(stats.equivalent_tokens))
    image_id = getattr(model.config, "image_token_id", None)
    n_images = int(inputs["input_ids"].shape[0])
    visual = float((inputs["input_ids"] == image_id).sum()) if image_id is not None else 0.0
    return TokenCounts(n_images, visual, visual, visual)


def _pad_token_id(processor, model):
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "pad_token_id", None) is not None:
        return tok.pad_token_id
    eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tok, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) else eos


@torch.inference_mode()
def generate_answers(model, processor, task: TaskData, indices: Sequence[int], prompts: Sequence[str],
                     settings: BenchSettings) -> tuple[list[str], TokenCounts]:
    """Greedy answers for one batch (question ``indices`` of ``task``) and its visual-token counts."""
    paths = [task.questions[i].image_path for i in indices]
    inputs = encode(processor, paths, [prompts[i] for i in indices], model)
    out = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=_pad_token_id(processor, model))
    tok = getattr(processor, "tokenizer", processor)
    new = out[:, inputs["input_ids"].shape[1]:]
    answers = [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return answers, _token_counts(model, inputs)


Predictor = Callable[..., tuple[list[str], TokenCounts]]


def answer_task(model, processor, task: TaskData, prompts: Sequence[str], settings: BenchSettings,
                info: DistInfo, predictor: Predictor, progress=None) -> tuple[list, TokenCounts]:
    """This rank's shard of ``task``: ([(index, answer), ...], token counts)."""
    answers, counts = [], TokenCounts()
    for batch in shard_batches(len(task.questions), settings.batch_size, info.rank, info.world):
        texts, c = predictor(model, processor, task, batch, prompts, settings)
        if len(texts) != len(batch):
            raise RuntimeError(f"predictor returned {len(texts)} answers for a batch of {len(batch)}")
        answers += list(zip(batch, texts))
        counts = counts.add(c)
        if progress is not None:
            progress.update(len(batch))
    return answers, counts


# ------------------------------------------------------------------------------------------------------------
# scoring
def score_task(task: str, questions: Sequence, predictions: Sequence[str]):
    """The task's report object (:class:`MMEReport` / :class:`GQAReport` / :class:`POPEReport`)."""
    if task == "mme":
        return mme_mod.score_mme(questions, predictions)
    if task == "gqa":
        return gqa_mod.score_gqa(questions, predictions)
    if task == "pope":
        return pope_mod.score_pope(questions, predictions)
    raise ValueError(f"unknown task {task!r}")


def task_score(task: str, report) -> float:
    """The headline number: MME Perception + Cognition (the subtasks present), GQA accuracy in %, POPE F1 in %
    (LLaVA's eval_pope convention, mean over the categories)."""
    if task == "mme":
        return float(report.total)
    if task == "pope":
        return float(report.f1)
    return float(report.accuracy)


def prompt_benchmark(task: str) -> str:
    """The :func:`~.prompts.build_prompt` style of a task: POPE's yes/no questions are put as MME's are (a
    trailing " Please answer yes or no." removed, then the short-answer instruction: LLaVA-1.5's and lmms-eval's
    POPE prompt)."""
    return "mme" if task == "pope" else task


def _score_entry(task: str, report) -> dict:
    d = report.to_dict()
    d["score"] = task_score(task, report)
    return d


# ------------------------------------------------------------------------------------------------------------
# the run
@contextlib.contextmanager
def _num_threads(n: int | None):
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _applied(model, config: BenchConfig):
    if config.method is None:
        yield model
        return
    method, kwargs = config.prune_args()
    prune(model, method, **kwargs)
    try:
        yield model
    finally:
        if getattr(model, "vtprune", None) is not None:
            unprune(model)


def _notice(message: str, info: DistInfo) -> None:
    print(f"vtprune bench [rank {info.rank}]: {message}" if info.world > 1 else f"vtprune bench: {message}",
          file=sys.stderr, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _timing_inputs(model, processor, tasks: list[TaskData], prompts: dict, n: int) -> list[dict]:
    """Single-sample inputs for the timing pass: the first questions of the tasks, in turn."""
    picks = []
    for i in range(max(len(t.questions) for t in tasks)):
        for t in tasks:
            if i < len(t.questions) and len(picks) < n:
                picks.append((t, i))
    return [encode(processor, [t.questions[i].image_path], [prompts[t.name][i]], model) for t, i in picks]


def _timing_pass(model, configs: list[BenchConfig], inputs: list[dict], settings: BenchSettings) -> dict:
    """perf.compare over every configuration, interleaved round by round (fair ratios under background load)."""
    if not inputs:
        return {c.label: None for c in configs}
    from ..progress import progress_bar  # drawn only in a terminal: CI logs stay free of redraws

    rounds = 1 + settings.timing_repeats
    bar = progress_bar(rounds, f"timing {len(configs)} configs", "round", settings.progress)
    setups = {c.label: (lambda c=c: _applied(model, c)) for c in configs}
    kwargs = dict(warmup=1, repeats=settings.timing_repeats, decode_tokens=settings.decode_tokens)
    try:
        return perf.compare(model, setups, inputs, on_round=(lambda _: bar.update(1)) if bar else None, **kwargs)
    except Exception:  # noqa: BLE001 - find the failing configuration(s), time the others alone
        out = {}
        for label, setup in setups.items():
            try:
                out.update(perf.compare(model, {label: setup}, inputs, **kwargs))
            except Exception as err:  # noqa: BLE001
                _notice(f"timing {label} failed: {type(err).__name__}: {err}", DistInfo())
                traceback.print_exception(err, file=sys.stderr)  # the note is short; the cause keeps its trace
                out[label] = None
        return out
    finally:
        if bar is not None:
            bar.close()


def run_bench(settings: BenchSettings, *, model=None, processor=None, predictor: Predictor | None = None,
              write: bool = True) -> dict | None:
    """Run the sweep; rank 0 returns the results dict (and writes the outputs), other ranks return None.

    ``model``/``processor`` skip loading (use an already built model); ``predictor`` replaces
    :func:`generate_answers` (same signature) -- tests feed hand-made predictions through it.
    """
    check_counts(settings)  # --threads is used at once
    info = init_distributed()
    try:
        with _num_threads(settings.threads):
            return _run(settings, info, model, processor, predictor or generate_answers, write)
    finally:
        if info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _load_tasks(settings) -> list[TaskData]:
    tasks = []
    for t in settings.tasks:
        try:
            tasks.append(load_task(t, settings.data.get(t), settings.limit))
        except (OSError, ValueError) as err:  # a malformed folder (MMEFormatError ...), an image that does not decode
            raise UsageError(f"--data {settings.data.get(t, t)}: {err}") from None
    return tasks


def _sweep(settings, model, files) -> tuple[int, list[BenchConfig]]:
    """(visual tokens per image, the configurations) once the model is known."""
    try:
        n_visual = visual_tokens_of(model)
    except TypeError as err:  # a loadable model of an unsupported class
        raise UsageError(f"--model {settings.model}: {err}") from None
    keeps = list(settings.keeps or [])
    ratios = list(settings.ratios or [])
    if not keeps and not ratios:
        keeps = scaled_keeps(n_visual)
    too_big = [k for k in keeps if k > n_visual]
    if too_big:
        raise UsageError(f"--keep {too_big} exceeds the {n_visual} visual tokens an image has "
                         f"for this model; use keeps <= {n_visual}")
    methods = _methods_of(settings)
    configs = build_configs(methods, keeps, ratios, settings.seed,
                            {m: settings.hyper for m in methods + [f[1] for f in files]}, files)
    for c in configs:
        if c.source and c.keep is not None and c.keep > n_visual:
            raise UsageError(f"--config {c.source}: keep {c.keep} exceeds the {n_visual} visual tokens an image "
                             f"has for this model; use a config with keep <= {n_visual} or a ratio")
    return n_visual, configs


def _run(settings, info, model, processor, predictor, write) -> dict | None:
    _seed_everything(settings.seed)
    files = check_settings(settings)
    tasks = _load_tasks(settings)  # before the model: a malformed data folder fails fast
    if model is None:
        model, processor, model_desc = load_model(settings.model, settings.dtype, settings.device)
    else:
        model_desc = {"name": type(model).__name__, "class": type(model).__name__, "path": None}
    n_visual, configs = _sweep(settings, model, files)
    check_on_model(model, configs, settings.hyper)  # a refused configuration fails here, before vanilla runs

    prompts = {t.name: [build_prompt(q.question, benchmark=prompt_benchmark(t.name),
                                     style=settings.prompt_style, processor=processor) for q in t.questions]
               for t in tasks}
    local = _answer_configs(model, processor, tasks, prompts, configs, settings, info, predictor)
    gathered = gather_to_main(local, info)

    timing = {}
    if info.main and settings.timing_samples > 0:
        failed = {label for rank in gathered for label, entry in rank.items() if "error" in entry}
        inputs = _timing_inputs(model, processor, tasks, prompts, settings.timing_samples)
        timing = _timing_pass(model, [c for c in configs if c.label not in failed], inputs, settings)
    _barrier(info)
    if not info.main:
        return None

    results = _assemble(settings, info, model_desc, n_visual, tasks, configs, gathered, timing)
    if write:
        write_outputs(results, settings.out, tasks)
    return results


def _answer_configs(model, processor, tasks, prompts, configs, settings, info, predictor) -> dict:
    """This rank's answers: label -> {task: ([(index, answer)], counts)}, or {"error": ...} for a configuration
    that failed (vanilla failing is raised)."""
    from ..progress import progress_bar  # drawn only in a terminal: CI logs stay free of redraws

    shard_size = sum(len(b) for t in tasks for b in shard_batches(len(t.questions), settings.batch_size,
                                                                  info.rank, info.world))
    bar = progress_bar(shard_size * len(configs), "bench", "q", settings.progress and info.main)
    local = {}
    try:
        for k, config in enumerate(configs):
            if bar is not None:
                bar.set_description(config.label)
            try:
                with _applied(model, config):
                    local[config.label] = {t.name: answer_task(model, processor, t, prompts[t.name], settings,
                                                               info, predictor, bar) for t in tasks}
            except Exception as err:  # noqa: BLE001 - one failing method must not sink the sweep
                if config.method is None:
                    raise
                local[config.label] = {"error": f"{type(err).__name__}: {err}"}
                traceback.print_exception(err, file=sys.stderr)  # the note is short; the cause keeps its trace
                _notice(f"{config.label} failed: {local[config.label]['error']}", info)
                if bar is not None:
                    bar.update(shard_size * (k + 1) - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return local


def _merge(gathered: list, label: str, task: TaskData) -> tuple[list[str], TokenCounts]:
    by_index, counts = {}, TokenCounts()
    for rank_result in gathered:
        pairs, c = rank_result[label][task.name]
        by_index.update(pairs)
        counts = counts.add(c)
    if len(by_index) != len(task.questions):
        raise RuntimeError(f"gathered {len(by_index)} answers for {len(task.questions)} {task.name} questions")
    return [by_index[i] for i in range(len(task.questions))], counts


def _hyper_of(config: BenchConfig) -> dict:
    """The method fields of a configuration (a config file's, then --set and seed), budget excluded; a pipeline's
    methods with all their fields."""
    if config.pipeline:
        return {"pipeline": [{"method": m, **dict(kwargs)} for m, kwargs in config.pipeline]}
    return {k: v for k, v in config.prune_kwargs().items() if k not in ("keep", "ratio")}


def _assemble(settings, info, model_desc, n_visual, tasks, configs, gathered, timing) -> dict:
    runs = []
    vanilla_ms = None
    for config in configs:
        counts = TokenCounts()
        scores, predictions = {}, {}
        errors = [rank[config.label]["error"] for rank in gathered if "error" in rank[config.label]]
        if errors:
            runs.append({"label": config.label, "method": config.method, "keep": config.keep,
                         "ratio": config.ratio, "hyper": _hyper_of(config), "config": config.source,
                         **TokenCounts().per_image(),
                         "scores": {}, "perf": perf.PerfReport().to_dict(), "speedup": None, "predictions": {},
                         "error": errors[0]})
            continue
        for t in tasks:
            preds, c = _merge(gathered, config.label, t)
            counts = counts.add(c)
            scores[t.name] = _score_entry(t.name, score_task(t.name, t.questions, preds))
            predictions[t.name] = [{"id": i, "prediction": p} for i, p in zip(prediction_ids(t.name, t.questions),
                                                                              preds)]
        report = timing.get(config.label)
        perf_dict = report.to_dict() if report is not None else perf.PerfReport().to_dict()
        if config.method is None:
            vanilla_ms = perf_dict["prefill_ms"]
        ms = perf_dict["prefill_ms"]
        runs.append({
            "label": config.label, "method": config.method or "vanilla", "keep": config.keep,
            "ratio": config.ratio, "hyper": _hyper_of(config), "config": config.source, **counts.per_image(),
            "scores": scores, "perf": perf_dict,
            "speedup": (vanilla_ms / ms) if (vanilla_ms and ms) else None,
            "predictions": predictions,
        })
    return {
        "meta": {
            "vtprune_bench": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": model_desc, "visual_tokens": n_visual,
            "settings": {"tasks": list(settings.tasks), "limit": settings.limit, "batch_size": settings.batch_size,
                         "max_new_tokens": settings.max_new_tokens, "prompt_style": settings.prompt_style,
                         "seed": settings.seed, "timing_samples": settings.timing_samples,
                         "timing_repeats": settings.timing_repeats, "decode_tokens": settings.decode_tokens,
                         "threads": settings.threads or torch.get_num_threads(),
                         "set": dict(settings.hyper), "configs": [str(c) for c in settings.configs]},
            "world_size": info.world,
            "versions": _versions(),
        },
        "tasks": {t.name: {"data": str(t.root), "questions": len(t.questions), "metric": t.metric} for t in tasks},
        "runs": runs,
    }


def _versions() -> dict:
    import transformers

    try:
        from .._version import __version__
    except ImportError:  # vtprune imported as a namespace package (stale editable install)
        from importlib.metadata import version

        __version__ = version("vtprune")
    return {"vtprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------------------
# outputs
def _mme_columns(results: dict) -> tuple[bool, bool]:
    reports = [r["scores"]["mme"] for r in results["runs"] if "mme" in r["scores"]]
    return (any(r["perception"] is not None for r in reports), any(r["cognition"] is not None for r in reports))


def _run_name(run: dict) -> str:
    """The method, and the config file a run comes from (its table row and plot line)."""
    return run["method"] + (f" [{run['config']}]" if run.get("config") else "")


def _budget(run: dict) -> str:
    """The nominal budget of a run as the table and the plot name it: keep N, ratio R, schedule, - for vanilla."""
    if run["method"] == "vanilla":
        return "-"
    if run["keep"] is not None:
        return f"keep {run['keep']}"
    return f"ratio {run['ratio']:g}" if run["ratio"] is not None else "schedule"


# POPE columns of the table: category means under LLaVA's eval_pope and lmms-eval's conventions
POPE_COLUMNS = ["POPE F1", "POPE acc", "F1 lmms", "acc lmms", "yes %"]
POPE_CELLS = [("llava", "f1"), ("llava", "accuracy"), ("lmms_eval", "f1"), ("lmms_eval", "accuracy"),
              ("llava", "yes_ratio")]


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    has_p, has_c = _mme_columns(results)
    runs = results["runs"]
    header = ["method", "budget", "kept", "equiv"]
    if has_p:
        header.append(f"MME-P/{runs[0]['scores']['mme']['perception_max']:.0f}")
    if has_c:
        header.append(f"MME-C/{runs[0]['scores']['mme']['cognition_max']:.0f}")
    if "gqa" in results["tasks"]:
        header.append("GQA %")
    if "pope" in results["tasks"]:
        header += POPE_COLUMNS
    header += ["prefill ms", "speed-up", "decode ms/tok", "KV KiB", "GFLOPs"]
    rows = []

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in runs:
        budget = _budget(r)
        if r.get("error"):
            rows.append([_run_name(r), budget, "failed (see results.json)"] + [""] * (len(header) - 3))
            continue
        row = [_run_name(r), budget, num(r["kept_tokens"], ".1f"), num(r["equivalent_tokens"], ".1f")]
        if has_p:
            row.append(num(r["scores"]["mme"]["perception"], ".1f"))
        if has_c:
            row.append(num(r["scores"]["mme"]["cognition"], ".1f"))
        if "gqa" in results["tasks"]:
            row.append(num(r["scores"]["gqa"]["accuracy"], ".1f"))
        if "pope" in results["tasks"]:
            pope = r["scores"]["pope"]
            row += [num(pope[conv]["mean"][metric], ".1f") for conv, metric in POPE_CELLS]
        p = r["perf"]
        row += [num(p["prefill_ms"], ".2f"), "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                num(p["decode_ms_per_token"], ".2f"),
                "-" if p["kv_bytes"] is None else f"{p['kv_bytes'] / 1024:.0f}",
                "-" if p["prefill_flops"] is None else f"{p['prefill_flops'] / 1e9:.3f}"]
        rows.append(row)
    return header, rows


def _pope_category_lines(results: dict) -> list[str]:
    runs = [r for r in results["runs"] if not r.get("error")]
    if not runs:
        return []
    categories = runs[0]["scores"]["pope"]["categories"]
    header = ["config"] + categories
    rows = []
    for r in runs:
        pope = r["scores"]["pope"]
        rows.append([r["label"]] + [
            f"{pope['llava']['categories'][c]['f1']:.1f} / {pope['lmms_eval']['categories'][c]['f1']:.1f} / "
            f"{pope['llava']['categories'][c]['yes_ratio']:.0f}" for c in categories])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header] + rows]


def format_table(results: dict) -> str:
    """The summary table ``vtprune bench`` prints (plus the MME per-subtask and POPE per-category scores and a
    legend)."""
    header, rows = _table_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if "mme" in results["tasks"]:
        subtasks = list(results["runs"][0]["scores"]["mme"]["subtasks"])
        lines += ["", "MME subtask score (acc + acc+, max 200 each):"]
        sub_rows = [[r["label"]] + [f"{r['scores']['mme']['subtasks'][s]['score']:.1f}" for s in subtasks]
                    for r in results["runs"] if not r.get("error")]
        sw = [max(len(x) for x in col) for col in zip(["config"] + subtasks, *sub_rows)]
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(["config"] + subtasks, sw))))
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, sw)))
                  for row in sub_rows]
    if "pope" in results["tasks"]:
        lines += ["", "POPE per category, F1 % as LLaVA eval_pope / lmms-eval (exact yes|no) / predicted yes %:"]
        lines += _pope_category_lines(results)
    failed = [r for r in results["runs"] if r.get("error")]
    if failed:
        lines += ["", "failed configurations:"] + [f"  {r['label']}: {r['error']}" for r in failed]
    meta = results["meta"]
    lines += ["", f"model: {meta['model']['name']} ({meta['visual_tokens']} visual tokens/image); "
                  f"kept/equiv = visual tokens per image (equiv = layer-averaged); prefill ms = median per sample "
                  f"over {meta['settings']['timing_samples']} samples; speed-up = vanilla prefill / prefill"]
    if "pope" in results["tasks"]:
        lines.append("POPE F1/acc: LLaVA eval_pope (first sentence, a no/not word = no, else yes); F1/acc lmms: "
                     "lmms-eval (the answer must be exactly yes or no); yes % = predicted yes (LLaVA); "
                     "means over the categories")
    return "\n".join(lines)


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for r in results["runs"]:
        row = {k: r[k] for k in ("label", "method", "keep", "ratio", "visual_tokens", "kept_tokens",
                                 "equivalent_tokens")}
        row["config"] = r.get("config")
        row["error"] = r.get("error")
        if "mme" in r["scores"]:
            m = r["scores"]["mme"]
            row.update({"mme_perception": m["perception"], "mme_cognition": m["cognition"], "mme_total": m["total"]})
            for name, s in m["subtasks"].items():
                row.update({f"mme_{name}_acc": s["acc"], f"mme_{name}_acc_plus": s["acc_plus"],
                            f"mme_{name}_score": s["score"]})
        if "gqa" in r["scores"]:
            row["gqa_accuracy"] = r["scores"]["gqa"]["accuracy"]
        if "pope" in r["scores"]:
            pope = r["scores"]["pope"]
            for conv in pope_mod.CONVENTIONS:
                for metric in pope_mod.METRICS:
                    row[f"pope_{metric}_{conv}"] = pope[conv]["mean"][metric]
                row[f"pope_other_{conv}"] = pope[conv]["all"]["other"]
                for cat, m in pope[conv]["categories"].items():
                    for metric in pope_mod.METRICS:
                        row[f"pope_{cat}_{metric}_{conv}"] = m[metric]
        row.update(r["perf"])
        row["speedup"] = r["speedup"]
        rows.append(row)
    return rows


def write_csv(results: dict, path: Path) -> Path:
    rows = _csv_rows(results)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _plot_points(results: dict, task: str) -> dict[str, list[tuple[float, float, str]]]:
    """(equivalent tokens, score, budget) of every pruned run that did not fail, by run name, sorted by tokens."""
    by_method: dict[str, list[tuple[float, float, str]]] = {}
    for r in results["runs"]:
        if r.get("error") or r["method"] == "vanilla":
            continue
        by_method.setdefault(_run_name(r), []).append((r["equivalent_tokens"], r["scores"][task]["score"],
                                                       _budget(r)))
    return {name: sorted(pts) for name, pts in by_method.items()}


def plot_results(results: dict, path: Path) -> Path:
    """Score vs cost: one panel per task, one line per method, each point at its layer-averaged equivalent visual
    tokens per image (what the LLM processes on average: FastV at keep 16 still runs its early layers on every
    token) and labelled with its nominal budget; vanilla as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in results["runs"]:
            if r["method"] == "vanilla" and not r.get("error"):
                score = r["scores"][task]["score"]
                ax.axhline(score, color="black", linestyle="--", linewidth=1.2, label=f"vanilla ({score:.1f})")
        xs = [results["meta"]["visual_tokens"]]
        for method, pts in _plot_points(results, task).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            for x, y, budget in pts:
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, alpha=0.7)
            xs += [p[0] for p in pts]
        title = results["tasks"][task]["metric"]
        if task == "mme":
            title += f" (max {results['runs'][0]['scores']['mme']['total_max']:.0f})"
        ax.set_title(title)
        ax.set_xlim(0, max(xs) * 1.05)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("equivalent visual tokens per image (layer-averaged)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['meta']['model']['name']}: score vs equivalent visual tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@=" else "_" for c in label)


def write_outputs(results: dict, out: str | os.PathLike, tasks: Sequence[TaskData] = ()) -> dict:
    """``results.json``, ``results.csv``, ``results.png`` and, per configuration, the official result formats
    (MME ``eval_tool`` folder, GQA predictions file, POPE LLaVA-style answers JSONL) under
    ``predictions/<label>/``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_csv(results, paths["csv"])
    plot_results(results, paths["png"])
    by_name = {t.name: t for t in tasks}
    for r in results["runs"]:
        target = out / "predictions" / _safe(r["label"])
        for name, entries in r["predictions"].items():
            if name not in by_name:
                continue
            preds = [e["prediction"] for e in entries]
            if name == "mme":
                mme_mod.write_results_dir(target / "mme", by_name[name].questions, preds)
            elif name == "pope":
                pope_mod.write_answers(target / "pope_answers.jsonl", by_name[name].questions, preds)
            else:
                target.mkdir(parents=True, exist_ok=True)
                gqa_mod.write_predictions(target / "gqa_predictions.json", by_name[name].questions, preds)
    return paths
