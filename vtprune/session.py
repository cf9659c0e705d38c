"""The object behind ``model.vtprune``: owns every hook, runs the stages, keeps ``stats``.

Data flow of one pruned prefill (see docs/architecture.md):

    model.forward pre-hook      find each image's visual span from input_ids (config.image_token_id)
    vision attention (wrapped)  record the CLS row / keys at the feature layer   (methods with needs_vision)
    projector pre-hook          record projector inputs                          (methods with needs_vision)
    language_model pre-hook     stage "pre_llm": cut visual rows of inputs_embeds, 2-D mask, position ids
    LLM attention (wrapped)     record the last query's attention row            (stage "llm" scoring)
    decoder layer K pre-hook    stage "llm": cut hidden states, rotary cos/sin, positions, 4-D mask
    decoder layers > K          reuse the cut cos/sin, positions and mask (the LLM passes full-length ones)

Decode steps (``generate``) run on the compacted cache: the language-model pre-hook maps generate's
original-layout 2-D mask and position ids onto the compacted layout, and layers >= K get their own mask.
Installing and removing the session is the only way vtprune touches a model; removal restores it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field

import torch

from . import compat
from .adapters import Adapter, VisualSpan, find_runs
from .errors import PruneError
from .kernels import compact_
from .methods.base import ImageView, Method, Selection, VisionView


# --------------------------------------------------------------------------------------------------------
# stats
@dataclass
class StageStats:
    stage: str
    layer: int | None
    tokens_in: int
    tokens_out: int
    kept_index: list[int]


@dataclass
class ImageStats:
    sample: int
    image: int
    n_tokens: int
    stages: list[StageStats] = field(default_factory=list)
    equivalent_tokens: float = 0.0

    @property
    def kept(self) -> int:
        return self.stages[-1].tokens_out if self.stages else self.n_tokens

    @property
    def kept_index(self) -> list[int]:
        return self.stages[-1].kept_index if self.stages else list(range(self.n_tokens))


@dataclass
class PruneStats:
    """Stats of the last prefill: one :class:`ImageStats` per image (batch order)."""

    method: str
    images: list[ImageStats] = field(default_factory=list)
    llm_layers: int = 0

    @property
    def visual_tokens(self) -> int:
        return sum(i.n_tokens for i in self.images)

    @property
    def kept_tokens(self) -> int:
        return sum(i.kept for i in self.images)

    @property
    def equivalent_tokens(self) -> float:
        """Layer-averaged visual tokens the LLM processed, summed over images."""
        return float(sum(i.equivalent_tokens for i in self.images))

    def summary(self) -> str:
        return (
            f"{self.method}: {len(self.images)} image(s), visual tokens {self.visual_tokens} -> {self.kept_tokens} "
            f"(layer-averaged equivalent {self.equivalent_tokens:.1f})"
        )


# --------------------------------------------------------------------------------------------------------
# per-forward and per-generation state
@dataclass
class _Layout:
    """Token layout of one LLM segment. ``src``: [B, T] position in the previous layout (-1 = padding slot);
    ``valid``: [B, T] bool; ``orig``: [B, T] position in the original input (-1 = padding)."""

    src: torch.Tensor
    valid: torch.Tensor
    orig: torch.Tensor
    images: list[torch.Tensor]  # per image: [n] current slots of its tokens
    image_index: list[torch.Tensor]  # per image: [n] original indices (0..N-1) of those tokens
    position_shift: torch.Tensor  # [B] subtract from original-layout decode positions (renumber mode)
    # prefill-only tensors reused by every layer of the segment
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple | None = None
    mask: torch.Tensor | None = None


@dataclass
class _VisionRecord:
    """What one run of the model's ``get_image_features`` showed (generate() runs it before the prefill)."""

    pixel_values: torch.Tensor | None
    image_sizes: object
    expand: int = 1  # generate() repeats each prompt this many times after encoding (beams, return sequences)
    n_crops: int | None = None
    cls: torch.Tensor | None = None  # [crops, S] CLS attention at the feature layer, summed over heads
    keys: torch.Tensor | None = None  # [crops, S, d] head-averaged keys of that layer
    layer_cls: dict = field(default_factory=dict)  # vision layer -> [crops, H, n] CLS attention row
    layer_values: dict = field(default_factory=dict)  # vision layer -> [crops, H, n, d] values
    crop_state: list | None = None  # per-crop dicts for vision-stage methods
    last_cut: int = 0
    vision_mask: torch.Tensor | None = None  # [crops, 1, K, K] additive mask once crops keep different counts
    hidden_cls: torch.Tensor | None = None  # [crops, D_v] CLS hidden state output by that layer
    projector_in: torch.Tensor | None = None  # [rows, t, D_in] the model's own projector input
    crop_keep: torch.Tensor | None = None  # [crops, S] bool: vision-sequence positions surviving the vision stage
    crop_index: list | None = None  # per crop: [n] kept patch indices (0-based, CLS excluded)
    vision_stages: list = field(default_factory=list)  # (layer, n_in, n_out, kept patch indices), per crop lists


@dataclass
class _Forward:
    spans: list[VisualSpan]
    batch: int
    length: int
    image_sizes: object
    vision: _VisionRecord | None = None
    base: _Layout | None = None  # layout entering the LLM (after the pre_llm cut)
    deep: dict = field(default_factory=dict)  # cut layer K -> _Layout
    attention_rows: dict = field(default_factory=dict)  # LLM layer -> [B, H, T] probabilities
    stats: PruneStats | None = None
    vision_spans: list = field(default_factory=list)  # spans of the prompts as the vision tower saw them
    vision_image: list = field(default_factory=list)  # per span: index of its image in the vision batch
    keep_hidden_states: bool = False  # the caller asked for hidden states: never compact a tensor handed back


@dataclass
class _Generation:
    cache: object
    base: _Layout
    deep: dict
    prompt_length: int  # original prompt length (padding included)
    spans: list
    step_mask: torch.Tensor | None = None  # this decode step's 2-D mask in the compacted layout


def _guard(fn):
    """Turn any failure inside a hook into a PruneError after restoring the model unpruned."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            self._abort()
            if isinstance(err, PruneError):
                raise
            raise PruneError(
                f"vtprune: {type(err).__name__} inside the {self.method.name!r} hooks: {err}. "
                "vtprune removed its hooks; the model is unpruned now (call vtprune.prune again)."
            ) from err

    return wrapper


class Session:
    """Per-model pruning session. Create through :func:`vtprune.prune`."""

    def __init__(self, model, adapter: Adapter, method: Method):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.stats: PruneStats | None = None
        self._handles: list = []
        self._hooked_attention: list = []
        self._wrapped_configs: list = []  # configs whose attention implementation this session wrapped
        self._fwd: _Forward | None = None
        self._gen: _Generation | None = None
        self._vision: _VisionRecord | None = None
        self._wrapped_image_features = False
        self._vision_cuts: tuple[int, ...] = ()

    # ---------------------------------------------------------------------------------------------------
    # install / remove
    def install(self) -> None:
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    def _install(self) -> None:
        m, a, method = self.model, self.adapter, self.method
        self._handles.append(m.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._on_model_end, with_kwargs=True, always_call=True))
        self._wrap_get_image_features()
        self._check_layers()  # also with ratio 0: a configuration that cannot run on this model is an error
        if method.is_noop:
            return  # ratio 0: nothing is cut and nothing is computed; stats still report the spans
        self._handles.append(a.language_model.register_forward_pre_hook(self._on_llm_start, with_kwargs=True))
        self._handles.append(a.language_model.register_forward_hook(self._on_llm_end, with_kwargs=True))
        observe = set(method.vision_observe_layers(len(a.vision_layers), a.vision_feature_layer))
        if method.needs_vision:
            observe.add(a.vision_feature_layer)
            layer = a.vision_layers[a.vision_feature_layer]
            self._handles.append(layer.register_forward_hook(self._record_vision_hidden))
            self._handles.append(a.projector.register_forward_pre_hook(self._record_projector_input))
        for j in sorted(observe):
            self._hook_attention(a.vision_attention(a.vision_layers[j]), functools.partial(self._record_vision_attention, j))
        if method.stage == "vision":
            n_vision = len(a.vision_layers)
            vision_cuts = self._vision_cuts = tuple(method.vision_cut_layers(n_vision, a.vision_feature_layer))
            for j in range(min(vision_cuts), n_vision) if vision_cuts else ():
                self._handles.append(
                    a.vision_layers[j].register_forward_pre_hook(functools.partial(self._on_vision_layer, j), with_kwargs=True)
                )
            self._handles.append(a.vision_tower.register_forward_hook(self._on_vision_end))
        n_layers = len(a.decoder_layers)
        cuts = method.cut_layers()
        if cuts:
            for i in range(min(cuts), n_layers):
                self._handles.append(
                    a.decoder_layers[i].register_forward_pre_hook(
                        functools.partial(self._on_decoder_layer, i), with_kwargs=True
                    )
                )
        for layer_idx in method.attention_rows():
            attn = a.decoder_layers[layer_idx].self_attn
            self._hook_attention(attn, functools.partial(self._record_llm_attention, layer_idx))
        if method.stage == "attention":
            for layer_idx in method.modulated_layers(n_layers):
                attn = a.decoder_layers[layer_idx].self_attn
                self._hook_attention(attn, self._modulate)

    def _check_layers(self) -> None:
        """Every vision / LLM layer the method names must exist in this model."""
        a, method = self.adapter, self.method
        n_vision, feature, n_layers = len(a.vision_layers), a.vision_feature_layer, len(a.decoder_layers)
        for j in method.vision_observe_layers(n_vision, feature):
            if not 0 <= j < n_vision:
                raise PruneError(f"vtprune: {method.name} observes vision layer {j}; the tower has 0..{n_vision - 1}")
        for j in method.vision_cut_layers(n_vision, feature) if method.stage == "vision" else ():
            if not 0 < j <= feature:
                raise PruneError(
                    f"vtprune: {method.name} cuts before vision layer {j}; use a layer in 1..{feature} "
                    f"(the model reads features after layer {feature} of 0..{n_vision - 1})"
                )
        for k in method.cut_layers():
            if not 0 < k < n_layers:
                raise PruneError(
                    f"vtprune: {method.name} cuts before LLM layer {k}, but the model has layers 0..{n_layers - 1}; "
                    f"use a layer in 1..{n_layers - 1}"
                )

    def _hook_attention(self, module, fn) -> None:
        config = module.config
        if not any(c is config for c in self._wrapped_configs):
            compat.acquire_wrapped_attention(config)
            self._wrapped_configs.append(config)
        module._vtprune_attention = fn
        self._hooked_attention.append(module)

    def _wrap_get_image_features(self) -> None:
        """Instance-level wrapper (never the class): generate() encodes images before the prefill forward, so
        the start of a vision run and its image_sizes are only visible here."""
        inner = self.model.model
        original = inner.get_image_features

        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            record = _VisionRecord(pixel_values=bound.get("pixel_values"), image_sizes=bound.get("image_sizes"))
            self._vision = record
            if self._fwd is not None and self._fwd.vision is None:
                self._fwd.vision = record
            return original(*args, **kwargs)

        get_image_features.vtprune_wrapper = True
        inner.get_image_features = get_image_features
        self._wrapped_image_features = True
        self._wrap_generate_expansion()

    def _wrap_generate_expansion(self) -> None:
        """Instance-level wrapper of generate()'s batch expansion: it runs after the images were encoded, so the
        prefill sees each prompt ``expand`` times but each image once."""
        name = compat.GENERATE_EXPAND
        original = getattr(self.model, name, None)
        if original is None:
            return
        signature = inspect.signature(original)

        @functools.wraps(original)
        def expand_inputs(*args, **kwargs):
            size = signature.bind_partial(*args, **kwargs).arguments.get("expand_size", 1)
            if self._vision is not None:
                self._vision.expand = int(size)
            return original(*args, **kwargs)

        expand_inputs.vtprune_wrapper = True
        setattr(self.model, name, expand_inputs)

    def remove(self) -> None:
        if self._wrapped_image_features:
            inner = self.model.model
            if getattr(inner.__dict__.get("get_image_features"), "vtprune_wrapper", False):
                del inner.get_image_features
            if getattr(self.model.__dict__.get(compat.GENERATE_EXPAND), "vtprune_wrapper", False):
                delattr(self.model, compat.GENERATE_EXPAND)
            self._wrapped_image_features = False
        self._vision = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._hooked_attention:
            if "_vtprune_attention" in module.__dict__:
                del module._vtprune_attention
        self._hooked_attention.clear()
        for config in reversed(self._wrapped_configs):
            compat.release_wrapped_attention(config)
        self._wrapped_configs.clear()
        self._fwd = None
        self._gen = None
        if getattr(self.model, "vtprune", None) is self:
            del self.model.vtprune

    def _abort(self) -> None:
        self._fwd = None
        self._gen = None
        self.remove()

    # ---------------------------------------------------------------------------------------------------
    # model entry / exit
    @_guard
    def _on_model_start(self, module, args, kwargs):
        self._fwd = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.get_cache(kwargs)
        pixel_values = kwargs.get("pixel_values")
        if self._gen is not None and cache is not None and cache is self._gen.cache:
            if pixel_values is not None:
                raise PruneError("vtprune: new images in a decode step of a pruned cache are not supported")
            return None  # decode step on our compacted cache
        self._gen = None
        self.stats = None  # a new forward: stats describe it once it has run, or stay None (text-only)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        has_images = pixel_values is not None or encoded is not None
        if input_ids is None or input_ids.numel() == 0:
            if has_images:  # generate(inputs_embeds=...) encodes pixel_values first: encoded, no input_ids
                raise PruneError("vtprune: pass input_ids (not inputs_embeds) so the visual tokens can be located")
            return None
        has_image_tokens = bool((input_ids == self.adapter.image_token_id).any())
        if not has_image_tokens:
            if has_images:
                raise PruneError(
                    "vtprune: pixel_values were given but input_ids hold no image token "
                    f"(id {self.adapter.image_token_id}); build the prompt with the model's processor"
                )
            return None  # text-only: untouched
        if compat.cache_length(cache) > 0:
            raise PruneError(
                "vtprune: image tokens arrived with a non-empty KV cache; pruning a continued conversation is "
                "not supported. Start from an empty cache."
            )
        if not has_images:
            raise PruneError("vtprune: input_ids hold image tokens but no pixel_values were given")
        vision = None
        if pixel_values is None:  # generate() (or the caller) ran get_image_features before this forward
            vision = self._vision
            if vision is None:
                raise PruneError(
                    "vtprune: image features were encoded before vtprune.prune() was called; pass pixel_values"
                )
            pixel_values = vision.pixel_values
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None and vision is not None:
            image_sizes = vision.image_sizes
        expand = vision.expand if vision is not None else 1
        vision_spans = self._find_spans(self._unexpanded(input_ids, expand), pixel_values, image_sizes)
        self._check_crops(vision_spans, pixel_values, image_sizes)
        spans, vision_image = self._expanded_spans(vision_spans, input_ids.shape[0], expand)
        self._fwd = _Forward(
            spans=spans, batch=input_ids.shape[0], length=input_ids.shape[1], image_sizes=image_sizes, vision=vision,
            vision_spans=vision_spans, vision_image=vision_image,
        )
        self._fwd.stats = PruneStats(
            method=self.method.name,
            images=[ImageStats(s.sample, s.image, s.length) for s in spans],
            llm_layers=len(self.adapter.decoder_layers),
        )
        if self.method.is_noop:
            self._finish_stats()
        return None

    def _on_model_end(self, module, args, kwargs, output):
        fwd, self._fwd = self._fwd, None
        if fwd is not None and fwd.stats is not None and (fwd.base is not None or self.method.is_noop):
            self.stats = fwd.stats
        return None

    @staticmethod
    def _unexpanded(input_ids: torch.Tensor, expand: int) -> torch.Tensor:
        """generate() with beams / several return sequences encodes each image once, then repeats every prompt
        ``expand`` times (repeat_interleave): the prompts those images belong to are every ``expand``-th row."""
        if expand == 1:
            return input_ids
        rows = input_ids[::expand]
        if input_ids.shape[0] % expand or not torch.equal(rows.repeat_interleave(expand, 0), input_ids):
            raise PruneError(
                f"vtprune: generate() expanded the batch {expand}x after encoding the images, but the rows of "
                "input_ids are not the repeated prompts; pass the prompts once, as generate() expects"
            )
        return rows

    @staticmethod
    def _expanded_spans(vision_spans: list[VisualSpan], batch: int, expand: int) -> tuple[list[VisualSpan], list[int]]:
        """Spans of the (expanded) batch in batch order, and for each the image it comes from in the vision batch."""
        if expand == 1:
            return vision_spans, [s.image for s in vision_spans]
        spans, source = [], []
        for b in range(batch):
            for s in (v for v in vision_spans if v.sample == b // expand):
                spans.append(dataclasses.replace(s, sample=b, image=len(spans)))
                source.append(s.image)
        return spans, source

    def _check_crops(self, vision_spans, pixel_values, image_sizes) -> None:
        """The prompt's image tokens must need exactly the crops / tiles the vision input holds."""
        a = self.adapter
        needed = sum(a.crops_per_image(vision_spans, image_sizes))
        available = sum(a.crop_counts(pixel_values, image_sizes))
        if needed != available:
            raise PruneError(
                f"vtprune: image-token count mismatch: the prompt's image tokens need {needed} vision crops/tiles but "
                f"pixel_values hold {available}; build prompts with the model's processor"
            )

    def _find_spans(self, input_ids, pixel_values, image_sizes) -> list[VisualSpan]:
        a = self.adapter
        runs = [find_runs(row, a.image_token_id) for row in input_ids]
        n_images = a.count_images(pixel_values, image_sizes)
        flat_runs = [(b, s, n) for b, row in enumerate(runs) for s, n in row]
        expected = a.image_token_counts(n_images or len(flat_runs), image_sizes, [n for *_, n in flat_runs])
        spans: list[VisualSpan] = []
        image = 0
        for b, row in enumerate(runs):
            k = 0
            for start, length in row:
                pos = start
                while pos < start + length:
                    if expected is None:
                        n = length
                    else:
                        if image >= len(expected):
                            raise PruneError(
                                f"vtprune: input_ids hold more image tokens than the {len(expected)} image(s) in "
                                "pixel_values provide; the prompt and the images do not match"
                            )
                        n = expected[image]
                    if pos + n > start + length:
                        raise PruneError(
                            f"vtprune: image-token count mismatch in sample {b}: a run of {length} image tokens "
                            f"does not split into images of {n} tokens; build prompts with the model's processor "
                            f"(it expands each image placeholder to the right count)"
                        )
                    spans.append(VisualSpan(b, image, k, pos, n))
                    pos += n
                    image += 1
                    k += 1
        if n_images is not None and image != n_images:  # None: one run per image (InternVL)
            raise PruneError(
                f"vtprune: image-token count mismatch: input_ids hold tokens for {image} image(s) but "
                f"pixel_values hold {n_images}; build prompts with the model's processor"
            )
        return spans

    # ---------------------------------------------------------------------------------------------------
    # recording
    def _record_vision_attention(self, layer_idx, base, module, query, key, value, attention_mask, **kwargs):
        rec = self._vision
        if rec is not None and layer_idx not in rec.layer_cls:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            logits = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scaling  # CLS query only
            if isinstance(attention_mask, torch.Tensor):
                am = attention_mask[:, :, :1]
                logits = logits.masked_fill(~am, float("-inf")) if am.dtype == torch.bool else logits + am.float()
            probs = logits.softmax(-1)[:, :, 0]  # [crops, H, n]
            rec.layer_cls[layer_idx] = probs
            if self.method.needs_values:
                rec.layer_values[layer_idx] = value.float()
            if layer_idx == self.adapter.vision_feature_layer and rec.cls is None:
                rec.cls = probs.sum(1)  # [crops, S], summed over heads
                rec.keys = key.float().mean(1)  # [crops, S, d]
                rec.n_crops = query.shape[0]
        return base(module, query, key, value, attention_mask, **kwargs)

    def _record_vision_hidden(self, module, args, output):
        rec = self._vision
        if rec is not None and rec.hidden_cls is None:
            hidden = output[0] if isinstance(output, tuple) else output
            rec.hidden_cls = hidden[:, 0]

    def _record_projector_input(self, module, args):
        # only the model's own call: methods may call the projector themselves (VisionZip merges)
        rec = self._vision
        if rec is not None and rec.projector_in is None:
            rec.projector_in = args[0]

    def _record_llm_attention(self, layer_idx, base, module, query, key, value, attention_mask, **kwargs):
        fwd = self._fwd
        if fwd is not None and query.shape[2] > 1:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            groups = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
            if self.method.attention_rows()[layer_idx] == "qkv_last":  # post-RoPE q/k of this layer, kv heads repeated
                v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
                fwd.attention_rows[layer_idx] = {"q_last": query[:, :, -1].float(), "keys": k.float(),
                                                 "values": v.float(), "scaling": scaling}
                return base(module, query, key, value, attention_mask, **kwargs)
            logits = (query[:, :, -1:].float() @ k.float().transpose(-1, -2)) * scaling
            if isinstance(attention_mask, torch.Tensor):
                am = attention_mask[:, :, -1:, : k.shape[2]]
                logits = logits.masked_fill(~am, float("-inf")) if am.dtype == torch.bool else logits + am.float()
            fwd.attention_rows[layer_idx] = logits.softmax(-1)[:, :, 0]  # [B, H, T]
        return base(module, query, key, value, attention_mask, **kwargs)

    def _modulate(self, base, module, query, key, value, attention_mask, **kwargs):
        out = self.method.modulate(self, base, module, query, key, value, attention_mask, **kwargs)
        return base(module, query, key, value, attention_mask, **kwargs) if out is None else out

    # ---------------------------------------------------------------------------------------------------
    # stage "vision": between vision-encoder layers
    @_guard
    def _on_vision_layer(self, layer_idx, module, args, kwargs):
        rec = self._vision
        if rec is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        crops = hidden.shape[0]
        if rec.crop_index is None:
            n0 = hidden.shape[1] - 1
            rec.crop_index = [torch.arange(n0, device=hidden.device) for _ in range(crops)]
            rec.crop_state = [{} for _ in range(crops)]
        if layer_idx in self._vision_cuts:
            hidden = self._cut_in_vision(layer_idx, hidden, rec)
        if rec.vision_mask is not None:
            if args and len(args) >= 2:
                args = (hidden, rec.vision_mask) + tuple(args[2:])
            elif "attention_mask" in kwargs or len(args) == 1 and self.adapter.vision_layer_takes_mask:
                kwargs["attention_mask"] = rec.vision_mask
            else:
                raise PruneError(
                    "vtprune: this vision tower takes no attention mask, so every crop must keep the same number of "
                    "patches (use the method's shared prune count)"
                )
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _cut_in_vision(self, layer_idx: int, hidden: torch.Tensor, rec: "_VisionRecord") -> torch.Tensor:
        crops = hidden.shape[0]
        n_patches = self.adapter.vision_seq_len - 1
        units = self.adapter.patch_units().to(hidden.device)
        per_unit = n_patches // int(units.max() + 1)
        per_image = self.adapter.crop_counts(rec.pixel_values, rec.image_sizes) if rec.pixel_values is not None else []
        crops_in_image = [c for c in per_image for _ in range(c)] if sum(per_image) == crops else [1] * crops
        observed = sorted(l for l in rec.layer_cls if rec.last_cut <= l < layer_idx)
        views = []
        for c in range(crops):
            n = rec.crop_index[c].numel()
            obs = [
                (l, rec.layer_cls[l][c][:, : n + 1],
                 rec.layer_values[l][c][:, : n + 1] if l in rec.layer_values else None)
                for l in observed
            ]
            views.append(ImageView(sample=-1, image=c, index_in_sample=c, n_tokens=n_patches, index=rec.crop_index[c],
                                   embeds=hidden[c, 1 : n + 1], stage="vision", layer=layer_idx, observations=obs,
                                   state=rec.crop_state[c], units=units[rec.crop_index[c]],
                                   crops_in_image=crops_in_image[c], patches_per_unit=per_unit,
                                   vision_feature_layer=self.adapter.vision_feature_layer))
        selections = self.method.select_crops(views)
        keeps = []
        for v, sel in zip(views, selections):
            keep = self._checked_keep(sel.keep, v.n).to(hidden.device)
            if keep.numel() == 0:
                raise PruneError(f"vtprune: {self.method.name} kept no patch of a crop; keep at least one")
            keeps.append(keep)
        counts = torch.tensor([1 + k.numel() for k in keeps], device=hidden.device)
        K = int(counts.max())
        index = torch.zeros(crops, K, dtype=torch.long, device=hidden.device)
        for c, keep in enumerate(keeps):
            index[c, 1 : 1 + keep.numel()] = keep + 1  # CLS (row 0) always stays
        rec.vision_stages.append(
            (layer_idx, [v.n for v in views], [k.numel() for k in keeps],
             [rec.crop_index[c][k].tolist() for c, k in enumerate(keeps)])
        )
        rec.crop_index = [rec.crop_index[c][k] for c, k in enumerate(keeps)]
        rec.last_cut = layer_idx
        if hidden.requires_grad:
            hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        else:
            hidden = compact_(hidden, index, dim=1, counts=counts)
        if bool((counts == K).all()):
            rec.vision_mask = None
        else:  # ragged crops: padded keys are masked out (additive, accepted by eager and SDPA alike)
            valid = torch.arange(K, device=hidden.device)[None] < counts[:, None]
            mask = torch.zeros(crops, 1, K, K, dtype=hidden.dtype, device=hidden.device)
            rec.vision_mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
        return hidden

    @_guard
    def _on_vision_end(self, module, args, output):
        """Scatter the surviving patches back to their grid positions (zeros elsewhere) so the model's own feature
        selection, pixel shuffle, projector and anyres packing run unchanged; the pre_llm cut then drops the
        tokens built only from pruned patches."""
        rec = self._vision
        if rec is None or rec.crop_index is None:
            return None
        S = self.adapter.vision_seq_len
        crops = len(rec.crop_index)
        counts = [1 + idx.numel() for idx in rec.crop_index]
        K = max(counts)
        device = rec.crop_index[0].device
        full_index = torch.zeros(crops, K, dtype=torch.long, device=device)
        row_valid = torch.zeros(crops, K, dtype=torch.bool, device=device)
        for c, idx in enumerate(rec.crop_index):
            full_index[c, 1 : counts[c]] = idx + 1
            row_valid[c, : counts[c]] = True
        rec.crop_keep = torch.zeros(crops, S, dtype=torch.bool, device=device)
        rec.crop_keep.scatter_(1, full_index, row_valid)
        rec.crop_keep[:, 0] = True

        def restore(x):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] == S:
                return x
            if x.shape[1] != K:
                raise PruneError("vtprune: vision hidden states were cut at more than one granularity")
            out = x.new_zeros(x.shape[0], S, x.shape[2])
            src = x * row_valid[..., None].to(x.dtype)  # padded rows must not overwrite CLS (index 0)
            return out.scatter_add(1, full_index[..., None].expand(-1, -1, x.shape[2]), src)

        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = restore(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(restore(h) for h in output.hidden_states)
        return output

    def _selections_from_vision(self) -> list[Selection]:
        """pre_llm cut implied by the vision stage: keep an LLM token if any of its vision sources survived."""
        fwd, a = self._fwd, self.adapter
        rec = fwd.vision
        if rec is None or rec.crop_keep is None:
            raise PruneError("vtprune: the vision stage did not run (was pixel_values given?)")
        out = []
        for span, (first, n_crops) in zip(fwd.spans, self._crop_ranges()):
            alive = rec.crop_keep[first:first + n_crops].reshape(-1)
            src = a.token_sources(self._source(span), fwd.image_sizes).to(alive.device)
            keep_tok = (alive[src.clamp(min=0)] & (src >= 0)).any(1)
            out.append(Selection(keep=torch.nonzero(keep_tok).flatten()))
            # stats: the vision stages of the image's first crop
            for layer, n_in, n_out, kept in rec.vision_stages:
                fwd.stats.images[span.image].stages.append(
                    StageStats("vision", layer, n_in[first], n_out[first], kept[first])
                )
        return out

    def _vision_crop_ranges(self) -> list[tuple[int, int]]:
        """(first crop, crop count) of every image of the vision tower's batch."""
        crops = self.adapter.crops_per_image(self._fwd.vision_spans, self._fwd.image_sizes)
        starts = [sum(crops[:i]) for i in range(len(crops))]
        return list(zip(starts, crops))

    def _crop_ranges(self) -> list[tuple[int, int]]:
        """(first crop, crop count) in the vision tower's batch of every image of the current forward."""
        ranges = self._vision_crop_ranges()
        return [ranges[i] for i in self._fwd.vision_image]

    def _source(self, span: VisualSpan) -> VisualSpan:
        """The span as the vision tower saw it (its image index in the vision batch), for adapter geometry."""
        return self._fwd.vision_spans[self._fwd.vision_image[span.image]]

    # ---------------------------------------------------------------------------------------------------
    # what attention-stage methods may ask
    def visual_key_mask(self, key_length: int) -> torch.Tensor | None:
        """[B, key_length] bool, True where a key is a visual token (LLM-input layout; generated tokens are
        text). None when the current forward has no images."""
        layout = self._fwd.base if self._fwd is not None else (self._gen.base if self._gen is not None else None)
        if layout is None:
            return None
        B, T = layout.valid.shape
        mask = torch.zeros(B, key_length, dtype=torch.bool, device=layout.valid.device)
        spans = self._fwd.spans if self._fwd is not None else self._gen.spans
        for span, slots in zip(spans, layout.images):
            mask[span.sample, slots[slots < key_length]] = True
        return mask

    # ---------------------------------------------------------------------------------------------------
    # views for methods
    def _vision_view(self, span: VisualSpan) -> VisionView:
        fwd, a = self._fwd, self.adapter
        rec = fwd.vision
        if rec is None or rec.cls is None:
            raise PruneError("vtprune: the vision tower's attention was not recorded (was pixel_values given?)")
        ranges = self._crop_ranges()
        needed = sum(n for _, n in self._vision_crop_ranges())
        if needed != rec.n_crops:
            raise PruneError(
                f"vtprune: image-token count mismatch: the prompt's image tokens need {needed} vision crops/tiles "
                f"but the vision tower ran on {rec.n_crops}; build prompts with the model's processor"
            )
        first_crop, n_crops = ranges[span.image]
        seq = rec.cls.shape[1]
        cls = rec.cls[first_crop : first_crop + n_crops].reshape(-1)
        keys = rec.keys[first_crop : first_crop + n_crops].reshape(n_crops * seq, -1)
        src = a.token_sources(self._source(span), fwd.image_sizes).to(cls.device)  # [N, S]
        has = src >= 0
        safe = src.clamp(min=0)
        cls_tok = (cls[safe] * has).sum(1)
        count = has.sum(1, keepdim=True).clamp(min=1)
        keys_tok = (keys[safe] * has[..., None]).sum(1) / count
        pre = project = cls_pre = None
        if rec.projector_in is not None:
            rows = a.projector_rows(self._source(span), fwd.image_sizes).to(cls.device)
            per_row = rec.projector_in.shape[1]
            flat = rec.projector_in[first_crop : first_crop + n_crops].reshape(n_crops * per_row, -1)
            if bool((rows >= 0).all()):
                pre = flat[rows]
                project = a.projector
                if a.cls_in_projector_space and rec.hidden_cls is not None and n_crops == 1:
                    cls_pre = rec.hidden_cls[first_crop]
        crop = {}  # anyres: each crop on its own, in projector-input space with its CLS row
        geometry = a.anyres_geometry(self._source(span), fwd.image_sizes)
        if (geometry is not None and rec.projector_in is not None and rec.hidden_cls is not None
                and a.cls_in_projector_space and seq == a.vision_seq_len):
            crops = slice(first_crop, first_crop + n_crops)
            feats = rec.projector_in[crops]
            if feats.shape[1] == seq - 1:  # the model dropped CLS: put its feature-layer vector back
                feats = torch.cat([rec.hidden_cls[crops, None].to(feats.dtype), feats], 1)
            order, tokens = (g.to(cls.device) for g in geometry)
            crop = dict(crop_cls=rec.cls[crops, 1:], crop_keys=rec.keys[crops, 1:], crop_features=feats,
                        crop_order=order, crop_tokens=tokens)
            project = a.projector
        layer_cls = {}
        for layer, probs in rec.layer_cls.items():
            if probs.shape[-1] != seq:
                continue  # recorded after a vision-stage cut: not on the full grid
            flat = probs[first_crop : first_crop + n_crops].mean(1).reshape(-1)
            layer_cls[layer] = (flat[safe] * has).sum(1)
        return VisionView(cls_attention=cls_tok, keys=keys_tok, pre_projector=pre, cls_pre_projector=cls_pre,
                          project=project, layer_cls=layer_cls, **crop)

    def _image_view(self, span: VisualSpan, layout: _Layout, hidden: torch.Tensor, stage: str, layer=None,
                    attention=None) -> ImageView:
        i = span.image
        slots = layout.images[i]
        return ImageView(
            sample=span.sample,
            image=i,
            index_in_sample=span.index_in_sample,
            n_tokens=span.length,
            index=layout.image_index[i],
            embeds=hidden[span.sample, slots],
            stage=stage,
            layer=layer,
            attention=None if attention is None or isinstance(attention, dict) else attention[span.sample][:, slots],
            qkv=None if not isinstance(attention, dict) else {
                "q_last": attention["q_last"][span.sample],
                "v_last": attention["values"][span.sample][:, -1],
                "keys": attention["keys"][span.sample][:, slots],
                "values": attention["values"][span.sample][:, slots],
                "scaling": attention["scaling"],
            },
            _vision=(lambda s=span: self._vision_view(s)) if self.method.needs_vision else None,
        )

    def _select(self, views: list[ImageView]) -> list[Selection]:
        out = []
        for v in views:
            n_keep = self.method.n_keep(v, self.adapter.nominal_tokens)
            n_keep = min(n_keep, v.n)
            sel = self.method.select(v, n_keep)
            sel.keep = self._checked_keep(sel.keep, v.n)
            out.append(sel)
        return out

    def _checked_keep(self, keep: torch.Tensor, n: int) -> torch.Tensor:
        """keep as a flat long tensor, after checking it is sorted, unique and within [0, n)."""
        keep = keep.to(torch.long).flatten()
        if keep.numel() and (bool((keep[1:] <= keep[:-1]).any()) or int(keep.min()) < 0 or int(keep.max()) >= n):
            raise PruneError(f"vtprune: {self.method.name} returned keep indices that are not sorted, unique and in range")
        return keep

    # ---------------------------------------------------------------------------------------------------
    # layouts
    def _original_layout(self, attention_mask, device) -> _Layout:
        fwd = self._fwd
        B, T = fwd.batch, fwd.length
        pos = torch.arange(T, device=device).expand(B, T)
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        return _Layout(
            src=pos,
            valid=valid,
            orig=torch.where(valid, pos, torch.full_like(pos, -1)),
            images=[torch.arange(s.start, s.start + s.length, device=device) for s in fwd.spans],
            image_index=[torch.arange(s.length, device=device) for s in fwd.spans],
            position_shift=torch.zeros(B, dtype=torch.long, device=device),
        )

    def _cut(self, prev: _Layout, selections: list[Selection]) -> tuple[_Layout, torch.Tensor, torch.Tensor]:
        """New layout after dropping the unselected visual slots of ``prev``.

        Returns the layout plus the kernel inputs: keep_index [B, T'] (slots of prev, sorted, first counts[b]
        valid) and counts [B]; rows are right-aligned (left padding) so generate's last-token logits stay last.
        """
        fwd = self._fwd
        device = prev.valid.device
        B, T = prev.valid.shape
        drop = torch.zeros(B, T, dtype=torch.bool, device=device)
        for span, sel in zip(fwd.spans, selections):
            slots = prev.images[span.image]
            mask = torch.ones(slots.numel(), dtype=torch.bool, device=device)
            mask[sel.keep.to(device)] = False
            drop[span.sample, slots[mask]] = True
        keep = ~drop
        counts = keep.sum(1)
        T_new = int(counts.max())
        keep_index = torch.full((B, T_new), -1, dtype=torch.long, device=device)
        for b in range(B):
            idx = torch.nonzero(keep[b]).flatten()
            keep_index[b, : idx.numel()] = idx
        pad = T_new - counts  # left padding added per sample
        slot_of = torch.full((B, T), -1, dtype=torch.long, device=device)  # prev slot -> new slot
        for b in range(B):
            idx = keep_index[b, : int(counts[b])]
            slot_of[b, idx] = torch.arange(int(counts[b]), device=device) + pad[b]
        src = torch.full((B, T_new), -1, dtype=torch.long, device=device)
        for b in range(B):
            src[b, int(pad[b]):] = keep_index[b, : int(counts[b])]
        gathered = src.clamp(min=0)
        valid = prev.valid.gather(1, gathered) & (src >= 0)
        orig = torch.where(valid, prev.orig.gather(1, gathered), torch.full_like(src, -1))
        images, image_index = [], []
        for span, sel in zip(fwd.spans, selections):
            old_slots = prev.images[span.image]
            kept_slots = old_slots[sel.keep.to(device)]
            images.append(slot_of[span.sample, kept_slots])
            image_index.append(prev.image_index[span.image][sel.keep.to(device)])
        layout = _Layout(src=src, valid=valid, orig=orig, images=images, image_index=image_index,
                         position_shift=prev.position_shift.clone())
        return layout, keep_index, counts

    def _record_stage(self, stage: str, layer, prev: _Layout, new: _Layout, selections: list[Selection]) -> None:
        for span, sel in zip(self._fwd.spans, selections):
            before = prev.image_index[span.image]
            kept = sel.sources if sel.sources is not None else new.image_index[span.image]
            self._fwd.stats.images[span.image].stages.append(
                StageStats(stage, layer, int(before.numel()), int(sel.keep.numel()),
                           [int(x) for x in kept.tolist() if int(x) >= 0])
            )

    def _finish_stats(self) -> None:
        stats = self._fwd.stats
        L = stats.llm_layers
        for img in stats.images:
            counts = [img.n_tokens] * L
            for st in img.stages:
                start = st.layer if st.stage == "llm" else 0
                for l in range(start, L):
                    counts[l] = st.tokens_out
            img.equivalent_tokens = sum(counts) / L if L else float(img.n_tokens)

    # ---------------------------------------------------------------------------------------------------
    # helpers shared by the LLM-side hooks
    def _gather_rows(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Out-of-place x[b, src[b, t]] for small per-token tensors ([B|1, T] or [B|1, T, d]); -1 -> 0."""
        B = src.shape[0]
        if x.shape[0] != B:
            x = x.expand(B, *x.shape[1:])
        idx = src.clamp(min=0)
        if x.dim() == 2:
            out = x.gather(1, idx)
        else:
            out = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return out

    def _compact_hidden(self, hidden: torch.Tensor, keep_index, counts) -> torch.Tensor:
        if hidden.requires_grad or self._fwd.keep_hidden_states:  # out of place: autograd / returned hidden states
            out = self._gather_rows(hidden, keep_index)
            # right-align to match the in-place kernel's left-padded layout
            T_new = keep_index.shape[1]
            res = torch.zeros_like(out)
            for b in range(hidden.shape[0]):
                c = int(counts[b])
                res[b, T_new - c:] = out[b, :c]
            return res
        return compact_(hidden, keep_index, dim=1, counts=counts, pad_left=True)

    def _positions(self, prev_positions: torch.Tensor, new: _Layout) -> torch.Tensor:
        """Position ids of the new layout's slots: original (gathered) or renumbered contiguously."""
        if self.method.positions == "original":
            pos = self._gather_rows(prev_positions, new.src)
            return torch.where(new.valid, pos, torch.zeros_like(pos))
        # renumber: contiguous over the valid slots, starting where the sample's first real token started
        first = self._gather_rows(prev_positions, new.src)
        start = torch.where(new.valid, first, torch.full_like(first, 1 << 30)).min(1, keepdim=True).values
        start = torch.where(start == (1 << 30), torch.zeros_like(start), start)
        ranks = new.valid.long().cumsum(1) - 1
        return torch.where(new.valid, start + ranks, torch.zeros_like(ranks))

    def _mask_4d(self, valid: torch.Tensor, q_len: int, dtype, like_impl: str):
        """[B, 1, q, T] mask for a compacted layout: slot-causal, padding keys masked, each query sees itself."""
        B, T = valid.shape
        q_slots = torch.arange(T - q_len, T, device=valid.device)
        k_slots = torch.arange(T, device=valid.device)
        causal = k_slots[None, :] <= q_slots[:, None]
        allowed = causal[None] & valid[:, None, :]
        allowed = allowed | (k_slots[None, None, :] == q_slots[None, :, None])
        allowed = allowed[:, None]
        if compat.mask_is_boolean(like_impl):
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)

    # ---------------------------------------------------------------------------------------------------
    # stage "pre_llm" (and decode-time mapping) at the language model's entry
    @_guard
    def _on_llm_start(self, module, args, kwargs):
        if self._gen is not None and self._fwd is None:
            return self._map_decode_inputs(kwargs)
        fwd = self._fwd
        if fwd is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[1] != fwd.length:
            raise PruneError("vtprune: the language model did not receive the merged inputs_embeds it expected")
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
            raise PruneError("vtprune: only 2-D attention masks are supported with pruning")
        self._check_left_padded(attention_mask)
        base = self._original_layout(attention_mask, embeds.device)
        lm_config = self.adapter.language_model.config
        fwd.keep_hidden_states = bool(kwargs.get("output_hidden_states", getattr(lm_config, "output_hidden_states", False)))
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(fwd.length, device=embeds.device)[None]  # the LLM's own default
        if position_ids.dim() != 2:
            raise PruneError("vtprune: 3-D (multimodal rope) position ids are not supported")
        if self.method.stage in ("pre_llm", "vision"):
            if self.method.stage == "vision":
                selections = self._selections_from_vision()
            else:
                views = [self._image_view(s, base, embeds, "pre_llm") for s in fwd.spans]
                selections = self._select(views)
            new, keep_index, counts = self._cut(base, selections)
            self._record_stage("pre_llm", None, base, new, selections)
            new_position_ids = self._positions(position_ids, new)
            embeds = self._compact_hidden(embeds, keep_index, counts)
            for span, sel in zip(fwd.spans, selections):
                if sel.values is not None:
                    embeds[span.sample, new.images[span.image]] = sel.values.to(embeds.dtype)
            old_last = self._gather_rows(position_ids, base.src)[:, -1]
            new.position_shift = old_last - new_position_ids[:, -1]
            kwargs["inputs_embeds"] = embeds
            kwargs["position_ids"] = new_position_ids
            # an explicit mask also stops transformers from reading position gaps as packed sequences
            kwargs["attention_mask"] = new.valid.long()
            base = new
        else:
            kwargs["position_ids"] = position_ids
        base.position_ids = kwargs["position_ids"]
        fwd.base = base
        if not self.method.cut_layers():
            self._finish_stats()
        return args, kwargs

    @staticmethod
    def _check_left_padded(attention_mask) -> None:
        """Scores read each sample's last prompt token and cuts keep rows right-aligned: refuse right padding."""
        if not isinstance(attention_mask, torch.Tensor):
            return
        padded_end = torch.nonzero(~attention_mask[:, -1].bool()).flatten()
        if padded_end.numel():
            raise PruneError(
                f"vtprune: sample {int(padded_end[0])} of the batch is right-padded (its attention_mask ends in 0), "
                "but pruning needs each sample's last prompt token in the last column; pad on the left "
                "(processor.tokenizer.padding_side = 'left')"
            )

    def _on_llm_end(self, module, args, kwargs, output):
        fwd = self._fwd
        if fwd is None or fwd.base is None:
            return None
        cache = getattr(output, "cache", None)
        if cache is None and isinstance(output, dict):
            cache = output.get("past_key_values")
        if cache is not None:
            self._gen = _Generation(
                cache=cache, base=fwd.base, deep=dict(fwd.deep), prompt_length=fwd.length, spans=fwd.spans
            )
        return None

    def _map_decode_inputs(self, kwargs):
        """Translate generate()'s original-layout 2-D mask / positions onto the compacted cache."""
        gen = self._gen
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        q = embeds.shape[1]
        base = gen.base
        cached = compat.cache_length(gen.cache, 0)
        T_base = base.valid.shape[1]
        new_tokens = cached - T_base + q  # tokens after the prompt, this step's included
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor):
            if am.dim() != 2:
                raise PruneError("vtprune: only 2-D attention masks are supported with pruning")
            if am.shape[1] == gen.prompt_length + new_tokens:
                tail = am[:, gen.prompt_length:]
            elif am.shape[1] == cached + q:
                tail = am[:, T_base:]  # already in the compacted layout
            else:
                raise PruneError(
                    f"vtprune: decode attention_mask has {am.shape[1]} columns; expected "
                    f"{gen.prompt_length + new_tokens} (original layout) or {cached + q} (compacted cache)"
                )
            kwargs["attention_mask"] = torch.cat([base.valid.to(tail.dtype), tail], dim=1)
        elif not bool(base.valid.all()):
            kwargs["attention_mask"] = torch.cat(
                [base.valid.long(), torch.ones(base.valid.shape[0], new_tokens, dtype=torch.long, device=base.valid.device)], 1
            )
        pos = kwargs.get("position_ids")
        if pos is None:
            last = base.position_ids[:, -1:]
            kwargs["position_ids"] = last + 1 + (new_tokens - q) + torch.arange(q, device=last.device)[None]
        else:
            kwargs["position_ids"] = pos - base.position_shift[:, None].to(pos.device)
        gen.step_mask = kwargs.get("attention_mask")
        return (), kwargs

    # ---------------------------------------------------------------------------------------------------
    # stage "llm": before decoder layer K
    @_guard
    def _on_decoder_layer(self, layer_idx, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cuts = self.method.cut_layers()
        fwd = self._fwd
        if fwd is not None and fwd.base is not None:
            if layer_idx in cuts:
                hidden = self._cut_in_llm(layer_idx, hidden, kwargs)
            seg = fwd.deep[max(k for k in cuts if k <= layer_idx)]
            kwargs["position_embeddings"] = seg.position_embeddings
            kwargs["position_ids"] = seg.position_ids
            kwargs["attention_mask"] = seg.mask
        elif self._gen is not None and self._gen.deep:
            seg = self._gen.deep[max(k for k in cuts if k <= layer_idx)]
            self._decode_layer_inputs(layer_idx, seg, hidden, kwargs)
        else:
            return None
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _cut_in_llm(self, layer_idx: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        fwd = self._fwd
        prev_k = [k for k in fwd.deep if k < layer_idx]
        prev = fwd.deep[max(prev_k)] if prev_k else fwd.base
        score_layer = layer_idx - 1
        attention = fwd.attention_rows.get(score_layer)
        views = [self._image_view(s, prev, hidden, "llm", layer_idx, attention) for s in fwd.spans]
        selections = self._select(views)
        new, keep_index, counts = self._cut(prev, selections)
        self._record_stage("llm", layer_idx, prev, new, selections)
        cos, sin = kwargs["position_embeddings"] if prev.position_embeddings is None else prev.position_embeddings
        if self.method.positions == "original":
            new.position_ids = self._gather_rows(prev.position_ids, new.src)
            new.position_embeddings = (self._gather_rows(cos, new.src), self._gather_rows(sin, new.src))
        else:
            new.position_ids = self._positions(prev.position_ids, new)
            new.position_embeddings = self.adapter.rotary(hidden, new.position_ids)
            new.position_shift = prev.position_shift + (prev.position_ids[:, -1] - new.position_ids[:, -1])
        incoming = kwargs.get("attention_mask") if prev.mask is None else prev.mask
        text_impl = compat.get_attn_implementation(self.adapter.language_model.config)
        if incoming is None and bool(new.valid.all()):
            new.mask = None
        else:
            new.mask = self._mask_4d(new.valid, new.valid.shape[1], hidden.dtype, text_impl)
        hidden = self._compact_hidden(hidden, keep_index, counts)
        for span, sel in zip(fwd.spans, selections):
            if sel.values is not None:
                hidden[span.sample, new.images[span.image]] = sel.values.to(hidden.dtype)
        fwd.deep[layer_idx] = new
        if layer_idx == max(self.method.cut_layers()):
            self._finish_stats()
        return hidden

    def _decode_layer_inputs(self, layer_idx: int, seg: _Layout, hidden: torch.Tensor, kwargs) -> None:
        gen = self._gen
        q = hidden.shape[1]
        cached = compat.cache_length(gen.cache, layer_idx)
        T_seg = seg.valid.shape[1]
        new_tokens = cached - T_seg + q
        am2d = gen.step_mask
        if isinstance(am2d, torch.Tensor):
            tail = am2d[:, am2d.shape[1] - new_tokens:].bool()
        else:
            tail = torch.ones(seg.valid.shape[0], new_tokens, dtype=torch.bool, device=seg.valid.device)
        valid = torch.cat([seg.valid, tail], dim=1)
        text_impl = compat.get_attn_implementation(self.adapter.language_model.config)
        if kwargs.get("attention_mask") is None and bool(valid.all()):
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = self._mask_4d(valid, q, hidden.dtype, text_impl)
        if self.method.positions == "renumber":
            # the language-model entry already moved decode positions into the layout entering the LLM; only the
            # shift added by the LLM cuts up to this segment is left (subtracting seg's total shift counts it twice)
            extra = seg.position_shift - gen.base.position_shift
            pos = kwargs["position_ids"] - extra[:, None]
            kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = self.adapter.rotary(hidden, pos)
