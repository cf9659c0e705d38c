"""``vtprune calibrate-sinks``: find VAR's sink dimensions (hidden dimensions with massive activations) of a
model. Flags are checked before torch is imported (see :mod:`vtprune.cli`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .args import UsageError, check_count, check_data_dir, check_model_spec, check_out_file, check_positive, report

__all__ = ["SINKS_HELP", "SINKS_DESCRIPTION", "add_sinks_arguments", "run_calibrate_sinks"]

SINKS_HELP = "find the hidden dimensions with massive activations (VAR's sink dims)"
SINKS_DESCRIPTION = ("Run a few prompts and report the hidden dimensions where |x_d| / RMS(x) exceeds --tau at the "
                     "residual stream of LLM layers 2..L-1 in at least half of them. When none does, VAR cannot run "
                     "on the model: that is said on stderr, nothing is written and the exit status is 1.")


def add_sinks_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--data", default=None, help="GQA- or MME-format folder (default: the synthetic generator)")
    p.add_argument("--prompts", type=int, default=16, help="prompts to run (default 16)")
    p.add_argument("--tau", type=float, default=20.0, help="threshold on |x_d| / RMS(x) (VAR's tau, default 20)")
    p.add_argument("--out", default=None, help="write a VAR config (.yaml) with the dims found (none found: no file)")
    p.add_argument("--seed", type=int, default=0)


def run_calibrate_sinks(args) -> int:
    """``vtprune calibrate-sinks``: 2 (one line) for bad flags, 1 when no sink dimension is found (nothing is
    written: VAR refuses empty sink dims at prune(), so such a config could never run), else 0."""
    prog = "vtprune calibrate-sinks"
    try:
        check_model_spec(args.model)
        check_data_dir(args.data)
        check_count(args.prompts, "--prompts")
        check_positive(args.tau, "--tau")
        if args.out is not None:
            if Path(args.out).suffix not in (".yaml", ".yml"):
                raise UsageError(f"--out {args.out}: write the sink dims to a .yaml config")
            check_out_file(args.out, example="var.yaml")
    except UsageError as err:
        return report(prog, err)
    from ..training.dyvte import folder_items

    try:  # a malformed --data folder or image: one line, before the model loads (as bench)
        items = folder_items(args.data) if args.data is not None else None
    except UsageError as err:
        return report(prog, err)
    from ..loading import load_model
    from ..methods.var import find_sink_dims

    model, processor, _ = load_model(args.model, "float32", "cpu")
    dims = find_sink_dims(model, _sink_batches(args, processor, items), tau=args.tau)
    rule = (f"|x_d| / RMS(x) > {args.tau:g} at the inputs of LLM layers 2..L-1, in at least half of "
            f"{args.prompts} prompts")
    if not dims:
        written = f"; nothing written to {args.out}" if args.out is not None else ""
        print(f"{prog}: no sink dimension found ({rule}), so VAR cannot run on this model with this --tau; try a "
              f"lower --tau or more --prompts{written}", file=sys.stderr)
        return 1
    print(f"sink dims ({rule}): {dims}")
    if args.out is not None:
        _write_sink_config(args.out, model, dims, args.tau)
        print(f"wrote {args.out}")
    return 0


def _sink_batches(args, processor, items=None) -> list[dict]:
    """``--prompts`` single-prompt model inputs from ``--data`` (its ``items``, read by
    :func:`~vtprune.training.dyvte.folder_items`; default: the synthetic generator)."""
    from ..training.dyvte import TrainSettings, encode, samples

    settings = TrainSettings(model=args.model, data=args.data, seed=args.seed)
    stream = samples(settings, items)
    batches = []
    for _ in range(args.prompts):
        batch = encode(processor, [next(stream)], settings.prompt_style)
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    return batches


def _write_sink_config(out, model, dims: list[int], tau: float) -> None:
    import yaml

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    config = {"method": "var", "model": str(getattr(model.config, "_name_or_path", "")), "sink_dims": dims, "tau": tau}
    Path(out).write_text(yaml.safe_dump(config, sort_keys=False))


def add(subparsers) -> None:
    """Register ``calibrate-sinks`` on the ``vtprune`` parser."""
    p = subparsers.add_parser("calibrate-sinks", help=SINKS_HELP, description=SINKS_DESCRIPTION)
    add_sinks_arguments(p)
    p.set_defaults(handler=run_calibrate_sinks)
