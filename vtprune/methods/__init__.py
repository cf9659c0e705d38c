"""Built-in methods; importing this package registers them."""

from .base import ImageView, Method, Selection, VisionView, top_k_sorted
from .fastv import FastV
from .random import RandomPrune
from .visionzip import VisionZip

__all__ = ["Method", "ImageView", "Selection", "VisionView", "top_k_sorted", "FastV", "RandomPrune", "VisionZip"]
