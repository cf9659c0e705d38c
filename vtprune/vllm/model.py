"""vLLM's LLaVA-1.5 with exactly k visual tokens per image (spec serving_eval.md §1.2, §1.4, §6). Imports vLLM.

Processor side: :class:`KeepKInfo` gives every image k placeholders, the method's own budget for the model's image
size (``select.kept_count``); vLLM uses the same count for memory profiling and dummy inputs. Model side:
:class:`VtpruneLlava` runs the CLIP tower with instance hooks on its q/k/v projections (vLLM's encoder attention
returns no probabilities, so the CLS rows are recomputed), projects, and hands each image to the method's own
selection (``select.kept_rows``): k rows per image. Positions of the kept rows are contiguous (``renumber``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaImageEmbeddingInputs, LlavaMultiModalProcessor,
                                              LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import ConfigError
from .config import OVERRIDE_KEY, UNPRUNED, checked_method, model_info
from .select import Captured, cls_attention_rows, kept_count, kept_rows

CHECKPOINT_PREFIXES = ("model.", "language_model.", "vision_tower.", "multi_modal_projector.", "lm_head.")
# transformers >= 5 saves the CLIP tower without its "vision_model." level (spec §1.4, blocker 3)
_FLAT_TOWER = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")


@functools.lru_cache(maxsize=8)
def _spec(config_json: str):
    config = json.loads(config_json)
    spec = dict(config.get(OVERRIDE_KEY) or {})
    if "method" not in spec:
        raise ConfigError(f"vtprune: {config.get('architectures')} needs hf_overrides {{'{OVERRIDE_KEY}': "
                          "{'method': ..., 'keep': ...}}; start it with vtprune.vllm.LLM or vtprune serve")
    name = spec.pop("method")
    return (None if name in UNPRUNED else checked_method(name, spec)), model_info(config)


def method_for(hf_config):
    """(method or None for unpruned, ModelInfo) from the ``vtprune`` key ``hf_overrides`` put on the config."""
    config = hf_config.to_dict()
    config[OVERRIDE_KEY] = getattr(hf_config, OVERRIDE_KEY, None)
    return _spec(json.dumps(config, sort_keys=True, default=str))


class KeepKInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        method, info = method_for(self.get_hf_config())
        return info.nominal_tokens if method is None else kept_count(method, info)  # one size for every image


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=KeepKInfo, dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlava(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_method, self.vtprune_info = method_for(vllm_config.model_config.hf_config)
        self._records: dict | None = None
        if self.vtprune_method is None:
            return
        layers = self.vision_tower.vision_model.encoder.layers  # built up to the feature layer
        for j, layer in enumerate(layers):
            layer.self_attn.qkv_proj.register_forward_hook(functools.partial(self._record_qkv, j, layer.self_attn))
        layers[-1].register_forward_hook(self._record_hidden)

    def _record_qkv(self, j, attn, module, args, output) -> None:
        if self._records is None:
            return
        qkv = output[0] if isinstance(output, tuple) else output  # [B, S, 3 * H * d]
        b, s = qkv.shape[0], qkv.shape[1]
        q, k, _ = (t.reshape(b, s, -1, attn.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        self._records.setdefault("cls", {})[j] = cls_attention_rows(q, k)  # [B, H, S]
        self._records["keys"] = k.float()  # the last hooked layer is the feature layer

    def _record_hidden(self, module, args, output) -> None:
        if self._records is not None:
            self._records["hidden_cls"] = (output[0] if isinstance(output, tuple) else output)[:, 0]

    def _process_image_input(self, image_input):
        if self.vtprune_method is None:
            return super()._process_image_input(image_input)
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError("vtprune: the vLLM plugin prunes images it encodes; give images, not image_embeds")
        self._records = {}
        try:
            features = self._process_image_pixels(image_input)  # [B, N, D_v] or one [N, D_v] per image
        finally:
            records, self._records = self._records, None
        out = []
        for i, feats in enumerate(features):
            cap = Captured(cls_rows={j: r[i] for j, r in records["cls"].items()}, keys=records["keys"][i],
                           hidden_cls=records["hidden_cls"][i], features=feats, project=self.multi_modal_projector)
            out.append(kept_rows(self.vtprune_method, self.vtprune_info, cap))
        return tuple(out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Only the model's weights (vLLM reads every *.safetensors of a folder, spec §6), tower names mapped."""
        ours = ((_FLAT_TOWER.sub(r"\1vision_model.", n), w) for n, w in weights if n.startswith(CHECKPOINT_PREFIXES))
        return super().load_weights(ours)
