"""The two references ``vtprune perf`` times a pruning method against.

**Oracle** (:func:`oracle`): the same model fed the already-pruned sequence. The vision tower and projector
run as usual; a pre-hook on the language model swaps its input for the prompt with only the chosen visual
tokens (one ``index_select``), so the LLM never sees the dropped tokens and nothing is scored. That is the
floor any pre-LLM pruner can reach at that budget. Decode steps continue on its short cache with explicit
masks and positions. Batch 1 only (``vtprune perf`` times single prompts).

**Schedule oracle** (:class:`Replay`): a method that cuts where a recorded run of another method cut and
keeps exactly what it kept (its LLM-side cuts: the LLM input and LLM layers), through the same session
machinery, with no probes and no scoring. Method minus replay is the method's scoring cost; for methods
that cut inside the LLM (FastV, TransPrune, ...) it is the fair floor of their own token schedule. Vision-
tower cuts are not replayed: the replay runs the full vision tower and cuts its survivors at the LLM input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import compat
from ..adapters import get_adapter
from ..adapters.base import find_runs
from ..core.stats import PruneStats
from ..methods.base import Cut, ImageView, Method, Selection

__all__ = ["even_keep", "oracle_rows", "oracle", "Replay", "replay_of"]


def even_keep(n_tokens: int, keep: int) -> torch.Tensor:
    """[keep] evenly spaced indices into an image's ``n_tokens`` visual tokens (which ones does not change the
    cost; a method's own kept set can be passed to :func:`oracle` instead)."""
    keep = max(0, min(int(keep), int(n_tokens)))
    return torch.linspace(0, n_tokens - 1, keep).round().long().unique() if keep else torch.zeros(0, dtype=torch.long)


def oracle_rows(model, input_ids: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """[n] sequence positions the oracle keeps of one prompt (``input_ids`` [1, T]): every text token and, for
    image i (in prompt order), its tokens ``kept[i]`` (indices 0..N_i-1 into that image's span)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"oracle: one prompt at a time (input_ids [1, T]), got shape {tuple(input_ids.shape)}")
    adapter = get_adapter(model)
    runs = find_runs(input_ids[0], adapter.image_token_id)
    if len(runs) != len(kept):
        raise ValueError(f"oracle: the prompt has {len(runs)} image(s) but kept sets were given for {len(kept)}")
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
    for (start, length), index in zip(runs, kept):
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= length):
            raise ValueError(f"oracle: kept indices must lie in [0, {length}) for an image of {length} tokens")
        keep[start:start + length] = False
        keep[start + index] = True
    return keep.nonzero().flatten()


@dataclass
class _OracleInput:
    """Per-run state of the oracle hook: the rows it keeps and the positions it gives them."""

    rows: torch.Tensor  # [n] sequence positions kept
    positions: torch.Tensor  # [n] their position ids
    length: int  # T, the unpruned prompt length
    adapter: object = None

    def prefill(self, kwargs: dict) -> dict:
        embeds = kwargs["inputs_embeds"]
        rows = self.rows.to(embeds.device)
        kwargs["inputs_embeds"] = embeds.index_select(1, rows)
        given = kwargs.get("position_ids")
        if _multimodal_rope(given, self):  # Qwen-VL's [3|4, 1, T]: the kept columns (original positions)
            kwargs["position_ids"] = given.index_select(-1, rows)
            deepstack = self.adapter.take_deepstack(kwargs)
            if deepstack is not None:  # Qwen3-VL: the kept visual tokens' own DeepStack rows
                mask, feats = deepstack
                kept = mask[0, rows].bool()
                index = (mask[0].long().cumsum(0) - 1)[rows][kept]
                kwargs["visual_pos_masks"] = mask[:, rows]
                kwargs["deepstack_visual_embeds"] = [f[index] for f in feats]
            kwargs["attention_mask"] = torch.ones(1, rows.numel(), dtype=torch.long, device=embeds.device)
            return kwargs
        kwargs["position_ids"] = self.positions.to(embeds.device)[None]
        # an explicit mask: position gaps would otherwise read as packed sequences
        kwargs["attention_mask"] = torch.ones(1, rows.numel(), dtype=torch.long, device=embeds.device)
        return kwargs

    def decode(self, kwargs: dict, cached: int) -> dict:
        embeds = kwargs["inputs_embeds"]
        q, step = embeds.shape[1], cached - self.rows.numel()
        if _multimodal_rope(kwargs.get("position_ids"), self):  # generate()'s original positions continue as they are
            kwargs["attention_mask"] = torch.ones(1, cached + q, dtype=torch.long, device=embeds.device)
            return kwargs
        start = int(self.positions[-1]) + 1 + step
        kwargs["position_ids"] = torch.arange(start, start + q, device=embeds.device)[None]
        kwargs["attention_mask"] = torch.ones(1, cached + q, dtype=torch.long, device=embeds.device)
        return kwargs


def _multimodal_rope(position_ids, state) -> bool:
    """Whether the language model gets multimodal-rope ids ([rows, 1, T]); the oracle keeps them original only."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 3:
        return False
    if not torch.equal(state.positions.cpu(), state.rows.cpu()):
        raise ValueError("oracle: positions='renumber' is not offered with multimodal-rope (Qwen-VL) position ids; "
                         "use positions='original'")
    return True


@contextlib.contextmanager
def oracle(model, input_ids: torch.Tensor, kept: list[torch.Tensor], positions: str = "original"):
    """Inside: ``model(...)`` / ``model.generate(...)`` on this prompt run the LLM on the pruned sequence.

    kept: per image of the prompt, the [k_i] token indices to keep (:func:`even_keep`, or a method's
    ``stats.images[i].kept_index``). positions: "original" (kept tokens keep their ids) or "renumber" (0..n-1),
    as the method being matched does."""
    if positions not in ("original", "renumber"):
        raise ValueError(f"oracle: positions must be 'original' or 'renumber', got {positions!r}")
    rows = oracle_rows(model, input_ids, kept)
    state = _OracleInput(rows, rows if positions == "original" else torch.arange(rows.numel()), input_ids.shape[1],
                         get_adapter(model))

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("oracle: the language model did not receive inputs_embeds")
        cached = compat.cache_length(compat.get_cache(kwargs), 0)
        if cached == 0:
            if embeds.shape[1] != state.length:
                raise RuntimeError(f"oracle: built for a prompt of {state.length} tokens, got {embeds.shape[1]}")
            return args, state.prefill(kwargs)
        return args, state.decode(kwargs, cached)

    handle = get_adapter(model).language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


@dataclass
class Replay(Method):
    """Cuts where a recorded run cut and keeps what it kept: the schedule oracle (:func:`replay_of`).

    schedule: one ``(Cut, positions, {(sample, image): (tokens_out, kept original indices)})`` per cut."""

    schedule: tuple = ()
    positions: str = "original"

    name: ClassVar[str] = "replay"
    description: ClassVar[str] = "Replays a recorded token schedule without scoring (the schedule oracle)."
    has_budget: ClassVar[bool] = False
    records_unchanged: ClassVar[bool] = False
    _by_cut: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        self._by_cut = {cut: (positions, kept) for cut, positions, kept in self.schedule}

    def cuts(self, model):
        return tuple(cut for cut, _, _ in self.schedule)

    def positions_at(self, cut: Cut) -> str:
        return self._by_cut[cut][0]

    def select(self, image: ImageView, n_keep) -> Selection:
        count, target = self._by_cut[image.cut][1].get((image.sample, image.image), (image.n, None))
        present = torch.isin(image.index, torch.as_tensor(target if target is not None else [], device=image.index.device))
        keep = present.nonzero().flatten()[:count]
        if keep.numel() < count:  # merged / recycled tokens recorded under a shared index: fill up to the count
            rest = (~present).nonzero().flatten()[: count - keep.numel()]
            keep = torch.sort(torch.cat([keep, rest])).values
        return Selection(keep=keep)


def replay_of(stats: PruneStats, methods: tuple[Method, ...]) -> Replay | None:
    """The :class:`Replay` of one recorded prefill (``model.vtprune.stats``) of ``methods``; None when no
    LLM-side token was cut. Vision-stage cuts become one cut at the LLM input (their survivors)."""
    by_name = {m.name: m for m in methods}
    cuts: dict[Cut, tuple[str, dict]] = {}
    for img in stats.images:
        for st in img.stages:
            cut = Cut("llm", st.layer) if st.stage == "llm" else Cut("pre_llm")
            method = by_name.get(st.method)
            positions = method.positions_at(cut) if method is not None else "original"
            entry = cuts.setdefault(cut, (positions, {}))
            entry[1][img.sample, img.image] = (st.tokens_out, st.kept_index)  # the last stage at a cut wins
    if not cuts:
        return None
    order = sorted(cuts, key=lambda c: c.order)
    return Replay(schedule=tuple((c, cuts[c][0], cuts[c][1]) for c in order))
