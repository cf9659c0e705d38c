"""Core v2: the pieces ``Session`` is made of (see docs/architecture.md).

``layout``: token layouts and the pure functions that cut them; ``spans``: where each image's tokens are;
``context``: the per-forward and per-generation state; ``hooks``: every hook vtprune registers and the
ordered attention chain; ``probes``: what a method may observe; ``attention``: what a modulator is handed;
``plan``: the cut points, probes and modulators of a pipeline, validated; ``stats``: what ``stats`` reports.
"""
