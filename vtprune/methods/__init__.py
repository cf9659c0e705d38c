"""Built-in methods; importing this package registers them."""

from .base import ImageView, Method, Selection, VisionView, top_k_sorted
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .dyvte import DyVTE
from .fastv import FastV
from .flowcut import FlowCut
from .paint import PAINT
from .pdrop import PDrop
from .random import RandomPrune
from .sparsevlm import SparseVLM
from .transprune import TransPrune
from .var import VAR
from .vflowopt import VFlowOpt
from .visionzip import VisionZip
from .vtc_cls import VTCCLS
from .zipvl import ZipVL

__all__ = ["Method", "ImageView", "Selection", "VisionView", "top_k_sorted", "CDPruner", "DART", "DivPrune", "DyVTE", "FastV", "FlowCut", "PAINT", "PDrop", "RandomPrune", "SparseVLM", "TransPrune", "VAR", "VFlowOpt", "VisionZip", "VTCCLS", "ZipVL"]
