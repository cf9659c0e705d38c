"""Independent references for the tests: written from the model's own pieces, never from vtprune code."""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

import vtprune


def merged_embeds(model, batch) -> torch.Tensor:
    """[B, T, D] LLM input embeddings with image features scattered in, as the model's own forward does."""
    kwargs = {"pixel_values": batch["pixel_values"]}
    for key in ("image_sizes", "image_grid_thw"):  # Qwen-VL: the patch grid of each image
        if key in batch:
            kwargs[key] = batch[key]
    with torch.no_grad():
        feats = model.model.get_image_features(**kwargs).pooler_output
        feats = torch.cat(list(feats), 0) if not isinstance(feats, torch.Tensor) or feats.dim() == 3 else feats
        feats = feats.reshape(-1, feats.shape[-1])
        emb = model.get_input_embeddings()(batch["input_ids"])
        mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask, feats.to(emb.dtype))


def image_positions(input_ids_row: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return torch.nonzero(input_ids_row == image_token_id).flatten()


def kept_sequence_positions(input_ids_row, image_token_id, kept_per_image: list[list[int]], lengths: list[int],
                            attention_mask_row=None):
    """Original positions of the tokens that survive: all text plus each image's kept indices. With the row's
    attention mask, its left padding is left out too (a cut drops padding: the batch is rebuilt as wide as its
    longest remaining sample)."""
    img_pos = image_positions(input_ids_row, image_token_id)
    keep = torch.ones(input_ids_row.numel(), dtype=torch.bool)
    if attention_mask_row is not None:
        keep &= attention_mask_row.bool()
    keep[img_pos] = False
    offset = 0
    for kept, n in zip(kept_per_image, lengths):
        keep[img_pos[offset + torch.tensor(kept, dtype=torch.long)]] = True
        offset += n
    return torch.nonzero(keep).flatten()


def greedy_from_embeds(model, embeds, position_ids, steps: int):
    """Greedy decode from precomputed input embeddings with explicit positions; returns (tokens, prefill logits)."""
    with torch.no_grad():
        n = embeds.shape[1]
        out = model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=torch.ones(1, n, dtype=torch.long),
                    use_cache=True)
        logits0 = out.logits[:, -1]
        tok = logits0.argmax(-1, keepdim=True)
        tokens = [int(tok)]
        cache, pos = out.cache, int(position_ids[0, -1])
        for t in range(steps - 1):
            pos += 1
            out = model(input_ids=tok, cache=cache, position_ids=torch.tensor([[pos]]),
                        attention_mask=torch.ones(1, n + t + 1, dtype=torch.long), use_cache=True)
            cache = out.cache
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
    return tokens, logits0


def slow_in_llm_generate(model, embeds, kept_positions: torch.Tensor, layer_k: int, steps: int, renumber=False):
    """Reference for in-LLM pruning with one cut: :func:`slow_multi_cut_generate` with a cut before ``layer_k``
    (layers < K see every token; from K on the kept prompt tokens and every generated token)."""
    return slow_multi_cut_generate(model, embeds, {layer_k: kept_positions}, steps, renumber=renumber)


def slow_multi_cut_generate(model, embeds, kept_positions: dict, steps: int, renumber=True):
    """Reference for progressive in-LLM pruning (several cuts): recompute the whole forward per step, no cache.
    ``kept_positions``: {layer K: original prompt positions that survive the cut before K} (each a subset of the
    previous cut's). From layer K on only those prompt tokens and every generated token remain, at contiguous
    positions over the rows present (``renumber``: generated tokens continue after the pruned sequence) or at
    their original positions."""
    lm = model.model.language_model
    T = embeds.shape[1]
    seq, tokens, first_logits = embeds, [], None
    with torch.no_grad():
        for _ in range(steps):
            n = seq.shape[1]
            h, rows = seq, torch.arange(n)
            pos = rows[None]
            cos, sin = lm.rotary_emb(h, position_ids=pos)
            for i, layer in enumerate(lm.layers):
                if i in kept_positions:
                    sel = torch.isin(rows, kept_positions[i]) | (rows >= T)
                    h, rows = h[:, sel], rows[sel]
                    pos = torch.arange(rows.numel())[None] if renumber else rows[None]
                    cos, sin = lm.rotary_emb(h, position_ids=pos)
                L = h.shape[1]
                causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
                h = layer(h, attention_mask=causal, position_embeddings=(cos, sin), position_ids=pos)
                h = h[0] if isinstance(h, tuple) else h
            logits = model.lm_head(lm.norm(h))[:, -1]
            first_logits = logits if first_logits is None else first_logits
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(int(tok))
            seq = torch.cat([seq, model.get_input_embeddings()(tok)], 1)
    return tokens, first_logits


def batch_of(model, family, seeds):
    """A left-padded batch of prompts with text lengths 3, 7, ... (one per seed)."""
    from .conftest import collate, make_prompt

    return collate([make_prompt(model, family, 3 + 4 * s, s) for s in seeds])


@contextlib.contextmanager
def own_attention(eager, fn):
    """Route the LLM attention of ``eager`` (only that model) through ``fn(module, q, k, v, mask, scaling)``."""
    lm = eager.model.language_model
    modeling = sys.modules[type(lm.layers[0].self_attn).__module__]
    original = modeling.eager_attention_forward
    mine = {id(layer.self_attn) for layer in lm.layers}

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if id(module) not in mine:
            return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return fn(module, query, key, value, attention_mask, scaling)

    modeling.eager_attention_forward = attention
    try:
        yield
    finally:
        modeling.eager_attention_forward = original


def attention_outputs(model, batch, method=None):
    """{layer: [B, q, H, d]} what the attention function returned at the prefill (the input of o_proj)."""
    lm = model.model.language_model
    heads = model.config.text_config.num_attention_heads
    seen, handles = {}, []
    for i, layer in enumerate(lm.layers):
        def hook(module, args, i=i):
            x = args[0]
            if x.shape[1] > 1:
                seen[i] = x.reshape(*x.shape[:2], heads, -1).clone()
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        with contextlib.ExitStack() as stack, torch.no_grad():
            if method is not None:
                stack.enter_context(vtprune.pruned(model, method))
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def defined_in(name: str, homes) -> object:
    """The object ``name`` is defined as in the first of the modules ``homes`` that has it (the real home of a
    name an alias module re-exports)."""
    for home in homes:
        module = importlib.import_module(home)
        if name in vars(module):
            return vars(module)[name]
    raise AssertionError(f"{name} is defined in none of {homes}")


def kept_batched_and_alone(model, batches) -> tuple[list, list]:
    """Kept indices per image with ``batches`` = (the collated batch, [each sample collated alone]) run through the
    already pruned ``model``: (batched, the first image of each sample alone)."""
    batch, alone = batches
    with torch.no_grad():
        model(**batch)
        batched = [image.kept_index for image in model.vtprune.stats.images]
        single = []
        for one in alone:
            model(**one)
            single.append(model.vtprune.stats.images[0].kept_index)
    return batched, single
