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


@pytest.mark.parametrize("method, n_panels", [("flowcut", 3), ("fastv", 2), ("vtc_cls", 2)])
def test_panels_and_dimming(model_and_processor, tmp_path, method, n_panels):
    model, processor = model_and_processor
    out = tmp_path / "kept.png"
    picture = kept_token_pictures(model, processor, _image(), "what color is the circle ?", method, out=out, keep=16)
    assert out.exists() and not hasattr(model, "vtprune")
    panel_w = (picture.width - 6 * (n_panels - 1)) / n_panels
    assert panel_w == int(panel_w) == 336
    arr = np.asarray(picture).astype(float)
    first, last = arr[22:, :336], arr[22:, -336:]
    side = int(round((model.config.vision_config.image_size // model.config.vision_config.patch_size)))
    cell = 336 // side
    cells_first = first[: side * cell, : side * cell].reshape(side, cell, side, cell, 3).mean((1, 3, 4))
    cells_last = last[: side * cell, : side * cell].reshape(side, cell, side, cell, 3).mean((1, 3, 4))
    darker = cells_last < cells_first - 1
    assert darker.sum() == side * side - 16  # exactly the pruned patches are dimmed


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
