"""Modules that let MONAI bundles run medsegkit's instance and query models.

MONAI's bundle tools expect ``network(image) -> tensor``. Instance models (Mask R-CNN) and query models
in instance / panoptic mode produce label maps through :func:`medsegkit.inference.predict` (slice-wise
detection, tiling and merging of instances across windows), so :class:`LabelMapNetwork` wraps such a
model and returns that label map as a one-channel float tensor ``(N, 1, *spatial)`` — the shape
``verify_net_in_out`` and ``SaveImaged`` work with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LabelMapNetwork"]


class LabelMapNetwork(nn.Module):
    """``forward(x: (N, C, *spatial)) -> (N, 1, *spatial)`` instance (or panoptic) label ids as float32.

    Args:
        model: a medsegkit instance model (``medsegkit_task == "instance"``) or universal model.
        task: ``"instance"`` or ``"panoptic"`` (universal models; instance models accept ``"instance"``).
        roi_size: window / tile size passed to :func:`medsegkit.inference.predict` (``None``: its default).
        predict_kwargs: further arguments of ``predict`` (thresholds, ``slice_axis``, ...).
    """

    def __init__(self, model: nn.Module, task: str = "instance", roi_size: Sequence[int] | None = None,
                 predict_kwargs: dict[str, Any] | None = None):
        super().__init__()
        kind = getattr(model, "medsegkit_task", "semantic")
        if kind == "semantic":
            raise ValueError(f"{type(model).__name__} is a semantic model; bundle it directly, not through LabelMapNetwork")
        if task not in ("instance", "panoptic"):
            raise ValueError(f"task must be 'instance' or 'panoptic', got {task!r}")
        self.model = model
        self.task = task
        self.roi_size = list(roi_size) if roi_size is not None else None
        self.predict_kwargs = dict(predict_kwargs or {})
        self.in_channels = getattr(model, "in_channels", 3)
        self.out_channels = 1
        self.medsegkit_task = "instance"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from medsegkit.inference import predict

        kwargs = dict(self.predict_kwargs)
        model_dims = getattr(self.model, "spatial_dims", x.ndim - 2)
        if x.ndim - 2 > model_dims:  # a 2D model on a RAS volume (C, X, Y, Z): axial slices, along Z
            kwargs.setdefault("slice_axis", x.ndim - 3)
        maps = []
        for image in x:  # (C, *spatial): each item of the batch is its own image
            labels = predict(self.model, image, task=self.task, roi_size=self.roi_size, output="labels",
                             **kwargs)
            maps.append(torch.as_tensor(labels).to(torch.float32)[None])
        result = torch.stack(maps)
        if type(x) is not torch.Tensor:  # a MONAI MetaTensor: keep its metadata (file name, affine) for Invertd/SaveImaged
            from monai.utils import convert_to_dst_type

            result = convert_to_dst_type(result, x, dtype=torch.float32)[0]
        return result
