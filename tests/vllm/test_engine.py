"""vLLM serving the embedded tiny LLaVA pruned by the plugin (vLLM environment only: ``make vllm-test``).

Must hold (issue 30): for random, VisionZip, VTC-CLS and DivPrune at two budgets, every prompt's image occupies
exactly k placeholder tokens (read from the engine's prompt token ids), and vLLM's greedy tokens and their
log-probabilities equal transformers + ``vtprune.prune(..., positions="renumber")`` on the same 6 prompts, batched.
Each case starts one engine (~30 s on 2 CPU cores).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vtprune  # noqa: E402
import vtprune.vllm as vv  # noqa: E402
from vtprune.embedded.tiny_llava import load_tiny_llava  # noqa: E402
from vtprune.eval.data import load_task  # noqa: E402

TINY = str(Path(vtprune.__file__).parent / "assets" / "tiny-llava")
IMAGE_ID = json.loads((Path(TINY) / "config.json").read_text())["image_token_index"]
STEPS = 6
ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, limit_mm_per_prompt={"image": 1},
              gpu_memory_utilization=0.5)  # CPU backend: the share of RAM it checks is free at start (default 0.92)


@pytest.fixture(scope="module")
def prompts():
    qs = load_task("gqa", limit=3).questions + load_task("mme", limit=3).questions  # open answers and yes / no
    return [(f"USER: <image>\n{q.question} ASSISTANT:", Image.open(q.image_path).convert("RGB")) for q in qs]


@pytest.fixture(scope="module")
def hf():
    return load_tiny_llava()


def hf_greedy(hf, prompts, method, keep):
    """[(token ids up to and with </s>, their log-probabilities)] from transformers + vtprune, batched."""
    model, proc = hf
    tok = proc.tokenizer
    tok.padding_side = "left"
    enc = proc(images=[im for _, im in prompts], text=[p for p, _ in prompts], return_tensors="pt", padding=True)
    with vtprune.pruned(model, method, keep=keep, positions="renumber"):
        out = model.generate(**enc, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    logp = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
    rows = []
    for ids, lp in zip(new.tolist(), logp.tolist()):
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        rows.append((ids[:n], lp[:n]))
    return rows


@pytest.mark.parametrize("method", ["random", "visionzip", "vtc_cls", "divprune"])
@pytest.mark.parametrize("keep", [36, 97])
def test_k_placeholders_and_greedy_equal_to_hf(prompts, hf, method, keep):
    llm = vv.LLM(TINY, method=method, keep=keep, seed=0, **ENGINE)
    try:
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in prompts],
                            vllm.SamplingParams(temperature=0, max_tokens=STEPS, logprobs=0))
    finally:
        del llm
        gc.collect()
    tok = hf[1].tokenizer
    for (text, _), out, (ids, logp) in zip(prompts, outs, hf_greedy(hf, prompts, method, keep)):
        assert out.prompt_token_ids.count(IMAGE_ID) == keep
        assert len(out.prompt_token_ids) == len(tok(text)["input_ids"]) - 1 + keep  # the text + k
        got = out.outputs[0]
        assert list(got.token_ids) == ids, text
        got_logp = [step[t].logprob for step, t in zip(got.logprobs, got.token_ids)]
        assert got_logp == pytest.approx(logp, abs=2e-3), text
