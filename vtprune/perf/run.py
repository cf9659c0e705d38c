"""The body of ``vtprune perf`` once its flags are checked: model, prompt, configurations, rounds, outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import loading  # load_model looked up at each run: tests and scripts replace vtprune.loading's
from ..cliargs import UsageError
from ..eval import sweep
from ..progress import progress_bar
from ..registry import list_methods, method_class
from . import output as perf_output
from . import suite as perf_suite

__all__ = ["load", "run"]


def load(args, device: torch.device):
    """(model, description) for --arch / --model / the embedded tiny LLaVA."""
    dtype = loading.resolve_dtype(args.dtype, device)
    if args.arch:
        from .archs import build_arch

        try:
            model = build_arch(args.arch, vision_layers=args.vision_layers, llm_layers=args.llm_layers, dtype=dtype,
                               device=str(device), seed=args.seed)
        except ValueError as err:
            raise UsageError(str(err)) from None
        depth = f" ({args.vision_layers or 'all'} vision / {args.llm_layers or 'all'} LLM layers)"
        return model, f"{args.arch}{depth}, random weights"
    model, _, desc = loading.load_model(args.model, dtype=args.dtype, device=str(device))
    return model, desc["name"]


def _default_methods(model, random_weights: bool) -> tuple[list[str], list[str]]:
    """(methods that can run on the model, names left out with why). Methods with learned weights run on a
    random-weight --arch model with seeded untrained weights (:func:`_untrained_routers`)."""
    path = getattr(model.config, "_name_or_path", None)
    names, skipped = [], []
    for name in list_methods():
        if not method_class(name).available_for(path) and not (random_weights and name == "dyvte"):
            skipped.append(f"{name} (needs weights trained for this model)")
        elif name == "var" and not _var_dims(model):
            skipped.append("var (no known sink dimensions for this LLM: run `vtprune calibrate-sinks`, then "
                           "--methods var --set sink_dims=[...])")
        elif (refused := _refused(model, name)) is not None:
            skipped.append(f"{name} ({refused})")
        else:
            names.append(name)
    return names, skipped


def _refused(model, name: str) -> str | None:
    """Why prune() refuses ``name`` on this model family whatever its settings (e.g. a vision-tower method on
    Qwen-VL), or None; checked on the plan alone, nothing is installed."""
    from ..adapters import get_adapter
    from ..core.plan import build_plan, model_info
    from ..errors import PruneError

    if name in ("dyvte", "var"):
        return None  # built from weights / sink dims the caller gives (checked above); they run on every family
    method = method_class(name)(**({"ratio": 0.5} if method_class(name).has_budget else {}))
    try:
        build_plan((method,), model_info(get_adapter(model)))
    except PruneError as err:
        return str(err).removeprefix("vtprune: ")
    return None


def _untrained_routers(model, out_dir, seed: int) -> dict:
    """DyVTE on a random-weight --arch model: seeded untrained routers (its weights are random anyway), so the
    run times DyVTE's router evaluation and whatever exit they choose (the record's equivalent tokens say which)."""
    from ..methods.dyvte import ROUTER_FILE, Routers, save_routers

    cfg = model.config.get_text_config()
    torch.manual_seed(seed)
    path = Path(out_dir) / "untrained-routers" / ROUTER_FILE
    save_routers(Routers(cfg.hidden_size, cfg.num_hidden_layers), path, {"model_id": model.config._name_or_path,
                                                                            "note": "untrained (vtprune perf --arch)"})
    return {"routers": str(path)}


def _var_dims(model) -> dict:
    """VAR's sink dimensions for a depth-reduced --arch model: those of its full-depth backbone (same widths)."""
    from ..methods.var import SINK_DIMS

    cfg = model.config.get_text_config()
    key = next((k for k in SINK_DIMS if k.split(":")[1].split("x")[0] == str(cfg.hidden_size)
                and k.endswith(f"x{cfg.intermediate_size}")), None)
    return {"sink_dims": SINK_DIMS[key]} if key else {}


def run(args, checked: dict, prog: str) -> int:
    from .archs import arch_inputs

    device = checked["device"]
    with loading.num_threads(args.threads):
        torch.manual_seed(args.seed)
        model, model_desc = load(args, device)
        inputs = arch_inputs(model, text_tokens=args.text_tokens, seed=args.seed)
        n_visual = loading.visual_tokens_of(model)
        keeps, ratios = checked["keeps"], checked["ratios"]
        if not keeps and not ratios:
            keeps = sweep.scaled_keeps(n_visual)
        methods, skipped = ((checked["methods"], []) if checked["methods"] is not None
                            else _default_methods(model, bool(args.arch)))
        if checked["files"] and checked["methods"] is None:
            methods = []
        hyper = {m: dict(checked["hyper"]) for m in [*methods, *(f[1] for f in checked["files"])]}  # as bench
        if "var" in methods:
            hyper["var"] = {**_var_dims(model), **hyper["var"]}
        if "dyvte" in methods and args.arch:
            hyper["dyvte"] = {**_untrained_routers(model, args.out, args.seed), **hyper["dyvte"]}
        configs = sweep.build_configs(methods, keeps, ratios, seed=args.seed, hyper=hyper, files=checked["files"])
        sweep.check_on_model(model, configs, checked["hyper"])  # a refused configuration fails before timing
        setups = perf_suite.plan_setups(model, inputs, configs, keeps, ratios, evict=args.evict_early_kv)
        for line in skipped:
            print(f"{prog}: left out {line}", file=sys.stderr)
        timings = _timed(model, inputs, setups, args, prog)
        rows = perf_suite.records(model, inputs, setups, timings)
    meta = {"model": model_desc, "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "threads": args.threads or torch.get_num_threads(), "rounds": args.rounds, "warmup": args.warmup,
            "order": "every configuration once per round, back to back; even rounds in setup order, odd reversed",
            "noise": perf_suite.machine_noise(rows),
            "decode_tokens": args.decode_tokens, "text_tokens": args.text_tokens, "visual_tokens": n_visual,
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "command": " ".join(sys.argv), "skipped": skipped,
            "torch": torch.__version__}
    print(perf_output.format_perf_table(rows, meta))
    paths = perf_output.write_results(rows, meta, args.out)
    print(f"{prog}: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    failed = [r["label"] for r in rows if r["error"]]
    if failed:  # as bench: the results are written, the exit status says some are missing
        print(f"{prog}: {len(failed)} configuration(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _timed(model, inputs, setups, args, prog):
    """run_perf with a progress bar in a terminal; elsewhere (CI logs) one line per round started, no bar."""
    total = args.warmup + args.rounds
    bar = progress_bar(total * len(setups), prog, "cfg")
    seen = set()

    def step(rnd, label):
        if bar is not None:
            if rnd == 1 and 1 not in seen:  # round 0 added the replays: the rounds are that long
                bar.total = total * bar.n
            seen.add(rnd)
            bar.set_postfix_str(f"round {rnd + 1}: {label}", refresh=False)
            bar.update(1)
        elif rnd not in seen:
            seen.add(rnd)
            print(f"{prog}: round {rnd + 1} of {total}", file=sys.stderr, flush=True)

    try:
        return perf_suite.run_perf(model, inputs, setups, rounds=args.rounds, warmup=args.warmup,
                                   decode_tokens=args.decode_tokens, peer=not args.no_peer,
                                   replays=not args.no_replay, on_step=step)
    finally:
        if bar is not None:
            bar.close()
