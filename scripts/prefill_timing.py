"""Prefill time of a LLaVA-1.5-shaped tiny model (576 visual tokens), vanilla vs each method, in one run.

Ratios are what matter: absolute milliseconds depend on the machine. Usage:
    python scripts/prefill_timing.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtprune


def build():
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=96, patch_size=4)
    tc = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=999, image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def time_prefill(model, inputs, repeats):
    with torch.no_grad():
        for _ in range(2):
            model(**inputs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build()
    ids = torch.tensor([[1] + list(range(3, 38)) + [999] * 576 + list(range(40, 60))])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 96, 96)}
    runs = [("vanilla", None, {})]
    methods = [m for m in vtprune.list_methods() if not m.startswith("_")]
    for keep in (192, 128, 64):
        for method in methods:
            runs.append((method, keep, {"keep": keep}))
    base = None
    print(f"{'method':<10} {'keep':>5} {'equiv. tokens':>13} {'prefill ms':>10} {'speed-up':>8}")
    for method, keep, kw in runs:
        if method == "vanilla":
            ms = time_prefill(model, inputs, args.repeats)
            base, equiv = ms, 576.0
        else:
            with vtprune.pruned(model, method, **kw):
                ms = time_prefill(model, inputs, args.repeats)
                equiv = model.vtprune.stats.equivalent_tokens
        print(f"{method:<10} {keep or 576:>5} {equiv:>13.1f} {ms:>10.1f} {base / ms:>7.2f}x")


if __name__ == "__main__":
    main()
