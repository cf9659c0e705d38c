"""Where each image's visual tokens sit in the prompt, checked against the vision inputs (pure functions)."""

from __future__ import annotations

import dataclasses

import torch

from ..adapters import Adapter, VisualSpan, find_runs
from ..errors import PruneError


def find_spans(adapter: Adapter, input_ids: torch.Tensor, pixel_values, image_sizes) -> list[VisualSpan]:
    """One span per image, batch order; runs of image tokens are split into images of the adapter's counts."""
    runs = [find_runs(row, adapter.image_token_id) for row in input_ids]
    n_images = adapter.count_images(pixel_values, image_sizes)
    lengths = [n for row in runs for _, n in row]
    expected = adapter.image_token_counts(n_images or len(lengths), image_sizes, lengths)
    spans: list[VisualSpan] = []
    for b, row in enumerate(runs):
        k = 0
        for start, length in row:
            pos = start
            while pos < start + length:
                if expected is not None and len(spans) >= len(expected):
                    raise PruneError(
                        f"vtprune: input_ids hold more image tokens than the {len(expected)} image(s) in "
                        "pixel_values provide; the prompt and the images do not match"
                    )
                n = length if expected is None else expected[len(spans)]
                if pos + n > start + length:
                    raise PruneError(
                        f"vtprune: image-token count mismatch in sample {b}: a run of {length} image tokens "
                        f"does not split into images of {n} tokens; build prompts with the model's processor "
                        f"(it expands each image placeholder to the right count)"
                    )
                spans.append(VisualSpan(b, len(spans), k, pos, n))
                pos += n
                k += 1
    if n_images is not None and len(spans) != n_images:  # None: one run per image (InternVL)
        raise PruneError(
            f"vtprune: image-token count mismatch: input_ids hold tokens for {len(spans)} image(s) but "
            f"pixel_values hold {n_images}; build prompts with the model's processor"
        )
    return spans


def unexpanded(input_ids: torch.Tensor, expand: int) -> torch.Tensor:
    """generate() with beams / several return sequences encodes each image once, then repeats every prompt
    ``expand`` times (repeat_interleave): the prompts those images belong to are every ``expand``-th row."""
    if expand == 1:
        return input_ids
    rows = input_ids[::expand]
    if input_ids.shape[0] % expand or not torch.equal(rows.repeat_interleave(expand, 0), input_ids):
        raise PruneError(
            f"vtprune: generate() expanded the batch {expand}x after encoding the images, but the rows of "
            "input_ids are not the repeated prompts; pass the prompts once, as generate() expects"
        )
    return rows


def expanded_spans(vision_spans: list[VisualSpan], batch: int, expand: int) -> tuple[list[VisualSpan], list[int]]:
    """Spans of the (expanded) batch in batch order, and for each the image it comes from in the vision batch."""
    if expand == 1:
        return vision_spans, [s.image for s in vision_spans]
    spans, source = [], []
    for b in range(batch):
        for s in (v for v in vision_spans if v.sample == b // expand):
            spans.append(dataclasses.replace(s, sample=b, image=len(spans)))
            source.append(s.image)
    return spans, source


def check_crops(adapter: Adapter, vision_spans, pixel_values, image_sizes) -> None:
    """The prompt's image tokens must need exactly the crops / tiles the vision input holds."""
    needed = sum(adapter.crops_per_image(vision_spans, image_sizes))
    available = sum(adapter.crop_counts(pixel_values, image_sizes))
    if needed != available:
        raise PruneError(
            f"vtprune: image-token count mismatch: the prompt's image tokens need {needed} vision crops/tiles but "
            f"pixel_values hold {available}; build prompts with the model's processor"
        )


def check_left_padded(attention_mask) -> None:
    """Scores read each sample's last prompt token and cuts keep rows right-aligned: refuse right padding."""
    if not isinstance(attention_mask, torch.Tensor):
        return
    padded_end = torch.nonzero(~attention_mask[:, -1].bool()).flatten()
    if padded_end.numel():
        raise PruneError(
            f"vtprune: sample {int(padded_end[0])} of the batch is right-padded (its attention_mask ends in 0), "
            "but pruning needs each sample's last prompt token in the last column; pad on the left "
            "(processor.tokenizer.padding_side = 'left')"
        )
