"""CDPruner (spec §4.8): the greedy against a brute-force log-det maximisation (float64), d^2 products against
det(L_Y), the relevance sign, duplicates, the whole kernel against rows on demand, and the CLIP path end to end
with a tiny random CLIP model built here (offline), per image also inside a batch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune.errors import ConfigError, PruneError
from vtprune.methods.cdpruner import dpp_greedy, normalised_relevance

from ..conftest import collate, make_prompt
from ..helpers import image_positions, kept_batched_and_alone, merged_embeds


def brute_force_logdet(x: torch.Tensor, r: torch.Tensor, k: int) -> list[int]:
    """argmax_j log det L_{Y+j} step by step, L = diag(r) x x^T diag(r), float64 (ties: lower index)."""
    L = (r[:, None] * (x @ x.T) * r[None]).double()
    picks: list[int] = []
    for _ in range(k):
        best, arg = -float("inf"), None
        for j in range(x.shape[0]):
            if j in picks:
                continue
            sign, logdet = torch.linalg.slogdet(L[picks + [j]][:, picks + [j]])
            value = float(logdet) if sign > 0 else -float("inf")
            if value > best:
                best, arg = value, j
        picks.append(arg)
    return picks


def _inputs(seed, n=24, d=12, m=3):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    u, t = torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(m, 8, generator=g, dtype=torch.float64)
    cos = (u / u.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    rho = -cos.mean(1)  # official sign
    r = (rho - rho.min() + 1e-6) / (rho.max() - rho.min())
    return x, u, t, r, cos.mean(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_picks_equal_brute_force_logdet_and_d2_product_is_det(seed):
    x, u, t, r, _ = _inputs(seed)
    picks, d2 = dpp_greedy(x, r, 8)
    assert picks.tolist() == brute_force_logdet(x, r, 8)
    assert int(picks[0]) == int(r.argmax())
    L = r[:, None] * (x @ x.T) * r[None]
    det = torch.linalg.det(L[picks][:, picks])
    torch.testing.assert_close(d2.prod(), det, rtol=1e-6, atol=0)
    torch.testing.assert_close(normalised_relevance(u, t, True), r)


@pytest.mark.parametrize("negate", [True, False])
def test_sign_decides_the_first_pick(negate):
    x, u, t, _, mean_cos = _inputs(4)
    picks, _ = dpp_greedy(x, normalised_relevance(u, t, negate), 3)
    assert int(picks[0]) == int(mean_cos.argmin() if negate else mean_cos.argmax())


def test_a_duplicate_is_never_picked_after_its_twin_while_others_remain():
    x, _, _, r, _ = _inputs(5, n=12, d=16)
    r = 0.5 + r / 2  # every token relevant (the min-max floor token has d^2 ~ 1e-12, i.e. none)
    x[7], r[7] = x[3], r[3]  # token 7 is token 3's twin
    picks, d2 = dpp_greedy(x, r, 11)  # 11 distinct directions: all of them before the twin
    assert len({3, 7} & set(picks.tolist())) == 1 and len(set(picks.tolist())) == 11
    assert torch.isfinite(d2).all() and bool((d2 > 0).all())


def test_rows_on_demand_give_the_same_picks_and_rank_exhaustion_is_guarded():
    x, _, _, r, _ = _inputs(6, n=40, d=48)
    assert dpp_greedy(x.float(), r.float(), 15, full_max=0)[0].tolist() == dpp_greedy(x.float(), r.float(), 15)[0].tolist()
    low = F.normalize(torch.randn(10, 2, dtype=torch.float64) @ torch.randn(2, 8, dtype=torch.float64), dim=-1)
    picks, d2 = dpp_greedy(low, r[:10], 6)  # rank 2: only two positive d^2, the rest by relevance
    assert len(set(picks.tolist())) == 6 and torch.isfinite(d2).all()
    rest = picks[2:].tolist()
    assert rest == sorted(rest, key=lambda j: (-float(r[j]), j))


# --- the CLIP path on the tiny LLaVA, with a tiny random CLIP built here ------------------------------------------

def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (vision width 32 = the tiny LLaVA's projector input) and a byte-level CLIP
    tokenizer with no merges, saved as a local checkpoint directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-clip")
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                                      eos_token_id=len(vocab) - 1, pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=4), projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    return str(path)


def _expected(model, batch, sample, clip_dir, text, keep):
    """Spec §4.2-4.3 from the model's pieces and the CLIP checkpoint, float64 brute force."""
    from transformers import AutoTokenizer, CLIPModel

    clip, tok = CLIPModel.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"][sample:sample + 1], output_hidden_states=True)
        patches = hidden.hidden_states[-2][0, 1:]  # the feature layer, CLS dropped
        u = clip.visual_projection(clip.vision_model.post_layernorm(patches)).double()
        ids = tok(text).input_ids
        ids = torch.tensor(ids + [0] * (-len(ids) % 77)).reshape(-1, 77)
        t = clip.text_projection(clip.text_model(input_ids=ids).pooler_output).double()
        embeds = merged_embeds(model, batch)[sample]
    x = F.normalize(embeds[image_positions(batch["input_ids"][sample], model.config.image_token_id)].double(), dim=-1)
    rho = -(F.normalize(u, dim=-1) @ F.normalize(t, dim=-1).T).mean(1)
    r = (rho - rho.min() + 1e-6) / (rho.max() - rho.min())
    return sorted(brute_force_logdet(x, r, keep))


def test_clip_relevance_end_to_end_equals_the_reference(models, clip_dir):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 0)])
    text = "what color is the cat?"
    with vtprune.pruned(model, "cdpruner", keep=6, clip=clip_dir, instruction=text + " Answer the question using "
                        "a single word or phrase."), torch.no_grad():
        model(**batch)
        kept = model.vtprune.stats.images[0].kept_index
    assert kept == _expected(model, batch, 0, clip_dir, text, 6)


def test_batch_with_prompt_instructions_equals_each_alone(models, clip_dir):
    """Instructions decoded from each prompt (tokenizer=), relevance normalised per image, not over the batch."""
    from transformers import AutoTokenizer

    model = models("llava")
    prompts = [make_prompt(model, "llava", 3 + 4 * i, i) for i in range(3)]
    tok = AutoTokenizer.from_pretrained(clip_dir)
    with vtprune.pruned(model, "cdpruner", keep=6, clip=clip_dir, tokenizer=clip_dir):
        batched, single = kept_batched_and_alone(model, (collate(prompts), [collate([p]) for p in prompts]))
    assert batched == single
    text = " ".join(tok.decode(prompts[2].input_ids[-3:].tolist(), skip_special_tokens=True).split())
    assert batched[2] == _expected(model, collate([prompts[2]]), 0, clip_dir, text, 6)


def test_missing_clip_weights_are_a_clear_error_and_the_model_stays_unpruned(models, tmp_path):
    model = models("llava")
    with pytest.raises(ConfigError, match="clip=<a local CLIP checkpoint directory>"):
        vtprune.prune(model, "cdpruner", keep=8)
    with pytest.raises(ConfigError, match="could not load the CLIP weights"):
        vtprune.prune(model, "cdpruner", keep=8, clip=str(tmp_path))
    assert not hasattr(model, "vtprune")


def test_clip_relevance_on_a_tower_of_another_width_names_the_fix(models, clip_dir):
    model = models("internvl")
    with vtprune.pruned(model, "cdpruner", keep=8, clip=clip_dir, instruction="a cat"):
        with pytest.raises(PruneError, match="relevance='llm'"), torch.no_grad():
            model(**collate([make_prompt(model, "internvl", 5, 0)]))


def test_llm_relevance_equals_the_reference(models):
    """relevance='llm': instruction rows of the input embeddings vs projector outputs, not negated (Qwen ports)."""
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 1)])
    ids = batch["input_ids"][0]
    img = image_positions(ids, model.config.image_token_id)
    with torch.no_grad():
        x = merged_embeds(model, batch)[0][img].double()
        t = model.get_input_embeddings()(ids[int(img[-1]) + 1:]).double()
    rho = (F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T).mean(1)
    r = (rho - rho.min() + 1e-6) / (rho.max() - rho.min())
    with vtprune.pruned(model, "cdpruner", keep=7, relevance="llm"), torch.no_grad():
        model(**batch)
        kept = model.vtprune.stats.images[0].kept_index
    assert kept == sorted(brute_force_logdet(F.normalize(x, dim=-1), r, 7))
