"""The method base class, modelled on kvpress "presses".

A method is a dataclass whose fields are its hyperparameters (paper defaults) plus one budget knob
(``ratio``: fraction of each image's visual tokens removed, or ``keep``: tokens kept per image). It declares
*where* it cuts (``stage``) and writes ``score()``; the base turns scores and the budget into sorted keep
indices. Methods that merge or re-order tokens override ``select()`` instead. Model facts never appear here:
a method sees one image at a time through an :class:`ImageView`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..budget import tokens_to_keep, validate_budget

STAGES = ("vision", "pre_llm", "llm", "attention")
POSITION_MODES = ("original", "renumber")


@dataclass
class VisionView:
    """What the vision tower saw for one image, mapped onto that image's N LLM-side tokens.

    cls_attention: [N] attention the CLS query gives each token at the feature layer, summed over heads
        (and over the vision patches pooled into one token). keys: [N, d] head-averaged keys of that layer.
    pre_projector: [N, D_in] projector inputs (None where a token has none, e.g. newline tokens).
    cls_pre_projector: [D_in] the CLS vector in projector-input space, when the model allows it.
    project: maps [k, D_in] projector inputs to [k, D] LLM embeddings.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    pre_projector: torch.Tensor | None
    cls_pre_projector: torch.Tensor | None
    project: Callable[[torch.Tensor], torch.Tensor] | None
    layer_cls: dict[int, torch.Tensor] | None = None  # vision layer -> [N] head-mean CLS->patch attention


@dataclass
class ImageView:
    """One image as a method sees it at a cut.

    n_tokens: N, the image's token count before any pruning. index: [n] original indices (0..N-1) of the
    tokens still present (sorted). embeds: [n, D] their current hidden states (LLM input embeddings before
    the LLM, layer input inside it). attention: [H, n] attention from the last prompt token at the scoring
    layer (``llm`` stage only). vision: lazily computed :class:`VisionView` (methods that declare
    ``needs_vision``).
    """

    sample: int
    image: int
    index_in_sample: int
    n_tokens: int
    index: torch.Tensor
    embeds: torch.Tensor
    stage: str
    layer: int | None = None
    attention: torch.Tensor | None = None
    _vision: Callable[[], VisionView] | None = None
    observations: list | None = None  # vision stage: [(layer, cls_row [H, n+1], values [H, n+1, d] | None)]
    state: dict | None = None  # vision stage: per-crop scratch space kept across the cuts of one forward
    qkv: dict | None = None  # llm stage, "qkv_last" rows: q_last [H, d], v_last [H, d], keys/values [H, n, d]
    units: torch.Tensor | None = None  # vision stage: [n] id of the LLM token each patch feeds (tile-local)
    crops_in_image: int = 1  # vision stage: how many crops the image this crop belongs to has (anyres)
    patches_per_unit: int = 1  # vision stage: patches pooled into one LLM token (4 for a 2x2 pixel shuffle)
    vision_feature_layer: int | None = None  # vision stage: the layer whose output the model reads

    @property
    def n(self) -> int:
        return int(self.index.numel())

    @property
    def vision(self) -> VisionView:
        if self._vision is None:
            raise RuntimeError("vtprune: this method did not declare needs_vision=True")
        return self._vision()


@dataclass
class Selection:
    """keep: [k] sorted indices into the image's current tokens. values: optional [k, D] replacement rows
    (merging methods). sources: optional original indices to report in stats instead of ``index[keep]``."""

    keep: torch.Tensor
    values: torch.Tensor | None = None
    sources: torch.Tensor | None = None


@dataclass
class Method:
    """Base for all methods. Subclasses set ``name``, ``description``, ``stage`` and write ``score``."""

    ratio: float | None = None
    keep: int | None = None
    positions: str = "original"

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stage: ClassVar[str] = "pre_llm"
    needs_vision: ClassVar[bool] = False

    def __post_init__(self):
        validate_budget(self.ratio, self.keep)
        if self.positions not in POSITION_MODES:
            raise ValueError(f"vtprune: positions must be one of {POSITION_MODES}, got {self.positions!r}")

    # --- what the core asks ---------------------------------------------------------------------------
    @property
    def is_noop(self) -> bool:
        return self.ratio is not None and float(self.ratio) == 0.0

    def cut_layers(self) -> tuple[int, ...]:
        """LLM layer indices K before which the ``llm`` stage cuts (empty for other stages)."""
        return ()

    def vision_observe_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        """Vision layers whose CLS attention row (all heads) is recorded; with ``needs_values`` also the values."""
        return ()

    needs_values: ClassVar[bool] = False

    def select_crops(self, views: list[ImageView]) -> list[Selection]:
        """``vision`` stage: choose the patches of every crop of the batch at once (a batch-level schedule may
        need all crops). Default: each crop on its own with ``n_keep``/``select``."""
        return [self.select(v, min(self.n_keep(v, v.n_tokens), v.n)) for v in views]

    def vision_cut_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        """Vision-encoder layer indices j before which the ``vision`` stage cuts patches (CLS always stays)."""
        return ()

    def attention_rows(self) -> dict[int, str]:
        """LLM layers whose attention probabilities the method needs, with which query rows ("last")."""
        return {}

    def n_keep(self, image: ImageView, reference: int) -> int:
        return tokens_to_keep(image.n_tokens, self.ratio, self.keep, reference)

    def score(self, image: ImageView) -> torch.Tensor:
        """[n] importance of the image's current tokens; higher is kept."""
        raise NotImplementedError

    def select(self, image: ImageView, n_keep: int) -> Selection:
        """Keep the top ``n_keep`` tokens by ``score`` (ties broken by lower index), in original order."""
        scores = self.score(image).float()
        if scores.shape != (image.n,):
            raise RuntimeError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, expected ({image.n},)")
        return Selection(keep=top_k_sorted(scores, n_keep))

    def modulated_layers(self, n_layers: int) -> tuple[int, ...]:
        """LLM layers whose attention an ``attention``-stage method rewrites."""
        return ()

    def modulate(self, session, base, module, query, key, value, attention_mask, **kwargs) -> Any:
        """``attention``-stage hook around one attention call; ``base`` is the model's own attention function.
        Return its ``(output, weights)`` result, or None to leave the call alone."""
        return None

def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending. Deterministic: stable sort, lower index wins ties."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values

