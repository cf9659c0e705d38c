"""Per-forward state. ``VisionRun``: one run of the vision tower; ``Forward``: one prefill (spans, the layout of
each LLM segment, probe records, per-method scratch, stats); ``Generation``: its frozen copy for decode steps.
Nothing here outlives the forward (or the ``generate()`` call) it describes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import Layout
from .stats import PruneStats


@dataclass
class CropCuts:
    """Vision-stage cuts of one run: per crop the kept patch indices (0-based, CLS excluded) and what happened."""

    index: list[torch.Tensor]
    last_cut: int = 0  # vision layer of the latest cut (probe rows recorded before it have other lengths)
    mask: torch.Tensor | None = None  # [crops, 1, K, K] additive key mask once crops keep different counts
    stages: list = field(default_factory=list)  # (method name, layer, n_in per crop, n_out per crop, kept per crop)
    keep: torch.Tensor | None = None  # [crops, S] bool: vision positions surviving, set when the tower ends


@dataclass
class VisionRun:
    """What one run of the model's ``get_image_features`` showed (generate() runs it before the prefill)."""

    pixel_values: torch.Tensor | None
    image_sizes: object
    expand: int = 1  # generate() repeats each prompt this many times after encoding (beams, return sequences)
    records: dict = field(default_factory=dict)  # vision probe -> what it recorded
    cuts: CropCuts | None = None
    state: dict = field(default_factory=dict)  # (pipeline slot, crop) -> the method's scratch for that crop
    received: dict = field(default_factory=dict)  # (pipeline slot, crop) -> patches the method first saw


@dataclass
class Forward:
    spans: list  # VisualSpan per image of the (expanded) batch
    batch: int
    length: int
    image_sizes: object
    vision: VisionRun | None = None
    vision_spans: list = field(default_factory=list)  # spans of the prompts as the vision tower saw them
    vision_image: list = field(default_factory=list)  # per span: index of its image in the vision batch
    segments: dict[int, Layout] = field(default_factory=dict)  # first LLM layer of a segment -> its layout
    records: dict = field(default_factory=dict)  # LLM probe -> what it recorded
    state: dict = field(default_factory=dict)  # (pipeline slot, image) -> the method's scratch for that image
    received: dict = field(default_factory=dict)  # (pipeline slot, image) -> tokens the method first saw
    shared: dict = field(default_factory=dict)  # pipeline slot -> the method's batch-level scratch
    stats: PruneStats | None = None
    keep_hidden_states: bool = False  # the caller asked for hidden states: never compact a tensor handed back
    deepstack: tuple | None = None  # (visual_pos_masks, rank, per-layer features) taken from the LLM (Qwen3-VL)

    @property
    def entry(self) -> Layout | None:
        """The layout entering the LLM (after the pre-LLM cuts); None before the language model started."""
        return self.segments.get(0)

    def layout_at(self, layer: int) -> Layout | None:
        return _segment(self.segments, layer)

    def source(self, span):
        """The span as the vision tower saw it (its image index in the vision batch), for adapter geometry."""
        return self.vision_spans[self.vision_image[span.image]]

    def crop_ranges(self, adapter) -> list[tuple[int, int]]:
        """(first crop, crop count) in the vision tower's batch of every image of this forward."""
        crops = adapter.crops_per_image(self.vision_spans, self.image_sizes)
        starts = [sum(crops[:i]) for i in range(len(crops))]
        return [(starts[i], crops[i]) for i in self.vision_image]


@dataclass
class Generation:
    """A prefill's layouts, kept for the decode steps of ``generate()`` on its compacted cache. ``segments`` says
    how each layer's cache is laid out: the prefill's segments, or (``evicted``, ``evict_early_kv=True``) only the
    last one, at 0, once every earlier layer's cache was cut to its tokens."""

    cache: object
    segments: dict[int, Layout]
    prompt_length: int  # original prompt length (padding included)
    spans: list
    shared: dict = field(default_factory=dict)  # the prefill's per-method scratch, for modulators in decode
    step_mask: torch.Tensor | None = None  # this decode step's 2-D mask in the compacted layout
    step_positions: torch.Tensor | None = None  # this decode step's model-level position ids (entry layout)
    evicted: bool = False  # every layer's cache holds the last segment's tokens: one layout for all layers

    @property
    def entry(self) -> Layout:
        return self.segments[0]

    def layout_at(self, layer: int) -> Layout:
        return _segment(self.segments, layer)


def _segment(segments: dict[int, Layout], layer: int) -> Layout | None:
    starts = [k for k in segments if k <= layer]
    return segments[max(starts)] if starts else None
