"""Inference: :func:`predict` on arrays (sliding windows) and :func:`segment` on images.

- :mod:`medsegkit.inference.windows`: the window engine (image source, window grid, runner, one iterator
  with progress / cancel) that every task consumes.
- :mod:`medsegkit.inference.predict`: :func:`predict`, task dispatch and semantic blending (slab-wise output).
- :mod:`medsegkit.inference.adapters` / :mod:`medsegkit.inference.instance`: query-segment merging
  (MaskFormer / Mask2Former) and detection linking (Mask R-CNN).
- :mod:`medsegkit.inference.fast`: the optimised path used by ``predict(..., fast=True)``.
- :mod:`medsegkit.inference.segment`: preprocessing → predict → inverse → clean-up, on ``Image``s.
"""

from __future__ import annotations

from medsegkit.inference.predict import OUTPUTS, predict, window_slices
from medsegkit.inference.segment import segment

__all__ = ["OUTPUTS", "predict", "segment", "window_slices"]
