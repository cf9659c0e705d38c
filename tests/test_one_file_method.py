"""The "one file" promise: a method written here, outside the package, adds a probe use no shipped method has
(an FFN sublayer's output), a cut-point combination none has (the LLM input *and* an LLM layer), per-forward
state carried between its cuts, and a modulator on another layer, without touching the core. Its result is
checked against the forward written out layer by layer from the formulas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.core.probes import Sublayer
from vtprune.methods.base import Cut, Method, Selection, top_k_sorted
from vtprune.registry import register

from .conftest import build_model, collate, make_prompt
from .helpers import merged_embeds

FIRST, SECOND = 24, 10  # tokens kept at the LLM input, then before LLM layer 2


@register
@dataclass
class _NormThenFFN(Method):
    """Keep the FIRST visual tokens of largest embedding norm at the LLM input; before layer 2 keep the SECOND
    with the largest ||FFN output of layer 1|| x (that embedding norm, remembered in ``image.state``); layer 1's
    logits of visual keys get ``beta`` added."""

    beta: float = -2.0

    name: ClassVar[str] = "_test_norm_then_ffn"
    description: ClassVar[str] = "test: one-file method"
    has_budget: ClassVar[bool] = False

    def cuts(self, model):
        return (Cut("pre_llm"), Cut("llm", 2))

    def probes(self, model):
        return (Sublayer(1, "mlp"),)

    def modulated_layers(self, model):
        return (1,)

    def select(self, image, n_keep):
        if image.stage == "pre_llm":
            norm = image.embeds.float().norm(dim=-1)
            image.state["norm"] = torch.zeros(image.n_tokens).index_copy_(0, image.index, norm)
            return Selection(keep=top_k_sorted(norm, FIRST))
        ffn_out = image[Sublayer(1, "mlp")].output
        return Selection(keep=top_k_sorted(ffn_out.float().norm(dim=-1) * image.state["norm"][image.index], SECOND))

    def modulate(self, call):
        return call.run(bias=torch.where(call.visual, self.beta, 0.0)[:, None, None, :])


def _reference(eager, batch, beta):
    """(kept original visual indices, last-token logits): one sample, original positions, eager layers."""
    lm, ids = eager.model.language_model, batch["input_ids"][0]
    h = merged_embeds(eager, batch)
    img = torch.nonzero(ids == eager.config.image_token_id).flatten()
    norm = h[0, img].float().norm(dim=-1)
    first = top_k_sorted(norm, FIRST)
    keep = torch.cat([torch.nonzero(ids != eager.config.image_token_id).flatten(), img[first]]).sort().values
    visual = torch.isin(keep, img)
    h, pos = h[:, keep], keep[None]
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    ffn = {}
    handle = lm.layers[1].mlp.register_forward_hook(lambda m, a, out: ffn.setdefault("out", out))
    try:
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                if i == 2:
                    score = ffn["out"][0, visual].float().norm(dim=-1) * norm[first]
                    second = top_k_sorted(score, SECOND)
                    rows = torch.cat([torch.nonzero(~visual).flatten(), torch.nonzero(visual).flatten()[second]]).sort().values
                    h, cos, sin, pos, visual = h[:, rows], cos[:, rows], sin[:, rows], pos[:, rows], visual[rows]
                T = h.shape[1]
                mask = torch.full((T, T), float("-inf")).triu(1) + (torch.where(visual, beta, 0.0)[None] if i == 1 else 0)
                out = layer(h, attention_mask=mask[None, None], position_embeddings=(cos, sin), position_ids=pos)
                h = out[0] if isinstance(out, tuple) else out
            logits = eager.lm_head(lm.norm(h))[:, -1]
    finally:
        handle.remove()
    return first[second].tolist(), logits


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_a_method_written_in_a_test_file_runs_as_the_formulas_say(models, family):
    model = models(family)
    eager = build_model(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = collate([make_prompt(model, family, 5, 3)])
    with vtprune.pruned(model, "_test_norm_then_ffn", beta=-2.0), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        img = model.vtprune.stats.images[0]
    kept, ref_logits = _reference(eager, batch, -2.0)
    assert [(s.stage, s.tokens_out) for s in img.stages] == [("pre_llm", FIRST), ("llm", SECOND)]
    assert img.kept_index == kept
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa"
