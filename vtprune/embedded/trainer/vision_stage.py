"""Stage 1 of the tiny-LLaVA training: the vision tower alone on the dense patch targets, and the shared schedule."""

from __future__ import annotations

import math
import random
import time

import torch

from ...adapters import get_adapter
from .. import synthetic
from .patches import PatchAux


class Stop:
    """Set ``Stop.flag`` (the trainer's SIGINT / SIGTERM handler does) to end either stage after its current step."""
    flag = False


def lr_factor(step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps times cosine decay to ``min_ratio`` over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warm * (min_ratio + (1.0 - min_ratio) * cos)


class _Enough(Exception):
    pass


def _stop(module, inputs, output):  # noqa: ARG001
    raise _Enough  # the layers above the feature layer never reach the projector: skip them


def _vision_batch(rng: random.Random, processor, aux: PatchAux, args) -> torch.Tensor:
    """Pixel values of ``--vision-batch-size`` fresh scenes; their patch targets are set on ``aux``."""
    scenes = [synthetic.random_scene(rng, text=rng.random() < args.text_fraction,
                                     max_objects=args.max_objects) for _ in range(args.vision_batch_size)]
    images = [synthetic.render_scene(s) for s in scenes]
    pv = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    aux.set_targets(scenes)
    return pv


def _vision_step(vision, aux: PatchAux, opt, params: list, pv: torch.Tensor, lr: float) -> None:
    """One AdamW step of the tower (up to the feature layer) and the patch heads at learning rate ``lr``."""
    for grp in opt.param_groups:
        grp["lr"] = lr
    try:
        vision(pixel_values=pv)
    except _Enough:
        pass
    loss = aux.loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def pretrain_vision(model, processor, aux: PatchAux, args) -> dict:
    """Stage 1: train the vision tower alone on the dense patch targets for ``--vision-minutes``.

    Same AdamW recipe (warm-up, cosine decay) at ``--vision-lr``; images come from their
    own random stream (``vision-<seed>``), a ``--text-fraction`` share with a glyph.
    Returns the last logged metrics.
    """
    adapter = get_adapter(model)
    vision = adapter.vision_tower
    # layers above the feature layer get no gradient; AdamW skips parameters whose grad is None
    params = list(vision.parameters()) + list(aux.head.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=args.vision_lr, betas=(0.9, 0.98))
    stopper = adapter.vision_layers[adapter.vision_feature_layer].register_forward_hook(_stop)
    rng = random.Random(f"vision-{args.seed}")
    budget, t0, step = args.vision_minutes * 60.0, time.time(), 0
    log: dict[str, list[float]] = {}
    metrics: dict = {}
    vision.train()
    while time.time() - t0 < budget and not Stop.flag:
        pv = _vision_batch(rng, processor, aux, args)
        lr = args.vision_lr * lr_factor(step, (time.time() - t0) / budget, args.warmup, args.min_lr_ratio)
        _vision_step(vision, aux, opt, params, pv, lr)
        step += 1
        for k, v in {"loss": aux.last, **aux.metrics}.items():
            log.setdefault(k, []).append(v)
        if step % args.log_every == 0:
            metrics = {k: sum(v) / len(v) for k, v in log.items()}
            log.clear()
            print(f"[vision {time.time() - t0:7.1f}s] step {step} images {step * args.vision_batch_size} "
                  + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" lr {lr:.2e}", flush=True)
    vision.eval()
    stopper.remove()
    metrics.update(steps=step, images=step * args.vision_batch_size, minutes=(time.time() - t0) / 60)
    return metrics
