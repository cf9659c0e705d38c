"""DivPrune (spec §3): picks against a brute-force max-min greedy written here (float64), the incremental form
against the official quadratic form (hypothesis), the official default budget, and the pruned forward against
the model run on the kept rows with contiguous positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vtprune
from vtprune.errors import ConfigError
from vtprune.methods.divprune import max_min_greedy, max_min_greedy_quadratic

from ..conftest import collate, make_prompt
from ..helpers import image_positions, merged_embeds


def brute_force_max_min(x: torch.Tensor, k: int) -> list[int]:
    """Spec §3.8 from the formula, float64: s_0 = argmax_j min_{i != j} D_ij; s_t = argmax over unpicked j of
    min_{s in S} D_sj, D = 1 - cos. Ties: lowest index."""
    x = x.double()
    n = x.shape[0]
    cos = [[float(x[i] @ x[j] / (x[i].norm() * x[j].norm())) for j in range(n)] for i in range(n)]
    dist = [[1.0 - c for c in row] for row in cos]
    isolation = [min(dist[j][i] for i in range(n) if i != j) for j in range(n)]
    picks = [max(range(n), key=lambda j: (isolation[j], -j))]
    while len(picks) < k:
        rest = [j for j in range(n) if j not in picks]
        picks.append(max(rest, key=lambda j: (min(dist[s][j] for s in picks), -j)))
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_picks_equal_the_brute_force_greedy(seed):
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert max_min_greedy(x, 9).tolist() == brute_force_max_min(x, 9)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 12), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       dup=st.booleans())
def test_incremental_equals_quadratic(n, d, frac, seed, dup):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if dup and n > 2:
        x[n // 2] = x[0]  # an exact duplicate: never both picked while a non-duplicate remains
    k = int(round(frac * n))
    assert max_min_greedy(x, k).tolist() == max_min_greedy_quadratic(x, k).tolist()


def test_blocked_nearest_neighbour_pass_gives_the_same_picks():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(5))
    assert max_min_greedy(x, 12, block=7).tolist() == max_min_greedy(x, 12).tolist()


def test_planted_clusters_keep_one_token_each():
    g = torch.Generator().manual_seed(3)
    centres = torch.linalg.qr(torch.randn(8, 6, generator=g))[0].T[:6]  # 6 orthonormal directions
    x = (centres.repeat_interleave(5, 0) + 1e-3 * torch.randn(30, 8, generator=g))[torch.randperm(30, generator=g)]
    cluster = ((x @ centres.T).argmax(1))
    picks = max_min_greedy(x, 6)
    assert sorted(cluster[picks].tolist()) == list(range(6))


def _pruned_logits(model, prompt, **fields):
    with vtprune.pruned(model, "divprune", **fields), torch.no_grad():
        logits = model(**collate([prompt])).logits
        return logits, model.vtprune.stats.images[0]


@pytest.mark.parametrize("fields,count", [({}, round(0.098 * 64)), ({"keep": 9}, 9), ({"ratio": 0.75}, 16)])
def test_kept_set_and_logits_on_the_model(models, fields, count):
    model = models("llava")
    prompt = make_prompt(model, "llava", 5, 0)
    batch = collate([prompt])
    embeds = merged_embeds(model, batch)[0]
    img = image_positions(batch["input_ids"][0], model.config.image_token_id)
    expected = sorted(brute_force_max_min(embeds[img], count))
    logits, stats = _pruned_logits(model, prompt, **fields)
    assert stats.kept_index == expected and stats.kept == count
    keep = torch.ones(embeds.shape[0], dtype=torch.bool)
    keep[img] = False
    keep[img[expected]] = True
    rows = embeds[keep][None]
    with torch.no_grad():  # renumbered: the kept rows at positions 0..L'-1
        ref = model(inputs_embeds=rows, position_ids=torch.arange(rows.shape[1])[None]).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_subset_ratio_with_another_budget_is_refused():
    with pytest.raises(ConfigError, match="subset_ratio"):
        vtprune.method("divprune", keep=16, subset_ratio=0.2)
    with pytest.raises(ConfigError, match="subset_ratio"):
        vtprune.method("divprune", subset_ratio=0.0)
