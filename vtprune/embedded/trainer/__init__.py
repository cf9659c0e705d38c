"""The library part of ``scripts/train_tiny_llava.py``: what the tiny LLaVA's training adds to a plain LM loss.

``patches`` (dense per-patch targets, :class:`PatchAux`), ``vision_stage`` (stage 1: the vision tower alone, and the
warm-up + cosine schedule), ``retrieval`` (stage 2: attention supervision of one head, :class:`RetrievalAux`, and the
referent read-out, :class:`ReadoutAux`) and ``dropout`` (visual-token dropout). The script keeps the command line,
the training loop, evaluation and the model card.
"""

from .dropout import drop_visual_tokens
from .patches import PatchAux, patch_classes, referent_classes
from .retrieval import ReadoutAux, RetrievalAux
from .vision_stage import Stop, lr_factor, pretrain_vision

__all__ = ["PatchAux", "patch_classes", "referent_classes", "RetrievalAux", "ReadoutAux", "drop_visual_tokens",
           "Stop", "lr_factor", "pretrain_vision"]
