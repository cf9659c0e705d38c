"""DyVTE (spec §2.3-2.5): learned exit routers drop every visual token of a sample after the layer its router
says "exit". The routers are built here by hand (so every decision is known) and the outputs are checked against
references written from the model's own layers (never vtprune's code): never exit = vanilla, bit for bit; exit
after layer 0 = layers 1..3 on text only at the original positions; per-sample exits in a batch; the KV cache per
layer; generate() against a slow no-cache reference; a prompt ending with its image; composition after FastV
(router files: test_dyvte_routers.py).

Router l reads f = concat(mean of the instruction tokens but the last, the last prompt token) of layer l's output
(instruction = every prompt token after the sample's last image token) and exits when logit[1] - logit[0] >
threshold. The tiny LLMs have L = 4 layers and d = 64: decisions after layers 0..2 (cuts before 1..3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vtprune
from vtprune.methods import DyVTE, FastV
from vtprune.methods.dyvte import Routers, save_routers

from ..conftest import FAMILIES, IMAGE_TOKEN, Prompt, collate, make_prompt
from ..helpers import kept_sequence_positions, merged_embeds, slow_multi_cut_generate

pytestmark = pytest.mark.usefixtures("one_thread")

L, D = 4, 64
STEPS = 6
MARGIN = 5.0  # |router pre-activation| for the sample-dependent routers; exits need > THRESHOLD
THRESHOLD = 1.0


# --- routers built by hand -----------------------------------------------------------------------------------
def zero_routers(hidden: int = D, layers: int = L) -> Routers:
    routers = Routers(hidden, layers)
    with torch.no_grad():
        for p in routers.parameters():
            p.zero_()
    return routers


def set_always_exit(routers: Routers, layer: int, seed: int = 0) -> None:
    """Router ``layer`` exits for every feature: W1 rows u and -u, W2's exit row (s, s), keep row 0, so
    logit[1] - logit[0] = s (GELU(x) + GELU(-x)) = s x erf(x / sqrt 2) > 0 for any x = u.f != 0."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(2 * D, generator=g)
    with torch.no_grad():
        r = routers.layers[layer]
        r[0].weight.zero_()
        r[2].weight.zero_()
        r[0].weight[0] = u
        r[0].weight[1] = -u
        r[2].weight[1, :2] = 10.0


def set_exit_for(routers: Routers, layer: int, feats: list[torch.Tensor], exits: list[bool]) -> None:
    """Router ``layer``: W1 row 0 = the min-norm w with w.f_i = +MARGIN (exit) or -MARGIN (keep), W2's exit row
    picks that unit: logit[1] - logit[0] = GELU(w.f) (about 5 or about 0)."""
    F = torch.stack(feats).double()
    t = torch.tensor([MARGIN if e else -MARGIN for e in exits], dtype=torch.float64)
    w = torch.linalg.pinv(F) @ t
    with torch.no_grad():
        r = routers.layers[layer]
        r[0].weight.zero_()
        r[2].weight.zero_()
        r[0].weight[0] = w.float()
        r[2].weight[1, 0] = 1.0
        got = torch.nn.functional.gelu(F.float() @ r[0].weight[0])
    assert all((float(v) > THRESHOLD + 2) == e and (float(v) < THRESHOLD - 0.5) != e for v, e in zip(got, exits))


def write(routers: Routers, folder, model_id: str = "tiny") -> str:
    path = folder / "dyvte_routers.safetensors"
    save_routers(routers, path, {"model_id": model_id})
    return str(path)


# --- references ---------------------------------------------------------------------------------------------
def layer_features(model, prompt) -> list[torch.Tensor]:
    """Per layer l, the [2d] router feature of one prompt (alone, unpruned) after layer l, from the model's hidden
    states (hidden_states[l + 1] = layer l's output)."""
    with torch.no_grad():
        states = model(**collate([prompt]), output_hidden_states=True).hidden_states
    last_image = int(torch.nonzero(prompt.input_ids == IMAGE_TOKEN).max())
    return [instruction_feature(hidden[0, last_image + 1:]) for hidden in states[1:L]]


def instruction_feature(instr: torch.Tensor) -> torch.Tensor:
    """concat(mean of all rows but the last, the last row); one row only: the docstring's (last, last)."""
    instr = instr.float()
    body = instr[:-1] if instr.shape[0] > 1 else instr
    return torch.cat([body.mean(0), instr[-1]])


def cut_run_features(model, batch, kept: dict) -> list[torch.Tensor]:
    """One prompt: the router feature after layers 0..L-2 when the prompt tokens not in ``kept[K]`` leave before
    layer K (original positions), from the model's own layers; instruction = the text after the last image."""
    lm = model.model.language_model
    ids = batch["input_ids"][0]
    last_image = int(torch.nonzero(ids == IMAGE_TOKEN).max())
    with torch.no_grad():
        h = merged_embeds(model, batch)
        rows = torch.arange(h.shape[1])
        out = []
        for i, layer in enumerate(lm.layers[:L - 1]):
            if i in kept:
                sel = torch.isin(rows, kept[i])
                h, rows = h[:, sel], rows[sel]
            n = h.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            cos, sin = lm.rotary_emb(h, position_ids=rows[None])
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=rows[None])
            h = h[0] if isinstance(h, tuple) else h
            out.append(instruction_feature(h[0, rows > last_image]))
    return out


def spy(method: DyVTE) -> list[tuple[int, torch.Tensor]]:
    """Record every (layer, feature) the method's routers are asked about."""
    calls = []
    original = method.router_logits
    method.router_logits = lambda layer, f: calls.append((layer, f.clone())) or original(layer, f)
    return calls


def text_positions(ids_row: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(ids_row != IMAGE_TOKEN).flatten()


def exit_after_layer0_logits(model, prompt) -> torch.Tensor:
    """Layer 0 on the full merged sequence, layers 1..3 on the text tokens only (InternVL's <img>/</img> are
    text), at their ORIGINAL position ids; last-token logits [V]."""
    lm = model.model.language_model
    batch = collate([prompt])
    with torch.no_grad():
        h = merged_embeds(model, batch)
        T = h.shape[1]
        pos = torch.arange(T)[None]
        for i, layer in enumerate(lm.layers):
            if i == 1:
                keep = text_positions(prompt.input_ids)
                h, pos = h[:, keep], keep[None]
            n = h.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            cos, sin = lm.rotary_emb(h, position_ids=pos)
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        return model.lm_head(lm.norm(h))[0, -1]


def exit_layers(stats) -> list[int | None]:
    """Per image: the layer it exited after (from its one DyVTE stage), None when it never exits."""
    out = []
    for img in stats.images:
        if not img.stages:
            out.append(None)
            continue
        (st,) = img.stages
        assert (st.stage, st.method, st.tokens_in, st.tokens_out, st.kept_index) == ("llm", "dyvte", img.n_tokens, 0, [])
        assert st.note == f"exit after layer {st.layer - 1}"
        out.append(st.layer - 1)
    return out


def cache_lengths(out) -> list[int]:
    return [layer.keys.shape[-2] for layer in out.cache.layers]


# --- 1. never exit = vanilla ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_is_bit_identical_to_vanilla(models, tmp_path, family):
    """All-zero routers: logits (0, 0) -> never > threshold 0: every layer is a no-op cut, the logits of a padded
    batch of 2 are bit-identical to the unpruned model's and no image has a stage."""
    model = models(family)
    batch = collate([make_prompt(model, family, 3, 0), make_prompt(model, family, 6, 1)])
    with torch.no_grad():
        ref = model(**batch).logits
    with vtprune.pruned(model, "dyvte", routers=write(zero_routers(), tmp_path)), torch.no_grad():
        got = model(**batch).logits
        stats = model.vtprune.stats
    assert torch.equal(got, ref)
    assert len(stats.images) == 2 and all(img.stages == [] for img in stats.images)
    assert [img.kept for img in stats.images] == [img.n_tokens for img in stats.images]


@pytest.mark.parametrize("family", FAMILIES)
def test_router_features_are_the_instruction_tokens_of_each_layer(models, three_exits, tmp_path, family):
    """What each router reads: f = concat(mean of the tokens after the last image but the last prompt token, the
    last prompt token) of layer l's output (InternVL: </img> is one of them), per sample alone and in a padded
    batch of 3, one call per sample and layer while nobody exits."""
    model = models(family)
    prompts, _ = three_exits(family)
    refs = [layer_features(model, p) for p in prompts]
    method = DyVTE(routers=write(zero_routers(), tmp_path))
    calls = spy(method)
    with vtprune.pruned(model, method), torch.no_grad():
        for p in prompts:
            model(**collate([p]))
        alone = list(calls)
        calls.clear()
        model(**collate(prompts))
    assert [layer for layer, _ in alone] == [0, 1, 2] * 3
    for i, (layer, f) in enumerate(alone):
        torch.testing.assert_close(f, refs[i // 3][layer], atol=1e-6, rtol=0)
    assert [layer for layer, _ in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, (layer, f) in enumerate(calls):
        torch.testing.assert_close(f, refs[i % 3][layer], atol=1e-4, rtol=1e-4)


def test_one_instruction_token_uses_it_for_both_halves(models, tmp_path):
    """Only the last prompt token after the image: the mean half is that token too (the official code's NaN would
    never exit); a router that exits on concat(h, h) exits after layer 0."""
    model = models("llava")
    base = make_prompt(model, "llava", 4, 3)
    prompt = Prompt(base.input_ids[:-2], base.pixel_values)
    assert int(prompt.input_ids[-2]) == IMAGE_TOKEN and int(prompt.input_ids[-1]) != IMAGE_TOKEN
    feats = layer_features(model, prompt)
    routers = zero_routers()
    set_exit_for(routers, 0, [feats[0]], [True])
    method = DyVTE(routers=write(routers, tmp_path), threshold=THRESHOLD)
    calls = spy(method)
    with vtprune.pruned(model, method), torch.no_grad():
        out = model(**collate([prompt]), use_cache=True)
        stats = model.vtprune.stats
    ((layer, f),) = calls
    assert layer == 0 and torch.isfinite(f).all()
    torch.testing.assert_close(f[:D], f[D:], atol=0, rtol=0)
    torch.testing.assert_close(f, feats[0], atol=1e-6, rtol=0)
    assert exit_layers(stats) == [0]
    T, N = prompt.input_ids.numel(), stats.images[0].n_tokens
    assert cache_lengths(out) == [T, T - N, T - N, T - N]


def _image_last(model, family: str, text_len: int, seed: int, n_images: int = 1) -> Prompt:
    """A prompt that ends with its last image's tokens (make_prompt's 3 trailing tokens and InternVL's </img> cut)."""
    base = make_prompt(model, family, text_len, seed, n_images)
    last = int(torch.nonzero(base.input_ids == IMAGE_TOKEN).max())
    return Prompt(base.input_ids[:last + 1], base.pixel_values, base.image_sizes)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_token_after_the_last_image_never_exits(models, tmp_path, family):
    """The image as the last prompt tokens: the routers have no text to read, so that sample never exits (as the
    official code's NaN feature) instead of an IndexError: no router call for it, its logits alone equal the
    unpruned model's, its images keep every token with one note at the first cut. In a padded batch the other
    sample still exits after layer 0, with the router call of its own features."""
    model = models(family)
    last = _image_last(model, family, 4, 0, n_images=2 if family == "llava" else 1)
    other = make_prompt(model, family, 6, 1)
    routers = zero_routers()
    set_always_exit(routers, 0)
    method = DyVTE(routers=write(routers, tmp_path))
    calls = spy(method)
    with torch.no_grad():
        ref = model(**collate([last])).logits
        ref_other = layer_features(model, other)[0]
    with vtprune.pruned(model, method), torch.no_grad():
        alone = model(**collate([last]), use_cache=True)
        stats_alone = model.vtprune.stats
        assert calls == []
        model(**collate([last, other]))
        stats = model.vtprune.stats
        gen = model.generate(**collate([last]), max_new_tokens=3, do_sample=False)
    assert torch.equal(alone.logits, ref)
    T = last.input_ids.numel()
    assert cache_lengths(alone) == [T] * L
    note = "no prompt token after the image: the routers have no text to read, every visual token stays"
    for images in (stats_alone.images, stats.images[:-1]):
        for img in images:
            (st,) = img.stages
            assert (st.layer, st.tokens_in, st.tokens_out, st.note) == (1, img.n_tokens, img.n_tokens, note)
            assert img.kept == img.n_tokens
    assert exit_layers(SimpleNamespace(images=stats.images[-1:])) == [0]
    ((layer, f),) = calls
    assert layer == 0
    torch.testing.assert_close(f, ref_other, atol=1e-4, rtol=1e-4)
    assert gen.shape[1] == T + 3


def test_two_images_of_a_sample_exit_together(models, tmp_path):
    """Two images in one llava prompt: both leave after the same layer (one decision per sample) and the cache
    of the later layers holds neither."""
    model = models("llava")
    prompt = make_prompt(model, "llava", 4, 5, n_images=2)
    routers = zero_routers()
    set_always_exit(routers, 1)
    with vtprune.pruned(model, "dyvte", routers=write(routers, tmp_path)), torch.no_grad():
        out = model(**collate([prompt]), use_cache=True)
        stats = model.vtprune.stats
    assert exit_layers(stats) == [1, 1]
    T, N = prompt.input_ids.numel(), sum(img.n_tokens for img in stats.images)
    assert N == int((prompt.input_ids == IMAGE_TOKEN).sum())
    assert cache_lengths(out) == [T, T, T - N, T - N]


# --- 2. exit after layer 0 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_exit_after_layer0_runs_layers_1_to_3_on_text_at_original_positions(models, tmp_path, family):
    """Zero routers at threshold -1: logit[1] - logit[0] = 0 > -1, every sample exits after layer 0. Each sample
    of a padded batch of 2 (and alone) gives the logits of the text-only reference."""
    model = models(family)
    prompts = [make_prompt(model, family, 3, 0), make_prompt(model, family, 6, 1)]
    refs = [exit_after_layer0_logits(model, p) for p in prompts]  # the same attention kernel (eager vs sdpa: ~2e-5)
    with vtprune.pruned(model, "dyvte", routers=write(zero_routers(), tmp_path), threshold=-1.0), torch.no_grad():
        alone = [model(**collate([p])).logits[0, -1] for p in prompts]
        batched = model(**collate(prompts)).logits[:, -1]
        stats = model.vtprune.stats
    assert exit_layers(stats) == [0, 0]
    for b, ref in enumerate(refs):
        torch.testing.assert_close(alone[b], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[b], ref, atol=5e-5, rtol=0)  # padding: vanilla NeXT differs ~1e-5 too
    # layer-averaged visual tokens: N for layer 0, none after
    assert [img.equivalent_tokens for img in stats.images] == [img.n_tokens / L for img in stats.images]


# --- 3. samples exiting at different layers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def three_exits(models, tmp_path_factory):
    """``get(family)``: (3 prompts, a router file) where sample 0 exits after layer 0, sample 1 after layer 1 and
    sample 2 never (weights solved from each sample's own features)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = models(family)
            prompts = [make_prompt(model, family, 3 + 2 * i, i) for i in range(3)]
            feats = [layer_features(model, p) for p in prompts]
            routers = zero_routers()
            set_exit_for(routers, 0, [f[0] for f in feats], [True, False, False])
            set_exit_for(routers, 1, [f[1] for f in feats[1:]], [True, False])
            set_exit_for(routers, 2, [feats[2][2]], [False])
            cache[family] = prompts, write(routers, tmp_path_factory.mktemp(f"three-{family}"))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_exit_layers_and_kv_cache(models, three_exits, family):
    """Each sample alone: its exit layer in the stats, and its KV cache holds T rows in layers <= e, T - N after."""
    model = models(family)
    prompts, path = three_exits(family)
    expected = [0, 1, None]
    with vtprune.pruned(model, "dyvte", routers=path, threshold=THRESHOLD), torch.no_grad():
        for prompt, e in zip(prompts, expected):
            out = model(**collate([prompt]), use_cache=True)
            stats = model.vtprune.stats
            assert exit_layers(stats) == [e]
            T, N = prompt.input_ids.numel(), stats.images[0].n_tokens
            assert N == int((prompt.input_ids == IMAGE_TOKEN).sum())
            last = L - 1 if e is None else e
            assert cache_lengths(out) == [T if i <= last else T - N for i in range(L)]
            assert stats.images[0].equivalent_tokens == N * (last + 1) / L


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_batch_of_three_exits_like_each_sample_alone(models, three_exits, family):
    """A padded batch of 3 (NeXT: 3 image sizes, so 3 token counts) exits after 0, 1, never - as each sample alone -
    and greedy-decodes the same 6 tokens as each sample alone."""
    model = models(family)
    prompts, path = three_exits(family)
    with vtprune.pruned(model, "dyvte", routers=path, threshold=THRESHOLD), torch.no_grad():
        batched = model.generate(**collate(prompts), max_new_tokens=STEPS)[:, -STEPS:].tolist()
        batched_exits = exit_layers(model.vtprune.stats)
        singles, single_exits = [], []
        for p in prompts:
            singles.append(model.generate(**collate([p]), max_new_tokens=STEPS)[0, -STEPS:].tolist())
            single_exits += exit_layers(model.vtprune.stats)
    if family == "llava_next":
        assert len({int((p.input_ids == IMAGE_TOKEN).sum()) for p in prompts}) == 3
    assert batched_exits == single_exits == [0, 1, None]
    assert batched == singles


# --- 4. generate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_slow_reference_exit_after_layer1(models, tmp_path, family):
    """Exit after layer 1 (router 1 always exits, router 0 never): generate() = the no-cache reference with text
    only from layer 2 on at the original positions; the routers run at prefill only (one call per layer up to the
    exit, none while decoding)."""
    model = models(family)
    prompt = make_prompt(model, family, 5, 2)
    batch = collate([prompt])
    routers = zero_routers()
    set_always_exit(routers, 1)
    set_always_exit(routers, 2, seed=1)  # never reached: the sample already exited
    method = DyVTE(routers=write(routers, tmp_path))
    calls = spy(method)
    vtprune.prune(model, method)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
        stats = model.vtprune.stats
    finally:
        vtprune.unprune(model)
    assert exit_layers(stats) == [1]
    assert [layer for layer, _ in calls] == [0, 1]
    ids = batch["input_ids"][0]
    kept = {2: kept_sequence_positions(ids, model.config.image_token_id, [[]], [stats.images[0].n_tokens])}
    assert torch.equal(kept[2], text_positions(ids))
    ref_tokens, ref_logits = slow_multi_cut_generate(model, merged_embeds(model, batch), kept, STEPS, renumber=False)
    assert out.sequences[0, -STEPS:].tolist() == ref_tokens
    torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-5, rtol=0)


# --- 6. after FastV -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_then_dyvte(models, tmp_path, family):
    """[FastV(ratio=0.5, layer=1), DyVTE]: FastV's cut before layer 1, then an exit after layer 2: the stats hold
    both stages, the cache holds FastV's kept tokens in layers 1-2 and none in layer 3, and generate() matches the
    no-cache reference with both cuts (original positions)."""
    model = models(family)
    prompt = make_prompt(model, family, 5, 1)
    batch = collate([prompt])
    T = prompt.input_ids.numel()
    routers = zero_routers()
    set_always_exit(routers, 2)
    dyvte_method = DyVTE(routers=write(routers, tmp_path))
    calls = spy(dyvte_method)
    vtprune.prune(model, [FastV(ratio=0.5, layer=1), dyvte_method])
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            stats = model.vtprune.stats
            gen = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
            gen_stats = model.vtprune.stats
    finally:
        vtprune.unprune(model)
    (img,) = stats.images
    N = img.n_tokens
    fastv, dyvte = img.stages
    K = fastv.tokens_out
    assert (fastv.method, fastv.layer, fastv.tokens_in) == ("fastv", 1, N)
    assert 0 < K < N and len(fastv.kept_index) == K
    assert (dyvte.method, dyvte.layer, dyvte.tokens_in, dyvte.tokens_out, dyvte.note) == \
        ("dyvte", 3, K, 0, "exit after layer 2")
    assert cache_lengths(out) == [T, T - N + K, T - N + K, T - N]
    # the routers read layer 0 on the full sequence, layers 1-2 on FastV's kept tokens
    ids = batch["input_ids"][0]
    fastv_rows = kept_sequence_positions(ids, model.config.image_token_id, [fastv.kept_index], [N])
    ref = cut_run_features(model, batch, {1: fastv_rows})
    prefill = calls[:3]
    assert [layer for layer, _ in prefill] == [0, 1, 2]
    for layer, f in prefill:
        torch.testing.assert_close(f, ref[layer], atol=1e-5, rtol=1e-5)
    assert [[(s.method, s.layer, s.kept_index) for s in i.stages] for i in gen_stats.images] == \
        [[(s.method, s.layer, s.kept_index) for s in i.stages] for i in stats.images]
    assert [layer for layer, _ in calls] == [0, 1, 2] * 2  # the forward and generate()'s prefill; no decode step
    kept = {1: fastv_rows, 3: text_positions(ids)}
    ref_tokens, ref_logits = slow_multi_cut_generate(model, merged_embeds(model, batch), kept, STEPS, renumber=False)
    assert gen.sequences[0, -STEPS:].tolist() == ref_tokens
    torch.testing.assert_close(gen.logits[0], ref_logits, atol=1e-5, rtol=0)
