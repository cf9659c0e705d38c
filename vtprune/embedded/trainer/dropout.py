"""Visual-token dropout during training (``--token-dropout``): the pre-LLM pruners' renumbered layout."""

from __future__ import annotations

import random

import torch

from .patches import patch_classes


def drop_visual_tokens(model, batch: dict, rng: random.Random, keep_range: tuple[float, float],
                       scenes=None, object_bias: float = 0.0, min_pixels: int = 1) -> dict:
    """The batch with a random subset of each image's visual tokens removed, as ``inputs_embeds``.

    Each sample keeps ``round(n * U(lo, hi))`` (at least 1) of its ``n`` visual tokens, chosen by a
    uniform score in [0, 1), plus ``object_bias`` on patches that show an object (``scenes`` given),
    in their original order; the dropped rows leave the sequence (with their labels, all -100) and the
    rows are re-padded on the right, so the language model numbers the positions contiguously: the
    ``positions="renumber"`` layout of the pre-LLM pruners.  The image features are computed here, with
    gradients, so the vision tower and projector still train.  Returns ``inputs_embeds``,
    ``attention_mask``, ``labels``, ``kept`` (visual tokens per sample) and ``kept_rows`` (the original
    positions each sample keeps, for :meth:`RetrievalAux.remap`).
    """
    cfg = model.config
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    embeds = model.get_input_embeddings()(ids)
    feats = model.model.get_image_features(pixel_values=batch["pixel_values"],
                                           vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                           return_dict=True).pooler_output
    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    visual = ids == cfg.image_token_id
    embeds = embeds.masked_scatter(visual.unsqueeze(-1).expand_as(embeds), feats.to(embeds.dtype))
    vc = cfg.vision_config
    grid, patch = vc.image_size // vc.patch_size, vc.patch_size
    rows, kept = [], []
    for i in range(ids.shape[0]):
        where = visual[i].nonzero().squeeze(1)
        n = where.numel()
        k = max(1, min(n, round(n * rng.uniform(*keep_range))))
        gen = torch.Generator().manual_seed(rng.getrandbits(31))
        score = torch.rand(n, generator=gen)
        if object_bias and scenes is not None and n == grid * grid:
            score = score + object_bias * torch.from_numpy(patch_classes(scenes[i], grid, patch, min_pixels) > 0).float()
        keep = where[torch.sort(torch.topk(score, k).indices).values]
        sel = mask[i].bool() & ~visual[i]
        sel[keep] = True
        rows.append(sel.nonzero().squeeze(1))
        kept.append(k)
    width = max(r.numel() for r in rows)
    B, D = ids.shape[0], embeds.shape[-1]
    new_embeds = embeds.new_zeros(B, width, D)
    new_mask = torch.zeros(B, width, dtype=mask.dtype)
    new_labels = torch.full((B, width), -100, dtype=labels.dtype)
    for i, r in enumerate(rows):
        new_embeds[i, : r.numel()] = embeds[i, r]
        new_mask[i, : r.numel()] = 1
        new_labels[i, : r.numel()] = labels[i, r]
    return {"inputs_embeds": new_embeds, "attention_mask": new_mask, "labels": new_labels, "kept": kept,
            "kept_rows": rows}
