"""The benchmark runner behind ``vtprune bench``: vanilla + pruning methods x budgets on MME / GQA / POPE.

One process (or one ``torchrun`` job) loads the model once and, for every configuration (vanilla, then each
method at each budget), prunes the model, answers every question with greedy decoding (left-padded batches),
unprunes it, and scores the answers (:mod:`.answer`). A separate timing pass (:mod:`vtprune.perf.timing`)
measures prefill latency, decode ms/token, KV bytes and analytic FLOPs on a few single-sample inputs, so the
speed-ups are ratios measured in the same process. Rank 0 writes the outputs (:mod:`.report`). ::

    from vtprune.eval.run import run_bench
    from vtprune.eval.sweep import BenchSettings
    results = run_bench(BenchSettings(tasks=("gqa",), methods=["fastv"], keeps=[32], limit=20))
"""

from __future__ import annotations

import contextlib
import random
import sys
import traceback

import torch

from .. import loading  # load_model looked up at each run: tests and scripts replace vtprune.loading's
from ..api import prune, unprune
from ..perf import timing as perf
from ..cliargs import UsageError
from ..loading import num_threads, visual_tokens_of
from .answer import Predictor, answer_task, encode, generate_answers, prompt_benchmark
from .checks import check_counts
from .data import TaskData, load_task
from .report import write_outputs
from .results import _assemble
from .shard import DistInfo, _barrier, gather_to_main, init_distributed, shard_batches
from .sweep import BenchConfig, BenchSettings, _methods_of, build_configs, check_on_model, check_settings, scaled_keeps
from .tasks.prompts import build_prompt


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
        with num_threads(settings.threads):
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
        model, processor, model_desc = loading.load_model(settings.model, settings.dtype, settings.device)
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
