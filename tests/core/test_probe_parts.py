"""core/probes.py is split by concern (probe_base, vision_probes, llm_probes) and keeps every name it had."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtprune.core import llm_probes, probe_base, probes, received, vision_probes

CORE = Path(probes.__file__).resolve().parent

# every name core/probes.py defined before the split, with the part that now defines it
MOVED = {"QUERY_SETS": probe_base, "CropSlice": probe_base, "ImageSlice": probe_base, "Probe": probe_base,
         "_check_vision": probe_base, "_check_llm": probe_base, "_masked_logits": probe_base, "_scaling": probe_base,
         "_cls_row": vision_probes, "_vision_attention": vision_probes, "_VisionLayers": vision_probes,
         "VisionCLS": vision_probes, "VisionValues": vision_probes, "VisionAttentionMap": vision_probes,
         "ProjectorInput": vision_probes, "FeatureLayer": vision_probes, "PatchEntropy": vision_probes,
         "_llm_attention": llm_probes, "_repeat_kv": llm_probes, "LLMAttention": llm_probes, "LLMQKV": llm_probes,
         "Residual": llm_probes, "LayerOutput": llm_probes, "Sublayer": llm_probes, "SublayerRows": llm_probes,
         "SublayerBatch": llm_probes, "IncomingAttention": llm_probes,
         "Instruction": llm_probes, "InstructionRows": llm_probes,  # added after the split (CDPruner)
         "ReceivedAttention": received,  # added after the split (Qwen-VL)
         "Rotary": llm_probes}  # added after the split (SparseVLM+)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_probes_keeps_every_name(name):
    assert getattr(probes, name) is getattr(MOVED[name], name)


def test_the_public_names_are_exported():
    assert sorted(probes.__all__) == sorted(n for n in MOVED if not n.startswith("_"))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        probes.nothing_here  # noqa: B018


@pytest.mark.parametrize("part", ["probes", "probe_base", "vision_probes", "llm_probes", "received"])
def test_each_part_is_under_500_lines(part):
    assert len((CORE / f"{part}.py").read_text().splitlines()) <= 500
