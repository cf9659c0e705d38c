"""The functions the task pack's YAMLs name (``!function utils.<name>``): vtprune's loaders and prompts
(:mod:`vtprune.lmms.docs`) feeding lmms-eval's own MME / GQA / POPE scorers."""

from lmms_eval.tasks.mme.utils import mme_process_results
from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_aggregate_f1_score,  # noqa: F401
                                        pope_aggregate_precision, pope_aggregate_recall, pope_aggregate_yes_ratio,
                                        pope_process_results)

from vtprune.lmms.docs import dataset, doc_to_text, doc_to_visual, gqa_results, mme_aggregate  # noqa: F401
from vtprune.lmms.docs import official_root, with_stats

# the shipped synthetic sets (vtprune/assets/synthetic_*; POPE's is drawn once into the vtprune cache)
mme_docs = lambda _split: dataset("mme")  # noqa: E731
gqa_docs = lambda _split: dataset("gqa")  # noqa: E731
pope_docs = lambda _split: dataset("pope")  # noqa: E731
vtprune_mme_results = with_stats("vtprune_mme", mme_process_results)
vtprune_gqa_results = with_stats("vtprune_gqa", gqa_results)
vtprune_pope_results = with_stats("vtprune_pope", pope_process_results)

# a user's local copy in the official layout (the folder vtprune bench --data takes), named by an environment
# variable; nothing is downloaded
mme_local_docs = lambda _split: dataset("mme", official_root("mme", "VTPRUNE_MME_DIR"))  # noqa: E731
gqa_local_docs = lambda _split: dataset("gqa", official_root("gqa", "VTPRUNE_GQA_DIR"))  # noqa: E731
pope_local_docs = lambda _split: dataset("pope", official_root("pope", "VTPRUNE_POPE_DIR"))  # noqa: E731
vtprune_mme_local_results = with_stats("vtprune_mme_local", mme_process_results)
vtprune_gqa_local_results = with_stats("vtprune_gqa_local", gqa_results)
vtprune_pope_local_results = with_stats("vtprune_pope_local", pope_process_results)
