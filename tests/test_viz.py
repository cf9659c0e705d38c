"""Kept-token pictures: one panel per stage, pruned patches dimmed, kept patches untouched."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vtprune.viz import kept_token_pictures

tiny = pytest.importorskip("vtprune.benchmarks.tiny_llava")


@pytest.fixture(scope="module")
def model_and_processor():
    out = tiny.build_untrained_tiny_llava()
    return out if isinstance(out, tuple) else (out, tiny.build_processor())


def _image():
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 10, 40, 40), fill="red")
    draw.rectangle((60, 50, 90, 90), fill="blue")
    return img


def _dimmed_cells(picture, model, n_panels: int) -> tuple[int, int]:
    """(dimmed patch cells of the last panel against the first, cells per panel); checks the panel count."""
    panel_w = (picture.width - 6 * (n_panels - 1)) / n_panels
    assert panel_w == int(panel_w) == 336
    arr = np.asarray(picture).astype(float)
    first, last = arr[22:, :336], arr[22:, -336:]
    side = int(round((model.config.vision_config.image_size // model.config.vision_config.patch_size)))
    cell = 336 // side
    cells_first = first[: side * cell, : side * cell].reshape(side, cell, side, cell, 3).mean((1, 3, 4))
    cells_last = last[: side * cell, : side * cell].reshape(side, cell, side, cell, 3).mean((1, 3, 4))
    return int((cells_last < cells_first - 1).sum()), side * side


@pytest.mark.parametrize("method, n_panels", [("flowcut", 3), ("fastv", 2), ("vtc_cls", 2)])
def test_panels_and_dimming(model_and_processor, tmp_path, method, n_panels):
    model, processor = model_and_processor
    out = tmp_path / "kept.png"
    picture = kept_token_pictures(model, processor, _image(), "what color is the circle ?", method, out=out, keep=16)
    assert out.exists() and not hasattr(model, "vtprune")
    dimmed, cells = _dimmed_cells(picture, model, n_panels)
    assert dimmed == cells - 16  # exactly the pruned patches are dimmed


@pytest.mark.parametrize("threshold, exits", [(-1e4, True), (1e4, False)])
def test_dyvte_without_a_budget(model_and_processor, tmp_path, threshold, exits):
    """DyVTE has no budget: its routers decide. A margin no logit gap reaches either way makes every router exit
    (the image is gone after layer 0: all dimmed) or none (a panel saying nothing was removed, nothing dimmed)."""
    from vtprune.methods.dyvte import Routers, save_routers

    model, processor = model_and_processor
    text = model.config.text_config
    routers = tmp_path / "routers.safetensors"
    save_routers(Routers(text.hidden_size, text.num_hidden_layers), routers, {"model_id": "tiny"})
    picture = kept_token_pictures(model, processor, _image(), "what color is the circle ?", "dyvte",
                                  routers=str(routers), threshold=threshold)
    dimmed, cells = _dimmed_cells(picture, model, 2)
    assert dimmed == (cells if exits else 0) and not hasattr(model, "vtprune")


def test_viz_command_line(tmp_path):
    from vtprune.cli import main

    image = tmp_path / "shapes.png"
    _image().save(image)
    out = tmp_path / "kept.png"
    assert main(["viz", "--image", str(image), "--question", "what color is the circle ?", "--method", "flowcut",
                 "--keep", "16", "--set", "cumulative_weight=0.5", "--out", str(out)]) == 0
    assert Image.open(out).width > 336
    assert main(["viz", "--image", str(image), "--question", "q", "--method", "flowcat", "--keep", "16",
                 "--out", str(out)]) == 2


@pytest.mark.parametrize("method, flags", [("dyvte", ["--set", "threshold=-1e4"]), ("transprune", []),
                                           ("vflowopt", [])])
def test_viz_command_line_without_a_budget(tmp_path, method, flags):
    """Methods that need no budget (DyVTE: its routers, shipped with the embedded model; TransPrune and VFlowOpt:
    their own schedules) are drawn without --keep / --ratio."""
    from vtprune.cli import main

    image = tmp_path / "shapes.png"
    _image().save(image)
    out = tmp_path / f"{method}.png"
    assert main(["viz", "--image", str(image), "--question", "q", "--method", method, *flags, "--out", str(out)]) == 0
    with Image.open(out) as picture:
        assert picture.width >= 2 * 336  # the input and at least one stage
        if method == "dyvte":  # every router exits after layer 0: the second panel is all dimmed (0.22 x + 20)
            arr = np.asarray(picture.convert("RGB")).astype(float)[22:]
            assert picture.width == 2 * 336 + 6 and arr[:, :336].max() > 250 and arr[:, 342:].max() <= 0.22 * 255 + 21


class _TinyQwenProcessor:
    """What a Qwen2.5-VL processor returns for one image (the real one needs torchvision): the model's own image
    processor (patch rows + image_grid_thw) and <|vision_start|> h*w/4 image tokens <|vision_end|>."""

    image_token, chat_template = "<|image_pad|>", None

    def __init__(self):
        from transformers import Qwen2VLImageProcessorPil

        self.image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64})

    def __call__(self, images, text, return_tensors="pt"):
        import torch

        from tests.qwen_fixtures import IMAGE_TOKEN, VISION_END, VISION_START

        out = dict(self.image_processor(images=images, return_tensors="pt"))
        n = int(out["image_grid_thw"].prod()) // 4
        ids = torch.tensor([[1, 5, 6, VISION_START] + [IMAGE_TOKEN] * n + [VISION_END, 7, 8]])
        return {**out, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


def test_qwen_panels_dim_the_pruned_merged_tokens(models, tmp_path):
    model = models("qwen2_5_vl")
    picture = kept_token_pictures(model, _TinyQwenProcessor(), _image(), "what?", "random", ratio=0.5,
                                  out=tmp_path / "q.png")
    arr = np.asarray(picture).astype(float)
    first, last = arr[22:, :336], arr[22:, -336:]
    side, cell = 3, 336 // 3  # 96 px -> 84 x 84 -> 6 x 6 patches -> 3 x 3 merged tokens
    cells = lambda a: a[: side * cell, : side * cell].reshape(side, cell, side, cell, 3).mean((1, 3, 4))  # noqa: E731
    assert picture.width == 2 * 336 + 6
    assert int((cells(last) < cells(first) - 1).sum()) == 9 - 4  # round(9 * 0.5) = 4 kept of 9
