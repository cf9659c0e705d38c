"""The object behind ``model.vtprune``: installs the plan's hooks, owns the per-forward context, keeps ``stats``.

Data flow of one pruned prefill (docs/architecture.md): the model pre-hook finds each image's span; vision
probes record inside the vision attention chain; vision layers before a cut run ``stages.vision``; the language
model pre-hook runs ``stages.llm_input``; decoder layer pre-hooks run ``stages.llm``; LLM probes and modulators
sit in each attention module's chain. Decode steps go through ``stages.decode`` on the compacted cache.
Installing and removing the session is the only way vtprune touches a model; removal restores it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref

from . import compat
from .adapters import Adapter
from .core.attention import AttentionCall
from .core.context import Forward, Generation, VisionRun
from .core.hooks import HookSet
from .core.layout import visual_key_mask
from .core.plan import Plan, build_plan, model_info
from .core.spans import check_crops, expanded_spans, find_spans, unexpanded
from .core.stats import ImageStats, PruneStats, StageStats  # noqa: F401  (re-exported)
from .errors import PruneError
from .methods.base import Method
from .stages import decode, llm, llm_input, vision


UNPRUNED = "vtprune removed its hooks; the model is unpruned now (call vtprune.prune again)."


def _guard(fn):
    """Turn any failure inside a hook into a PruneError after restoring the model unpruned; the message says so,
    so that a caller who catches it and retries does not get unpruned results unknowingly."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            self._abort()
            if isinstance(err, PruneError):
                if UNPRUNED not in str(err):
                    err.args = (_then_unpruned(str(err)),)
                raise
            where = f"{type(err).__name__} inside the {self.plan_name!r} hooks"
            raise PruneError(_then_unpruned(f"vtprune: {where}: {err}")) from err

    return wrapper


def _then_unpruned(message: str) -> str:
    """``message`` as a sentence (a full stop added unless it ends in one), then :data:`UNPRUNED`."""
    message = message.rstrip()
    return f"{message}{'' if message.endswith(('.', '!', '?')) else '.'} {UNPRUNED}"


class Session:
    """Per-model pruning session for a pipeline of methods. Create through :func:`vtprune.prune`.
    ``evict_early_kv``: after each prefill, cut the KV cache of the layers before the last LLM cut to the final
    kept tokens (``stages.llm.evict_early_kv``).

    What outlives a call: only ``stats``, once generate() (or a plain forward) returns. The KV cache belongs to the
    caller: its Generation is parked, held through a weak reference to the cache, so decoding by hand on it
    (``cache=out.cache``) resumes it, and nothing of it stays once the cache is dropped."""

    def __init__(self, model, adapter: Adapter, methods: tuple[Method, ...], evict_early_kv: bool = False):
        self.model = model
        self.adapter = adapter
        self.methods = tuple(methods)
        self.evict_early_kv = evict_early_kv
        self.plan: Plan | None = None
        self.hooks = HookSet()
        self.stats: PruneStats | None = None
        self._fwd: Forward | None = None
        self._gen: Generation | None = None
        self._vision: VisionRun | None = None
        self._generating = 0  # generate() calls running (a nested one ends inside the outer one)
        # cache -> its Generation without the cache, once the forward / generate() that filled it returned: kept
        # while the caller holds the cache (to decode on it by hand), gone with it
        self._parked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def method(self) -> Method:
        """The method of a one-method session (a pipeline has ``methods``)."""
        if len(self.methods) != 1:
            raise AttributeError(f"vtprune: this model runs a pipeline ({self.plan_name}); use .methods")
        return self.methods[0]

    @property
    def plan_name(self) -> str:
        return "+".join(m.name for m in self.methods)

    # --- what probes and stages ask -------------------------------------------------------------------
    def vision_run(self) -> VisionRun | None:
        return self._vision

    def starting(self) -> Forward | None:
        """The prefill this model call is setting up, from the model's entry on (before the language model starts;
        for probes that record the prompt itself); None in decode steps and text-only forwards."""
        return self._fwd

    def prefill(self) -> Forward | None:
        """The current prefill once the language model started (None in decode steps and text-only forwards)."""
        return self._fwd if self._fwd is not None and self._fwd.entry is not None else None

    # --- install / remove -----------------------------------------------------------------------------
    def install(self) -> None:
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    def _install(self) -> None:
        m, a, hooks = self.model, self.adapter, self.hooks
        self.plan = plan = build_plan(self.methods, model_info(a))  # every layer checked, also at ratio 0
        own = [x.name for x in self.methods if x.stores_kv]
        if self.evict_early_kv and own:
            raise PruneError(f"vtprune: evict_early_kv cuts the default cache's layers, but {own[0]} replaces them by "
                             f"its own KV store; drop evict_early_kv or use {own[0]} without a KV mode")
        hooks.pre(m, self._on_model_start)
        hooks.post(m, self._on_model_end, with_kwargs=True, always_call=True)
        hooks.wrap(m.model, "get_image_features", self._wrap_image_features)
        hooks.wrap(m, compat.GENERATE_EXPAND, self._wrap_expand)
        hooks.wrap(m, "generate", self._wrap_generate)
        if not plan.active:
            return  # ratio 0: nothing is cut and nothing is computed; stats still report the spans
        hooks.pre(a.language_model, self._on_llm_start)
        hooks.post(a.language_model, self._on_llm_end, with_kwargs=True)
        if plan.vision:
            for j in range(min(plan.vision), len(a.vision_layers)):
                hooks.pre(a.vision_layers[j], functools.partial(self._on_vision_layer, j))
            hooks.post(a.vision_tower, self._on_vision_end)
        if plan.llm:
            for i in range(min(plan.llm), len(a.decoder_layers)):
                hooks.pre(a.decoder_layers[i], functools.partial(self._on_decoder_layer, i))
        for probe in plan.probes:  # after the cut hooks: a probe sees what its layer really gets
            probe.attach(self)
        for layer, modulators in sorted(plan.modulators.items()):
            for slot, method in modulators:
                fn = functools.partial(self._modulate, layer, slot, method)
                hooks.attention(a.decoder_layers[layer].self_attn, fn, "modulate")
        for layer in range(a.deepstack_layers):  # first among the next module's pre-hooks: the model adds it there
            after = a.decoder_layers[layer + 1] if layer + 1 < len(a.decoder_layers) else a.language_model.norm
            hooks.pre(after, functools.partial(self._on_deepstack, layer), prepend=True)

    def _wrap_image_features(self, original):
        """generate() encodes images before the prefill forward: the start of a vision run is only visible here."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            sizes = bound.get(self.adapter.image_sizes_key)  # Qwen-VL: image_grid_thw, seen here under generate()
            self._vision = VisionRun(pixel_values=bound.get("pixel_values"), image_sizes=sizes)
            if self._fwd is not None and self._fwd.vision is None:
                self._fwd.vision = self._vision
            return original(*args, **kwargs)

        return get_image_features

    def _wrap_expand(self, original):
        """generate()'s batch expansion runs after the images were encoded: each prompt ``expand`` times, each
        image once."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def expand_inputs(*args, **kwargs):
            size = signature.bind_partial(*args, **kwargs).arguments.get("expand_size", 1)
            if self._vision is not None:
                self._vision.expand = int(size)
            return original(*args, **kwargs)

        return expand_inputs

    def _wrap_generate(self, original):
        """When generate() returns (or raises), let go of what it kept: the VisionRun (pixel values, vision probe
        records), the Forward and the KV cache (its Generation is parked); ``stats`` stay."""

        @functools.wraps(original)
        def generate(*args, **kwargs):
            self._generating += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._generating -= 1
                if self._generating == 0:
                    self._park()
                    self._vision = self._fwd = None

        return generate

    def _park(self) -> None:
        """Hold the current Generation only weakly through its cache: a caller who keeps the cache can still
        decode on it (``_resume``); once the cache is dropped, nothing of it stays."""
        gen, self._gen = self._gen, None
        if gen is not None:  # decode reads the layouts' slots and positions, not the prefill's 4-D masks / rotary
            segments = {k: dataclasses.replace(l, mask=None, position_embeddings=None) for k, l in gen.segments.items()}
            try:
                self._parked[gen.cache] = dataclasses.replace(gen, cache=None, step_mask=None, segments=segments)
            except TypeError:  # a cache object without weak references cannot be resumed: nothing is kept
                pass

    def _resume(self, cache) -> None:
        """A forward continuing a parked cache (not emptied since) makes its Generation current again."""
        if cache is None or (self._gen is not None and cache is self._gen.cache):
            return
        parked = self._parked.pop(cache, None)
        if parked is not None and compat.cache_length(cache) > 0:
            self._park()
            self._gen = dataclasses.replace(parked, cache=cache)

    def remove(self) -> None:
        self.hooks.remove()
        self._vision = self._fwd = self._gen = None
        self._parked.clear()
        if getattr(self.model, "vtprune", None) is self:
            del self.model.vtprune

    def _abort(self) -> None:
        self._fwd = self._gen = None
        self.remove()

    # --- model entry / exit ---------------------------------------------------------------------------
    @_guard
    def _on_model_start(self, module, args, kwargs):
        self._fwd = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.get_cache(kwargs)
        pixel_values = kwargs.get("pixel_values")
        self._resume(cache)
        if self._gen is not None and cache is not None and cache is self._gen.cache:
            if pixel_values is not None:
                raise PruneError("vtprune: new images in a decode step of a pruned cache are not supported")
            return None  # decode step on our compacted cache
        self._park()
        self.stats = None  # a new forward: stats describe it once it has run, or stay None (text-only)
        vision = self._images_of(kwargs, input_ids, cache)
        if vision is False:
            return None  # text-only: untouched
        self._refuse_static(cache)
        if pixel_values is None:  # generate() (or the caller) ran get_image_features before this forward
            pixel_values = vision.pixel_values
        image_sizes = kwargs.get(self.adapter.image_sizes_key)
        if image_sizes is None and vision is not None:
            image_sizes = vision.image_sizes
        expand = vision.expand if vision is not None else 1
        vision_spans = find_spans(self.adapter, unexpanded(input_ids, expand), pixel_values, image_sizes)
        check_crops(self.adapter, vision_spans, pixel_values, image_sizes)
        spans, vision_image = expanded_spans(vision_spans, input_ids.shape[0], expand)
        self._check_keep_per_image(spans)
        self._fwd = Forward(spans=spans, batch=input_ids.shape[0], length=input_ids.shape[1], image_sizes=image_sizes,
                            vision=vision, vision_spans=vision_spans, vision_image=vision_image)
        self._fwd.stats = PruneStats(method=self.plan_name, images=[ImageStats(s.sample, s.image, s.length) for s in spans],
                                     llm_layers=len(self.adapter.decoder_layers))
        if not self.plan.active:
            self._fwd.stats.finish()
        return None

    def _check_keep_per_image(self, spans) -> None:
        """Dynamic resolution (``image_nominal`` None): ``keep`` is per image, capped at each image's tokens; a keep
        above every image of the batch would prune nothing anywhere, which is a mistake, not a budget."""
        if self.adapter.image_nominal is not None or not spans:
            return
        largest = max(s.length for s in spans)
        for m in self.methods:
            if m.keep is not None and not m.is_noop and m.keep > largest:
                raise PruneError(f"vtprune: {m.name} keep={m.keep} is more than every image of this batch has (the "
                                 f"largest has {largest} visual tokens); use keep <= {largest}, or ratio=...")

    def _refuse_static(self, cache) -> None:
        """A preallocated cache is sized and masked for the unpruned sequence; pruning shortens it."""
        static = compat.static_cache_name(cache) if self.plan.active else None
        if static is not None:
            option = compat.STATIC_CACHE_OPTION
            raise PruneError(f"vtprune: a {static} ({option}) cannot hold a pruned sequence; use the default "
                             f"DynamicCache: drop {option} (or pass no cache)")

    def _images_of(self, kwargs, input_ids, cache):
        """The vision run already encoded for this forward (generate()), None when pixel_values come with it, or
        False for a text-only forward; raises on inputs that cannot be pruned."""
        pixel_values = kwargs.get("pixel_values")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        has_images = pixel_values is not None or encoded is not None
        if input_ids is None or input_ids.numel() == 0:
            if has_images:  # generate(inputs_embeds=...) encodes pixel_values first: encoded, no input_ids
                raise PruneError("vtprune: pass input_ids (not inputs_embeds) so the visual tokens can be located")
            return False
        if not bool((input_ids == self.adapter.image_token_id).any()):
            if has_images:
                raise PruneError(
                    "vtprune: pixel_values were given but input_ids hold no image token "
                    f"(id {self.adapter.image_token_id}); build the prompt with the model's processor"
                )
            return False
        if compat.cache_length(cache) > 0:
            raise PruneError(
                "vtprune: image tokens arrived with a non-empty KV cache; pruning a continued conversation is "
                "not supported. Start from an empty cache."
            )
        if not has_images:
            raise PruneError("vtprune: input_ids hold image tokens but no pixel_values were given")
        if pixel_values is not None:
            return None
        if self._vision is None:
            raise PruneError("vtprune: image features were encoded before vtprune.prune() was called; pass pixel_values")
        return self._vision

    def _on_model_end(self, module, args, kwargs, output):
        fwd, self._fwd = self._fwd, None
        if kwargs.get("pixel_values") is not None:
            self._vision = None  # this forward encoded its own images: nothing later reads them
        if fwd is not None and fwd.stats is not None and (fwd.entry is not None or not self.plan.active):
            self.stats = fwd.stats
        cache = compat.output_cache(output) if fwd is not None and not self.plan.active else None
        if cache is not None:  # ratio 0: no LLM hooks, but decode steps must still be told from new forwards
            self._gen = Generation(cache=cache, segments={}, prompt_length=fwd.length, spans=fwd.spans)
        if not self._generating:
            self._park()  # a plain forward returned: its cache is the caller's now
        return None

    # --- vision tower ---------------------------------------------------------------------------------
    @_guard
    def _on_vision_layer(self, layer, module, args, kwargs):
        run = self._vision
        if run is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden, mask = vision.before_layer(self, run, layer, hidden)
        return vision.layer_inputs(self, args, kwargs, hidden, mask)

    @_guard
    def _on_vision_end(self, module, args, output):
        run = self._vision
        if run is None or run.cuts is None:
            return None
        return vision.after_tower(self, run, output)

    # --- language model -------------------------------------------------------------------------------
    @_guard
    def _on_llm_start(self, module, args, kwargs):
        if self._gen is not None and self._fwd is None:
            return decode.llm_inputs(self._gen, kwargs)
        if self._fwd is None:
            return None
        return args, llm_input.prepare(self, self._fwd, kwargs)

    @_guard
    def _on_llm_end(self, module, args, kwargs, output):
        fwd = self._fwd
        if fwd is None or fwd.entry is None:
            return None
        cache = compat.output_cache(output)
        if cache is not None:
            for slot, method in enumerate(self.methods):
                method.end_prefill(cache, fwd.shared.setdefault(slot, {}))
            evicted = llm.evict_early_kv(fwd, cache) if self.evict_early_kv else None
            self._gen = Generation(cache=cache, segments=evicted or dict(fwd.segments), prompt_length=fwd.length,
                                   spans=fwd.spans, shared=fwd.shared, evicted=evicted is not None)
        return None

    @_guard
    def _on_deepstack(self, layer, module, args, kwargs):
        """Add DeepStack features after decoder ``layer`` on its current layout (the language model's own add was
        taken over at its entry: its mask is a local variable no hook could cut)."""
        fwd = self.prefill()
        if fwd is None or fwd.deepstack is None:
            return None
        if args:
            return (llm_input.add_deepstack(fwd, layer, args[0]),) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = llm_input.add_deepstack(fwd, layer, kwargs["hidden_states"])
        return args, kwargs

    @_guard
    def _on_decoder_layer(self, layer, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.prefill() is not None:
            hidden = llm.before_layer(self, self._fwd, layer, hidden, kwargs)
        elif self._gen is not None:
            decode.layer_inputs(self, self._gen, layer, hidden, kwargs)
        else:
            return None
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    @_guard
    def _modulate(self, layer, slot, method, next, module, query, key, value, attention_mask, **kwargs):
        context = self.prefill() or (self._gen if self._fwd is None else None)
        if context is None:  # text-only forward: untouched
            return next(module, query, key, value, attention_mask, **kwargs)
        layout = context.layout_at(layer)
        visual = visual_key_mask(layout, context.spans, key.shape[2])
        prefill = isinstance(context, Forward)
        call = AttentionCall(module, query, key, value, attention_mask, kwargs, layer, visual, next,
                             records=context.records if prefill else {}, layout=layout, spans=context.spans,
                             shared=context.shared.setdefault(slot, {}),
                             view=functools.partial(self._probe_view, slot, layout) if prefill else None,
                             stats=context.stats if prefill else None)
        out = method.modulate(call)
        return call.run() if out is None else out

    def _probe_view(self, slot, layout, probe, span):
        """A modulator's view of a declared probe for one image (its tokens in ``layout``), at prefill."""
        from .core.probes import ImageSlice

        fwd = self._fwd
        where = ImageSlice(span, fwd, self.adapter, layout.image_index[span.image])
        if probe is None:
            return where
        if probe not in self.plan.declared.get(slot, ()):
            raise PruneError(f"vtprune: a modulator reads {probe} but does not declare it; return it from probes()")
        store = fwd.vision.records if probe.scope == "vision" and fwd.vision is not None else fwd.records
        if store.get(probe) is None:
            raise PruneError(f"vtprune: {probe} recorded nothing before LLM attention (was pixel_values given?)")
        return probe.for_image(store[probe], where)
