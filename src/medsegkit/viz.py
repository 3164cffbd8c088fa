"""Looking at an image and its labels: :func:`show` (matplotlib, three planes) and :func:`view` (napari).

Both turn the voxel axes to the closest RAS order first (permutations and flips only, no resampling),
so an LSA scan shows the same way up as an RAS one; :func:`show` draws each plane with the world's aspect
ratio (anisotropic voxels are not squashed) and :func:`view` gives napari the voxel size as ``scale``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from medsegkit.io import Image

__all__ = ["show", "view"]

PLANES = ("axial", "coronal", "sagittal")


def _as_image(obj: Any, what: str) -> Image:
    from medsegkit.io import Image, read_image

    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj)
    if isinstance(obj, Image):
        return obj
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    array = np.asarray(obj)
    if array.ndim != 3:
        raise ValueError(f"{what} must be a 3D volume (i, j, k) or an Image; got shape {array.shape}")
    return Image(array)


def _canonical(image: Image, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k), affine)`` with the voxel axes permuted / flipped to the closest RAS order (no
    resampling; :func:`medsegkit.io.geometry.to_canonical`); a multi-channel image gives its first channel."""
    from medsegkit.io.geometry import to_canonical

    if image.spatial_ndim != 3:
        raise ValueError(f"{what} must be 3D; got a {image.spatial_ndim}D image of shape {image.spatial_shape}")
    array = np.asarray(image.array)
    if image.channel_axis is not None:
        array = array[0]
    return to_canonical(array, image.affine, 3)


def _label_colormap(present: Sequence[int], colors: Sequence[Sequence[int]] | None):
    """Colours of the ``present`` labels in order (entry ``n`` is ``present[n - 1]``; entry 0 background)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    table = np.zeros((max(len(present), 1) + 1, 4))
    fallback = colormaps["tab10"]
    for index, label in enumerate(present, start=1):
        if colors is not None and label < len(colors):
            table[index, :3] = np.asarray(colors[label][:3], dtype=float) / 255.0
        else:
            table[index, :3] = fallback((label - 1) % 10)[:3]
        table[index, 3] = 1.0
    return ListedColormap(table)


def show(
    image: Any,
    labels: Any = None,
    *,
    center: Sequence[int] | None = None,
    alpha: float = 0.45,
    class_names: Sequence[str] | None = None,
    colors: Sequence[Sequence[int]] | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (12.0, 4.2),
) -> Figure:
    """Axial, coronal and sagittal planes of ``image`` with ``labels`` drawn over them.

    Args:
        image: a 3D :class:`~medsegkit.io.Image` (or a path, or an array ``(i, j, k)``: 1 mm voxels);
            of a multi-channel image the first channel is shown.
        labels: optional label map on the same grid (Image, path or array); background 0 is transparent.
        center: the voxel ``(i, j, k)`` of the closest-RAS grid where the planes cross; default: the
            centre of the labels' foreground, else the middle of the volume.
        alpha: opacity of the label overlay.
        class_names, colors: legend names (background first) and RGB 0-255 colours per label;
            default: the labels' ``meta["class_names"]`` / ``meta["label_colors"]``, else tab10 colours.
        title: figure title.
        figsize: matplotlib figure size in inches.

    Returns:
        The matplotlib ``Figure`` (shown inline in Jupyter; ``fig.savefig(...)`` elsewhere).

    Raises:
        ValueError: the image is not 3D, or labels lie on another grid.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from medsegkit.io import same_grid
    from medsegkit.io.image import class_indices

    volume = _as_image(image, "image")
    grid, affine = _canonical(volume, "image")
    label_grid = None
    if labels is not None:
        label_image = _as_image(labels, "labels")
        if label_image.spatial_shape != volume.spatial_shape or not same_grid(label_image, volume):
            raise ValueError(f"labels {label_image.spatial_shape} must lie on the image's grid "
                             f"{volume.spatial_shape} (same shape and affine)")
        label_grid, _ = _canonical(label_image, "labels")
        label_grid = class_indices(label_grid, "labels")  # not astype: 1.5 was drawn as class 1
        if label_grid.size and label_grid.min() < 0:
            raise ValueError("labels must be non-negative class indices (0 = background); found negative values")
        class_names = class_names if class_names is not None else label_image.meta.get("class_names")
        colors = colors if colors is not None else label_image.meta.get("label_colors")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if center is None:
        if label_grid is not None and label_grid.any():
            center = [int(round(c)) for c in np.argwhere(label_grid > 0).mean(axis=0)]
        else:
            center = [n // 2 for n in grid.shape]
    center = [int(np.clip(c, 0, n - 1)) for c, n in zip(center, grid.shape)]
    i, j, k = center
    # (plane, 2D cut with rows = vertical world axis, row spacing / column spacing)
    cuts = [
        ("axial", lambda a: a[:, :, k].T, spacing[1] / spacing[0], f"z (k={k})"),
        ("coronal", lambda a: a[:, j, :].T, spacing[2] / spacing[0], f"y (j={j})"),
        ("sagittal", lambda a: a[i, :, :].T, spacing[2] / spacing[1], f"x (i={i})"),
    ]
    finite = grid[np.isfinite(grid)] if grid.dtype.kind == "f" else grid
    vmin, vmax = np.percentile(finite, (0.5, 99.5)) if finite.size else (0, 1)
    present = [int(v) for v in np.unique(label_grid) if v != 0] if label_grid is not None else []
    if present:  # draw the ranks 1..n of the present labels: a colour table per value up to 2**31 took 64 GiB
        label_grid = np.searchsorted(np.asarray([0, *present]), label_grid)
    count = len(present)
    cmap = _label_colormap(present, colors)
    fig, axes = plt.subplots(1, 3, figsize=figsize)
    for ax, (name, cut, aspect, where) in zip(axes, cuts):
        ax.imshow(cut(grid), cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect,
                  interpolation="nearest")
        if label_grid is not None:
            overlay = np.ma.masked_equal(cut(label_grid), 0)
            ax.imshow(overlay, cmap=cmap, vmin=0, vmax=max(count, 1), alpha=alpha, aspect=aspect, origin="lower",
                      interpolation="nearest")
        ax.set_title(f"{name} {where}")
        ax.set_axis_off()
    if count:
        handles = [Patch(color=cmap(n), label=(class_names[v] if class_names and v < len(class_names) else str(v)))
                   for n, v in enumerate(present, start=1)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if count else 0, 1, 1))
    return fig


def view(image: Any, labels: Any = None, *, viewer: Any = None, name: str = "image") -> Any:
    """Open ``image`` (and ``labels``) in napari with the voxel size as ``scale`` and the origin as
    ``translate`` (axes as the medsegkit napari reader lays them out: ``(z, y, x)``, closest RAS order).

    Args:
        image: a 3D :class:`~medsegkit.io.Image`, path or array ``(i, j, k)``.
        labels: optional label map on the same grid.
        viewer: an existing ``napari.Viewer`` to add the layers to (default: a new one).
        name: the image layer's name (the labels layer is ``"<name> labels"``).

    Returns:
        The ``napari.Viewer``.
    """
    import napari  # heavy (Qt): only when a viewer is asked for

    from medsegkit.io.geometry import layer_geometry, reverse_spatial

    volume = _as_image(image, "image")
    grid, affine = _canonical(volume, "image")
    geometry = layer_geometry(affine, 3)  # napari's (z, y, x) = the voxel axes reversed
    viewer = viewer if viewer is not None else napari.Viewer()
    viewer.add_image(np.ascontiguousarray(reverse_spatial(grid, 3)), name=name, **geometry)
    if labels is not None:
        label_image = _as_image(labels, "labels")
        if label_image.spatial_shape != volume.spatial_shape:
            raise ValueError(f"labels {label_image.spatial_shape} must lie on the image's grid {volume.spatial_shape}")
        label_grid, _ = _canonical(label_image, "labels")
        viewer.add_labels(np.ascontiguousarray(reverse_spatial(label_grid, 3)).astype(np.int32), name=f"{name} labels", **geometry)
    return viewer

