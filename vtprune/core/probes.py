"""Typed probes: what a method may observe during a forward, each recording only what is asked.

A method returns probes from ``probes(model)``; the session attaches each once (equal probes are merged) and a
method reads what one recorded as ``image[probe]``, sliced to that image (or crop) and its current tokens.
Recorders run inside the attention chain (SDPA stays on for the whole model) or as forward hooks; records
live in the per-forward context and are dropped with it.

Vision probes (vision tower; one record per run of ``get_image_features``):
    VisionCLS(layers)            CLS query's attention row, all heads
    VisionValues(layers)         value vectors, all heads
    VisionAttentionMap(layers)   full attention map, mean over heads
    FeatureLayer()               the :class:`VisionView` (feature-layer CLS attention and keys, projector inputs)
    ProjectorInput()             the model's own projector input
LLM probes (prefill only; rows refer to the layout of the layer they were recorded at):
    LLMAttention(layer, queries) attention probabilities of the last prompt token or the instruction tokens
    LLMQKV(layer)                post-RoPE query of the last prompt token, keys (image and instruction rows), values
    Residual(layer, rows)        the residual stream entering a decoder layer (image rows, or the instruction's)
    Rotary(layer)                the rotary cos / sin a decoder layer applies, instruction rows and image columns
    LayerOutput(layer, rows)     a decoder layer's output (before the next layer's cut), instruction or image rows,
                                 optionally after the LLM's final norm
    Sublayer(layer, part)        input and output of the attention (``"attn"``) or FFN (``"mlp"``) sublayer
    IncomingAttention(layer, q)  the attention layer ``layer`` would compute on the hidden states entering it,
                                 before a cut there decides (its own norm, q/k projections and RoPE)
    Instruction()                the prompt's instruction token ids (and their input embeddings) per sample
    PatchEntropy()               information entropy of each vision patch's pixels (vision probe)
    ReceivedAttention(block)     attention each token receives in a full vision block (towers without CLS: Qwen-VL)
``image.batch(probe)`` gives the batch-level record where a probe has one (LLM probes: whole [B, T] rows), for
decisions that need every position (softmax over a sample's sequence).
The probes live in :mod:`.vision_probes` and :mod:`.llm_probes`, their base and views in :mod:`.probe_base`;
this module re-exports them (import probes from here).
"""

from __future__ import annotations

from .._parts import getattr_from_parts
from .llm_probes import (IncomingAttention, Instruction, InstructionRows, LayerOutput, LLMAttention, LLMQKV, Residual,
                         Rotary, Sublayer, SublayerBatch, SublayerRows)
from .probe_base import QUERY_SETS, CropSlice, ImageSlice, Probe
from .received import ReceivedAttention
from .vision_probes import FeatureLayer, PatchEntropy, ProjectorInput, VisionAttentionMap, VisionCLS, VisionValues

__all__ = ["QUERY_SETS", "CropSlice", "ImageSlice", "Probe", "VisionCLS", "VisionValues", "VisionAttentionMap", "ProjectorInput", "FeatureLayer", "PatchEntropy", "LLMAttention", "LLMQKV", "Residual", "LayerOutput", "Sublayer", "SublayerRows", "SublayerBatch", "IncomingAttention", "Instruction", "InstructionRows", "ReceivedAttention", "Rotary"]

# the modules this one was split into: private names (``probes._masked_logits``) are still found there
_PARTS = ("probe_base", "vision_probes", "llm_probes", "received")

__getattr__ = getattr_from_parts(__name__, __package__, _PARTS)
