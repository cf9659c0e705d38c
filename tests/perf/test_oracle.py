"""The oracle's LLM input equals the pruned model's (so the comparison is fair), its cached decode equals a
recompute, and the replay of a recorded schedule cuts the same tokens at the same layers."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vtprune
from vtprune.adapters import get_adapter
from vtprune.perf.oracle import even_keep, oracle, replay_of

from ..conftest import FAMILIES, IMAGE_TOKEN, collate, make_prompt
from ..helpers import greedy_from_embeds, kept_sequence_positions, merged_embeds

pytestmark = pytest.mark.usefixtures("one_thread")
KEEP = {"llava": 16, "llava_next": 16, "internvl": 8}


@contextlib.contextmanager
def llm_input(model, into: dict):
    """Record what the language model receives (registered last: after any vtprune hook rewrote it)."""
    def hook(module, args, kwargs):
        into.update({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    handle = get_adapter(model).language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _prompt(model, family, seed=0):
    batch = collate([make_prompt(model, family, 9, seed)])
    batch.pop("attention_mask")
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random", "vtc_cls"])
def test_oracle_feeds_the_llm_what_the_pruned_model_feeds_it(models, family, method):
    model = models(family)
    batch = _prompt(model, family)
    pruned, fed = {}, {}
    with torch.no_grad():
        with vtprune.pruned(model, method, keep=KEEP[family]), llm_input(model, pruned):
            logits = model(**batch).logits[:, -1]
            session = model.vtprune
            kept = [torch.tensor(img.kept_index) for img in session.stats.images]
            positions = session.method.positions
        with oracle(model, batch["input_ids"], kept, positions), llm_input(model, fed):
            oracle_logits = model(**batch).logits[:, -1]
    assert all(len(k) == KEEP[family] for k in kept) or family == "llava_next"
    assert torch.equal(pruned["inputs_embeds"], fed["inputs_embeds"])
    assert torch.equal(pruned["position_ids"], fed["position_ids"])
    assert torch.equal(pruned["attention_mask"], fed["attention_mask"])
    torch.testing.assert_close(oracle_logits, logits)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_oracle_cached_decode_equals_a_recompute_on_the_pruned_sequence(models, family):
    model = models(family)
    batch = _prompt(model, family, seed=1)
    ids = batch["input_ids"][0]
    n = int((ids == IMAGE_TOKEN).sum())
    kept = even_keep(n, 12)
    with torch.no_grad(), oracle(model, batch["input_ids"], [kept]):
        out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    rows = kept_sequence_positions(ids, IMAGE_TOKEN, [kept.tolist()], [n])
    embeds = merged_embeds(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])})[:, rows]
    tokens, _ = greedy_from_embeds(model, embeds, rows[None], 5)
    assert out[0, ids.numel():].tolist() == list(tokens)


def test_oracle_refuses_a_prompt_it_was_not_built_for(models):
    model = models("llava")
    batch = _prompt(model, "llava")
    with pytest.raises(ValueError, match="image"):
        with oracle(model, batch["input_ids"], [even_keep(64, 8), even_keep(64, 8)]):
            pass
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        with oracle(model, batch["input_ids"], [torch.tensor([3, 64])]):
            pass


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method,kw", [("fastv", {"keep": 16}), ("transprune", {"keep": 16}), ("vtc_cls", {"keep": 16})])
def test_replay_cuts_the_recorded_tokens_at_the_recorded_layers(models, family, method, kw):
    model = models(family)
    batch = _prompt(model, family)
    with torch.no_grad():
        with vtprune.pruned(model, method, **kw):
            logits = model(**batch).logits[:, -1]
            stats, methods = model.vtprune.stats, model.vtprune.methods
        with vtprune.pruned(model, replay_of(stats, methods)):
            replay_logits = model(**batch).logits[:, -1]
            replayed = model.vtprune.stats
    schedule = lambda s: [(st.stage, st.layer, st.tokens_out, st.kept_index) for i in s.images for st in i.stages]  # noqa: E731
    assert schedule(replayed) == schedule(stats)
    torch.testing.assert_close(replay_logits, logits)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_oracle_on_qwen_matches_the_pruned_model_with_3d_positions_and_deepstack(models, family):
    model = models(family)
    batch = collate([make_prompt(model, family, 9, seed=1, n_images=2)])
    with torch.no_grad():
        with vtprune.pruned(model, "random", keep=4, positions="original"):
            logits = model(**batch).logits[:, -1]
            kept = [torch.tensor(img.kept_index) for img in model.vtprune.stats.images]
            tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with oracle(model, batch["input_ids"], kept):
            oracle_logits = model(**batch).logits[:, -1]
            oracle_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with pytest.raises(ValueError, match="renumber.*multimodal-rope"):
            with oracle(model, batch["input_ids"], kept, "renumber"):
                model(**batch)
    torch.testing.assert_close(oracle_logits, logits, atol=1e-5, rtol=0)
    assert torch.equal(oracle_tokens, tokens)
