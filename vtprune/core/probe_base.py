"""The probe protocol (:class:`Probe`), the views a probe's record is sliced with (:class:`CropSlice` at a
vision-stage cut, :class:`ImageSlice` at an LLM-side cut), and the layer checks and attention math the vision and
LLM probes share. The probes themselves: :mod:`.vision_probes`, :mod:`.llm_probes` (all re-exported by
:mod:`.probes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PruneError
from .layout import slots_of

QUERY_SETS = ("last", "instruction")


@dataclass(frozen=True)
class CropSlice:
    """A vision-stage cut's view of one crop: ``n`` current patches, probe rows recorded in [since, until)."""

    crop: int
    n: int
    since: int
    until: int


@dataclass(frozen=True)
class ImageSlice:
    """An LLM-side cut's view of one image: its span, the forward, the adapter and its current tokens."""

    span: Any
    forward: Any
    adapter: Any
    index: torch.Tensor  # [n] original indices of the image's current tokens

    def crops(self) -> slice:
        first, n = self.forward.crop_ranges(self.adapter)[self.span.image]
        return slice(first, first + n)

    def sources(self, device) -> torch.Tensor:
        """[N, S] positions in this image's vision sequences feeding each token (-1 pads)."""
        return self.adapter.token_sources(self.forward.source(self.span), self.forward.image_sizes).to(device)

    def to_tokens(self, per_position: torch.Tensor) -> torch.Tensor:
        """[crops * S] values per vision position -> [N] per token, summed over the positions feeding it."""
        src = self.sources(per_position.device)
        return (per_position[src.clamp(min=0)] * (src >= 0)).sum(1)

    def rows(self, record_layout) -> torch.Tensor:
        """[n] slots of the current tokens in the layout a record was made in."""
        return slots_of(record_layout, self.span.image, self.index)

    def token_grid(self) -> torch.Tensor:
        """[N, 3] (grid, row, col) of every token of the image (adapter geometry)."""
        return self.adapter.token_grid(self.forward.source(self.span), self.forward.image_sizes)

    def from_patches(self, per_patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[crops, P] per vision patch (CLS excluded) -> ([N] summed over each token's patches, [N] bool: the token
        has patches; newline tokens have none)."""
        seq = self.adapter.vision_seq_len
        per_position = per_patch.new_zeros(per_patch.shape[0], seq)
        per_position[:, seq - per_patch.shape[1]:] = per_patch
        src = self.sources(per_patch.device)
        return self.to_tokens(per_position.reshape(-1)), (src >= 0).any(1)


class Probe:
    """Base: ``scope`` is "vision" or "llm"; ``attach`` installs the recorders; ``for_crop`` / ``for_image`` slice
    a record for a vision-stage or an LLM-side cut."""

    scope: ClassVar[str] = "llm"

    def check(self, info) -> None:
        """Raise PruneError when a layer does not exist in the model (``info``: ModelInfo)."""

    def attach(self, host) -> None:
        raise NotImplementedError

    def for_crop(self, record, where: CropSlice):
        raise PruneError(f"vtprune: probe {self} has no per-crop view (vision-stage cuts); use it at an LLM-side cut")

    def for_image(self, record, where: ImageSlice):
        raise PruneError(f"vtprune: probe {self} has no per-image view; use it at a vision-stage cut")

    def for_batch(self, record, where: ImageSlice):
        raise PruneError(f"vtprune: probe {self} has no batch-level view")


def _check_vision(probe, layers, info) -> None:
    bad = [j for j in layers if not 0 <= j < info.vision_layers]
    if bad:
        raise PruneError(f"vtprune: {probe} observes vision layer {bad[0]}; the tower has 0..{info.vision_layers - 1}")


def _check_llm(probe, layer, info) -> None:
    if not 0 <= layer < info.llm_layers:
        raise PruneError(f"vtprune: {probe} observes LLM layer {layer}; the model has layers 0..{info.llm_layers - 1}")


def _masked_logits(logits: torch.Tensor, mask, rows: slice, keys: int, causal: bool = False) -> torch.Tensor:
    """Apply the model's mask to the logits of query ``rows``; with no mask, a causal layer (the LLM: SDPA's
    ``is_causal`` path passes None) still hides later keys from each row."""
    if isinstance(mask, torch.Tensor):
        m = mask[:, :, rows, :keys]
        return logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    if causal:  # the rows are the last queries of a prefill: row r is query keys - rows + r
        first = keys - logits.shape[-2]
        later = torch.arange(keys, device=logits.device)[None] > torch.arange(first, keys, device=logits.device)[:, None]
        return logits.masked_fill(later, float("-inf"))
    return logits


def _scaling(query: torch.Tensor, kwargs: dict) -> float:
    return kwargs.get("scaling") or query.shape[-1] ** -0.5
