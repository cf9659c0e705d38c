"""Alias of the benchmark runner, which Layout v3 split by concern into :mod:`vtprune.eval` (``sweep``, ``data``,
``answer``, ``shard``, ``run``, ``results``, ``report``) and :mod:`vtprune.loading`; kept so that existing scripts
importing ``vtprune.benchmarks.runner`` keep working. New code imports the real modules. Setting an attribute
here (``monkeypatch.setattr(runner, "load_model", ...)``) does not reach them: patch the real module."""

from .. import loading as _loading
from ..cliargs import check_model_spec
from ..eval import answer as _answer, checks as _checks, data as _data, report as _report, results as _results
from ..eval import run as _run, shard as _shard, sweep as _sweep
from ..eval.answer import TokenCounts, generate_answers, prompt_benchmark, score_task, task_score
from ..eval.checks import check_counts
from ..eval.data import TaskData, default_data_dir, detect_task, limit_mme, load_task, prediction_ids
from ..eval.report import format_table, write_outputs
from ..eval.run import run_bench
from ..eval.sweep import (REFERENCE_KEEPS, BenchConfig, BenchSettings, build_configs, check_configs, check_on_model,
                          check_settings, default_methods, load_method_config, scaled_keeps, validate_methods)
from ..eval.tasks import DEFAULT_TASKS, TASKS
from ..eval.tasks import mme as _mme, pope as _pope
from ..loading import quiet_hf_logging

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

_num_threads = _loading.num_threads  # its name before it moved to vtprune.loading

_TARGETS = (_sweep, _checks, _loading, _data, _shard, _answer, _run, _results, _report, _mme, _pope)  # tasks: moved helpers


def __getattr__(name: str):
    # every other attribute (load_model, read at each call so that a patch of vtprune.loading's reaches scripts
    # calling runner.load_model; constants; private helpers old scripts reach for) comes from the real modules
    for module in _TARGETS:
        if name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
