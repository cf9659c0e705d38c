"""The method interface (v2), modelled on kvpress "presses".

A method is a dataclass whose fields are its hyperparameters (paper defaults) plus one budget knob (``ratio``:
fraction of the visual tokens it receives that it removes, or ``keep``: visual tokens kept per image after it).
It declares *where* it acts and *what* it observes, and writes the decision:

    cuts(model)             Cut("vision", j) | Cut("pre_llm") | Cut("llm", k)
    probes(model)           typed observables (vtprune.core.probes); read back as ``image[probe]``
    setup(model)            model-dependent initialisation, once at ``prune()``
    budget(image)           tokens to keep at a cut (None: the method has no budget there)
    score(image)            [n] importance: the default ``select`` keeps the top ``budget``
    select(image, n_keep) / select_batch(images)     per image / batch-level decisions
    modulated_layers(model), modulate(call)          rewrite attention; ``call`` is an AttentionCall

Model facts never appear here: a method sees the model's shape as a :class:`ModelInfo` and each image (or,
at a vision cut, each crop) through an :class:`ImageView`. Per-forward scratch lives in ``image.state``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..budget import _is_bool, tokens_to_keep, validate_budget
from ..core.probes import FeatureLayer, Probe
from ..core.vision_view import VisionView  # defined in core (probes build it); methods import it from here
from ..errors import ConfigError

CUT_POINTS = ("vision", "pre_llm", "llm")
POSITION_MODES = ("original", "renumber")


@dataclass(frozen=True)
class Cut:
    """Where a method cuts: before vision layer ``layer`` (``"vision"``), on the LLM input (``"pre_llm"``, no
    layer) or before LLM layer ``layer`` (``"llm"``)."""

    where: str
    layer: int | None = None

    def __post_init__(self):
        if self.where not in CUT_POINTS:
            raise ConfigError(f"vtprune: Cut where={self.where!r}; use one of {CUT_POINTS}")
        if (self.layer is None) != (self.where == "pre_llm"):
            raise ConfigError(f"vtprune: Cut({self.where!r}) needs {'no' if self.where == 'pre_llm' else 'a'} layer")

    def __str__(self) -> str:
        return {"vision": f"vision layer {self.layer}", "pre_llm": "the LLM input"}.get(self.where, f"LLM layer {self.layer}")

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass: vision cuts, then the LLM input, then LLM layers."""
        return CUT_POINTS.index(self.where), self.layer or 0


@dataclass(frozen=True)
class ModelInfo:
    """The model's shape as a method may see it: vision layers 0..vision_layers-1 (features read after
    ``feature_layer``), LLM layers 0..llm_layers-1 of width ``hidden_size``, ``nominal_tokens`` visual tokens of a
    standard image."""

    family: str
    vision_layers: int
    feature_layer: int
    llm_layers: int
    nominal_tokens: int
    hidden_size: int = 0
    name_or_path: str = ""  # the model's config._name_or_path (a hub id or a local folder)
    backbone: str = ""  # the LLM as "type:hidden x layers x ffn", e.g. "llama:4096x32x11008" (Vicuna-7B)
    vision_cuts: bool = True  # False: no cut or probe inside the vision tower (Qwen-VL's packed, windowed tower)


@dataclass
class ImageView:
    """One image (at a vision cut: one crop) as a method sees it at a cut.

    n_tokens: N, the image's token count before any pruning (patches per crop at a vision cut). index: [n]
    original indices (0..N-1) of the tokens still present (sorted). embeds: [n, D] their current hidden states.
    nominal: the token count ``keep`` refers to; n_received: the tokens this method first received (``ratio``
    is relative to it). model: the model's shape. state: this method's scratch for this image in this forward;
    shared: its scratch for the whole batch in this forward (the same dict in every image's view).
    ``image[probe]``: what a declared probe recorded, sliced to this image's current tokens. Vision cuts also
    give ``units`` ([n] id of the LLM token each patch feeds), ``crops_in_image`` and ``patches_per_unit``.
    """

    sample: int
    image: int
    index_in_sample: int
    n_tokens: int
    index: torch.Tensor
    embeds: torch.Tensor
    cut: Cut
    nominal: int | None  # None: keep= is per image, capped at its tokens (dynamic resolution)
    n_received: int
    model: ModelInfo | None = None
    state: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    units: torch.Tensor | None = None
    crops_in_image: int = 1
    patches_per_unit: int = 1
    _lookup: Callable[[Probe], Any] | None = field(default=None, repr=False)
    _batch: Callable[[Probe], Any] | None = field(default=None, repr=False)
    _geometry: Any = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.index.numel())

    @property
    def vision_cuts(self) -> bool:
        """Whether the model's tower offers per-crop vision views (:attr:`vision`); False on Qwen-VL's packed tower
        (an ImageView built without a model, as in unit tests, has them)."""
        return self.model is None or self.model.vision_cuts

    @property
    def stage(self) -> str:
        return self.cut.where

    @property
    def layer(self) -> int | None:
        return self.cut.layer

    def __getitem__(self, probe: Probe):
        if self._lookup is None:
            raise KeyError(f"vtprune: no probe records at {self.cut}")
        return self._lookup(probe)

    def batch(self, probe: Probe):
        """The batch-level record of a declared probe (e.g. a Sublayer's [B, T, D] rows), the same for every image."""
        if self._batch is None:
            raise KeyError(f"vtprune: no batch-level records at {self.cut}")
        return self._batch(probe)

    def token_grid(self) -> torch.Tensor:
        """[N, 3] (grid, row, col) of each of the image's N tokens on its token grid (LLM-side cuts)."""
        return self._require_geometry().token_grid()

    def from_patches(self, per_patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[crops, P] values per vision patch of this image's crops -> ([N] summed over each token's patches,
        [N] bool: the token comes from patches; LLaVA-NeXT newline tokens do not)."""
        return self._require_geometry().from_patches(per_patch)

    def _require_geometry(self):
        if self._geometry is None:
            raise RuntimeError(f"vtprune: token geometry is available at LLM-side cuts, not at {self.cut}")
        return self._geometry

    @property
    def vision(self) -> VisionView:
        """The image's :class:`VisionView` (declare ``FeatureLayer()`` in ``probes``)."""
        return self[FeatureLayer()]


@dataclass
class Selection:
    """keep: [k] sorted indices into the image's current tokens. values: optional [k, D] replacement rows
    (merging methods). sources: optional original indices to report in stats instead of ``index[keep]``.
    extra_values / extra_index: optional [m, D] tokens appended to the kept set (merged or recycled) and the
    original index each stands for; they take the image's first free slots (keep + m <= n). note: a line for
    this stage's stats."""

    keep: torch.Tensor
    values: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    extra_values: torch.Tensor | None = None
    extra_index: torch.Tensor | None = None
    note: str | None = None  # reported in this stage's stats (e.g. a budget the schedule could not reach)


@dataclass
class Method:
    """Base for all methods. Subclasses set ``name`` and ``description``, return their ``cuts`` and write
    ``score`` (or ``select``)."""

    ratio: float | None = None
    keep: int | None = None
    positions: str = "original"

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    has_budget: ClassVar[bool] = True  # False: schedule-defined or learned, ratio / keep are refused
    budget_optional: ClassVar[bool] = False  # True: ratio / keep may both be left out (the schedule decides)
    prunes: ClassVar[bool] = True  # False: the method only modulates attention (left out of default bench sweeps)
    # field settings a bench / perf sweep runs as separate points unless the user sets those fields (ZipVL's KV modes)
    sweep_variants: ClassVar[tuple[dict, ...]] = ()
    budget_kind: ClassVar[str] = "kept"  # "kept": tokens kept per image after it; "average": over all LLM layers
    records_unchanged: ClassVar[bool] = True  # False: a cut that keeps an image whole adds no stage to its stats
    # True: modulate() computes the attention on other queries / keys than the call's (ZipVL's sparse prefill), so no
    # modulator may follow it on a layer: it would be handed the rewritten tensors
    rewrites_attention: ClassVar[bool] = False

    def __post_init__(self):
        """Validate every field at construction: types from the annotations (numpy scalars become Python
        numbers, lists become tuples), then the budget and ``positions``, then the method's ``check_fields``."""
        _check_field_types(self)
        if self.has_budget and not (self.budget_optional and self.ratio is None and self.keep is None):
            validate_budget(self.ratio, self.keep, self.name)
        elif self.ratio is not None or self.keep is not None:
            raise ConfigError(f"vtprune: {self.name} has no ratio / keep budget (its schedule decides); drop them")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"vtprune: {self.name} positions must be one of {POSITION_MODES}, "
                              f"got {self.positions!r}")
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

    def layer_settings(self) -> str:
        """``name=value`` of the fields that pick model layers (their names hold "layer", or PAINT's ``start``),
        for errors found once the model is known; ``its default layers`` when there are none."""
        names = [f.name for f in dataclasses.fields(self) if f.init and ("layer" in f.name or f.name == "start")]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names) or "its default layers"

    @classmethod
    def available_for(cls, model_path: str | None) -> bool:
        """Whether the method can run on the model at ``model_path`` as it is (e.g. its learned weights exist);
        default sweeps leave out methods that cannot."""
        return True

    @property
    def is_noop(self) -> bool:
        """ratio 0: nothing is cut and nothing is computed."""
        return self.ratio is not None and float(self.ratio) == 0.0

    # --- declarations ---------------------------------------------------------------------------------
    def setup(self, model: ModelInfo) -> None:
        """Model-dependent initialisation, once at ``prune()`` (e.g. load weights sized for this model)."""

    def cuts(self, model: ModelInfo) -> tuple[Cut, ...]:
        """Where the method cuts. Default: the LLM input, so a method that writes only ``score`` is complete;
        a pure modulator returns ()."""
        return (Cut("pre_llm"),)

    def probes(self, model: ModelInfo) -> tuple[Probe, ...]:
        return ()

    def modulated_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return ()

    def positions_at(self, cut: Cut) -> str:
        """Position handling of one cut ("original" or "renumber"); default: the ``positions`` field."""
        return self.positions

    # --- decisions --------------------------------------------------------------------------------------
    def budget(self, image: ImageView) -> int | None:
        """Tokens to keep at this cut: ``ratio`` of the tokens the method received, or ``keep`` per image (scaled
        by the image's N over ``nominal`` for anyres images); never more than the image has now."""
        if not self.has_budget:
            return None
        if self.ratio is not None:
            return min(image.n, tokens_to_keep(image.n_received, self.ratio, None))
        return min(image.n, tokens_to_keep(image.n_tokens, None, self.keep, image.nominal, self.name))

    def score(self, image: ImageView) -> torch.Tensor:
        """[n] importance of the image's current tokens; higher is kept."""
        raise NotImplementedError(f"{type(self).__name__} writes neither score() nor select()")

    def select(self, image: ImageView, n_keep: int | None) -> Selection:
        """Keep the top ``n_keep`` tokens by ``score`` (ties broken by lower index), in original order."""
        scores = self.score(image).float()
        if scores.shape != (image.n,):
            raise RuntimeError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, expected ({image.n},)")
        return Selection(keep=top_k_sorted(scores, image.n if n_keep is None else n_keep))

    def select_batch(self, images: list[ImageView]) -> list[Selection]:
        """Every image (crop) of the batch at one cut; override for batch-level decisions. Default: each alone."""
        return [self.select(v, self.budget(v)) for v in images]

    def modulate(self, call) -> Any:
        """Rewrite one attention call of a modulated layer (``call``: :class:`~vtprune.core.attention.AttentionCall`).
        Return ``(output, weights)`` (e.g. ``call.run(bias=...)``), or None to leave it alone."""
        return None

    @property
    def stores_kv(self) -> bool:
        """Whether :meth:`end_prefill` replaces cache layers by its own stores (refused with ``evict_early_kv``)."""
        return False

    def end_prefill(self, cache, shared: dict) -> None:
        """Once a prefill's LLM has run, with the KV cache it filled and this method's scratch (what its modulator's
        ``call.shared`` was): e.g. replace layers' caches by compressed stores (``compat.set_cache_store``)."""
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
            raise ConfigError(
                f"vtprune: {cls.name or cls.__name__} {f.name}={value!r} has the wrong type: expected "
                f"{_type_name(hints[f.name])}, got {type(value).__name__}{_example(f)}"
            ) from None
        if not all(math.isfinite(v) for v in _numbers_in(converted)):
            raise ConfigError(f"vtprune: {cls.name or cls.__name__} {f.name}={value!r} is not a finite number; "
                              f"give a finite value{_example(f)}")
        if converted is not value:
            object.__setattr__(method, f.name, converted)


def _numbers_in(value) -> list:
    """The float values in a field value (itself or, for a tuple, its items): NaN and inf are refused for all."""
    items = value if isinstance(value, tuple) else (value,)
    return [v for v in items if isinstance(v, float)]


def _example(f: dataclasses.Field) -> str:
    return f"; e.g. {f.name}={f.default!r}" if f.default not in (dataclasses.MISSING, None) else ""


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
        if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 1:
            value = value.tolist()  # a 1-D numpy array reads as a list
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
            raise _Mismatch  # NaN and inf pass here; _check_field_types refuses them
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

