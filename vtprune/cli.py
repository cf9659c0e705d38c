"""The ``vtprune`` command: one argparse sub-command per tool.

    vtprune bench [...]     accuracy + speed of pruning methods on MME / GQA / POPE (see ``vtprune bench -h``)
    vtprune perf [...]      speed, memory and FLOPs against the oracle and the FLOPs ideal (see ``vtprune perf -h``)
    vtprune methods         list the registered methods
    vtprune viz [...]       draw which visual tokens a method keeps (see ``vtprune viz -h``)
    vtprune train-dyvte     train DyVTE's exit routers for a model (see ``vtprune train-dyvte -h``)
    vtprune calibrate-sinks find VAR's sink dimensions of a model (see ``vtprune calibrate-sinks -h``)

Adding a sub-command (e.g. ``viz``): write ``_add_<name>(subparsers)`` that creates the sub-parser, adds its
flags and sets ``handler=<function(args) -> exit status>``, then list it in ``COMMANDS``. Heavy imports
(torch, transformers) belong inside the handler so ``vtprune -h`` stays fast.

User errors (bad flags, files, folders, devices, methods) are one ``<prog>: error: <message>`` line on stderr and
exit status 2, found before any model is loaded: argparse's through :class:`OneLineParser`, later checks by
raising :class:`UsageError` (caught by the handler and printed with :func:`report`). What only the model can
tell (a layer beyond its depth) is checked right after loading it, before any forward (:func:`check_prune`).
Other exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

__all__ = ["build_parser", "main", "COMMANDS", "UsageError", "report", "parse_set", "OneLineParser"]


def _add_bench(subparsers) -> None:
    from .benchmarks import cli as bench_cli

    p = subparsers.add_parser(
        "bench", help="benchmark pruning methods (accuracy + prefill speed) on MME / GQA / POPE",
        description=bench_cli.DESCRIPTION, epilog=bench_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_cli.add_arguments(p)
    p.set_defaults(handler=lambda args: bench_cli.run_from_args(args, prog="vtprune bench"))


def _run_methods(args) -> int:
    from . import methods as _methods  # noqa: F401  (registers the built-in methods)
    from .registry import list_methods

    for name, desc in list_methods().items():
        print(f"{name:<14} {desc}")
    return 0


def _add_methods(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list the registered pruning methods")
    p.set_defaults(handler=_run_methods)


class UsageError(ValueError):
    """Bad command-line input (a flag value, file or folder): printed as one ``<prog>: error:`` line, exit 2."""


def report(prog: str, err) -> int:
    """Print ``err`` as the single line ``<prog>: error: <message>`` on stderr; returns exit status 2."""
    message = " ".join(str(err).split()).removeprefix(f"{prog}: ").removeprefix("vtprune bench: ")
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like the checks run after parsing."""

    def error(self, message):
        raise SystemExit(report(self.prog, f"{message} (see {self.prog} -h)"))


def _parse_value(text: str):
    """A ``--set`` value as YAML reads it (ints, floats, booleans, strings); ``1e-3`` is a float too."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_set(items, reserved=("keep", "ratio")) -> dict:
    """``--set KEY=VALUE`` entries -> {key: value}; the budget keys have their own flags."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE with a method field as KEY (e.g. --set layer=3), got {item!r}")
        if key in reserved:
            raise UsageError(f"--set {key}=...: give the budget with --{key} instead")
        out[key] = _parse_value(value.strip())
    return out


def check_method(name: str, **kwargs):
    """The method ``name`` built with ``kwargs`` (fields and budget checked without a model)."""
    from . import methods as _methods  # noqa: F401  (registers the built-in methods)
    from .registry import make_method

    try:
        return make_method(name, **kwargs)
    except (TypeError, ValueError) as err:  # unknown method or field, bad value, bad budget
        raise UsageError(str(err)) from err


def check_prune(model, method, **kwargs) -> None:
    """Prune ``model`` as ``vtprune.prune(model, method, **kwargs)`` would and unprune it at once, with no forward
    run: what this model refuses (a layer beyond its depth, missing routers) is a UsageError (prune's message).
    The model is left unpruned either way."""
    from .api import prune, unprune
    from .errors import PruneError

    try:
        prune(model, method, **kwargs)
    except PruneError as err:  # ConfigError included; a refused prune leaves no session on the model
        raise UsageError(str(err)) from None
    unprune(model)


def check_count(value, flag: str, low: int = 1) -> None:
    """A whole-number flag (None: not given) is at least ``low``; else a UsageError."""
    if value is not None and value < low:
        raise UsageError(f"{flag} {value}: must be >= {low}")


def check_positive(value, flag: str, fix: str = "") -> None:
    """A number flag (None: not given) is finite and > 0; else a UsageError (``fix`` is appended to it)."""
    if value is not None and not (math.isfinite(value) and value > 0):  # nan compares false, so it fails too
        raise UsageError(f"{flag} {value:g}: must be a finite number > 0{fix}")


def _probe_writable(path: Path, flag: str, what: str, shown: Path | None = None) -> None:
    """``path`` (not yet existing parts allowed: they get created) can be written; else a UsageError naming
    ``shown`` (default ``path``: the flag's value)."""
    import tempfile

    shown = path if shown is None else shown
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {shown}: {ancestor} is a file, so no {what} can be created under it; "
                         "choose another path")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as err:
        raise UsageError(f"{flag} {shown}: cannot write in {ancestor} ({err.strerror or err}); "
                         "choose a writable location") from None


def check_out_dir(out, flag: str = "--out") -> Path:
    """An output folder that exists or can be created, and can be written."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file; give a folder (it is created if missing)")
    _probe_writable(path, flag, "folder")
    return path


def check_out_file(out, flag: str = "--out", example: str = "out.yaml") -> Path:
    """An output file path: not a folder, in a folder that exists or can be created, and can be written."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name such as {path / example}")
    _probe_writable(path.parent, flag, "file", shown=path)
    return path


def check_out_image(out, flag: str = "--out") -> Path:
    """An output image path: :func:`check_out_file` with a suffix PIL can save."""
    from PIL import Image

    path = Path(out).expanduser()
    if not path.is_dir() and path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"{flag} {path}: unknown image type {path.suffix or '(no extension)'!r}; use .png or .jpg")
    return check_out_file(path, flag, example="kept.png")


def check_image(image, flag: str = "--image") -> Path:
    """An existing, readable image file (its header checked by PIL, no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(image).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give an image file")
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if not path.is_file():  # a device or a pipe such as /dev/null: PIL would read nothing or block
        raise UsageError(f"{flag} {path}: not a regular file; give an image file (PNG or JPEG)")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # SyntaxError: PIL's broken-PNG error
        raise UsageError(f"{flag} {path}: not an image PIL can read ({err}); give a PNG or JPEG file") from None
    return path


def _viz_check(args) -> dict:
    """Everything about a viz command line that needs no model; returns the method keywords."""
    from .benchmarks.runner import check_model_spec, resolve_device

    check_image(args.image)
    check_out_image(args.out)
    check_model_spec(args.model)
    resolve_device(args.device)
    hyper = parse_set(args.set)
    hyper.update({"keep": args.keep} if args.keep is not None else {"ratio": args.ratio})
    check_method(args.method, **hyper)
    return hyper


def _run_viz(args) -> int:
    from .adapters import get_adapter
    from .benchmarks.runner import load_model
    from .viz import kept_token_pictures

    prog = "vtprune viz"
    try:
        hyper = _viz_check(args)
        model, processor, _ = load_model(args.model, dtype=args.dtype, device=args.device)
        try:
            n_visual = get_adapter(model).nominal_tokens
        except TypeError as err:  # a loadable model of an unsupported class
            raise UsageError(f"--model {args.model}: {err}") from None
        if args.keep is not None and args.keep > n_visual:
            raise UsageError(f"--keep {args.keep}: more than the {n_visual} visual tokens an image has for this "
                             f"model; use --keep <= {n_visual} (or --ratio)")
        check_prune(model, args.method, **hyper)  # e.g. --set layer=99 on a 4-layer LLM, before the forward
    except UsageError as err:
        return report(prog, err)
    kept_token_pictures(model, processor, args.image, args.question, args.method, out=args.out, **hyper)
    print(f"wrote {args.out}")
    return 0


def _add_viz(subparsers) -> None:
    p = subparsers.add_parser(
        "viz", help="draw which visual tokens a method keeps (one panel per stage)",
        description="Draw the image as the model saw it with pruned patches dimmed, one panel per pruning stage.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True, help="the question asked with the image")
    p.add_argument("--method", required=True, help="method name (see `vtprune methods`)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=int, help="visual tokens kept per image")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens removed, in [0, 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method hyperparameter (repeatable)")
    p.add_argument("--out", default="kept.png", help="output image (default kept.png; missing folders are created)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(handler=_run_viz)


def _check_data(data) -> None:
    if data is not None and not Path(data).is_dir():
        raise UsageError(f"--data {data}: not a folder (a GQA- or MME-format folder)")


def _run_train_dyvte(args) -> int:
    from .training.dyvte import TrainSettings, train

    try:
        check_model_spec_arg(args.model)
        _check_data(args.data)
        for flag in ("steps", "batch_size", "width"):
            check_count(getattr(args, flag), f"--{flag.replace('_', '-')}")
        check_positive(args.lr, "--lr")
        check_positive(args.minutes, "--minutes", " (or leave the flag out: no time limit)")
        check_out_dir(args.out)
    except UsageError as err:
        return report("vtprune train-dyvte", err)
    meta = train(TrainSettings(model=args.model, data=args.data, steps=args.steps, minutes=args.minutes, lr=args.lr,
                               batch_size=args.batch_size, out=args.out, seed=args.seed, width=args.width,
                               prompt_style=args.prompt_style, progress=not args.no_progress))
    print(f"wrote {Path(args.out) / 'dyvte_routers.safetensors'} ({meta['steps']} steps); safe-to-exit per layer: "
          + ", ".join(f"{r:.2f}" for r in meta["exit_rate"]))
    return 0


def check_model_spec_arg(spec) -> None:
    if spec is not None:
        from .benchmarks.runner import check_model_spec

        check_model_spec(spec)


def _add_train_dyvte(subparsers) -> None:
    p = subparsers.add_parser(
        "train-dyvte", help="train DyVTE's exit routers on a frozen model (the synthetic set by default)",
        description="Train one exit router per LLM layer (spec §2.6); resumes from --out when it holds state.pt.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--data", default=None, help="GQA- or MME-format folder (default: the synthetic generator)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--lr", type=float, default=6e-5, help="peak learning rate, cosine with 3%% warm-up (6e-5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=None, help="router hidden width (default: d // 2)")
    p.add_argument("--prompt-style", default="llava_v1", choices=["llava_v1", "chat_template"])
    p.add_argument("--out", default="out/dyvte", help="output folder (routers, exit curve, state.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_train_dyvte)


def _run_calibrate_sinks(args) -> int:
    try:
        check_model_spec_arg(args.model)
        _check_data(args.data)
        check_count(args.prompts, "--prompts")
        check_positive(args.tau, "--tau")
        if args.out is not None:
            if Path(args.out).suffix not in (".yaml", ".yml"):
                raise UsageError(f"--out {args.out}: write the sink dims to a .yaml config")
            check_out_file(args.out, example="var.yaml")
    except UsageError as err:
        return report("vtprune calibrate-sinks", err)
    import yaml

    from .benchmarks.runner import load_model
    from .methods.var import find_sink_dims
    from .training.dyvte import TrainSettings, encode, samples

    model, processor, _ = load_model(args.model, "float32", "cpu")
    settings = TrainSettings(model=args.model, data=args.data, seed=args.seed)
    stream = samples(settings)
    batches = []
    for _ in range(args.prompts):
        batch = encode(processor, [next(stream)], settings.prompt_style)
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    dims = find_sink_dims(model, batches, tau=args.tau)
    print(f"sink dims (|x_d| / RMS(x) > {args.tau:g} at the inputs of LLM layers 2..L-1, in at least half of "
          f"{args.prompts} prompts): {dims if dims else 'none'}")
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        config = {"method": "var", "model": str(getattr(model.config, "_name_or_path", "")), "sink_dims": dims,
                  "tau": args.tau}
        Path(args.out).write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"wrote {args.out}")
    return 0


def _add_calibrate_sinks(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-sinks", help="find the hidden dimensions with massive activations (VAR's sink dims)",
        description="Run a few prompts and report the hidden dimensions where |x_d| / RMS(x) exceeds --tau at "
                    "the residual stream of LLM layers 2..L-1 in at least half of them.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--data", default=None, help="GQA- or MME-format folder (default: the synthetic generator)")
    p.add_argument("--prompts", type=int, default=16, help="prompts to run (default 16)")
    p.add_argument("--tau", type=float, default=20.0, help="threshold on |x_d| / RMS(x) (VAR's tau, default 20)")
    p.add_argument("--out", default=None, help="write a VAR config (.yaml) with the dims found")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_calibrate_sinks)


def _add_perf(subparsers) -> None:
    from .benchmarks import perf_cli

    p = subparsers.add_parser(
        "perf", help="speed, memory and FLOPs of pruning methods against the oracle and the FLOPs ideal",
        description=perf_cli.DESCRIPTION, epilog=perf_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    perf_cli.add_arguments(p)
    p.set_defaults(handler=lambda args: perf_cli.run_from_args(args, prog="vtprune perf"))


def _add_search(subparsers) -> None:
    from .search import cli as search_cli

    p = subparsers.add_parser(
        "search", help="tune a method's hyperparameters with optuna (flow objective or dev accuracy)",
        description=search_cli.DESCRIPTION, epilog=search_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search_cli.add_arguments(p)
    p.set_defaults(handler=lambda args: search_cli.run_from_args(args, prog="vtprune search"))


# name -> function that registers the sub-command
COMMANDS = {
    "bench": _add_bench,
    "methods": _add_methods,
    "viz": _add_viz,
    "train-dyvte": _add_train_dyvte,
    "calibrate-sinks": _add_calibrate_sinks,
    "perf": _add_perf,
    "search": _add_search,
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vtprune", description="Training-free visual-token pruning for HF VLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:  # no command given: a user error like the others, one line
        parser.error(f"give a command: {', '.join(COMMANDS)}")
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
