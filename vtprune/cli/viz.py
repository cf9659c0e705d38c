"""``vtprune viz``: draw which visual tokens a method keeps, one panel per pruning stage (the drawing itself is
:mod:`vtprune.viz`). Files, flags and the method's name, fields and budget are checked before torch is imported,
the field values right after.
"""

from __future__ import annotations

from pathlib import Path

from .args import UsageError, check_method, check_model_spec, check_out_image, check_prune, parse_set, report
from .known import check_light

__all__ = ["load_image"]


def load_image(image, flag: str = "--image"):
    """An image file decoded in full, as an RGB PIL image: a truncated or corrupt file, or one over PIL's
    decompression-bomb limit (its warning counts too), is a UsageError before any model loads."""
    from ..images import ImageDecodeError, decode_image

    path = Path(image).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give an image file")
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if not path.is_file():  # a device or a pipe such as /dev/null: PIL would read nothing or block
        raise UsageError(f"{flag} {path}: not a regular file; give an image file (PNG or JPEG)")
    try:
        return decode_image(path)
    except ImageDecodeError as err:
        raise UsageError(f"{flag} {err}") from None


def _viz_budget(args) -> dict:
    """``--keep`` / ``--ratio`` as method keywords: required by a method that prunes to a budget, optional for a
    budget-free schedule (TransPrune, VFlowOpt), refused (by the method's own check) where there is no budget
    (DyVTE). A method that removes no token has nothing to draw."""
    from .known import known_method

    try:
        name, cls = known_method(args.method)  # torch-free facts of the built-in methods
    except ValueError as err:  # unknown method: the registry's message with close matches
        raise UsageError(str(err)) from None
    if not cls.prunes:
        raise UsageError(f"--method {name}: it removes no visual token (it only modulates attention), so "
                         "there is nothing to draw; choose a pruning method (see vtprune methods)")
    budget = {"keep": args.keep} if args.keep is not None else {} if args.ratio is None else {"ratio": args.ratio}
    if not budget and cls.has_budget and not cls.budget_optional:
        raise UsageError(f"--method {name} prunes to a budget: give --keep N (visual tokens kept per image) "
                         "or --ratio R (the fraction removed, in [0, 1))")
    return budget


def _viz_check(args) -> tuple:
    """Everything about a viz command line that needs no model: files and flags first (no torch needed), then
    the method's name, fields and budget (no torch either), the device, then the field values. Returns (the
    decoded image, the method keywords)."""
    image = load_image(args.image)
    check_out_image(args.out)
    check_model_spec(args.model)
    hyper = parse_set(args.set)
    hyper.update(_viz_budget(args))
    check_light(args.method, **hyper)  # name, fields and budget before torch; the values after it
    from ..loading import resolve_device

    resolve_device(args.device)
    check_method(args.method, **hyper)
    return image, hyper


def _run_viz(args) -> int:
    prog = "vtprune viz"
    try:
        image, hyper = _viz_check(args)
        from ..adapters import get_adapter
        from ..loading import load_model

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
    from ..viz import kept_token_pictures

    kept_token_pictures(model, processor, image, args.question, args.method, out=args.out, **hyper)
    print(f"wrote {args.out}")
    return 0


def add(subparsers) -> None:
    """Register ``viz`` on the ``vtprune`` parser."""
    p = subparsers.add_parser(
        "viz", help="draw which visual tokens a method keeps (one panel per stage)",
        description="Draw the image as the model saw it with pruned patches dimmed, one panel per pruning stage.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True, help="the question asked with the image")
    p.add_argument("--method", required=True, help="method name (see `vtprune methods`)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens kept per image (needed unless the method has no "
                                                  "budget, as dyvte, or a schedule of its own, as transprune)")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens removed, in [0, 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method hyperparameter (repeatable)")
    p.add_argument("--out", default="kept.png", help="output image (default kept.png; missing folders are created)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(handler=_run_viz)
