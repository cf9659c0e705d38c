"""The method base class, modelled on kvpress "presses".

A method is a dataclass whose fields are its hyperparameters (paper defaults) plus one budget knob
(``ratio``: fraction of each image's visual tokens removed, or ``keep``: tokens kept per image). It declares
*where* it cuts (``stage``) and writes ``score()``; the base turns scores and the budget into sorted keep
indices. Methods that merge or re-order tokens override ``select()`` instead. Model facts never appear here:
a method sees one image at a time through an :class:`ImageView`.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..budget import _is_bool, tokens_to_keep, validate_budget
from ..errors import ConfigError

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

    Per-crop view, only for anyres models (LLaVA-NeXT; None elsewhere). C crops of P patches, crop 0 is the
    base (global) image, then the high-res grid crops row-major, as in the model's pixel batch:
    crop_cls: [C, P] CLS attention to each patch at the feature layer, summed over heads. crop_keys: [C, P, d]
    head-averaged patch keys of that layer. crop_features: [C, 1+P, D_in] projector inputs, CLS row first.
    crop_order: [C, P] rank of each patch in the model's packing with nothing unpadded and no newline tokens
    (base crop first, then the grid raster over all grid crops). crop_tokens: [C, P] the patch's token index
    (0..N-1) in the image, -1 where the model's unpadding dropped it.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    pre_projector: torch.Tensor | None
    cls_pre_projector: torch.Tensor | None
    project: Callable[[torch.Tensor], torch.Tensor] | None
    layer_cls: dict[int, torch.Tensor] | None = None  # vision layer -> [N] head-mean CLS->patch attention
    crop_cls: torch.Tensor | None = None
    crop_keys: torch.Tensor | None = None
    crop_features: torch.Tensor | None = None
    crop_order: torch.Tensor | None = None
    crop_tokens: torch.Tensor | None = None


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
        """Validate every field at construction: types from the annotations (numpy scalars become Python
        numbers, lists become tuples), then the budget and ``positions``, then the method's ``check_fields``."""
        _check_field_types(self)
        validate_budget(self.ratio, self.keep)
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"vtprune: positions must be one of {POSITION_MODES}, got {self.positions!r}")
        self.check_fields()

    def check_fields(self) -> None:
        """Range checks of the method's own fields; raise a ValueError (``raise self.field_error(...)``).
        Runs after the type checks, so values already have their annotated Python types. Default: none."""

    def field_error(self, field: str, expected: str) -> ConfigError:
        """The error for a field whose value is out of range, e.g. ``raise self.field_error("layer", ">= 1")``."""
        return ConfigError(
            f"vtprune: {self.name or type(self).__name__} {field}={getattr(self, field)!r} is out of range; "
            f"expected {expected}"
        )

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

class _Mismatch(Exception):
    pass


def _field_hints(cls) -> dict[str, Any]:
    """Resolved annotations of ``cls``'s fields; one that cannot be resolved (a test-local name) is skipped."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        pass
    hints = {}
    for f in dataclasses.fields(cls):
        owner = next((k for k in cls.__mro__ if f.name in k.__dict__.get("__annotations__", {})), cls)
        try:
            hints[f.name] = eval(f.type, vars(sys.modules[owner.__module__])) if isinstance(f.type, str) else f.type
        except Exception:
            continue
    return hints


def _check_field_types(method: Method) -> None:
    cls = type(method)
    hints = _field_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in hints:
            continue
        value = getattr(method, f.name)
        try:
            converted = _coerce(value, hints[f.name])
        except _Mismatch:
            example = f"; e.g. {f.name}={f.default!r}" if f.default not in (dataclasses.MISSING, None) else ""
            raise ConfigError(
                f"vtprune: {cls.name or cls.__name__} {f.name}={value!r} has the wrong type: expected "
                f"{_type_name(hints[f.name])}, got {type(value).__name__}{example}"
            ) from None
        if converted is not value:
            object.__setattr__(method, f.name, converted)


def _coerce(value, hint):
    """``value`` as the annotated type: numpy scalars -> Python numbers, int -> float, list -> tuple.
    Raises _Mismatch; annotations other than int/float/bool/str/tuple/Literal/unions/classes are not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arg in sorted(args, key=lambda a: a is not type(None)):  # None first: never coerced into
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if hint is bool:
        if _is_bool(value):
            return bool(value)
        raise _Mismatch
    if hint is int or hint is float:
        if _is_bool(value) or not isinstance(value, numbers.Integral if hint is int else numbers.Real):
            raise _Mismatch  # NaN passes here; range checks (all comparisons False) refuse it
        return value if type(value) is hint else hint(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(hint, type) and origin is None and not isinstance(value, hint):
        raise _Mismatch
    return value


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_type_name(args[0])}"
        return f"a tuple ({', '.join(_type_name(a) for a in args)})" if args else "a tuple"
    if hint is float:
        return "float (a number)"
    return getattr(hint, "__name__", repr(hint))


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending. Deterministic: stable sort, lower index wins ties."""
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values

