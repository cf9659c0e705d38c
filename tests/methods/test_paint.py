"""PAINT (spec §2.3-2.4) against an independent eager reference written here from the spec.

Token sets, per image, from the eager vision tower's own ``output_attentions``: c_l = head mean of
``attentions[l][crop, :, 0, 1:]`` mapped to tokens (LLaVA: token i = patch i; InternVL: the model's own
``pixel_shuffle`` applied to the per-patch values, summed over each token's 4 patches; tiles concatenated);
local = top floor(N / 4) of c_0; summary = top floor(N f) of c_feature, f = the share of tokens above
Q3 + 1.5 IQR (torch.quantile, linear); local <- local minus summary. LLM layers 2..3 (start=2, end=None, L=4):
the eager copy's attention function is replaced here, and the last query row only gets
z += alpha |z| on local columns and beta |z| on summary columns before the softmax (the new token's row in
every decode step). Nothing of vtprune is used to build it.

The tiny towers are nearly uniform (InternVL's CLS token and position embeddings are zero-initialised, so its
layer-0 CLS row is exactly uniform: every token ties). The reference tests therefore use copies whose vision
``q_proj`` is scaled up (and, InternVL, a random CLS token / position embeddings), so the sets are well
separated (every ranking decision >= 1e-5 from a tie, asserted) and the summary set is not empty; the plain
tiny LLaVA (empty summary set) is tested too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.errors import PruneError
from vtprune.methods import PAINT, FastV
from vtprune.methods.base import Method
from vtprune.methods.flowcut import FlowCut
from vtprune.registry import register

from ..conftest import FAMILIES, IMAGE_TOKEN, build_model, collate, make_prompt
from ..helpers import attention_outputs, batch_of, kept_sequence_positions, own_attention

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA, BETA = 0.7, 0.4
FEATURE = {"llava": 1, "internvl": 2}  # vision_feature_layer -2 / -1 of the 3-layer tiny towers
SHARPEN = {"llava": 20.0, "llava_next": 20.0, "internvl": 150.0}
GAP = 1e-5
STEPS = 4


def sharpen(model, family):
    """Peaky vision attention: q_proj x SHARPEN; InternVL also gets a random CLS token and position embeddings."""
    g = torch.Generator().manual_seed(7)
    tower = model.model.vision_tower
    with torch.no_grad():
        for name, module in tower.named_modules():
            if name.endswith("q_proj"):
                module.weight.mul_(SHARPEN[family])
                if module.bias is not None:
                    module.bias.mul_(SHARPEN[family])
        if family == "internvl":
            emb = tower.embeddings
            emb.cls_token.copy_(torch.randn(emb.cls_token.shape, generator=g))
            emb.position_embeddings.copy_(torch.randn(emb.position_embeddings.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def sharp():
    """``get(family)``: (SDPA model, eager copy) with the sharpened vision tower (built here, never shared)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = sharpen(build_model(family), family)
            eager = build_model(family, attn="eager")
            eager.load_state_dict(model.state_dict())
            cache[family] = model, eager
        return cache[family]

    return get


# --- the independent reference -------------------------------------------------------------------------------
def cls_per_token(eager, family, attentions, layer) -> torch.Tensor:
    """[crops, tokens per crop] head-mean CLS attention of vision layer ``layer``, summed over each token's patches."""
    c = attentions[layer][:, :, 0, 1:].float().mean(1)  # [crops, P]
    if family == "internvl":
        side = int(round(c.shape[1] ** 0.5))
        shuffled = eager.model.pixel_shuffle(c.reshape(c.shape[0], side, side, 1),
                                             scale_factor=eager.config.downsample_ratio)
        c = shuffled.reshape(c.shape[0], -1, shuffled.shape[-1]).sum(-1)  # the 4 patches feeding each token
    return c


@dataclass
class Sets:
    positions: torch.Tensor  # [N] sequence positions of the image's tokens
    local: list[int]
    summary: list[int]
    overlap: int  # tokens of the top local set that were summary tokens (removed from local)


def paint_sets(eager, family, batch, local_ratio=0.25) -> list[Sets]:
    """One image per sample: its sets, from the eager tower's attentions (spec §2.3)."""
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values=batch["pixel_values"], output_attentions=True).attentions
    early, late = cls_per_token(eager, family, att, 0), cls_per_token(eager, family, att, FEATURE[family])
    per_crop = early.shape[1]
    out, crop = [], 0
    for b in range(batch["input_ids"].shape[0]):
        pos = torch.nonzero(batch["input_ids"][b] == IMAGE_TOKEN).flatten()
        crops = pos.numel() // per_crop
        e, l = early[crop:crop + crops].reshape(-1), late[crop:crop + crops].reshape(-1)
        crop += crops
        n = e.numel()
        k = math.floor(n * local_ratio)
        ranked = e.sort(descending=True).values
        assert ranked[k - 1] - ranked[k] > GAP, "local set is at a tie"
        q1, q3 = torch.quantile(l, torch.tensor([0.25, 0.75]))
        bar = q3 + 1.5 * (q3 - q1)
        assert ((l - bar).abs() > GAP).all(), "a token is at the outlier bar"
        share = int((l > bar).sum()) / n
        top = set(torch.topk(e, k).indices.tolist())
        summary = set(torch.topk(l, math.floor(n * share)).indices.tolist())
        out.append(Sets(pos, sorted(top - summary), sorted(summary), len(top & summary)))
    return out


def paint_reference(eager, family, batch, alpha=ALPHA, beta=BETA, start=2, steps=STEPS, probs=None):
    """(prefill last-token logits, greedy tokens [B, steps], scores [B, steps, V]) of PAINT on the eager copy.
    ``probs``: a dict filled with {layer: [B, H, Q, T] probabilities of the prefill} (the last row boosted)."""
    sets = paint_sets(eager, family, batch)
    B, T0 = batch["input_ids"].shape
    gain0 = torch.zeros(B, T0)
    for b, s in enumerate(sets):
        gain0[b, s.positions[s.local]] = alpha
        gain0[b, s.positions[s.summary]] = beta
    L = eager.config.text_config.num_hidden_layers

    def attention(module, q, k, v, mask, scaling):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
        Q, T = q.shape[2], k.shape[2]
        z = (q.float() @ k.transpose(-1, -2)) * scaling
        z = z + mask[..., :T].float() if mask is not None else z.masked_fill(
            ~torch.ones(Q, T, dtype=torch.bool).tril(T - Q), float("-inf"))
        if start <= module.layer_idx < L:
            gain = torch.cat([gain0, gain0.new_zeros(B, T - T0)], 1)  # generated tokens are text
            last = z[:, :, -1]
            z = z.clone()
            z[:, :, -1] = last + gain[:, None] * last.abs()
        A = z.softmax(-1)
        if probs is not None and Q > 1:
            probs[module.layer_idx] = A
        return (A @ v).to(q.dtype).transpose(1, 2).contiguous(), A

    with own_attention(eager, attention), torch.no_grad():
        logits = eager(**batch).logits[:, -1]
        if probs is not None:
            return logits, None, None, sets
        out = eager.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return logits, out.sequences[:, T0:], torch.stack(out.scores, 1), sets


def run(model, batch, method, steps=STEPS):
    """(prefill last-token logits, greedy tokens, scores, stats) under ``method``."""
    with vtprune.pruned(model, method), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        stats = model.vtprune.stats
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return logits, out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.scores, 1), stats


# --- 4. against the reference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("seeds", [(1,), (0, 1)], ids=["batch1", "padded-batch2"])
def test_paint_logits_and_generate_equal_the_eager_reference(sharp, family, seeds):
    model, eager = sharp(family)
    batch = batch_of(model, family, seeds)
    ref_logits, ref_tokens, ref_scores, sets = paint_reference(eager, family, batch)
    assert all(s.summary for s in sets)  # both streams are exercised
    logits, tokens, scores, _ = run(model, batch, PAINT(alpha=ALPHA, beta=BETA))
    with torch.no_grad():
        vanilla = model(**batch).logits[:, -1]
    assert (logits - vanilla).abs().max() > 1e-3
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)  # decode steps boost the new row


def test_local_minus_summary(sharp):
    """The sharpened LLaVA has prompts whose top-local tokens include summary tokens: they get beta, not alpha
    (the logits test above would fail otherwise); here the overlap is asserted to exist."""
    model, eager = sharp("llava")
    sets = paint_sets(eager, "llava", batch_of(model, "llava", (1, 2, 3)))
    assert any(s.overlap for s in sets)
    for s in sets:
        assert not set(s.local) & set(s.summary) and len(s.local) + s.overlap == 64 // 4


def test_plain_tiny_llava_has_an_empty_summary_set(models):
    """On the unmodified tiny LLaVA (nearly uniform CLS attention) this prompt has no outlier: summary = {},
    only the local boost acts, and PAINT still equals the reference (beta has no effect)."""
    model = models("llava")
    eager = build_model("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = batch_of(model, "llava", (1,))
    ref_logits, ref_tokens, _, sets = paint_reference(eager, "llava", batch, steps=2)
    assert sets[0].summary == [] and len(sets[0].local) == 16
    logits, tokens, _, _ = run(model, batch, PAINT(alpha=ALPHA, beta=BETA), steps=2)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == ref_tokens.tolist()
    other, _, _, _ = run(model, batch, PAINT(alpha=ALPHA, beta=0.9), steps=1)
    assert torch.equal(other, logits)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_output_attentions_under_eager_returns_every_layer_with_the_boosted_probabilities(sharp, family):
    """Issue 23 item 1: modulated layers are not dropped from ``out.attentions``; ``attentions[i]`` is layer i's
    probabilities, the last row boosted where PAINT modulates (the reference's A)."""
    _, eager = sharp(family)
    batch = batch_of(eager, family, (0, 1))
    ref = {}
    paint_reference(eager, family, batch, probs=ref)
    layers = eager.config.text_config.num_hidden_layers
    with torch.no_grad():
        plain = eager(**batch, output_attentions=True).attentions
        with vtprune.pruned(eager, PAINT(alpha=ALPHA, beta=BETA)):
            got = eager(**batch, output_attentions=True).attentions
    assert len(plain) == len(got) == len(ref) == layers
    for layer in range(layers):
        torch.testing.assert_close(got[layer], ref[layer], atol=1e-5, rtol=1e-4)
    for layer in range(2):  # before start: the model's own
        assert torch.equal(got[layer], plain[layer])
    assert (got[2][:, :, -1] - plain[2][:, :, -1]).abs().amax() > 1e-3  # the boosted row, not the plain one


# --- 5. the model's own rows, pipelines ----------------------------------------------------------------------
def test_alpha_beta_zero_is_vanilla(sharp):
    model, _ = sharp("llava")
    batch = batch_of(model, "llava", (0, 1))
    with torch.no_grad():
        vanilla = model(**batch).logits
        with vtprune.pruned(model, PAINT(alpha=0.0, beta=0.0)):
            same = model(**batch).logits
    assert torch.equal(vanilla, same)


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("seeds", [(1,), (0, 1)], ids=["batch1", "padded-batch2"])
def test_rows_but_the_last_are_bit_identical(sharp, family, seeds):
    model, _ = sharp(family)
    batch = batch_of(model, family, seeds)
    plain = attention_outputs(model, batch)
    mod = attention_outputs(model, batch, PAINT(alpha=ALPHA, beta=BETA))
    assert torch.equal(plain[0], mod[0]) and torch.equal(plain[1], mod[1])  # before start
    assert torch.equal(plain[2][:, :-1], mod[2][:, :-1])  # every row but the last query's: the model's own
    assert (plain[2][:, -1] != mod[2][:, -1]).any(-1).all()  # the last row changed in every head of every sample


CALLS: list[dict] = []


@register
@dataclass
class _PaintBias(Method):
    """Test-only modulator listed after PAINT on layers 2..3: records the mask PAINT's boosted call passes on
    (PAINT's bias is in it), with the query / key it goes with; changes nothing."""

    name: ClassVar[str] = "_test_paint_bias"
    description: ClassVar[str] = "test: capture PAINT's bias"
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return (2, 3)

    def modulate(self, call):
        m = call.mask
        if isinstance(m, torch.Tensor) and m.is_floating_point() and bool((m[..., -1, :] > 0).any()):
            CALLS.append(dict(layer=call.layer, mask=m.float(), query=call.query, key=call.key,
                              scaling=call.module.scaling))
        return None


def boosts(entry) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, H, T] bias on the last row, [B, H, T] its gain bias / |z|, z recomputed from the call's q / k)."""
    q, k = entry["query"][:, :, -1:].float(), entry["key"].float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    z = (q @ k.transpose(-1, -2))[:, :, 0] * entry["scaling"]
    bias = entry["mask"][..., -1, :].expand_as(z).clamp_min(0.0)
    return bias, bias / z.abs()


def boosted_columns(entry) -> list[dict[int, float]]:
    """Per sample: {key slot: gain} of the boosted columns (the same in every head)."""
    bias, gain = boosts(entry)
    out = []
    for b in range(bias.shape[0]):
        cols = torch.nonzero((bias[b] > 0).all(0)).flatten()
        assert torch.equal((bias[b] > 0).any(0), (bias[b] > 0).all(0))  # every head boosts the same columns
        out.append({int(c): round(float(gain[b, :, c].mean()), 4) for c in cols})
        torch.testing.assert_close(gain[b, :, cols], gain[b, :1, cols].expand(gain.shape[1], -1), atol=1e-4, rtol=0)
    return out


def sets_from_run(model, batch) -> list[tuple[list[int], list[int]]]:
    """(local, summary) token indices PAINT boosts, read off its bias at layer 2 of an uncut prefill."""
    CALLS.clear()
    with vtprune.pruned(model, [PAINT(alpha=ALPHA, beta=BETA), _PaintBias()]), torch.no_grad():
        model(**batch)
    entry = next(c for c in CALLS if c["layer"] == 2)
    out = []
    for b, cols in enumerate(boosted_columns(entry)):
        pos = torch.nonzero(batch["input_ids"][b] == IMAGE_TOKEN).flatten().tolist()
        assert set(cols) <= set(pos)  # only the image's columns
        out.append(([pos.index(c) for c, g in cols.items() if g == ALPHA],
                    [pos.index(c) for c, g in cols.items() if g == BETA]))
        assert len(out[-1][0]) + len(out[-1][1]) == len(cols)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_then_paint_batched_boosts_the_kept_tokens_of_each_set(sharp, family):
    model, eager = sharp(family)
    prompts = [make_prompt(model, family, 3 + 4 * s, s) for s in (0, 1)]
    batch = collate(prompts)
    sets = sets_from_run(model, batch)  # what PAINT boosts without a cut
    if family in FEATURE:  # and it is the spec's sets, recomputed here
        assert sets == [(s.local, s.summary) for s in paint_sets(eager, family, batch)]
    assert any(summary for _, summary in sets)
    pipeline = [FastV(ratio=0.5), PAINT(alpha=ALPHA, beta=BETA), _PaintBias()]

    logits, tokens, scores, stats = run(model, batch, pipeline)
    for b, prompt in enumerate(prompts):  # batch of 2 == each alone
        alone_logits, alone_tokens, alone_scores, _ = run(model, collate([prompt]), pipeline)
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(scores[b], alone_scores[0], atol=1e-4, rtol=1e-4)

    CALLS.clear()
    with vtprune.pruned(model, pipeline), torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        stats = model.vtprune.stats
    ids = batch["input_ids"]
    images = sorted(stats.images, key=lambda i: i.sample)
    assert [i.sample for i in images] == [0, 1] and all(i.kept < i.n_tokens for i in images)  # FastV did cut
    seqs = [kept_sequence_positions(ids[b], IMAGE_TOKEN, [img.kept_index], [img.n_tokens], batch["attention_mask"][b])
            for b, img in enumerate(images)]
    T = max(s.numel() for s in seqs)  # the prompt after the cut (padding dropped, left-padded again, right-aligned)
    expected = []
    for b, (img, seq) in enumerate(zip(images, seqs)):
        pos = torch.nonzero(ids[b] == IMAGE_TOKEN).flatten()
        slot = {int(p): T - seq.numel() + i for i, p in enumerate(seq.tolist())}
        local, summary = sets[b]
        kept = set(img.kept_index)
        want = {slot[int(pos[t])]: ALPHA for t in local if t in kept}
        want.update({slot[int(pos[t])]: BETA for t in summary if t in kept})
        assert want and set(local) - kept  # some boosted tokens were cut, some kept
        expected.append(want)
    seen = [(c["layer"], c["query"].shape[2]) for c in CALLS]
    assert seen == [(2, T), (3, T), (2, 1), (3, 1)]  # the prefill's boosted calls, then each decode step's
    for entry in CALLS:
        assert boosted_columns(entry) == expected  # the kept tokens of each set, at their slots after the cut


def test_flowcut_then_paint_is_refused(models):
    model = models("llava")
    with pytest.raises(PruneError, match="full patch grid"):
        vtprune.prune(model, [FlowCut(keep=8, shared_prune_count=False), PAINT()])
    assert not hasattr(model, "vtprune")
    assert not any("_vtprune_attention" in m.__dict__ for m in model.modules())
