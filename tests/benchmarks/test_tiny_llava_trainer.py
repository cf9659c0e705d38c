"""scripts/train_tiny_llava.py: the dense patch targets of the vision stage and a few-step smoke run (no real training)."""

import importlib.util
import os
import random
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from vtprune.benchmarks import synthetic as S
from vtprune.benchmarks import tiny_llava as TL

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_llava.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_tiny_llava", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patch_targets_name_class_and_centre_of_each_object(trainer):
    model, _ = TL.build_untrained_tiny_llava(seed=0)
    aux = trainer.PatchAux(model)
    # a large red circle centred in patch (row 2, col 3) and a green square centred in patch (row 8, col 9)
    scene = S.Scene((S.ShapeObj("circle", "red", 28, 20, 10), S.ShapeObj("square", "green", 76, 68, 8)))
    aux.set_targets([scene])
    grid = 96 // 8
    cls, centre = aux.targets[0].view(grid, grid), aux.centres[0].view(grid, grid)
    assert cls[2, 3] == S.LABEL_CLASSES.index("red circle")
    assert cls[8, 9] == S.LABEL_CLASSES.index("green square")
    assert cls[0, 11] == 0 and cls[11, 0] == 0  # empty corners are background
    assert set(torch.unique(cls).tolist()) == {0, S.LABEL_CLASSES.index("red circle"),
                                               S.LABEL_CLASSES.index("green square")}
    assert centre.sum() == 2 and centre[2, 3] == 1 and centre[8, 9] == 1
    # the colour and shape heads factor the class id as 1 + colour * n_shapes + shape
    for ci, color in enumerate(S.COLORS):
        for ki, kind in enumerate(S.SHAPES):
            assert S.LABEL_CLASSES[1 + ci * len(S.SHAPES) + ki] == f"{color} {kind}"


def test_glyph_patches_and_centre(trainer):
    model, _ = TL.build_untrained_tiny_llava(seed=0)
    aux = trainer.PatchAux(model)
    scene = S.random_scene(random.Random(3), text=True, max_objects=1)
    assert scene.glyph is not None and not scene.shapes
    aux.set_targets([scene])
    glyph_id = S.LABEL_CLASSES.index(scene.glyph.char)
    assert set(torch.unique(aux.targets).tolist()) == {0, glyph_id}
    assert aux.centres.sum() == 1
    assert aux.targets[0, aux.centres[0].argmax()] == glyph_id  # the glyph's centre patch shows the glyph


def test_vision_stage_smoke_trains_only_the_vision_tower(trainer):
    model, processor = TL.build_untrained_tiny_llava(seed=0)
    aux = trainer.PatchAux(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = Namespace(seed=0, vision_lr=1e-3, vision_minutes=0.02, vision_batch_size=2, text_fraction=0.5,
                     max_objects=2, warmup=1, min_lr_ratio=0.05, log_every=1)
    metrics = trainer.pretrain_vision(model, processor, aux, args)
    assert metrics["steps"] >= 1 and metrics["loss"] == metrics["loss"]  # ran and the loss is finite
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.vision_tower.") for n in changed)
    last = model.config.vision_config.num_hidden_layers - 1
    # the layer above vision_feature_layer=-2 never feeds the projector and is skipped
    assert not any(f"layers.{last}." in n for n in changed)
    # the early-exit hook is gone: a full forward works again
    model.model.vision_tower(pixel_values=torch.zeros(1, 3, 96, 96))
