"""Kept-token pictures: the image as the model saw it, pruned patches dimmed, one panel per pruning stage.

    from vtprune.viz import kept_token_pictures
    picture = kept_token_pictures(model, processor, "cat.png", "What is on the mat?", "flowcut", keep=64)
    picture.save("kept.png")

Panels follow ``model.vtprune.stats``: FlowCut shows each ViT cut and the final set, FastV the set entering
layer K, DyVTE the layer its routers exit after (all dimmed), and so on; a run that removed nothing says so. The base crop (LLaVA-NeXT) or first tile (InternVL) is drawn; an LLM token lights up the
vision patches it is built from (4 per token after InternVL's pixel shuffle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .adapters import VisualSpan
from .api import pruned


def _to_pil(pixels: torch.Tensor, image_processor) -> Image.Image:
    """[3, H, W] normalised pixels -> the RGB image the vision tower saw."""
    mean = torch.tensor(getattr(image_processor, "image_mean", [0.5, 0.5, 0.5]))[:, None, None]
    std = torch.tensor(getattr(image_processor, "image_std", [0.5, 0.5, 0.5]))[:, None, None]
    arr = (pixels.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def _patch_mask(adapter, stage, n_tokens: int, image_sizes) -> np.ndarray:
    """Boolean [side, side] grid of the first crop: True where the stage kept the patch."""
    seq = adapter.vision_seq_len
    side = int(round((seq - 1) ** 0.5))
    kept = np.zeros(seq - 1, dtype=bool)
    if stage.stage == "vision":
        kept[np.asarray(stage.kept_index, dtype=np.int64)] = True
    else:
        sources = adapter.token_sources(VisualSpan(0, 0, 0, 0, n_tokens), image_sizes)  # [N, S] crop*seq + pos
        chosen = sources[torch.as_tensor(stage.kept_index, dtype=torch.long)].flatten()
        chosen = chosen[(chosen > 0) & (chosen < seq)] - 1  # first crop, CLS (0) excluded
        kept[chosen.numpy()] = True
    return kept.reshape(side, side)


def _grid_mask(adapter, stage, n_tokens: int, image_sizes) -> np.ndarray:
    """Dynamic-resolution images (Qwen-VL): [rows, cols] of the first frame's merged-token grid, True where kept."""
    grid = adapter.token_grid(VisualSpan(0, 0, 0, 0, n_tokens), image_sizes).numpy()  # [N, 3] frame, row, col
    first = grid[:, 0] == 0
    mask = np.zeros((grid[first, 1].max() + 1, grid[first, 2].max() + 1), dtype=bool)
    kept = grid[np.asarray(stage.kept_index, dtype=np.int64)]
    kept = kept[kept[:, 0] == 0]
    mask[kept[:, 1], kept[:, 2]] = True
    return mask


def _panel(base: Image.Image, mask: np.ndarray, title: str, size: int = 336) -> Image.Image:
    img = base.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    ys = (np.arange(size) * mask.shape[0] / size).astype(int).clip(0, mask.shape[0] - 1)
    xs = (np.arange(size) * mask.shape[1] / size).astype(int).clip(0, mask.shape[1] - 1)
    full = mask[ys][:, xs]
    arr = np.where(full[..., None], arr, arr * 0.22 + 20)
    panel = Image.new("RGB", (size, size + 22), "white")
    panel.paste(Image.fromarray(arr.astype(np.uint8)), (0, 22))
    ImageDraw.Draw(panel).text((4, 4), title, fill="black")
    return panel


def kept_token_pictures(model, processor, image, question: str, method: str, out: str | Path | None = None,
                        prompt: str | None = None, **method_kwargs) -> Image.Image:
    """Run one pruned forward on (image, question) and draw what each stage kept; saves to ``out`` if given."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as img:  # closes the file once decoded
            image = img.convert("RGB")
    image = image.convert("RGB")
    image_token = getattr(processor, "image_token", "<image>")
    if prompt is None and getattr(processor, "chat_template", None) and image_token != "<image>":
        from .eval.tasks.prompts import chat_template_prompt  # e.g. Qwen-VL: its vision delimiters around the image

        prompt = chat_template_prompt(processor, question)
    text = prompt if prompt is not None else f"USER: {image_token}\n{question} ASSISTANT:"
    inputs = processor(images=image, text=text, return_tensors="pt")
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    with pruned(model, method, **method_kwargs), torch.no_grad():
        model(**inputs)
        stats = model.vtprune.stats
        adapter = model.vtprune.adapter
        image_sizes = inputs.get(adapter.image_sizes_key)
        img_stats = stats.images[0]
        patch_rows = adapter.image_sizes_key == "image_grid_thw"  # Qwen-VL: pixel_values are patch rows
        pixels = inputs["pixel_values"][0]
        pixels = pixels[0] if pixels.dim() == 4 else pixels  # LLaVA-NeXT: the base crop
        base = image if patch_rows else _to_pil(pixels, processor.image_processor)
        panels = [_panel(base, np.ones((1, 1), dtype=bool), f"input ({img_stats.n_tokens} tokens)")]
        for st in img_stats.stages:
            if st.stage == "llm" and st.tokens_in == st.tokens_out:
                continue  # a cut that removed nothing (e.g. FlowCut's anyres stage on a single-crop image)
            where = f"before ViT layer {st.layer}" if st.stage == "vision" else (
                "before the LLM" if st.stage == "pre_llm" else f"before LLM layer {st.layer}")
            mask = (_grid_mask if patch_rows else _patch_mask)(adapter, st, img_stats.n_tokens, image_sizes)
            panels.append(_panel(base, mask, f"{method}: {where}, {st.tokens_out}/{st.tokens_in} kept"))
        if len(panels) == 1:  # e.g. DyVTE's routers kept the image to the end: say so rather than draw one panel
            panels.append(_panel(base, np.ones((1, 1), dtype=bool), f"{method}: nothing removed"))
    width = sum(p.width for p in panels) + 6 * (len(panels) - 1)
    picture = Image.new("RGB", (width, panels[0].height), "white")
    x = 0
    for p in panels:
        picture.paste(p, (x, 0))
        x += p.width + 6
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        picture.save(out)
    return picture
