"""napari side of the layer geometry: read a napari layer's full data → world transform.

The numpy geometry (axis order, affines, scale / translate / affine split, reorientation, the channel
axis choice) is core and lives in :mod:`medsegkit.io.geometry`; the plugin modules import it from there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["data_to_world_matrix"]


def data_to_world_matrix(layer: Any) -> np.ndarray:
    """The full ``(ndim+1, ndim+1)`` data → world matrix of a napari layer (scale, translate, rotate, shear, affine)."""
    from napari.utils.transforms import Affine

    data2physical = Affine(
        scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear, ndim=layer.ndim
    )
    return np.asarray(layer.affine.affine_matrix, dtype=float) @ np.asarray(data2physical.affine_matrix, dtype=float)
