"""Real architectures with random weights (vtprune.perf.archs): published dimensions, reduced depth, the
model's own image-token counts, prompts that vtprune can prune.

Real widths make every build costly (a 1-layer 7B-width LLM is ~2 GB in fp32), so each model is built once with
the fewest layers; only LLaVA-1.5-7B runs an LLM forward, the others are checked in bfloat16 up to the vision
features, and full depth is checked on the meta device."""

import gc

import pytest
import torch

import vtprune
from tests.conftest import FAMILIES
from vtprune.perf.archs import ARCHS, arch_inputs, build_arch

# the published configs (llava-hf/llava-1.5-7b-hf, llava-1.5-13b-hf, llava-v1.6-vicuna-7b-hf, OpenGVLab/InternVL2-8B)
CLIP = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
            hidden_act="quick_gelu")
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32064)
EXPECTED = {
    "llava-1.5-7b": (CLIP, VICUNA_7B, 576),
    "llava-1.5-13b": (CLIP, dict(VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                 num_key_value_heads=40), 576),
    # 672x672: base crop 24x24 + a 2x2 grid of crops = 48x48 tokens + one newline per row
    "llava-next-7b": (CLIP, VICUNA_7B, 576 + 48 * 48 + 48),
    "internvl2-8b": (dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=(448, 448),
                          patch_size=(14, 14)),
                     dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          vocab_size=92553), 256),
}
# parameter counts at full depth: LLaVA-1.5-7B 7,063,427,072 and InternVL2-8B 8,075,365,376 as published;
# LLaVA-NeXT adds the 4096-wide image_newline; 13B = Llama-2-13B (vocab 32064) + CLIP-L/336 + the 2-layer projector
PARAMS = {"llava-1.5-7b": 7_063_427_072, "llava-1.5-13b": 13_351_494_656, "llava-next-7b": 7_063_431_168,
          "internvl2-8b": 8_075_365_376, "qwen2.5-vl-7b": 8_292_166_656, "qwen3-vl-8b": 8_767_123_696}
# Qwen: the hub lists Qwen2.5-VL-7B-Instruct at 8.29B and Qwen3-VL-8B-Instruct at 8.77B parameters
DEPTHS = {"llava-1.5-13b": (24, 40), "qwen2.5-vl-7b": (32, 28), "qwen3-vl-8b": (27, 36)}  # (vision, LLM); else 24, 32


def check_dims(model, name, vision_layers, llm_layers):
    vision, text, _ = EXPECTED[name]
    vc, tc = model.config.vision_config, model.config.get_text_config()
    assert {k: getattr(vc, k) for k in vision} == vision
    assert {k: getattr(tc, k) for k in text} == text
    assert (vc.num_hidden_layers, tc.num_hidden_layers) == (vision_layers, llm_layers)
    assert model.config._name_or_path == f"arch:{name}"
    assert not model.training


def image_tokens(model, inputs):
    return int((inputs["input_ids"] == model.config.image_token_id).sum(1)[0])


@pytest.fixture(scope="module")
def llava7b():
    model = build_arch("llava-1.5-7b", vision_layers=2, llm_layers=1)
    yield model
    del model
    gc.collect()


def test_llava7b_dims_tokens_and_prefill(llava7b):
    check_dims(llava7b, "llava-1.5-7b", 2, 1)
    inputs = arch_inputs(llava7b, text_tokens=56)
    assert image_tokens(llava7b, inputs) == 576 and inputs["input_ids"].shape == (1, 56 + 576)
    assert inputs["pixel_values"].shape == (1, 3, 336, 336) and inputs["input_ids"][0, 0] == 1  # BOS first
    # features come from hidden_states[-2] = the output of layer 0 of the 2 kept
    assert vtprune.adapters.get_adapter(llava7b).vision_feature_layer == 0
    with vtprune.pruned(llava7b, "random", keep=64), torch.no_grad():
        out = llava7b(**inputs, use_cache=True, logits_to_keep=1)
        assert llava7b.vtprune.stats.kept_tokens == 64
    assert out.logits.shape == (1, 1, 32064) and bool(out.logits.isfinite().all())
    assert out.cache.layers[0].keys.shape == (1, 32, 56 + 64, 128)


def test_generation_config(llava7b):
    gen = llava7b.generation_config
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (None, 0, False)


@pytest.mark.parametrize("name", ["llava-1.5-13b", "llava-next-7b", "internvl2-8b"])
def test_other_archs_dims_and_image_tokens(name):
    vision_layers = 2 if ARCHS[name].family != "internvl" else 1
    model = build_arch(name, vision_layers=vision_layers, llm_layers=1, dtype=torch.bfloat16)
    try:
        check_dims(model, name, vision_layers, 1)
        assert next(model.parameters()).dtype == torch.bfloat16
        inputs = arch_inputs(model, text_tokens=20)
        assert image_tokens(model, inputs) == EXPECTED[name][2]
        assert inputs["input_ids"].shape[1] == 20 + EXPECTED[name][2]
        assert inputs["pixel_values"].dtype == torch.bfloat16
        if name == "llava-next-7b":
            assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
            assert inputs["image_sizes"].tolist() == [[672, 672]]
        if name == "internvl2-8b":  # <img> ... </img> around the run, as InternVL2's tokenizer has them
            ids = inputs["input_ids"][0].tolist()
            first = ids.index(92546)
            assert ids[first - 1] == 92544 and ids[first + 256] == 92545
    finally:
        del model
        gc.collect()


@pytest.mark.parametrize("name", list(ARCHS))
def test_full_depth_on_meta(name):
    model = build_arch(name, device="meta")
    vc, tc = model.config.vision_config, model.config.get_text_config()
    assert (getattr(vc, "num_hidden_layers", None) or vc.depth, tc.num_hidden_layers) == DEPTHS.get(name, (24, 32))
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert next(model.parameters()).device.type == "meta"


def test_bad_names_and_depths():
    with pytest.raises(ValueError, match="llava-1.5-7b, llava-1.5-13b, llava-next-7b, internvl2-8b"):
        build_arch("llava-7b", device="meta")
    with pytest.raises(ValueError, match=r"vision_layers .* 2\.\.24"):  # hidden_states[-2] needs 2 layers
        build_arch("llava-1.5-7b", vision_layers=1, device="meta")
    with pytest.raises(ValueError, match=r"llm_layers .* 1\.\.32"):
        build_arch("internvl2-8b", llm_layers=33, device="meta")
    with pytest.raises(ValueError, match=r"llm_layers .* 1\.\.40"):
        build_arch("llava-1.5-13b", llm_layers=0, device="meta")


@pytest.mark.parametrize("family", FAMILIES)
def test_arch_inputs_work_with_pruning(models, family):
    """The prompt layout on the tiny models: image run where the model expects it, FastV and a pre-LLM method run."""
    model = models(family)
    inputs = arch_inputs(model, text_tokens=12, batch=2, seed=3)
    n = image_tokens(model, inputs)
    assert inputs["input_ids"].shape == (2, 12 + n) and bool(inputs["attention_mask"].all())
    assert not torch.equal(inputs["input_ids"][0], inputs["input_ids"][1])  # each row its own text
    for name in ("fastv", "random"):
        with vtprune.pruned(model, name, keep=4), torch.no_grad():
            model(**inputs)
            images = model.vtprune.stats.images
        assert [(img.sample, img.n_tokens) for img in images] == [(0, n), (1, n)]
        assert all(img.kept == 4 for img in images) if family != "llava_next" else all(img.kept < n for img in images)


@pytest.mark.parametrize("name,family", [("qwen2.5-vl-7b", "qwen2_5_vl"), ("qwen3-vl-8b", "qwen3_vl")])
def test_qwen_archs_published_dims_on_meta(name, family):
    model = build_arch(name, device="meta")
    vc, tc = model.config.vision_config, model.config.text_config
    assert vtprune.adapters.get_adapter(model).family == family
    if family == "qwen2_5_vl":  # Qwen/Qwen2.5-VL-7B-Instruct config.json
        assert (vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.patch_size, vc.window_size) == (1280, 3420, 16, 14, 112)
        assert vc.fullatt_block_indexes == [7, 15, 23, 31] and (tc.hidden_size, tc.num_key_value_heads) == (3584, 4)
    else:  # Qwen/Qwen3-VL-8B-Instruct config.json
        assert (vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.deepstack_visual_indexes) == (1152, 4304, 16, [8, 16, 24])
        assert (tc.hidden_size, tc.num_key_value_heads, tc.head_dim, tc.intermediate_size) == (4096, 8, 128, 12288)
    shallow = build_arch(name, vision_layers=9, llm_layers=2, device="meta").config.vision_config
    assert getattr(shallow, "fullatt_block_indexes", [7]) == [7]  # indexes past the depth are dropped
    assert getattr(shallow, "deepstack_visual_indexes", [8]) == [8]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_arch_inputs_on_qwen_work_with_pruning(models, family):
    model = models(family)
    vc = model.config.vision_config
    unit = vc.patch_size * 2
    inputs = arch_inputs(model, text_tokens=12, batch=2, seed=3, image_size=(3 * unit, 5 * unit + 3))
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 10]] * 2 and inputs["pixel_values"].shape[0] == 120
    ids = inputs["input_ids"][0].tolist()
    first = ids.index(model.config.image_token_id)
    assert ids[first - 1] == model.config.vision_start_token_id and ids[first + 15] == model.config.vision_end_token_id
    assert inputs["input_ids"].shape == (2, 12 + 15)
    with vtprune.pruned(model, "fastv", keep=4), torch.no_grad():
        model(**inputs)
        assert [img.kept for img in model.vtprune.stats.images] == [4, 4]
