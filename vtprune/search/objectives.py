"""What a search trial measures: the label-free ``flow`` objective, dev-split ``accuracy``, prefill time.

flow (VFlowOpt §1.11): mean over the calibration samples of cos(h_full, h_pruned), h the final-norm hidden
state of the last prompt token at the prefill (``output_hidden_states[-1]``: transformers applies the final
norm to that entry), NaN counted as 0. The unpruned states are computed once and cached in a file.

accuracy: the task score on the dev split, as a percentage (MME: total / its maximum, GQA: accuracy, POPE:
F1), averaged over the tasks; questions are answered in chunks so a pruner can stop a poor trial early.

Dev split (never the bench's test split): without ``--data`` the embedded synthetic sets' generators with their
own seeds (each task's seed + :data:`DEV_SEED_OFFSET`), written once into the vtprune cache folder; the bench
tests on the shipped sets (other seeds). With ``--data`` the folder given is the dev split (a folder you do not
bench on: GQA's val questions, or MME / POPE images set aside); the shipped test sets are refused.

Budget check: a method whose budget is a layer average (VFlowOpt) can miss it when the searched schedule cannot
reach it; every prefill's stats give the realised average, and a trial above budget + 1 token is infeasible.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from ..eval import answer as eval_answer, data as eval_data
from ..eval.data import TaskData
from ..eval.sweep import BenchSettings
from ..eval.tasks.prompts import build_prompt
from ..eval.tasks import get_task
from ..budget import tokens_to_keep

DEV_SEED_OFFSET = 100  # a dev set is drawn with its task's synthetic seed + this: no image of the bench's test set
ACCURACY_CHUNKS = 4  # accuracy trials report after each quarter of the questions (median pruner steps)
TIMING_SAMPLES, TIMING_REPEATS = 3, 3  # single-sample prefills timed per trial (--pareto), median of repeats


# ------------------------------------------------------------------------------------------------------------
# data
def dev_data_dir(task: str) -> Path:
    """The synthetic dev set of ``task`` (own seed), generated once into the vtprune cache folder."""
    bench_task = get_task(task)
    return eval_data.cached_synthetic_set(f"synthetic_dev_{task}", task, bench_task.synthetic_seed + DEV_SEED_OFFSET,
                                       bench_task.dev_size)


def bench_test_dirs() -> set[Path]:
    """The folders the bench tests on by default (refused as --data): shipped, or generated into the cache."""
    shipped = {p.resolve() for p in eval_data.ASSET_DATA.values()}
    return shipped | {(eval_data._cache_dir() / f"synthetic_{t}").resolve() for t in eval_data.TASKS}


def dev_tasks(tasks: Sequence[str], data: dict) -> list[TaskData]:
    """The dev split of every task: ``data[task]`` when given, else its synthetic dev set. A malformed folder or
    image is a UsageError naming it, as ``vtprune bench`` reports it."""
    from ..cliargs import UsageError

    loaded = []
    for t in tasks:
        try:
            loaded.append(eval_data.load_task(t, data.get(t) or dev_data_dir(t)))
        except (OSError, ValueError) as err:  # GQAFormatError, MMEFormatError, ImageDecodeError ...
            raise UsageError(f"--data {data.get(t, t)}: {err}") from None
    return loaded


@dataclass
class Unit:
    """Questions answered and scored together: one question, or both questions of an MME image."""

    task: int
    indices: list[int]


def interleaved_units(tasks: Sequence[TaskData]) -> list[Unit]:
    """Units of every task, round-robin over tasks (and over MME subtasks), so any prefix covers them all."""
    per_task = [_units(k, t) for k, t in enumerate(tasks)]
    out, depth = [], 0
    while any(depth < len(u) for u in per_task):
        out += [u[depth] for u in per_task if depth < len(u)]
        depth += 1
    return out


def _units(k: int, task: TaskData) -> list[Unit]:
    return [Unit(k, indices) for indices in task.task.units(task.questions)]


def prompts_of(task: TaskData, processor, style: str) -> list[str]:
    benchmark = eval_answer.prompt_benchmark(task.name)
    return [build_prompt(q.question, benchmark=benchmark, style=style, processor=processor)
            for q in task.questions]


def calibration_inputs(model, processor, tasks: Sequence[TaskData], n: int, batch_size: int,
                       style: str) -> tuple[list[dict], list[str]]:
    """(encoded left-padded batches of the first ``n`` questions, interleaved over tasks; their ids)."""
    picks = [(u.task, i) for u in interleaved_units(tasks) for i in u.indices][:n]
    prompts = {k: prompts_of(t, processor, style) for k, t in enumerate(tasks)}
    batches = []
    for start in range(0, len(picks), batch_size):
        chunk = picks[start:start + batch_size]
        batches.append(eval_answer.encode(processor, [tasks[k].questions[i].image_path for k, i in chunk],
                                     [prompts[k][i] for k, i in chunk], model))
    ids = [f"{tasks[k].name}:{eval_data.prediction_ids(tasks[k].name, [tasks[k].questions[i]])[0]}" for k, i in picks]
    return batches, ids


def single_inputs(batches: Sequence[dict], n: int) -> list[dict]:
    """The first ``n`` samples of ``batches`` as batches of one (left padding removed)."""
    out = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            if len(out) == n:
                return out
            keep = batch["attention_mask"][row].bool()
            one = {k: v[row:row + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
            out.append(one)
    return out


# ------------------------------------------------------------------------------------------------------------
# evaluation
@dataclass
class Evaluation:
    """One configuration's result: ``value`` (flow or accuracy), ``over_budget`` (max tokens above an average
    budget, <= 0: within it), optional ``prefill_ms`` and what the method warned about."""

    value: float
    over_budget: float = 0.0
    prefill_ms: float | None = None
    warnings: list[str] = field(default_factory=list)


class BudgetCheck:
    """Realised layer-averaged visual tokens against the budget of average-budget methods, batch by batch."""

    def __init__(self):
        self.excess = -math.inf

    def update(self, model) -> None:
        session = getattr(model, "vtprune", None)
        stats = getattr(session, "stats", None)
        if stats is None:
            return
        averaged = [m for m in session.methods if m.budget_kind == "average" and (m.keep, m.ratio) != (None, None)]
        if not averaged:
            return
        method, nominal = averaged[-1], session.adapter.nominal_tokens
        for img in stats.images:
            target = tokens_to_keep(img.n_tokens, method.ratio, method.keep, nominal)
            self.excess = max(self.excess, img.equivalent_tokens - target - 1.0)

    @property
    def value(self) -> float:
        return 0.0 if self.excess == -math.inf else float(self.excess)


@contextlib.contextmanager
def _recorded(caught: list):
    """Warnings raised while a configuration is installed and run, kept as text (one per message)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in seen:
                text = " ".join(str(w.message).split())
                if issubclass(w.category, UserWarning) and text not in caught:
                    caught.append(text)


@torch.inference_mode()
def final_states(model, batches: Sequence[dict], check: BudgetCheck | None = None) -> torch.Tensor:
    """[N, D] float32 final-norm hidden state of every sample's last prompt token (left padding: position -1)."""
    rows = []
    for batch in batches:
        out = model(**batch, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        rows.append(out.hidden_states[-1][:, -1].float().cpu())
        if check is not None:
            check.update(model)
    return torch.cat(rows)


def mean_cosine(reference: torch.Tensor, states: torch.Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(reference.double(), states.double(), dim=-1)
    return float(torch.nan_to_num(cos, nan=0.0).mean())


def prefill_ms(model, samples: Sequence[dict]) -> float:
    """Mean over ``samples`` of the median prefill time (ms) of the model as it is (pruned or not)."""
    from ..perf import timing as perf

    device = next(model.parameters()).device
    times = [perf.time_call(lambda s=s: perf.prefill(model, s), device=device, warmup=1, repeats=TIMING_REPEATS)[0]
             for s in samples]
    return float(sum(times) / len(times))


Setup = Callable[[], ContextManager]  # installs a configuration on the model for the duration


class FlowObjective:
    """Mean cosine of the pruned to the unpruned final-norm last-token states over the calibration batches."""

    name = "flow"

    def __init__(self, model, batches: Sequence[dict], reference: torch.Tensor, timing: Sequence[dict] = ()):
        self.model, self.batches, self.reference, self.timing = model, list(batches), reference, list(timing)

    def evaluate(self, setup: Setup, report=None) -> Evaluation:
        caught: list[str] = []
        check = BudgetCheck()
        with _recorded(caught), setup():
            value = mean_cosine(self.reference, final_states(self.model, self.batches, check))
            ms = prefill_ms(self.model, self.timing) if self.timing else None
        return Evaluation(value, check.value, ms, caught)


class AccuracyObjective:
    """Mean task percentage on the dev split; ``report(step, value)`` after each chunk (may raise to prune)."""

    name = "accuracy"

    def __init__(self, model, processor, tasks: Sequence[TaskData], batch_size: int, max_new_tokens: int,
                 style: str, timing: Sequence[dict] = ()):
        self.model, self.processor, self.tasks, self.timing = model, processor, list(tasks), list(timing)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.prompts = [prompts_of(t, processor, style) for t in self.tasks]
        units = interleaved_units(self.tasks)
        size = max(1, math.ceil(len(units) / ACCURACY_CHUNKS))
        self.chunks = [units[i:i + size] for i in range(0, len(units), size)]

    def evaluate(self, setup: Setup, report=None) -> Evaluation:
        caught: list[str] = []
        check = BudgetCheck()
        answers: list[dict[int, str]] = [{} for _ in self.tasks]
        with _recorded(caught), setup():
            for step, chunk in enumerate(self.chunks):
                self._answer(chunk, answers, check)
                value = self.score(answers)
                if report is not None and step < len(self.chunks) - 1:
                    report(step, value)
            ms = prefill_ms(self.model, self.timing) if self.timing else None
        return Evaluation(value, check.value, ms, caught)

    def _answer(self, chunk: Sequence[Unit], answers: list[dict], check: BudgetCheck) -> None:
        settings = BenchSettings(max_new_tokens=self.max_new_tokens)
        for k, task in enumerate(self.tasks):
            indices = [i for u in chunk if u.task == k for i in u.indices]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts, _ = eval_answer.generate_answers(self.model, self.processor, task, batch, self.prompts[k],
                                                        settings)
                answers[k].update(zip(batch, texts))
                check.update(self.model)

    def score(self, answers: list[dict]) -> float:
        """Mean over tasks with answers of the task's percentage on the answered questions."""
        scores = []
        for task, given in zip(self.tasks, answers):
            if given:
                order = sorted(given)
                scores.append(task_percent(task.name, [task.questions[i] for i in order], [given[i] for i in order]))
        return float(sum(scores) / len(scores)) if scores else 0.0


def task_percent(task: str, questions: Sequence, predictions: Sequence[str]) -> float:
    """The task's headline score as a percentage: MME total / its maximum, GQA accuracy, POPE F1."""
    bench_task = get_task(task)
    return float(bench_task.percent(bench_task.score(questions, predictions)))
