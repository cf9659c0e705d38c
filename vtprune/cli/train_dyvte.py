"""``vtprune train-dyvte``: train DyVTE's exit routers from a model's activations (the trainer itself is
:mod:`vtprune.training.dyvte`). Flags are checked before torch is imported (see :mod:`vtprune.cli`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .args import UsageError, check_count, check_data_dir, check_model_spec, check_out_dir, check_positive, report

__all__ = ["TRAIN_HELP", "TRAIN_DESCRIPTION", "add_train_arguments", "run_train"]

TRAIN_HELP = "train DyVTE's exit routers on a frozen model (the synthetic set by default)"
TRAIN_DESCRIPTION = ("Train one exit router per LLM layer (spec §2.6); resumes from --out when it holds state.pt "
                     "(for the same model and --width: another is refused).")


def add_train_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--data", default=None, help="GQA- or MME-format folder (default: the synthetic generator)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--lr", type=float, default=6e-5, help="peak learning rate, cosine with 3%% warm-up (6e-5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=None,
                   help="router hidden width (default: d // 2, or the width of the run --out resumes)")
    p.add_argument("--prompt-style", default="llava_v1", choices=["llava_v1", "chat_template"])
    p.add_argument("--out", default="out/dyvte", help="output folder (routers, exit curve, state.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run_train(args) -> int:
    """``vtprune train-dyvte``: 2 (one line) for bad flags or a state.pt that cannot be resumed, 130 on Ctrl-C."""
    prog = "vtprune train-dyvte"
    try:
        check_model_spec(args.model)
        check_data_dir(args.data)
        for flag in ("steps", "batch_size", "width"):
            check_count(getattr(args, flag), f"--{flag.replace('_', '-')}")
        check_positive(args.lr, "--lr")
        check_positive(args.minutes, "--minutes", " (or leave the flag out: no time limit)")
        check_out_dir(args.out)
        from ..training.dyvte import TrainSettings, train

        # a state.pt in --out that cannot be resumed is a UsageError too, before any step
        meta = train(TrainSettings(model=args.model, data=args.data, steps=args.steps, minutes=args.minutes,
                                   lr=args.lr, batch_size=args.batch_size, out=args.out, seed=args.seed,
                                   width=args.width, prompt_style=args.prompt_style, progress=not args.no_progress))
    except UsageError as err:
        return report(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume from the last saved step "
              f"({Path(args.out) / 'state.pt'})", file=sys.stderr)
        return 130
    print(f"wrote {Path(args.out) / 'dyvte_routers.safetensors'} ({meta['steps']} steps); safe-to-exit per layer: "
          + ", ".join(f"{r:.2f}" for r in meta["exit_rate"]))
    return 0


def add(subparsers) -> None:
    """Register ``train-dyvte`` on the ``vtprune`` parser."""
    p = subparsers.add_parser("train-dyvte", help=TRAIN_HELP, description=TRAIN_DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(handler=run_train)
