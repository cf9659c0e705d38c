"""Everything that depends on the transformers version lives here.

transformers 5.x moves fast: ``cache_position`` was removed (5.4), ``past_key_values`` became ``cache``
(5.24, old name deprecated until 5.40), attention functions and mask functions are looked up by name in two
registries, and a cache layer is a ``CacheLayerMixin`` (``StoreLayer`` puts a vtprune KV store in its place). The
rest of vtprune goes through these helpers only.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CACHE_KWARGS = ("cache", "past_key_values")
# generate()'s method that repeats the batch for beams / num_return_sequences after the images were encoded
GENERATE_EXPAND = "_expand_inputs_for_generation"
WRAPPED_PREFIX = "vtprune+"
# generate()'s option that builds a preallocated (static) KV cache
STATIC_CACHE_OPTION = 'cache_implementation="static"'


def get_cache(kwargs: dict) -> Any:
    """The KV cache passed to a forward, under whichever keyword this transformers version uses."""
    for key in CACHE_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (a ModelOutput attribute or a dict key, by this version's name), or None."""
    for key in CACHE_KWARGS:
        cache = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if cache is not None:
            return cache
    return None


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    """Number of cached positions in ``layer_idx`` (0 when there is no cache or it is empty)."""
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer_idx))
    except (IndexError, AttributeError):
        return 0


def static_cache_name(cache: Any) -> str | None:
    """The class name of a cache whose layers are preallocated to a fixed length (``StaticCache``, what
    ``cache_implementation="static"`` and its offloaded / sliding variants build), else None."""
    if any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", None) or ()):
        return type(cache).__name__
    return None


def cache_layer_kv(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[B, H, T, d]`` keys and values one layer of a ``DynamicCache`` holds (5.x: ``cache.layers[i]``)."""
    layer = _dynamic_layer(cache, layer_idx)
    return layer.keys, layer.values


def set_cache_layer_kv(cache: Any, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make one ``DynamicCache`` layer hold ``keys`` / ``values`` ([B, H, T', d]; later steps concatenate to them)."""
    layer = _dynamic_layer(cache, layer_idx)
    layer.keys, layer.values = keys, values


class StoreLayer(DynamicLayer):
    """A cache layer whose tokens live in a vtprune KV store (``core.kvcache``: evicted or packed): transformers
    reads the store's logical length (masks and positions continue from the unpruned prompt) and attention gets
    what ``store.append`` returns. Beam reordering and batch selection go to ``store.select``."""

    def __init__(self, store):  # no DynamicLayer.__init__: keys / values are the store's, read-only
        self.store, self.is_initialized, self.device = store, True, store.device

    keys = property(lambda self: self.store.tensors()[0], lambda self, _: None)
    values = property(lambda self: self.store.tensors()[1], lambda self, _: None)

    def update(self, key_states, value_states, *args, **kwargs):
        return self.store.append(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.store.length

    def reorder_cache(self, beam_idx) -> None:
        self.store.select(beam_idx)

    def batch_select_indices(self, indices) -> None:
        self.store.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.store.tensors()[0].shape[0]
        self.store.select(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("vtprune: a pruned / packed KV cache layer cannot be cropped (assisted decoding)")

    def reset(self) -> None:
        raise NotImplementedError("vtprune: a pruned / packed KV cache layer cannot be reset; start a new cache")


def set_cache_store(cache: Any, layer_idx: int, store) -> None:
    """Make layer ``layer_idx`` of a ``DynamicCache`` hold ``store`` (a ``core.kvcache`` store) from now on."""
    _dynamic_layer(cache, layer_idx)  # only a filled default layer is replaced
    cache.layers[layer_idx] = StoreLayer(store)


def cache_store(cache: Any, layer_idx: int):
    """The store of a layer :func:`set_cache_store` replaced, or None."""
    layers = getattr(cache, "layers", None) or ()
    layer = layers[layer_idx] if 0 <= layer_idx < len(layers) else None
    return layer.store if isinstance(layer, StoreLayer) else None


def _dynamic_layer(cache: Any, layer_idx: int) -> DynamicLayer:
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and 0 <= layer_idx < len(layers) else None
    # subclasses (sliding window, quantized, indexed) keep more state about their length than the tensors
    if type(layer) is not DynamicLayer or not layer.is_initialized:
        raise TypeError(
            f"layer {layer_idx} of the KV cache is a {type(layer).__name__}, not a filled DynamicLayer; evicting "
            "cached tokens needs the default DynamicCache (do not pass cache_implementation / a static cache)"
        )
    return layer


def get_attn_implementation(config) -> str:
    return config._attn_implementation


def set_attn_implementation(config, name: str) -> None:
    """Set the attention implementation of one (sub-)config, on this model instance only.

    ``PreTrainedModel.set_attn_implementation`` validates names against the hub-kernel machinery; our wrapped
    names are registered locally, so the field is set directly (and restored the same way).
    """
    config._attn_implementation_internal = name


# Models may share one config object (e.g. two models built from the same config): the wrapped name is set on a
# config while any session needs it and restored when the last one lets go.
_WRAPPED_CONFIGS: dict[int, list] = {}  # id(config) -> [config, original implementation, sessions holding it]


def acquire_wrapped_attention(config) -> None:
    """Route this config's attention through the vtprune wrapper (reference-counted per config object)."""
    entry = _WRAPPED_CONFIGS.get(id(config))
    if entry is None or entry[0] is not config:
        impl = get_attn_implementation(config)
        entry = _WRAPPED_CONFIGS[id(config)] = [config, impl, 0]
        set_attn_implementation(config, wrapped_attention_name(impl))
    entry[2] += 1


def release_wrapped_attention(config) -> None:
    """Undo one :func:`acquire_wrapped_attention`; the last release restores the original implementation."""
    entry = _WRAPPED_CONFIGS.get(id(config))
    if entry is None or entry[0] is not config:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        set_attn_implementation(config, entry[1])
        del _WRAPPED_CONFIGS[id(config)]


def _eager_function_for(module: torch.nn.Module) -> Callable:
    """The model family's own eager attention function (each modeling file defines one)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"vtprune: no eager_attention_forward next to {type(module).__name__}")
    return fn


def rotary_function(module: torch.nn.Module) -> Callable:
    """The model family's own ``apply_rotary_pos_emb(q, k, cos, sin)`` (each modeling file defines one)."""
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise RuntimeError(f"vtprune: no apply_rotary_pos_emb next to {type(module).__name__}")
    return fn


def base_attention_function(module: torch.nn.Module, implementation: str) -> Callable:
    if implementation == "eager":
        return _eager_function_for(module)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def wrapped_attention_name(implementation: str) -> str:
    """Register (once) an attention function that delegates to ``implementation`` unless a vtprune hook is set.

    The hook is an instance attribute ``_vtprune_attention`` of the attention module (vtprune's ordered chain,
    ``core.hooks.AttentionChain``), so other models in the process that use the same name are untouched.
    """
    if implementation.startswith(WRAPPED_PREFIX):
        return implementation
    name = WRAPPED_PREFIX + implementation
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        base = base_attention_function(module, implementation)
        hook = getattr(module, "_vtprune_attention", None)
        if hook is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        return hook(base, module, query, key, value, attention_mask, **kwargs)

    attention.vtprune_base = implementation  # for introspection / tests
    AttentionInterface.register(name, attention)
    mask_name = "eager" if implementation == "eager" else implementation
    if mask_name in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        # Without a mask function registered under the same name, transformers silently builds no mask.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_name])
    return name


def mask_is_boolean(implementation: str) -> bool:
    """Whether the 4-D masks this implementation consumes are boolean (True = attend) or additive floats."""
    base = implementation[len(WRAPPED_PREFIX):] if implementation.startswith(WRAPPED_PREFIX) else implementation
    return base != "eager"



def vision_window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int) -> torch.Tensor:
    """[U] Qwen2.5-VL's window permutation of merged tokens (``transformers.vision_utils``, 5.23+)."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, merge, window_size, patch_size)[0]
