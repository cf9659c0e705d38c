"""Offline vLLM throughput, pruned vs unpruned (issue 30 §4): requests/s, output tokens/s and mean time to first
token of one batch of image prompts submitted at once, one engine per configuration, after one warm-up batch.

    .venv-vllm/bin/python -m vtprune.vllm.bench --model vtprune/assets/tiny-llava --methods none,visionzip,divprune \\
        --keep 36 --requests 32 --max-tokens 16 --dtype float32
    .venv-vllm/bin/python -m vtprune.vllm.bench --arch llava-1.5-7b --vision-layers 2 --llm-layers 2 \\
        --methods none,visionzip --keep 64 --requests 8 --max-tokens 8 --dtype float32

``--arch`` (a LLaVA-1.5 shape of ``vtprune.perf.archs``) saves that architecture with seeded random weights, at the
depths given, to a temporary folder and serves it from there. Every request decodes exactly ``--max-tokens`` tokens (``ignore_eos``), so the configurations do the same work
but for the visual tokens. Images and questions: the embedded synthetic MME set, cycled.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"


def _requests(n: int) -> list[dict]:
    from PIL import Image

    from ..eval.data import load_task

    qs = load_task("mme").questions
    images = {}
    out = []
    for i in range(n):
        q = qs[i % len(qs)]
        if q.image_path not in images:
            images[q.image_path] = Image.open(q.image_path).convert("RGB")
        out.append({"prompt": f"USER: <image>\n{q.question} ASSISTANT:", "multi_modal_data": {"image": images[q.image_path]}})
    return out


def measure(model: str, method: str | None, keep: int | None, n: int, max_tokens: int, **engine) -> dict:
    """One configuration: {method, visual tokens, requests/s, output tokens/s, mean TTFT s, engine start s}."""
    from vllm import SamplingParams

    from . import LLM

    t0 = time.perf_counter()
    llm = LLM(model, method=method, keep=None if method in (None, "none") else keep, disable_log_stats=False, **engine)
    start = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = _requests(n)
    llm.generate(reqs[: min(4, n)], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ttft = [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None]
    row = {"method": method or "none", "visual_tokens": outs[0].prompt_token_ids.count(_image_id(llm)),
           "requests_per_s": n / wall, "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
           "mean_ttft_s": sum(ttft) / len(ttft) if ttft else float("nan"), "engine_start_s": start}
    del llm
    gc.collect()
    return row


def arch_checkpoint(name: str, folder: str, vision_layers: int | None, llm_layers: int | None) -> str:
    """Save ``name`` (a LLaVA-1.5 arch) with seeded random weights to ``folder``, loadable by vLLM offline: its
    processor is the embedded model's tokenizer and chat template (whose ``<image>`` id replaces 32000 in the
    config; the 32064-row vocabulary stays) with CLIP-L/336 preprocessing and patch 14. Returns ``folder``."""
    from transformers import AutoProcessor

    from ..errors import ConfigError
    from ..perf.archs import ARCHS, arch_config, build_arch

    if name not in ARCHS or ARCHS[name].family != "llava":
        served = ", ".join(n for n, a in ARCHS.items() if a.family == "llava")
        raise ConfigError(f"vtprune: --arch {name!r} is not a LLaVA-1.5 shape the plugin serves; choose {served}")
    try:
        arch_config(name, vision_layers=vision_layers, llm_layers=llm_layers)
    except ValueError as err:  # a depth out of range
        raise ConfigError(f"vtprune: {err}") from None
    model = build_arch(name, vision_layers=vision_layers, llm_layers=llm_layers)
    processor = AutoProcessor.from_pretrained(TINY)
    model.config.image_token_index = json.loads((TINY / "config.json").read_text())["image_token_index"]
    side = model.config.vision_config.image_size
    processor.image_processor.size, processor.image_processor.crop_size = {"shortest_edge": side}, {
        "height": side, "width": side}
    processor.patch_size = model.config.vision_config.patch_size
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def _image_id(llm) -> int:
    return llm.llm_engine.model_config.hf_config.image_token_index


def table(rows: list[dict]) -> str:
    head = "| method | visual tokens / image | requests/s | output tokens/s | mean TTFT (s) |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['method']} | {r['visual_tokens']} | {r['requests_per_s']:.2f} | "
                          f"{r['output_tokens_per_s']:.1f} | {r['mean_ttft_s']:.3f} |\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtprune.vllm.bench", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="a LLaVA-1.5 checkpoint folder")
    where.add_argument("--arch", help="a LLaVA-1.5 shape of vtprune.perf.archs, random weights (e.g. llava-1.5-7b)")
    p.add_argument("--vision-layers", type=int, help="with --arch: vision layers kept (default all)")
    p.add_argument("--llm-layers", type=int, help="with --arch: LLM layers kept (default all)")
    p.add_argument("--methods", default="none,visionzip,divprune", help="comma-separated; none = unpruned")
    p.add_argument("--keep", type=int, default=36)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args(argv)
    if args.arch is None and (args.vision_layers, args.llm_layers) != (None, None):
        p.error("--vision-layers / --llm-layers need --arch")
    from ..errors import ConfigError

    try:
        if args.arch is None:
            return run(args, args.model)
        with tempfile.TemporaryDirectory(prefix="vtprune-arch-") as folder:
            return run(args, arch_checkpoint(args.arch, folder, args.vision_layers, args.llm_layers))
    except ConfigError as err:  # bad method / budget / arch / depth: one line, before any engine starts
        p.exit(2, f"{p.prog}: error: {err}\n")


def run(args, model: str) -> int:
    """Check every configuration, then time each in its own engine and print the table."""
    engine = dict(dtype=args.dtype, max_model_len=args.max_model_len, limit_mm_per_prompt={"image": 1})
    for m in args.methods.split(","):  # every check before the first engine starts
        from .config import plan

        plan(model, m, {} if m == "none" else {"keep": args.keep})
    rows = [measure(model, m, args.keep, args.requests, args.max_tokens, **engine) for m in args.methods.split(",")]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
