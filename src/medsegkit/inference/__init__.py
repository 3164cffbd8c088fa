"""Inference: :func:`predict` on arrays (sliding windows) and :func:`segment` on images.

- :mod:`medsegkit.inference.predict`: the window loop (lazy input, slab-wise output, progress, cancel).
- :mod:`medsegkit.inference.fast`: the optimised path used by ``predict(..., fast=True)``.
- :mod:`medsegkit.inference.segment`: preprocessing → predict → inverse → clean-up, on ``Image``s.
"""

from __future__ import annotations

from medsegkit.inference.predict import OUTPUTS, predict, window_slices
from medsegkit.inference.segment import segment

__all__ = ["OUTPUTS", "predict", "segment", "window_slices"]
