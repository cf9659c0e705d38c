"""``vtprune perf``: flags, checks (one line, exit 2, before any work) and the run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .args import UsageError, check_count, check_model_spec, check_out_dir, parse_set, report

__all__ = ["DESCRIPTION", "EPILOG", "add_arguments", "check_args", "run_from_args", "main"]

DESCRIPTION = """\
Speed, memory and FLOPs of pruning methods against vanilla, the oracle (the same model fed the already-pruned
sequence: the floor any pruner can reach at a budget) and the FLOPs ideal, measured in one interleaved run.

  vtprune perf                                   # the embedded tiny LLaVA, every method, its scaled budgets
  vtprune perf --arch llava-1.5-7b --vision-layers 2 --llm-layers 4 --keep 192,128,64 --out out/perf
  vtprune perf --arch llava-1.5-7b --device cuda --dtype bfloat16 --keep 64   # full depth on a GPU
  vtprune perf --methods fastv,transprune --evict-early-kv                     # decode with and without eviction
  vtprune perf --kernel [--device cuda --dtype bfloat16]                       # the compaction kernel alone
"""

EPILOG = """\
Per configuration: prefill (time to first token), vision-tower ms, decode ms/token, peak memory, KV bytes (cache
tensors and analytic), FLOPs (vision / projector / LLM prefill / decode step), speed-up, oracle %, ideal %,
overhead, replay of the method's own schedule, and the eager 'peer' (official-code style scoring).
Writes results.json, results.csv and results.png to --out. --arch builds the architecture with random weights
from its config (widths kept, --vision-layers / --llm-layers cut the depth), so it runs offline on a CPU.
Bad flags, --set fields, configs and --out are one line and exit status 2 before any work; a configuration the
built model refuses (e.g. --set layer=99 on a shallower LLM) likewise, before any timing. A configuration that
fails while timed is recorded with its error (traceback on stderr) and makes the exit status 1.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint folder (default: the embedded tiny LLaVA)")
    src.add_argument("--arch", help="a real architecture with random weights: llava-1.5-7b, llava-1.5-13b, "
                                    "llava-next-7b, internvl2-8b, qwen2.5-vl-7b or qwen3-vl-8b")
    p.add_argument("--vision-layers", type=int, help="with --arch: vision layers to build (default: all)")
    p.add_argument("--llm-layers", type=int, help="with --arch: LLM layers to build (default: all)")
    p.add_argument("--methods", help="comma-separated methods (default: every registered method that can run)")
    p.add_argument("--keep", help="comma-separated visual tokens kept per image (default: 192,128,64 scaled)")
    p.add_argument("--ratio", help="comma-separated fractions of visual tokens removed")
    p.add_argument("--config", action="append", default=[], help="a method / pipeline config file (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method field for every method")
    p.add_argument("--rounds", type=int, default=8, help="recorded interleaved rounds (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not recorded (default 1)")
    p.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed per round (default 8)")
    p.add_argument("--text-tokens", type=int, default=56, help="text tokens of the prompt (default 56)")
    p.add_argument("--evict-early-kv", action="store_true",
                   help="also time LLM-cutting methods with evict_early_kv=True (decode ms, KV bytes)")
    p.add_argument("--no-peer", action="store_true", help="skip the eager / output_attentions peer timing")
    p.add_argument("--no-replay", action="store_true", help="skip the replays of the methods' own schedules")
    p.add_argument("--kernel", action="store_true", help="benchmark the compaction kernel instead")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="weights (--arch), prompt and seeded methods")
    p.add_argument("--out", default="out/perf", help="output folder (default out/perf)")


def _ints(text: str | None, flag: str) -> list[int]:
    if not text:
        return []
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text}: expected comma-separated whole numbers, e.g. {flag} 192,128,64") from None
    if any(v < 1 for v in values):
        raise UsageError(f"{flag} {text}: every value must be >= 1")
    return values


def _floats(text: str | None, flag: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text}: expected comma-separated numbers in [0, 1), e.g. {flag} 0.5,0.75") from None
    if any(not 0 <= v < 1 for v in values):
        raise UsageError(f"{flag} {text}: every ratio must be in [0, 1)")
    return values


def _check_light(args, hyper: dict) -> list[str] | None:
    """--arch, --methods (canonical names returned; None: not given), their --set fields and --config files
    that exist: the checks that need neither torch nor a model, so they answer at once."""
    from .known import ARCH_NAMES, check_config_exists, check_set_fields, known_method

    if args.arch and args.arch not in ARCH_NAMES:
        raise UsageError(f"--arch {args.arch}: unknown architecture; use one of {', '.join(ARCH_NAMES)}")
    methods = None
    if args.methods:
        try:
            methods = [known_method(m.strip())[0] for m in args.methods.split(",") if m.strip()]
        except ValueError as err:
            raise UsageError(f"--methods {args.methods}: {err}") from None
    check_set_fields(methods or [], hyper)
    for spec in args.config:
        check_config_exists(spec)
    return methods


def check_args(args) -> dict:
    """Every check that needs no model; returns the parsed lists. Raises UsageError. The flags that need no
    torch come first, so a mistake in them is reported at once."""
    for flag in ("rounds", "decode_tokens", "text_tokens", "vision_layers", "llm_layers", "threads", "warmup"):
        low = 0 if flag in ("decode_tokens", "warmup") else 1
        check_count(getattr(args, flag), f"--{flag.replace('_', '-')}", low)
    if (args.vision_layers or args.llm_layers) and not args.arch:
        raise UsageError("--vision-layers / --llm-layers cut the depth of an --arch model; add --arch NAME")
    check_model_spec(args.model)
    check_out_dir(args.out)
    hyper, keeps, ratios = parse_set(args.set), _ints(args.keep, "--keep"), _floats(args.ratio, "--ratio")
    methods = _check_light(args, hyper)
    from ..eval import sweep
    from ..loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    try:
        resolve_dtype(args.dtype, device)
    except ValueError as err:
        raise UsageError(f"--dtype {args.dtype}: {err}") from None
    files = [sweep.load_method_config(c) for c in args.config]
    # the default method list depends on the model: those configurations are checked once it is built
    sweep.check_configs(methods or [], files, hyper, keeps, ratios, args.seed)
    return {"device": device, "methods": methods, "files": files, "hyper": hyper, "keeps": keeps, "ratios": ratios}


def run_from_args(args, prog: str = "vtprune perf") -> int:
    try:
        checked = check_args(args)
    except UsageError as err:
        return report(prog, err)
    if args.kernel:
        return _run_kernel(args, checked)
    from ..perf.run import run

    try:
        return run(args, checked, prog)
    except UsageError as err:
        return report(prog, err)


def _run_kernel(args, checked) -> int:
    import torch

    from ..loading import num_threads, resolve_dtype
    from ..perf import kernel_bench

    device = checked["device"]
    dtype = resolve_dtype(args.dtype, device) if args.dtype != "auto" else torch.float32
    with num_threads(args.threads):
        rows = kernel_bench.run_kernel_bench(device=str(device), dtype=dtype)
    print(kernel_bench.kernel_table(rows))
    kernel_bench.write_kernel_results(rows, args.out)
    print(f"wrote {Path(args.out) / 'kernel.json'} and kernel.csv", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .args import OneLineParser

    p = OneLineParser(prog="vtprune perf", description=DESCRIPTION, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    start = time.perf_counter()
    status = run_from_args(p.parse_args(argv))
    print(f"vtprune perf: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return status



def add(subparsers) -> None:
    """Register ``perf`` on the ``vtprune`` parser."""
    p = subparsers.add_parser(
        "perf", help="speed, memory and FLOPs of pruning methods against the oracle and the FLOPs ideal",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(handler=lambda args: run_from_args(args, prog="vtprune perf"))
