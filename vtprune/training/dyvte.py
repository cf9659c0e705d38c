"""``vtprune train-dyvte``: train DyVTE's exit routers on a frozen LVLM (spec §2.6).

Each step samples one exit layer l for the batch, runs the teacher-forced answer once in full and once with the
image keys masked from layer l + 1 on (masking instead of removal, as the official recipe: the text outputs are
the same), labels a sample "exit" when the exit run's argmax agrees with the full run's on > 99 % of its answer
positions and its loss is < 1.03 x the full loss, and takes a cross-entropy step on router l's logits for the
layer-l features (detached: no gradient reaches the model). Output (``--out``): the routers
(``dyvte_routers.safetensors`` + ``.json``), ``exit_curve.csv`` / ``.png`` (the label rate per layer: where it is
safe to exit) and ``state.pt`` to resume from.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import compat
from ..adapters import get_adapter
from ..cliargs import UsageError
from ..methods.dyvte import ROUTER_FILE, Routers, router_features, save_routers

AGREEMENT, LOSS_RATIO = 0.99, 1.03
STATE_FILE = "state.pt"
STATE_KEYS = ("routers", "optimizer", "scheduler", "step", "counts", "rng")  # what a resume reads


@dataclass
class TrainSettings:
    model: str | None = None  # None: the shipped tiny LLaVA
    data: str | None = None  # None: the synthetic generator; else a GQA- or MME-format folder
    steps: int = 300
    minutes: float | None = None  # stop after this long (whichever of steps / minutes comes first)
    lr: float = 6e-5
    warmup: float = 0.03
    batch_size: int = 8
    width: int | None = None  # router hidden width; None = d // 2
    out: str = "out/dyvte"
    seed: int = 0
    prompt_style: str = "llava_v1"
    save_every: int = 50
    progress: bool = True


def samples(settings: TrainSettings, items: list[tuple] | None = None) -> Iterator[tuple]:
    """Endless (image, question, answer, benchmark) tuples: the synthetic stream or a folder's ``items`` (read by
    :func:`folder_items` unless given), shuffled."""
    if settings.data is None:
        from ..embedded import synthetic

        for s in synthetic.training_samples(seed=settings.seed):
            yield s.image, s.question, s.answer, s.style
        return
    from PIL import Image

    items = list(folder_items(settings.data) if items is None else items)
    rng = random.Random(settings.seed)
    while True:
        rng.shuffle(items)
        for path, question, answer, bench in items:
            yield Image.open(path).convert("RGB"), question, answer, bench


def folder_items(data) -> list[tuple]:
    """(image path, question, answer, benchmark) of every question of a GQA- or MME-format ``data`` folder, read
    as ``vtprune bench`` reads it (format detected once, every image decoded), so a malformed folder or image is
    a UsageError naming the file before the model loads. A folder with a GQA question file is read as GQA only."""
    from ..eval.data import detect_task, load_task
    from ..eval.tasks import TASKS, get_task

    try:
        task = get_task(detect_task(data))
        if not task.trains_dyvte:
            usable = "- or ".join(sorted(t.upper() for t in TASKS if get_task(t).trains_dyvte))
            raise ValueError(f"a {task.name.upper()} folder; training reads a {usable}-format folder")
        questions = load_task(task.name, data).questions
    except (OSError, ValueError) as err:  # GQAFormatError, MMEFormatError, ImageDecodeError ...
        raise UsageError(f"--data {data}: {str(err).removeprefix('vtprune bench: ')}") from None
    return [(q.image_path, q.question, task.training_answer(q), task.prompt_benchmark) for q in questions]


def encode(processor, batch: list[tuple], prompt_style: str) -> dict:
    from ..eval.tasks.prompts import build_prompt
    from ..embedded.tiny_llava import encode_training_batch

    prompts = [build_prompt(q, benchmark=b, style=prompt_style, processor=processor) for _, q, _, b in batch]
    return encode_training_batch(processor, [s[0] for s in batch], prompts, [s[2] for s in batch])


def exit_logits(model, adapter, hidden: torch.Tensor, batch: dict, layer: int) -> torch.Tensor:
    """Logits when layers layer+1.. run with the image keys masked (causal, padding masked too)."""
    lm = adapter.language_model
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    T, device = ids.shape[1], hidden.device
    ids, valid = ids.to(device), valid.to(device)
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None] & valid[:, None, :]
    allowed &= (ids != adapter.image_token_id)[:, None, :] | torch.eye(T, dtype=torch.bool, device=device)[None]
    allowed = allowed[:, None]
    if not compat.mask_is_boolean(compat.get_attn_implementation(lm.config)):
        allowed = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)
    pos = adapter.prompt_positions({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    rotary = adapter.rotary(hidden, pos)  # Qwen-VL: its 3-D M-RoPE positions, as the model's own forward
    for block in adapter.decoder_layers[layer + 1:]:
        out = block(hidden, attention_mask=allowed, position_embeddings=rotary,
                    position_ids=adapter.layer_position_ids(pos))
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(hidden))


def answer_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: mean CE over the answer tokens [B] and the argmax predictions [B, T-1]."""
    shifted, target = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(shifted.transpose(1, 2), target.clamp(min=0), reduction="none") * (target >= 0)
    return ce.sum(1) / (target >= 0).sum(1).clamp(min=1), shifted.argmax(-1)


def exit_labels(full: torch.Tensor, exited: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] 1 where exiting is safe: argmax agreement > 99 % and loss < 1.03 x the full loss."""
    loss_full, pred_full = answer_stats(full, labels)
    loss_exit, pred_exit = answer_stats(exited, labels)
    answer = labels[:, 1:] >= 0
    agree = ((pred_full == pred_exit) & answer).sum(1) / answer.sum(1).clamp(min=1)
    return ((agree > AGREEMENT) & (loss_exit < LOSS_RATIO * loss_full)).long()


def features(hidden: torch.Tensor, batch: dict, image_token_id: int) -> torch.Tensor:
    """[B, 2d] router features from layer outputs [B, T, d]: the prompt's tokens after its last image."""
    rows = []
    for b in range(hidden.shape[0]):
        prompt_end = int(torch.nonzero(batch["labels"][b] >= 0)[0]) if bool((batch["labels"][b] >= 0).any()) else \
            int(batch["attention_mask"][b].sum())
        last_image = int(torch.nonzero(batch["input_ids"][b, :prompt_end] == image_token_id).max())
        rows.append(router_features(hidden[b, last_image + 1:prompt_end]))
    return torch.stack(rows)


def train(settings: TrainSettings, model=None, processor=None) -> dict:
    """Train (or resume from ``state.pt`` in ``settings.out``) routers; returns the summary written to the router
    card. A state that does not load is a UsageError before the model loads; one saved for another model or
    ``width`` is one before any step."""
    from ..loading import load_model

    out = Path(settings.out)
    state = read_state(out)
    items = folder_items(settings.data) if settings.data is not None else None  # a bad folder: before the model
    if model is None:
        model, processor, _ = load_model(settings.model, "float32", "cpu")
    model.requires_grad_(False).eval()
    adapter = get_adapter(model)
    d, L = int(adapter.language_model.config.hidden_size), len(adapter.decoder_layers)
    model_id = _model_id(model)
    width = settings.width if state is None else check_state(state, out / STATE_FILE, d, L, settings.width, model_id)
    torch.manual_seed(settings.seed)
    routers = Routers(d, L, width)
    optimizer, scheduler, step, counts, rng = _optimizer(routers, settings, state, L)
    out.mkdir(parents=True, exist_ok=True)
    stream = samples(settings, items)
    for _ in range(step * settings.batch_size):  # the same data order as an uninterrupted run
        next(stream)
    start = time.monotonic()
    bar = _progress(settings, step)
    while step < settings.steps and (settings.minutes is None or time.monotonic() - start < settings.minutes * 60):
        batch = encode(processor, [next(stream) for _ in range(settings.batch_size)], settings.prompt_style)
        layer = rng.randrange(L - 1)
        loss, y = _train_step(model, adapter, routers, optimizer, batch, layer)
        scheduler.step()
        step += 1
        counts["labels"][layer] += int(y.numel())
        counts["exits"][layer] += int(y.sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", exit_rate=" ".join(f"{r:.2f}" for r in _rates(counts)))
        if step % settings.save_every == 0 or step == settings.steps:
            _save(out, routers, optimizer, scheduler, step, counts, rng, settings.steps, model_id)
    if bar is not None:
        bar.close()
    _save(out, routers, optimizer, scheduler, step, counts, rng, settings.steps, model_id)
    meta = {"model_id": str(getattr(model.config, "_name_or_path", "")), "prompt_style": settings.prompt_style,
            "steps": step, "seed": settings.seed, "lr": settings.lr, "batch_size": settings.batch_size,
            "data": settings.data or "synthetic", "exit_rate": _rates(counts)}
    _replace(out / ROUTER_FILE, lambda tmp: save_routers(routers, tmp, meta), also=(".json",))
    _write_curve(out, counts)
    return meta


def _train_step(model, adapter, routers: Routers, optimizer, batch: dict, layer: int):
    """One optimizer step of router ``layer`` on a batch; returns (loss, the exit labels [B])."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True)
        hidden = full.hidden_states[layer + 1]
        y = exit_labels(full.logits, exit_logits(model, adapter, hidden, batch, layer), batch["labels"])
        f = features(hidden, batch, adapter.image_token_id)
    loss = F.cross_entropy(routers(layer, f.to(next(routers.parameters()).device)), y.to(f.device))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, y


def _optimizer(routers: Routers, settings: TrainSettings, state: dict | None, L: int):
    """(optimizer, scheduler, step, counts, rng): fresh, or continued from a resumed ``state``."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(routers.parameters(), lr=settings.lr, weight_decay=0.0)
    warmup = max(1, int(settings.warmup * settings.steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps)
    rng = random.Random(settings.seed)
    if state is None:
        return optimizer, scheduler, 0, {"labels": [0] * (L - 1), "exits": [0] * (L - 1)}, rng
    step = _resumed_step(state, L, settings.out)
    try:  # each field's own loader checks it; what they raise varies (KeyError, ValueError, TypeError ...)
        routers.load_state_dict(state["routers"])
    except Exception as err:  # noqa: BLE001
        raise _bad_field(settings.out, "routers", err) from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # noqa: BLE001
        raise _bad_field(settings.out, "optimizer", err) from None
    if state.get("total") == settings.steps:
        try:
            scheduler.load_state_dict(state["scheduler"])
        except Exception as err:  # noqa: BLE001
            raise _bad_field(settings.out, "scheduler", err) from None
    else:  # a longer (or shorter) run: the schedule of that length, advanced to this step
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = settings.lr
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps, last_epoch=step - 1)
    try:
        rng.setstate(state["rng"])
    except Exception as err:  # noqa: BLE001
        raise _bad_field(settings.out, "rng", err) from None
    return optimizer, scheduler, step, state["counts"], rng


def _bad_field(out, field: str, why) -> UsageError:
    """The error of a state.pt that loads but whose ``field`` cannot be resumed from."""
    path = Path(out) / STATE_FILE
    if isinstance(why, Exception):
        why = f"{type(why).__name__}: {why}"
    return UsageError(f"--out {out}: cannot resume from {path}: its {field!r} is malformed ({why}); delete it to "
                      "train from scratch, or give a new --out")


def _resumed_step(state: dict, L: int, out) -> int:
    """The saved step (an int >= 0), once the saved counts are checked ({labels, exits}: L - 1 ints each)."""
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad_field(out, "step", f"{step!r}, expected a whole number >= 0")
    counts = state["counts"]
    for key in ("labels", "exits"):
        row = counts.get(key) if isinstance(counts, dict) else None
        if not isinstance(row, list) or len(row) != L - 1 or not all(type(v) is int for v in row):
            raise _bad_field(out, "counts", f"expected {key!r}: {L - 1} whole numbers, one per exit layer")
    return step


def read_state(out: Path) -> dict | None:
    """The ``state.pt`` in ``out`` to resume from, or None (a fresh run). One that does not load (cut short by a
    kill while an older version wrote it in place, or another file) is a UsageError naming it."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    fix = "delete it to train from scratch, or give a new --out"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # data only: a state runs no code
    except Exception as err:  # noqa: BLE001 - truncated zip, short or foreign pickle: each fails differently
        reason = str(err).split(". ")[0][:120] or "the file ends early"
        raise UsageError(f"--out {out}: cannot resume from {path}: it does not load ({type(err).__name__}: "
                         f"{reason}); {fix}") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if not missing and not any(str(k).endswith(".0.weight") for k in state["routers"]):
        missing = ["router weights"]
    if missing:
        raise UsageError(f"--out {out}: cannot resume from {path}: not a train-dyvte state (no {', '.join(missing)}); "
                         f"{fix}")
    return state


def check_state(state: dict, path: Path, d: int, L: int, width: int | None, model_id: str) -> int:
    """The router width of a resumed run: the saved one. A state saved for another model (hidden size, layers
    or model id) or another ``width`` is a UsageError naming both and the fix."""
    firsts = [v for k, v in state["routers"].items() if k.endswith(".0.weight")]  # [width, 2d] per layer
    saved_d, saved_L, saved_width = int(firsts[0].shape[1]) // 2, len(firsts), int(firsts[0].shape[0])
    saved_id = state.get("model_id") or ""
    if (saved_d, saved_L) != (d, L) or (saved_id and model_id and saved_id != model_id):
        raise UsageError(f"{path} was saved for {saved_id or 'another model'} (hidden size {saved_d} x "
                         f"{saved_L} layers), not for {model_id or 'this model'} (hidden size {d} x {L} layers); "
                         "give that --model to resume it, or a new --out to train for this one")
    if width is not None and width != saved_width:
        raise UsageError(f"--width {width}: {path} holds routers of width {saved_width}; pass --width {saved_width} "
                         "(or leave it out) to resume, or give a new --out to train another width")
    return saved_width


def _model_id(model) -> str:
    """The model's name for a state: its folder (absolute, so ./m and m/ match), its hub id, or ''."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def _replace(path: Path, write, also: tuple = ()) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it over ``path`` (atomic on one file
    system): a kill during a save leaves the previous file whole, never a truncated one. ``also``: suffixes of
    the files ``write`` puts beside ``tmp`` (the router card), renamed over theirs first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    siblings = [(tmp.with_suffix(suffix), path.with_suffix(suffix)) for suffix in also]
    try:
        write(tmp)
        for source, target in siblings:
            os.replace(source, target)
        os.replace(tmp, path)
    finally:  # after a failed write: no stray temporary file
        for leftover in (tmp, *(source for source, _ in siblings)):
            leftover.unlink(missing_ok=True)


def _rates(counts: dict) -> list[float]:
    return [e / n if n else float("nan") for e, n in zip(counts["exits"], counts["labels"])]


def _progress(settings: TrainSettings, step: int):
    from ..progress import progress_bar

    return progress_bar(settings.steps, "train-dyvte", "step", settings.progress, initial=step)


def _save(out: Path, routers, optimizer, scheduler, step: int, counts: dict, rng: random.Random, total: int,
          model_id: str) -> None:
    state = {"routers": routers.state_dict(), "optimizer": optimizer.state_dict(), "total": total,
             "scheduler": scheduler.state_dict(), "step": step, "counts": counts, "rng": rng.getstate(),
             "model_id": model_id}
    _replace(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def _write_curve(out: Path, counts: dict) -> None:
    """exit_curve.csv / .png: per layer, the share of samples for which exiting after it was safe."""
    rates = _rates(counts)
    with open(out / "exit_curve.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "samples", "safe_to_exit"])
        for layer, (n, r) in enumerate(zip(counts["labels"], rates)):
            writer.writerow([layer, n, "" if math.isnan(r) else f"{r:.4f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(rates)), rates, marker="o")
    ax.set(xlabel="exit after LLM layer", ylabel="safe to exit (label rate)", ylim=(0, 1), title="DyVTE exit curve")
    fig.tight_layout()
    fig.savefig(out / "exit_curve.png", dpi=120)
    plt.close(fig)
    (out / "exit_curve.json").write_text(json.dumps({"safe_to_exit": rates, "samples": counts["labels"]}) + "\n")
