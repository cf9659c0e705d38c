"""``vtprune lmms-tasks``: print the folder of vtprune's offline lmms-eval task pack, for
``lmms-eval --include_path "$(vtprune lmms-tasks)"``. Torch-free (the folder ships in the package)."""

from __future__ import annotations

EPILOG = """tasks in that folder:
  vtprune_mme, vtprune_gqa, vtprune_pope        the synthetic sets vtprune ships (offline)
  vtprune_mme_local, vtprune_gqa_local,         your local copy in the official layout, named by
  vtprune_pope_local                            VTPRUNE_MME_DIR / VTPRUNE_GQA_DIR / VTPRUNE_POPE_DIR
example:
  lmms-eval --model vtprune --model_args pretrained=DIR,method=fastv,ratio=0.75 \\
      --include_path "$(vtprune lmms-tasks)" --tasks vtprune_mme,vtprune_gqa,vtprune_pope"""


def _run(args) -> int:
    from ..lmms import TASKS_DIR

    print(TASKS_DIR)
    return 0


def add(subparsers) -> None:
    """Register ``lmms-tasks`` on the ``vtprune`` parser."""
    import argparse

    p = subparsers.add_parser("lmms-tasks", help="print the folder of the offline lmms-eval task pack",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=_run)
