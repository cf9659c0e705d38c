"""Kernels for visual-token pruning.

``compact_`` compacts kept tokens in place along a token axis (torch path
always available; Triton kernel used when triton is importable and x is on
CUDA, or under TRITON_INTERPRET=1). Importing this package never imports triton.
"""

from .compact import compact_, triton_available

__all__ = ["compact_", "triton_available"]
