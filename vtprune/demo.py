"""``make demo`` = ``python -m vtprune.demo``: the default benchmark end to end into ./out/demo.

The embedded tiny LLaVA (144 visual tokens per image) answers the embedded synthetic MME and GQA sets,
unpruned and pruned by :data:`DEMO_METHODS` at 48/32/16 kept tokens (LLaVA's 192/128/64 of 576, scaled); the
table, results.json/.csv and the score-vs-tokens plot show what pruning costs and buys. The list is fixed so the
demo's output and time stay put as methods are added (``vtprune bench`` with no ``--methods`` runs them all).
Extra arguments go to ``vtprune bench`` (e.g. ``python -m vtprune.demo --limit 50``). Runs on one torch thread
(``--threads`` overrides): about 3-5 minutes on a 2-core machine, also while other work shares it.
"""

from __future__ import annotations

import os
import sys
import time

DEMO_OUT = os.path.join("out", "demo")
# the seed papers' token-removing methods and the FastV / VisionZip / random baselines (under 10 minutes on 2 cores)
DEMO_METHODS = ("dyvte", "fastv", "flowcut", "random", "transprune", "vflowopt", "visionzip", "vtc_cls")


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .cli import bench as bench_cli
    from .embedded import tiny_llava

    argv = list(sys.argv[1:] if argv is None else argv)
    if not (tiny_llava.DEFAULT_ASSET_DIR / "config.json").is_file():
        print(f"note: no trained tiny LLaVA at {tiny_llava.DEFAULT_ASSET_DIR}; the demo runs a random-init "
              "model, so its scores are chance level (timings are still real)", file=sys.stderr)
    if "--out" not in argv:
        argv = ["--out", DEMO_OUT] + argv
    if "--methods" not in argv:
        argv = ["--methods", ",".join(DEMO_METHODS)] + argv
    if "--threads" not in argv:  # the tiny model gains nothing from intra-op threads; on a shared box they hurt
        argv = ["--threads", "1"] + argv
    print("vtprune demo: vanilla vs pruned tiny LLaVA on synthetic MME + GQA", flush=True)
    start = time.perf_counter()
    status = bench_cli.main(argv)
    print(f"vtprune demo finished in {time.perf_counter() - start:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
