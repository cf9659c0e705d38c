"""VAR (spec §1.3, paper conventions) against an independent eager reference written here from the spec.

The reference runs the eager copy of the tiny model with its own attention function replaced in every LLM layer
(post-RoPE q / k / v and the model's own mask come in; logits, fp32 softmax, the explicit probability edit and
@ v are computed here): sinks are phi(x) = max_{d in dims} |x_d| / sqrt(mean x^2 + 1e-6) > tau on the residual
stream entering each modulated layer (a forward pre-hook on the decoder layer), per sample; a (head, query) row
is selected when a_img >= min_image_mass, nonsink / a_img >= rho, the query is a text token after the sample's
last image and the layer has a visual sink; selected rows get A'[sink] = (1 - p) A[sink] and
A'[nonsink image] = A + p s A / a. Nothing of vtprune is used to build it.

The tiny models have no massive activations: ``sink_dims`` / ``tau`` are chosen (per family) so that a few tokens
per sample are sinks (visual ones and text ones), and ``rho`` / ``min_image_mass`` so that some but not all rows
are selected (asserted). Every threshold decision of the reference is checked to be far (>= 1e-4) from its
threshold, so the SDPA model and its eager copy cannot decide differently.
"""

from __future__ import annotations

import sys

import pytest
import torch

import vtprune
from vtprune.methods import VAR
from vtprune.methods.flowcut import FlowCut
from vtprune.methods.var import find_sink_dims

from ..conftest import FAMILIES, IMAGE_TOKEN, QWEN_FAMILIES, build_model, collate, make_prompt
from ..helpers import attention_outputs, batch_of, own_attention

pytestmark = pytest.mark.usefixtures("one_thread")

# per family: dims / tau giving a few sinks per sample (visual and text), rho / mass selecting some rows
CFG = {
    "llava": dict(sink_dims=(17, 31), tau=2.5),
    "internvl": dict(sink_dims=(21, 29, 50, 53), tau=2.5),
    "llava_next": dict(sink_dims=(50, 63), tau=3.0),
}
SELECT = dict(rho=0.95, min_image_mass=0.8, p=0.4, layers=(1, 2))  # p != 1 - p, rho != 1 - rho: conventions tell
MARGIN = 1e-4


def var(family, **overrides):
    return VAR(**{**CFG[family], **SELECT, **overrides})


# --- the independent reference -------------------------------------------------------------------------------
def phi(hidden, dims):
    x = hidden.float()
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return (x[..., list(dims)].abs() / rms).amax(-1)


def eager_probs(q, k, mask, scaling):
    """[B, H, Q, T] fp32 probabilities from post-RoPE q [B, H, Q, d], k [B, H, T, d] (heads repeated here)."""
    Q, T = q.shape[2], k.shape[2]
    z = (q.float() @ k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        z = z + mask[..., :T].float()
    else:
        z = z.masked_fill(~torch.ones(Q, T, dtype=torch.bool).tril(T - Q), float("-inf"))
    return z.softmax(-1)


def var_reference(eager, batch, *, sink_dims, tau, rho, min_image_mass, p, layers, steps=0, probs=None):
    """(last-token logits, {layer: what was decided at the prefill}, [what was decided in each decode step],
    greedy tokens [B, steps], scores [B, steps, V]) of VAR on ``eager``, from the spec. Sinks are found at the
    prefill; generated tokens are never sinks; in a decode step the query is the new token (after the image).
    ``probs``: a dict filled with {layer: [B, H, Q, T] probabilities of the prefill} (after VAR's edit)."""
    lm = eager.model.language_model
    ids = batch["input_ids"]
    visual = ids == IMAGE_TOKEN
    valid = batch["attention_mask"].bool()
    last_image = torch.where(visual, torch.arange(ids.shape[1]), -1).amax(1)  # [B]
    phis, info, decode = {}, {}, []

    def entering(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] > 1:  # the prefill
                phis[layer] = phi(hidden, sink_dims)
        return hook

    def attention(module, q, k, v, mask, scaling):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1).float()
        A = eager_probs(q, k, mask, scaling)
        layer = module.layer_idx
        if layer in layers:
            B, H, Q, T = A.shape
            prompt_sinks = (phis[layer] > tau) & valid  # [B, T0]
            sinks = torch.cat([prompt_sinks, prompt_sinks.new_zeros(B, T - prompt_sinks.shape[1])], 1)
            vis = torch.cat([visual, visual.new_zeros(B, T - visual.shape[1])], 1)
            sink, vis = sinks[:, None, None], vis[:, None, None]
            rest = vis & ~sink
            a_img, a, s = (A * vis).sum(-1), (A * rest).sum(-1), (A * sink).sum(-1)  # [B, H, Q]
            ratio = a / a_img
            after = (torch.arange(T - Q, T)[None] > last_image[:, None])[:, None].expand(B, H, Q)
            has_visual_sink = (prompt_sinks & visual).any(1)  # [B]
            selected = (a_img >= min_image_mass) & (ratio >= rho) & after & has_visual_sink[:, None, None]
            edited = A.clone()
            edited = torch.where(sink, (1 - p) * A, edited)
            edited = torch.where(rest, A + p * s[..., None] * A / a[..., None], edited)
            out = torch.where(selected[..., None], edited, A)
            d = dict(selected=selected, after=after, sinks=prompt_sinks, phi=phis[layer][valid], A=A, edited=out,
                     a_img=a_img, ratio=ratio, has_visual_sink=has_visual_sink)
            if Q > 1:
                info[layer] = d
            else:
                decode.append(d)
            A = out
        if probs is not None and q.shape[2] > 1:
            probs[module.layer_idx] = A
        return (A @ v).to(q.dtype).transpose(1, 2).contiguous(), A

    handles = [lm.layers[l].register_forward_pre_hook(entering(l), with_kwargs=True) for l in layers]
    try:
        with own_attention(eager, attention), torch.no_grad():
            logits = eager(**batch).logits[:, -1]
            tokens = scores = None
            if steps:  # its prefill records the same decisions again
                gen = eager.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
                tokens, scores = gen.sequences[:, ids.shape[1]:], torch.stack(gen.scores, 1)
    finally:
        for h in handles:
            h.remove()
    return logits, info, decode, tokens, scores


def assert_far_from_thresholds(decisions, tau, rho, mass):
    """Every decision of the reference is >= MARGIN from its threshold (SDPA vs eager cannot flip it)."""
    for layer, d in enumerate(decisions):
        assert ((d["phi"] - tau).abs() > MARGIN).all(), f"layer {layer}: a token's phi is at tau"
        rows = d["after"] & d["has_visual_sink"][:, None, None]
        assert ((d["a_img"][rows] - mass).abs() > MARGIN).all(), f"layer {layer}: a row's image mass is at the bar"
        ok_mass = rows & (d["a_img"] >= mass)
        assert ((d["ratio"][ok_mass] - rho).abs() > MARGIN).all(), f"layer {layer}: a row's ratio is at rho"


def vtprune_logits(model, batch, method):
    with vtprune.pruned(model, method), torch.no_grad():
        return model(**batch).logits[:, -1]


# --- 1. logits against the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("seeds", [(1,), (0, 1)], ids=["batch1", "padded-batch2"])
def test_var_logits_equal_the_eager_reference(models, eager_copy, family, seeds):
    model, eager = models(family), eager_copy(family)
    batch = batch_of(model, family, seeds)
    method = var(family)
    ref, info, decode, ref_tokens, ref_scores = var_reference(eager, batch, **CFG[family], **SELECT, steps=4)
    assert_far_from_thresholds(list(info.values()) + decode, CFG[family]["tau"], SELECT["rho"], SELECT["min_image_mass"])
    assert len(decode) == 3 * len(SELECT["layers"])  # 4 tokens: 3 decode steps
    assert any(d["selected"].any() for d in decode)  # rows of generated tokens are redistributed too
    visual = batch["input_ids"] == IMAGE_TOKEN
    for layer, d in info.items():  # the setting exercises every rule
        assert (d["sinks"] & visual).any(), f"layer {layer}: no visual sink"
        rows = d["selected"][d["after"]]
        assert rows.any() and not rows.all(), f"layer {layer}: selection is all or nothing"
        assert not (d["selected"] & ~d["after"]).any()
    assert any((d["sinks"] & ~visual).any() for d in info.values()), "no text sink anywhere"
    got = vtprune_logits(model, batch, method)
    with torch.no_grad():
        vanilla = model(**batch).logits[:, -1]
    assert (got - vanilla).abs().max() > 1e-3  # VAR changes the output...
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # ...exactly as the spec says
    tokens, scores = generate(model, batch, method)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)  # decode steps: the new token's rows


def test_a_layer_without_visual_sink_selects_nothing(models, eager_copy):
    """InternVL sample 0 has a text sink but no visual sink entering layer 1: that sample's layer 1 is untouched
    although it has image-centric rows, while sample 1 (same batch) is modulated there (this is the padded
    InternVL batch whose logits match the reference above)."""
    model, eager = models("internvl"), eager_copy("internvl")
    batch = batch_of(model, "internvl", (0, 1))
    _, info, _, _, _ = var_reference(eager, batch, **CFG["internvl"], **SELECT)
    d = info[1]
    assert d["has_visual_sink"].tolist() == [False, True] and d["sinks"][0].any()
    assert not d["selected"][0].any() and d["selected"][1].any()
    assert ((d["a_img"][0][d["after"][0]] >= SELECT["min_image_mass"])
            & (d["ratio"][0][d["after"][0]] >= SELECT["rho"])).any()  # rows that would be image-centric


def test_redistributed_rows_sum_to_one_and_move_the_sink_mass(models, eager_copy):
    model, eager = models("llava"), eager_copy("llava")
    batch = batch_of(model, "llava", (0, 1))
    _, info, _, _, _ = var_reference(eager, batch, **CFG["llava"], **SELECT)
    p = SELECT["p"]
    for d in info.values():
        sel, A, A2 = d["selected"], d["A"], d["edited"]
        rows, new = A[sel], A2[sel]  # [n, T]
        assert ((new.sum(-1) - 1).abs() < 1e-6).all()
        sink = d["sinks"][:, None, None].expand_as(A)[sel]
        vis = (batch["input_ids"] == IMAGE_TOKEN)[:, None, None].expand_as(A)[sel]
        torch.testing.assert_close(new[sink], (1 - p) * rows[sink])  # sinks keep 1 - p
        text = ~vis & ~sink
        assert torch.equal(new[text], rows[text])  # other text keys untouched
        moved = ((new - rows) * (vis & ~sink)).sum(-1)
        torch.testing.assert_close(moved, p * (rows * sink).sum(-1), atol=1e-6, rtol=1e-5)


# --- 2. the model's own rows, p = 0, batching, SDPA -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("seeds", [(1,), (0, 1)], ids=["batch1", "padded-batch2"])
def test_unselected_rows_and_layers_before_are_bit_identical(models, eager_copy, family, seeds):
    model, eager = models(family), eager_copy(family)
    batch = batch_of(model, family, seeds)
    _, info, _, _, _ = var_reference(eager, batch, **CFG[family], **SELECT)
    plain = attention_outputs(model, batch)
    mod = attention_outputs(model, batch, var(family))
    assert torch.equal(plain[0], mod[0])  # layer 0 is not modulated and sees the same input
    first = min(SELECT["layers"])
    selected = info[first]["selected"].transpose(1, 2)  # [B, q, H]
    a, b = plain[first], mod[first]
    assert torch.equal(a[~selected], b[~selected])  # every unselected (head, query) row is the model's own
    changed = (a[selected] != b[selected]).any(-1)
    assert changed.all()  # and every selected row was redistributed


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_output_attentions_under_eager_returns_every_layer_with_the_redistributed_probabilities(eager_copy, family):
    """Issue 23 item 1: modulated layers are not dropped from ``out.attentions``; ``attentions[i]`` is layer i's
    probabilities, VAR's redistributed ones (the reference's edited A) where it modulates."""
    eager = eager_copy(family)
    batch = batch_of(eager, family, (0, 1))
    ref = {}
    _, info, _, _, _ = var_reference(eager, batch, **CFG[family], **SELECT, probs=ref)
    layers = eager.config.text_config.num_hidden_layers
    with torch.no_grad():
        plain = eager(**batch, output_attentions=True).attentions
        with vtprune.pruned(eager, var(family)):
            got = eager(**batch, output_attentions=True).attentions
    assert len(plain) == len(got) == len(ref) == layers
    assert torch.equal(got[0], plain[0])  # before the first modulated layer: the model's own
    for layer in range(layers):
        torch.testing.assert_close(got[layer], ref[layer], atol=1e-5, rtol=1e-4)
    for layer in SELECT["layers"]:  # the modulated layers return their edited rows, not the plain ones
        rows = info[layer]["selected"]
        assert rows.any()
        assert (got[layer][rows] - info[layer]["A"][rows]).abs().amax() > 1e-3


def test_p_zero_is_vanilla(models):
    model = models("llava")
    batch = batch_of(model, "llava", (0, 1))
    with torch.no_grad():
        vanilla = model(**batch).logits
        with vtprune.pruned(model, var("llava", p=0.0)):
            same = model(**batch).logits
    assert torch.equal(vanilla, same)


def generate(model, batch, method, steps=4):
    """(greedy tokens [B, steps], per-step scores [B, steps, V]) under ``method``."""
    with vtprune.pruned(model, method), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.scores, 1)


def assert_batch_equals_alone(model, prompts, method):
    tokens, scores = generate(model, collate(prompts), method)
    for b, prompt in enumerate(prompts):
        alone_tokens, alone_scores = generate(model, collate([prompt]), method)
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(scores[b], alone_scores[0], atol=1e-4, rtol=1e-4)  # every decode step too


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(models, family):
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 4 * s, s) for s in (0, 1)]
    method = var(family)
    assert_batch_equals_alone(model, prompts, method)
    # and VAR acts on this family's prompts (its prefill logits differ from vanilla)
    batch = collate(prompts)
    with torch.no_grad():
        vanilla = model(**batch).logits[:, -1]
    assert (vtprune_logits(model, batch, method) - vanilla).abs().max() > 1e-3


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_var_on_qwen_with_calibrated_sink_dims_acts_and_batch_equals_alone(models, family):
    """Qwen-VL: sink dims come from the calibration (``find_sink_dims``, what ``vtprune calibrate-sinks`` runs)."""
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 4 * s, s) for s in (0, 1)]
    batch = collate(prompts)
    dims = find_sink_dims(model, [batch], tau=3.0)
    assert dims
    method = VAR(sink_dims=tuple(dims), tau=2.5, rho=0.5, min_image_mass=0.3, p=0.4, layers=(1, 2))
    assert_batch_equals_alone(model, prompts, method)
    with torch.no_grad():
        vanilla = model(**batch).logits[:, -1]
    assert (vtprune_logits(model, batch, method) - vanilla).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_var_stays_on_sdpa_and_never_calls_eager(models, family, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = models(family)
    batch = batch_of(model, family, (0, 1))
    lm = model.model.language_model
    modules = {sys.modules[type(m).__module__] for m in model.modules() if hasattr(sys.modules[type(m).__module__],
                                                                                  "eager_attention_forward")}
    assert sys.modules[type(lm.layers[0].self_attn).__module__] in modules

    def forbidden(*args, **kwargs):
        raise AssertionError("eager attention called")

    for modeling in modules:
        monkeypatch.setattr(modeling, "eager_attention_forward", forbidden)
    with vtprune.pruned(model, var(family)), torch.no_grad():
        impl = model.config.text_config._attn_implementation
        # vtprune routes the model's own implementation through its chain under a wrapped name: the base is SDPA
        assert impl in ("sdpa", "vtprune+sdpa")
        assert getattr(ALL_ATTENTION_FUNCTIONS[impl], "vtprune_base", "sdpa") == "sdpa"
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert model.config.text_config._attn_implementation == "sdpa"


# --- pipelines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_flowcut_then_var_generates_batched(models, family):
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 4 * s, s) for s in (0, 1)]
    # after the cut there are few tokens: a lower bar so that VAR has sinks and image-centric rows to act on
    pipeline = [FlowCut(keep=8, shared_prune_count=False), var(family, tau=2.0, min_image_mass=0.3, rho=0.5)]
    assert_batch_equals_alone(model, prompts, pipeline)
    batch = collate(prompts)
    with vtprune.pruned(model, pipeline), torch.no_grad():
        both = model(**batch).logits[:, -1]
        assert all(img.kept < img.n_tokens for img in model.vtprune.stats.images)  # FlowCut did cut
    with vtprune.pruned(model, pipeline[0]), torch.no_grad():
        cut_only = model(**batch).logits[:, -1]
    assert (both - cut_only).abs().max() > 1e-4  # VAR acts on the tokens FlowCut kept


# --- 3. calibration ---------------------------------------------------------------------------------------------
PLANTED = (5, 40)
CAL_TAU = 4.5  # hidden 64: two equal dominant dims give |x_d| / RMS <= sqrt(64 / 2) = 5.66; plain tokens stay < 4.2


@pytest.fixture(scope="module")
def planted():
    """(vanilla tiny LLaVA, the same weights with massive activations on PLANTED at the BOS token)."""
    plain = build_model("llava")
    model = build_model("llava")
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[1, list(PLANTED)] += 60.0  # bos_token_id = 1
    return plain, model


def prompt_batches(model, seed):
    return [collate([make_prompt(model, "llava", 3 + (seed + i) % 5, seed + i) for i in range(2 * b, 2 * b + 2)])
            for b in range(2)]


def test_find_sink_dims_finds_the_planted_dims(planted):
    plain, model = planted
    first = find_sink_dims(model, prompt_batches(model, 10), tau=CAL_TAU)
    second = find_sink_dims(model, prompt_batches(model, 50), tau=CAL_TAU)
    assert first == second == sorted(PLANTED)
    assert find_sink_dims(plain, prompt_batches(plain, 10), tau=CAL_TAU) == []


def test_find_sink_dims_sees_activations_planted_inside_the_llm(planted):
    """Massive values that appear only at the output of decoder layer 1 (first real token) are found too."""
    plain, _ = planted
    dims = (12, 33)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, 0, list(dims)] += 80.0  # one prompt per batch, no padding: token 0 is BOS
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = plain.model.language_model.layers[1].register_forward_hook(hook)
    try:
        found = find_sink_dims(plain, [collate([make_prompt(plain, "llava", 4, s)]) for s in range(3)], tau=CAL_TAU)
    finally:
        handle.remove()
    assert found == sorted(dims)


def test_find_sink_dims_ignores_padding():
    """Massive values only on the pad token's embedding: no real token of any prompt has them, so calibrating on
    left-padded batches must find nothing (it does on the same prompts unpadded)."""
    model = build_model("llava")
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[0, list(PLANTED)] += 60.0  # pad_token_id = 0
    prompts = [make_prompt(model, "llava", 3 + 6 * (s % 2), s) for s in range(4)]
    assert find_sink_dims(model, [collate([p]) for p in prompts], tau=CAL_TAU) == []
    padded = [collate(prompts[:2]), collate(prompts[2:])]
    assert all(bool((b["attention_mask"] == 0).any()) for b in padded)
    assert find_sink_dims(model, padded, tau=CAL_TAU) == []
