"""Result assembly: the gathered predictions of every rank merged, scored and put into the ``results.json``
dict (meta, tasks, one entry per configuration with its scores, token counts, timing and speed-up)."""

from __future__ import annotations

import datetime as _dt
import platform

import torch

from ..perf import timing as perf
from .answer import TokenCounts, _score_entry, score_task
from .data import TaskData, prediction_ids
from .sweep import BenchConfig


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
