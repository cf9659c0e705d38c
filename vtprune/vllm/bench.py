"""Offline vLLM throughput, pruned vs unpruned (issue 30 §4): requests/s, output tokens/s and mean time to first
token of one batch of image prompts submitted at once, one engine per configuration, after one warm-up batch.

    .venv-vllm/bin/python -m vtprune.vllm.bench --model vtprune/assets/tiny-llava --methods none,visionzip,divprune \\
        --keep 36 --requests 32 --max-tokens 16 --dtype float32

Every request decodes exactly ``--max-tokens`` tokens (``ignore_eos``), so the configurations do the same work
but for the visual tokens. Images and questions: the embedded synthetic MME set, cycled.
"""

from __future__ import annotations

import argparse
import gc
import time


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


def _image_id(llm) -> int:
    return llm.llm_engine.model_config.hf_config.image_token_index


def table(rows: list[dict]) -> str:
    head = "| method | visual tokens / image | requests/s | output tokens/s | mean TTFT (s) |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['method']} | {r['visual_tokens']} | {r['requests_per_s']:.2f} | "
                          f"{r['output_tokens_per_s']:.1f} | {r['mean_ttft_s']:.3f} |\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtprune.vllm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--methods", default="none,visionzip,divprune", help="comma-separated; none = unpruned")
    p.add_argument("--keep", type=int, default=36)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args(argv)
    engine = dict(dtype=args.dtype, max_model_len=args.max_model_len, limit_mm_per_prompt={"image": 1})
    for m in args.methods.split(","):  # every check before the first engine starts
        from .config import plan

        plan(args.model, m, {} if m == "none" else {"keep": args.keep})
    rows = [measure(args.model, m, args.keep, args.requests, args.max_tokens, **engine) for m in args.methods.split(",")]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
