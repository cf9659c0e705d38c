"""Efficiency measurements for a (pruned or vanilla) VLM: prefill latency, decode ms/token, KV-cache bytes,
analytic LLM prefill FLOPs and peak memory.

All timings use warm-up runs and the median of repeats, with ``torch.cuda.synchronize`` around every timed
call when the model is on CUDA. Everything works on an already pruned model: ``vtprune.prune`` hooks stay in
place, so the numbers are the pruned model's. ::

    from vtprune.perf.timing import measure
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    report = measure(model, inputs)          # PerfReport
    print(report.prefill_ms, report.kv_bytes, report.prefill_flops)
    # several setups, interleaved round by round so background load hits them alike:
    reports = compare(model, {"vanilla": contextlib.nullcontext,
                              "fastv": lambda: vtprune.pruned(model, "fastv", keep=64)}, inputs)

FLOPs of one sample's LLM prefill (projections + attention + MLP, the usual dense-layer count)::

    sum over layers l:  4·n_l·d² + 2·n_l²·d + 2·n_l·d·m

with ``n_l`` the tokens layer ``l`` processes (visual tokens taken from ``model.vtprune.stats``, so in-LLM
methods such as FastV count their full early layers), ``d`` the hidden size and ``m`` the FFN width.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from .. import compat

__all__ = [
    "PerfReport",
    "synchronize",
    "time_call",
    "kv_cache_bytes",
    "llm_dims",
    "layer_flops",
    "prefill_flops",
    "visual_tokens_per_layer",
    "layer_token_counts",
    "batch_prefill_flops",
    "prefill",
    "measure_prefill",
    "measure_decode",
    "compare",
    "measure",
]


@dataclass
class PerfReport:
    """Per-sample efficiency numbers (means over the measured samples)."""

    prefill_ms: float | None = None
    decode_ms_per_token: float | None = None
    kv_bytes: int | None = None  # KV cache right after the prefill
    prefill_flops: float | None = None  # analytic LLM prefill FLOPs
    peak_memory_bytes: int | None = None  # CUDA only
    samples: int = 0
    repeats: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------------
# timing
def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def synchronize(device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, device="cpu", warmup: int = 1, repeats: int = 5) -> tuple[float, object]:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` runs; returns (ms, last result)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = None
    for _ in range(max(0, warmup)):
        out = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), out


# ------------------------------------------------------------------------------------------------------------
# KV cache
def kv_cache_bytes(cache) -> int:
    """Bytes held by a KV cache: sum of every layer's keys + values ``nbytes`` (``Cache`` objects with
    ``.layers``, or legacy tuples of (key, value) per layer)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            store = getattr(layer, "store", None)  # a vtprune KV store (core.kvcache): its packed bytes
            if store is not None:
                total += store.nbytes()
                continue
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total
    for entry in cache:  # legacy ((k, v), ...) format
        for t in entry:
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def _output_cache(output):
    for key in ("cache", "past_key_values"):
        try:
            value = output[key] if isinstance(output, dict) else getattr(output, key, None)
        except KeyError:
            value = None
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------------------------------------------------
# FLOPs
def llm_dims(model) -> tuple[int, int, int]:
    """(layers, hidden size d, FFN width m) of the model's language model."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers), int(cfg.hidden_size), int(cfg.intermediate_size)


def layer_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one decoder layer on ``n`` tokens: ``4·n·d² + 2·n²·d + 2·n·d·m``."""
    n, d, m = float(n), float(d), float(m)
    return 4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m


def prefill_flops(layer_tokens: Sequence[int], d: int, m: int) -> float:
    """One sample's LLM prefill FLOPs, each layer with its own token count."""
    return float(sum(layer_flops(n, d, m) for n in layer_tokens))


def visual_tokens_per_layer(image_stats, n_layers: int) -> list[int]:
    """Visual tokens of one image (an ``ImageStats``) entering each LLM layer."""
    counts = [int(image_stats.n_tokens)] * n_layers
    for stage in image_stats.stages:
        if stage.stage == "vision":  # inside the vision tower: its survivors reach the LLM through the pre-LLM stage
            continue
        start = 0 if stage.layer is None else int(stage.layer)
        for layer in range(start, n_layers):
            counts[layer] = int(stage.tokens_out)
    return counts


def layer_token_counts(stats, sample_tokens: Sequence[int], n_layers: int) -> list[list[int]]:
    """Tokens each sample's LLM layers process: prompt tokens (padding excluded) with each image's visual
    tokens replaced by its per-layer count from ``stats`` (a ``PruneStats``; None = unpruned)."""
    rows = [[int(t)] * n_layers for t in sample_tokens]
    if stats is None:
        return rows
    for img in stats.images:
        per_layer = visual_tokens_per_layer(img, n_layers)
        row = rows[img.sample]
        for layer in range(n_layers):
            row[layer] += per_layer[layer] - int(img.n_tokens)
    return rows


def batch_prefill_flops(model, inputs: dict, stats=None) -> list[float]:
    """Analytic LLM prefill FLOPs of each sample of a batch (``stats`` from the pruned forward, if any)."""
    n_layers, d, m = llm_dims(model)
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    sample_tokens = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    return [prefill_flops(row, d, m) for row in layer_token_counts(stats, sample_tokens, n_layers)]


# ------------------------------------------------------------------------------------------------------------
# measurements
def _last_stats(model):
    session = getattr(model, "vtprune", None)
    return getattr(session, "stats", None)


@torch.inference_mode()
def prefill(model, inputs: dict):
    """One prefill forward (fresh cache, logits of the last position only); returns the model output."""
    try:
        return model(**inputs, use_cache=True, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        return model(**inputs, use_cache=True)


def measure_prefill(model, inputs: dict, *, warmup: int = 1, repeats: int = 5) -> PerfReport:
    """Prefill latency (median ms), KV bytes after the prefill, analytic FLOPs and (CUDA) peak memory for one
    batch. For per-sample latency pass batches of one sample."""
    device = _device_of(model)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ms, out = time_call(lambda: prefill(model, inputs), device=device, warmup=warmup, repeats=repeats)
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    flops = batch_prefill_flops(model, inputs, _last_stats(model))
    kv = kv_cache_bytes(_output_cache(out))
    del out
    return PerfReport(prefill_ms=ms, kv_bytes=kv, prefill_flops=sum(flops), peak_memory_bytes=peak,
                      samples=int(inputs["input_ids"].shape[0]), repeats=repeats)


def _generate_fn(model, inputs: dict) -> Callable[[int], object]:
    """``fn(n)``: greedy generate of exactly ``n`` new tokens (EOS suppressed through ``min_new_tokens``)."""
    kwargs = {}
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "pad_token_id", None) is None and getattr(gen_cfg, "eos_token_id", None) is not None:
        eos = gen_cfg.eos_token_id
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos

    @torch.inference_mode()
    def gen(n: int):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, **kwargs)

    return gen


def measure_decode(model, inputs: dict, *, new_tokens: int = 8, warmup: int = 1, repeats: int = 3) -> float:
    """Decode ms per generated token: (time of generate(1 + new_tokens) - time of generate(1)) / new_tokens,
    greedy, with EOS suppressed so both runs have their exact length."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = _device_of(model)
    gen = _generate_fn(model, inputs)
    t1, _ = time_call(lambda: gen(1), device=device, warmup=warmup, repeats=repeats)
    tn, _ = time_call(lambda: gen(1 + new_tokens), device=device, warmup=warmup, repeats=repeats)
    return max(0.0, (tn - t1) / new_tokens)


@dataclass
class _Tally:
    """What :func:`compare` records of one setup: per-sample prefill ms of each recorded round, the decode
    runs' ms, (KV bytes, FLOPs) per sample from the first round, and the CUDA peak."""

    prefill_ms: list[list[float]]
    gen_1: list[float] = field(default_factory=list)  # generate(1) ms
    gen_n: list[float] = field(default_factory=list)  # generate(1 + decode_tokens) ms
    static: list[tuple[float, float]] = field(default_factory=list)
    peak: int | None = None


def _time_prefills(model, samples: Sequence[dict], tally: _Tally, device, *, record: bool, first: bool) -> None:
    """One timed prefill per sample; the first round also counts each sample's KV bytes and FLOPs."""
    for i, inputs in enumerate(samples):
        ms, out = time_call(lambda: prefill(model, inputs), device=device, warmup=0, repeats=1)
        if record:
            tally.prefill_ms[i].append(ms)
        if first:  # static numbers: the same every round
            n = int(inputs["input_ids"].shape[0])
            flops = sum(batch_prefill_flops(model, inputs, _last_stats(model))) / n
            tally.static.append((kv_cache_bytes(_output_cache(out)) / n, flops))
        del out


def _time_decode(model, inputs: dict, decode_tokens: int, device) -> tuple[float, float]:
    """ms of one ``generate(1)`` and one ``generate(1 + decode_tokens)`` on ``inputs``."""
    gen = _generate_fn(model, inputs)
    t1, _ = time_call(lambda: gen(1), device=device, warmup=0, repeats=1)
    tn, _ = time_call(lambda: gen(1 + decode_tokens), device=device, warmup=0, repeats=1)
    return t1, tn


def _round(model, setup: Callable[[], ContextManager], samples: Sequence[dict], tally: _Tally, *, device,
           record: bool, first: bool, decode_tokens: int) -> None:
    """One round of one setup: enter it, time every sample's prefill and (``decode_tokens`` > 0) the decode."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    with setup():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _time_prefills(model, samples, tally, device, record=record, first=first)
        if decode_tokens:
            t1, tn = _time_decode(model, samples[0], decode_tokens, device)
            if record:
                tally.gen_1.append(t1)
                tally.gen_n.append(tn)
        if cuda:
            tally.peak = max(tally.peak or 0, int(torch.cuda.max_memory_allocated(device)))


def _report(tally: _Tally, decode_tokens: int, repeats: int) -> PerfReport:
    """A setup's :class:`PerfReport` from its tally (see :func:`compare` for each number's definition)."""
    kv = [k for k, _ in tally.static]
    fl = [f for _, f in tally.static]
    decode = None
    if decode_tokens:
        decode = max(0.0, (statistics.median(tally.gen_n) - statistics.median(tally.gen_1)) / decode_tokens)
    return PerfReport(
        prefill_ms=sum(statistics.median(t) for t in tally.prefill_ms) / len(tally.prefill_ms),
        decode_ms_per_token=decode,
        kv_bytes=int(round(sum(kv) / len(kv))),
        prefill_flops=sum(fl) / len(fl),
        peak_memory_bytes=tally.peak,
        samples=len(tally.prefill_ms),
        repeats=repeats,
    )


def compare(model, setups: dict[str, Callable[[], ContextManager]], samples: dict | Sequence[dict], *,
            warmup: int = 1, repeats: int = 5, decode_tokens: int = 8,
            on_round: Callable[[int], None] | None = None) -> dict[str, PerfReport]:
    """Per-sample efficiency of several setups of one model, measured interleaved.

    ``setups`` maps a label to a zero-argument callable returning a context manager that puts the model in that
    state (e.g. ``lambda: vtprune.pruned(model, "fastv", keep=32)``; ``contextlib.nullcontext`` = as is).
    Every round enters each setup in turn and times one prefill per sample and (``decode_tokens`` > 0) one
    ``generate(1)`` and one ``generate(1 + decode_tokens)`` on the first sample, so background load hits all
    setups alike; the first ``warmup`` rounds are not recorded. ``samples`` are single-sample input dicts.

    Returns label -> :class:`PerfReport`: prefill ms = mean over samples of each sample's median, decode
    ms/token = (median generate(1 + D) - median generate(1)) / D, KV bytes / FLOPs = means over samples,
    peak memory = CUDA peak while the setup ran.
    """
    samples = [samples] if isinstance(samples, dict) else list(samples)
    if not samples:
        raise ValueError("compare() needs at least one sample")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _device_of(model)
    tallies = {label: _Tally([[] for _ in samples]) for label in setups}
    for rnd in range(max(0, warmup) + repeats):
        for label, setup in setups.items():
            _round(model, setup, samples, tallies[label], device=device, record=rnd >= warmup, first=rnd == 0,
                   decode_tokens=decode_tokens)
        if on_round is not None:
            on_round(rnd)
    return {label: _report(tally, decode_tokens, repeats) for label, tally in tallies.items()}


def measure(model, samples: dict | Sequence[dict], *, warmup: int = 1, repeats: int = 5,
            decode_tokens: int = 8) -> PerfReport:
    """Per-sample efficiency of ``model`` as it is now (pruned or not) on one or more single-sample input dicts:
    :func:`compare` with one setup. ``decode_tokens=0`` skips decode ms/token."""
    return compare(model, {"model": contextlib.nullcontext}, samples, warmup=warmup, repeats=repeats,
                   decode_tokens=decode_tokens)["model"]


# ------------------------------------------------------------------------------------------------------------
# generate-based timing, memory and the eager peer (used by ``vtprune perf``)
class StepClock:
    """A logits processor that timestamps every generated token (transformers calls it once per forward).

    ``ttft_ms``: start -> first token (the prefill); ``step_ms``: the gaps between later tokens (decode steps)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.start = 0.0
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def reset(self) -> None:
        synchronize(self.device)
        self.stamps = []
        self.start = time.perf_counter()

    @property
    def ttft_ms(self) -> float:
        return (self.stamps[0] - self.start) * 1000.0

    @property
    def step_ms(self) -> list[float]:
        return [(b - a) * 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]


@torch.inference_mode()
def timed_generate(model, inputs: dict, new_tokens: int, **kwargs):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens, timed per token: (StepClock, output with the cache)."""
    from transformers import LogitsProcessorList

    clock = StepClock(_device_of(model))
    gen_cfg = getattr(model, "generation_config", None)
    if getattr(gen_cfg, "pad_token_id", None) is None and getattr(gen_cfg, "eos_token_id", None) is not None:
        eos = gen_cfg.eos_token_id
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos
    clock.reset()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                         logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True, **kwargs)
    return clock, out


class PeakMemory:
    """Peak memory while the ``with`` body runs, as bytes above the level at entry: CUDA ``max_memory_allocated``;
    on CPU the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; None where Linux refuses)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device)) - self.base
        elif self.base is not None:
            self.peak = max(0, _status_bytes("VmHWM") - self.base)
        return False


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> int | None:
    """Reset the peak RSS to the current RSS; returns the current RSS (None where that is not possible)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None


@contextlib.contextmanager
def eager_attention(model):
    """Every attention of ``model`` (vision tower and LLM) on transformers' eager implementation inside the
    ``with``, restored on exit: how the official code of attention-scored methods runs."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            compat.set_attn_implementation(cfg, "eager")
        yield model
    finally:
        for key, cfg in configs.items():
            compat.set_attn_implementation(cfg, saved[key])
