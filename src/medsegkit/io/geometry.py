"""Geometry between :class:`~medsegkit.io.Image` (voxel order) and viewer layers (display order), numpy only.

The core indexes voxels ``(i, j, k)`` and the world as RAS ``(x, y, z)`` mm (nibabel's order).
Viewers (napari, and every napari reader) put the *last* axis horizontally and slide over the
*first*: their habit is ``(z, y, x)``. So the conversion reverses the spatial axes everywhere, one
rule for reading into a layer, writing a layer and returning a result:

* layer data = ``Image.array`` with its spatial axes reversed: ``(k, j, i)`` (``(j, i)`` in 2D);
* layer world axes = RAS reversed: ``(z, y, x)`` mm, i.e. the default 3D view slides over axial
  slices and shows each one with x (towards the patient's right) to the right;
* the layer's data → world matrix is ``W = P · A · P`` (``A`` the image affine, ``P`` the axis
  reversal that keeps the homogeneous coordinate last), split into the layer's ``scale`` (the
  spacing), ``translate`` (the origin) and — only when the direction is not the identity — ``affine``
  (the direction). napari applies ``affine ∘ (scale, translate)``, so with direction ``D`` the
  translate is ``D⁻¹ · origin``.

napari slices in data space, so a direction that *permutes* axes (an LSA scan, say) would make the
2D view's transform singular. A reader therefore first turns the voxel axes to the closest RAS
order (axis permutations and flips only, no resampling: nibabel's ``io_orientation``), leaving only
a small oblique rotation, if any, for ``affine``; a writer turns a result back to its source's
voxel order when the layer remembers the source affine.

This module is core (it imports neither napari nor torch): the napari plugin
(:mod:`medsegkit.napari`), the GUI worker (:mod:`medsegkit.worker`) and
:mod:`medsegkit.viz` use it. Only the part that reads a napari layer object
(``data_to_world_matrix``) lives in :mod:`medsegkit.napari._geometry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "drop_axis",
    "from_canonical",
    "image_affine_from_world",
    "layer_geometry",
    "reorient_voxels",
    "resolve_channel_axis",
    "reverse_spatial",
    "to_canonical",
    "world_from_image_affine",
]

_IDENTITY_ATOL = 1e-6


def reverse_spatial(array: Any, n_spatial: int) -> Any:
    """Reverse the last ``n_spatial`` axes (napari ``(z, y, x)`` ↔ voxel ``(i, j, k)``); a view, any leading axes kept."""
    lead = array.ndim - n_spatial
    return array.transpose(*range(lead), *reversed(range(lead, array.ndim)))


def _reversal(n: int) -> list[int]:
    return [*reversed(range(n)), n]


def world_from_image_affine(affine: np.ndarray, n_spatial: int) -> np.ndarray:
    """napari's ``(n+1, n+1)`` data → world matrix (axes ``(z, y, x)``) from an ``Image`` 4×4 RAS affine.

    A 2D image uses the affine's upper-left 2×2 block and first two translations (the core's rule).
    """
    affine = np.asarray(affine, dtype=float)
    keep = [*range(n_spatial), 3]
    sub = affine[np.ix_(keep, keep)]
    perm = _reversal(n_spatial)
    return sub[np.ix_(perm, perm)]


def image_affine_from_world(world: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The ``Image`` 4×4 RAS affine from napari's ``(n+1, n+1)`` data → world matrix (n = 2 or 3)."""
    world = np.asarray(world, dtype=float)
    n = world.shape[0] - 1
    if world.shape != (n + 1, n + 1) or n not in (2, 3):
        raise ValueError(f"expected a 3x3 (2D) or 4x4 (3D) data-to-world matrix, got shape {world.shape}")
    perm = _reversal(n)
    sub = world[np.ix_(perm, perm)]
    affine = np.eye(4)
    affine[:n, :n] = sub[:n, :n]
    affine[:n, 3] = sub[:n, n]
    return affine


def layer_geometry(affine: np.ndarray, n_spatial: int) -> dict[str, Any]:
    """napari layer keyword arguments (``scale``, ``translate``, and ``affine`` when needed) for an ``Image`` affine.

    Returns ``{"scale": (n,), "translate": (n,)}`` plus ``"affine"`` (``(n+1, n+1)``, direction only,
    no translation) when the direction is not the identity.
    """
    world = world_from_image_affine(affine, n_spatial)
    linear, offset = world[:n_spatial, :n_spatial], world[:n_spatial, n_spatial]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing[None, :]
    kwargs: dict[str, Any] = {"scale": tuple(float(s) for s in spacing)}
    if np.allclose(direction, np.eye(n_spatial), atol=_IDENTITY_ATOL):
        kwargs["translate"] = tuple(float(t) for t in offset)
        return kwargs
    kwargs["translate"] = tuple(float(t) for t in np.linalg.solve(direction, offset))
    rotation = np.eye(n_spatial + 1)
    rotation[:n_spatial, :n_spatial] = direction
    kwargs["affine"] = rotation
    return kwargs


def drop_axis(matrix: np.ndarray, axis: int) -> np.ndarray:
    """Remove one layer axis (row and column) from a homogeneous matrix."""
    keep = [a for a in range(matrix.shape[0]) if a != axis]
    return matrix[np.ix_(keep, keep)]


def _spatial_block(affine: np.ndarray, n_spatial: int) -> np.ndarray:
    keep = [*range(n_spatial), 3]
    return np.asarray(affine, dtype=float)[np.ix_(keep, keep)]


def _embed(block: np.ndarray, n_spatial: int) -> np.ndarray:
    affine = np.eye(4)
    affine[:n_spatial, :n_spatial] = block[:n_spatial, :n_spatial]
    affine[:n_spatial, 3] = block[:n_spatial, n_spatial]
    return affine


def reorient_voxels(array: np.ndarray, affine: np.ndarray, n_spatial: int, transform: np.ndarray,
                    channel_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` with the voxel axes permuted / flipped by a nibabel orientation ``transform``
    (``(n_spatial, 2)``: for each input axis, its output axis and ``±1``); a view, no resampling, and the
    4×4 affine follows so that every voxel keeps its position in mm.
    """
    import nibabel.orientations as nio

    spatial_shape = array.shape[1:] if channel_first else array.shape
    moved = np.moveaxis(array, 0, -1) if channel_first else array
    moved = nio.apply_orientation(moved, transform)
    out = np.moveaxis(moved, -1, 0) if channel_first else moved
    block = _spatial_block(affine, n_spatial) @ nio.inv_ornt_aff(transform, spatial_shape)
    return out, _embed(block, n_spatial)


def to_canonical(array: np.ndarray, affine: np.ndarray, n_spatial: int, *,
                 channel_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` with the voxel axes permuted/flipped to the closest RAS order (a view, no resampling).

    ``array`` is ``(i, j, k)`` (``(C, i, j, k)`` with ``channel_first``), ``affine`` the 4×4 RAS affine.
    """
    import nibabel.orientations as nio

    transform = nio.io_orientation(_spatial_block(affine, n_spatial))
    if np.array_equal(transform, nio.axcodes2ornt("RAS"[:n_spatial])):
        return array, np.asarray(affine, dtype=float)
    return reorient_voxels(array, affine, n_spatial, transform, channel_first)


def from_canonical(array: np.ndarray, affine: np.ndarray, source_affine: np.ndarray,
                   n_spatial: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Turn a result on a :func:`to_canonical` grid back to the source's voxel order.

    Returns ``None`` when ``affine`` is not the canonical form of ``source_affine`` (another grid).
    """
    import nibabel.orientations as nio

    source = _spatial_block(source_affine, n_spatial)
    start = nio.io_orientation(_spatial_block(affine, n_spatial))
    transform = nio.ornt_transform(start, nio.io_orientation(source))
    back, back_affine = reorient_voxels(array, affine, n_spatial, transform)
    if not np.allclose(_spatial_block(back_affine, n_spatial), source, atol=1e-4):
        return None
    return back, back_affine


def resolve_channel_axis(shape: Sequence[int], *, rgb: bool, choice: int | str | None, model_dims: int,
                         in_channels: int | None) -> int | None:
    """Which axis of a layer's data holds the channels, for a model with ``model_dims`` spatial axes.

    Args:
        shape: the layer's data shape (napari order; an RGB layer's colour axis last).
        rgb: napari's ``layer.rgb``: the last axis is the colour axis.
        choice: the user's choice: an axis index, ``None`` (no channel axis) or ``"auto"``.
        model_dims: 2 or 3.
        in_channels: the model's input channels (``None`` if unknown).

    Returns:
        The channel axis (non-negative), or ``None``.

    Raises:
        ValueError: the axis is ambiguous or the shape does not fit the model; the message says what
            to choose.
    """
    ndim = len(shape)
    if rgb:
        return ndim - 1
    if choice is None or choice == "none":
        return None
    if choice != "auto":
        axis = int(choice)
        if not -ndim <= axis < ndim:
            raise ValueError(f"channel axis {axis} does not exist in a layer of shape {tuple(shape)}")
        return axis % ndim
    extra = ndim - model_dims
    if extra <= 0 or (model_dims == 2 and extra == 1 and not (in_channels and in_channels > 1)):
        return None  # plain image, or a volume a 2D model runs slice by slice
    candidates = [a for a in dict.fromkeys((0, ndim - 1)) if in_channels and shape[a] == in_channels]
    if extra == 1 and len(candidates) == 1:
        return candidates[0]
    if extra == 1 and model_dims == 2 and not candidates:
        return None
    raise ValueError(
        f"cannot tell which axis of the layer (shape {tuple(shape)}) holds the channels for a {model_dims}D model "
        f"with {in_channels if in_channels else 'unknown'} input channel(s); choose the channel axis in the widget"
    )
