"""The answering loop: encode images and prompts, greedy-decode left-padded batches, count visual tokens kept,
and score a task's answers with its scorer (:mod:`vtprune.eval.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .data import TaskData
from .shard import DistInfo, shard_batches
from .sweep import BenchSettings
from .tasks import get_task


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
    return get_task(task).score(questions, predictions)


def task_score(task: str, report) -> float:
    """The headline number: MME Perception + Cognition (the subtasks present), GQA accuracy in %, POPE F1 in %
    (LLaVA's eval_pope convention, mean over the categories)."""
    return get_task(task).headline(report)


def prompt_benchmark(task: str) -> str:
    """The :func:`~.tasks.prompts.build_prompt` style of a task: POPE's yes/no questions are put as MME's are (a
    trailing " Please answer yes or no." removed, then the short-answer instruction: LLaVA-1.5's and lmms-eval's
    POPE prompt)."""
    return get_task(task).prompt_benchmark


def _score_entry(task: str, report) -> dict:
    d = report.to_dict()
    d["score"] = task_score(task, report)
    return d
