"""vtprune inside lmms-eval (the ``lmms`` extra): ``lmms-eval --model vtprune --model_args
pretrained=DIR,method=fastv,ratio=0.75`` runs any lmms-eval task with any vtprune method, and ``vtprune
lmms-tasks`` prints the folder of the offline task pack (``--include_path``).

``manifests`` is the ``lmms_eval.models`` entry point; this package imports neither torch nor lmms-eval until
lmms-eval loads the class (``model``: the plugin class, ``args``: ``--model_args``, ``recorder``: the stats,
``docs``: the task pack's data and scoring helpers, ``tasks/``: the YAMLs)."""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "vtprune"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def manifests():
    """The ``lmms_eval.models`` entry point: the ``vtprune`` model (a chat model, :class:`.model.Vtprune`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path="vtprune.lmms.model.Vtprune")]
