"""The :class:`Image` container: a voxel array plus its place in the world (RAS millimetres).

Conventions (the same as nibabel and MONAI):

* ``array`` is indexed in voxel order ``(i, j, k)`` — the order nibabel gives — for a 3D image, or
  ``(i, j)`` for a 2D one. A multi-channel image keeps its channels on the **first** axis:
  ``(C, i, j, k)``; ``channel_axis`` is then ``0`` (``None`` for a single-channel image without a
  channel axis).
* ``affine`` is the 4×4 voxel → world matrix in **RAS** millimetres (x grows to the patient's Right→Left
  is *negative*; NIfTI's and MONAI's convention): ``world = affine @ (i, j, k, 1)``. A 2D image uses the
  upper-left 2×2 block and the first two translations; its third axis is a unit axis.
* ``spacing``, ``origin`` and ``direction`` are read from ``affine`` (so they can never disagree with
  it): ``spacing`` is the length of each voxel axis in mm, ``origin`` the RAS position of voxel
  ``(0, 0, 0)``, ``direction`` the unit RAS direction of each voxel axis (as *columns*).

SimpleITK and ITK index arrays as ``(k, j, i)`` and describe geometry in LPS; :meth:`Image.to_sitk` and
:meth:`Image.from_sitk` convert both ways.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

__all__ = ["Image", "affine_from_geometry", "same_grid", "class_indices", "LPS_TO_RAS"]

# Flip between LPS (DICOM, ITK) and RAS (NIfTI, MONAI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_from_geometry(
    spacing: Sequence[float],
    origin: Sequence[float] | None = None,
    direction: np.ndarray | Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """The 4×4 RAS affine of a grid with ``spacing`` (mm per voxel axis), RAS ``origin`` (mm) and
    ``direction`` (RAS unit vector of each voxel axis as a column; identity when omitted).

    2 or 3 values are accepted for ``spacing``/``origin`` (a 2D grid gets a unit third axis).
    """
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    ndim = spacing.size
    if ndim not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 values, got {spacing.tolist()}")
    if np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be finite and > 0, got {spacing.tolist()}")
    origin_v = np.zeros(ndim) if origin is None else np.asarray(origin, dtype=np.float64).ravel()
    if origin_v.size != ndim:
        raise ValueError(f"origin needs {ndim} values like spacing, got {origin_v.tolist()}")
    dir_m = np.eye(ndim) if direction is None else np.asarray(direction, dtype=np.float64)
    if dir_m.shape != (ndim, ndim):
        raise ValueError(f"direction must be a {ndim}x{ndim} matrix, got shape {dir_m.shape}")
    affine = np.eye(4)
    affine[:ndim, :ndim] = dir_m * spacing[None, :]
    affine[:ndim, 3] = origin_v
    return affine


def _check_affine(affine: Any) -> np.ndarray:
    affine = np.array(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix (RAS voxel -> mm), got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be finite, got {matrix_text(affine)}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine is singular (a voxel axis has zero length): {matrix_text(affine)}")
    return affine


def matrix_text(matrix: Any) -> str:
    """A matrix on one line for error messages: ``[[1, 0, 0, 0], [0, 2, 0, 0], ...]``."""
    rows = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    return "[" + ", ".join("[" + ", ".join(f"{v:.6g}" for v in row) + "]" for row in rows) + "]"


@dataclass(eq=False, repr=False)
class Image:
    """A 2D or 3D image (optionally multi-channel) with RAS geometry.

    Args:
        array: voxels in ``(i, j, k)`` order (``(i, j)`` in 2D); with ``channel_axis=0``, ``(C, i, j, k)``.
        affine: 4×4 voxel → RAS mm matrix (MONAI's and nibabel's convention).
        meta: free facts about the source: ``"path"`` (str), ``"paths"`` (all inputs), ``"format"``,
            ``"dtype"`` (on-disk dtype), DICOM tags, ...
        channel_axis: ``0`` when ``array`` has a leading channel axis, else ``None``.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict[str, Any] = field(default_factory=dict)
    channel_axis: int | None = None

    def __post_init__(self) -> None:
        self.array = np.asanyarray(self.array)
        self.affine = _check_affine(self.affine)
        if self.channel_axis not in (None, 0):
            raise ValueError(
                f"channel_axis must be None (no channels) or 0 (channels first), got {self.channel_axis!r}; "
                "move the channels to the front with np.moveaxis(array, axis, 0)"
            )
        nspatial = self.array.ndim - (0 if self.channel_axis is None else 1)
        if nspatial not in (2, 3):
            expected = "(i, j) or (i, j, k)" if self.channel_axis is None else "(C, i, j) or (C, i, j, k)"
            raise ValueError(
                f"Image array must be {expected}, got shape {self.array.shape} "
                f"(channel_axis={self.channel_axis})"
            )
        if self.array.size == 0:
            raise ValueError(f"Image array is empty (shape {self.array.shape})")
        if nspatial == 2 and not np.allclose(self.affine[2, :3], [0, 0, self.affine[2, 2]]):
            raise ValueError("a 2D image's affine must keep the third axis separate (affine[2, :2] == 0)")
        self.meta = dict(self.meta)

    # -- shape facts ---------------------------------------------------------------------------------
    @property
    def spatial_ndim(self) -> int:
        """2 or 3."""
        return self.array.ndim - (0 if self.channel_axis is None else 1)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The grid size ``(i, j, k)`` (or ``(i, j)``), without channels."""
        shape = self.array.shape
        return tuple(int(s) for s in (shape if self.channel_axis is None else shape[1:]))

    @property
    def num_channels(self) -> int:
        """Number of channels (1 when there is no channel axis)."""
        return 1 if self.channel_axis is None else int(self.array.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    # -- geometry (read from the affine) ------------------------------------------------------------
    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each voxel axis (``spatial_ndim`` values)."""
        n = self.spatial_ndim
        return tuple(float(v) for v in np.linalg.norm(self.affine[:n, :n], axis=0))

    @property
    def origin(self) -> tuple[float, ...]:
        """RAS position (mm) of voxel ``(0, 0, 0)`` (``spatial_ndim`` values)."""
        return tuple(float(v) for v in self.affine[: self.spatial_ndim, 3])

    @property
    def direction(self) -> np.ndarray:
        """``(n, n)`` matrix whose column ``a`` is the RAS unit direction of voxel axis ``a``."""
        n = self.spatial_ndim
        return self.affine[:n, :n] / np.asarray(self.spacing)[None, :]

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. ``"RAS"`` or ``"LSA"`` (nibabel's ``aff2axcodes``)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))[: self.spatial_ndim]

    # -- derived images -----------------------------------------------------------------------------
    def with_array(self, array: np.ndarray, *, meta: dict[str, Any] | None = None) -> Image:
        """A new image on the same grid holding ``array``: ``(*spatial_shape)`` or ``(C, *spatial_shape)``.

        The new image remembers where its grid came from (``meta["derived_from"]``: the source paths) so
        :func:`medsegkit.io.write_image` refuses to write it over its source; ``"path"``/``"paths"`` are
        dropped (the array is no longer that file's content).
        """
        array = np.asanyarray(array)
        if array.shape == self.spatial_shape:
            channel_axis = None
        elif array.ndim == len(self.spatial_shape) + 1 and tuple(array.shape[1:]) == self.spatial_shape:
            channel_axis = 0
        else:
            raise ValueError(
                f"array of shape {array.shape} does not fit the image grid {self.spatial_shape}: "
                f"expected {self.spatial_shape} or (C, *{self.spatial_shape})"
            )
        new_meta = {k: v for k, v in self.meta.items() if k not in ("path", "paths")}
        new_meta["derived_from"] = self.source_paths()
        new_meta["dtype"] = str(array.dtype)
        if meta:
            new_meta.update(meta)
        return Image(array, self.affine.copy(), new_meta, channel_axis)

    def source_paths(self) -> list[str]:
        """The files this image (or the image it was derived from) was read from."""
        paths: list[str] = []
        for key in ("path", "paths", "derived_from"):
            value = self.meta.get(key)
            if value is None:
                continue
            for p in [value] if isinstance(value, (str, os.PathLike)) else value:
                if os.fspath(p) not in paths:
                    paths.append(os.fspath(p))
        return paths

    @classmethod
    def from_geometry(
        cls,
        array: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float] | None = None,
        direction: np.ndarray | None = None,
        *,
        channel_axis: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Image:
        """Build an image from ``spacing`` / RAS ``origin`` / RAS ``direction`` (columns) instead of an affine."""
        return cls(
            np.asanyarray(array), affine_from_geometry(spacing, origin, direction), meta or {}, channel_axis
        )

    # -- SimpleITK ----------------------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """The image as a ``SimpleITK.Image`` (LPS geometry, ``(k, j, i)`` buffer; channels → components)."""
        import SimpleITK as sitk

        n = self.spatial_ndim
        array = self.array
        if array.dtype == bool:
            array = array.astype(np.uint8)
        elif not array.dtype.isnative:  # SimpleITK takes native byte order only (">i2" raised TypeError)
            array = array.astype(array.dtype.newbyteorder("="))
        if self.channel_axis is None:
            buffer = np.ascontiguousarray(array.transpose(tuple(range(n))[::-1]))
            image = sitk.GetImageFromArray(buffer, isVector=False)
        else:
            # (C, i, j, k) -> (k, j, i, C)
            buffer = np.ascontiguousarray(np.moveaxis(array, 0, -1).transpose(tuple(range(n))[::-1] + (n,)))
            image = sitk.GetImageFromArray(buffer, isVector=True)
        lps = LPS_TO_RAS @ self.affine
        spacing = np.linalg.norm(lps[:n, :n], axis=0)
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(v) for v in lps[:n, 3]])
        image.SetDirection([float(v) for v in (lps[:n, :n] / spacing[None, :]).ravel()])
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: dict[str, Any] | None = None) -> Image:
        """Convert a ``SimpleITK.Image`` (2D or 3D, scalar or vector pixels) to an :class:`Image`."""
        import SimpleITK as sitk

        n = image.GetDimension()
        if n not in (2, 3):
            raise ValueError(f"only 2D and 3D images are supported, got a {n}D SimpleITK image")
        buffer = sitk.GetArrayFromImage(image)  # (k, j, i) or (k, j, i, C)
        if image.GetNumberOfComponentsPerPixel() > 1:
            array = np.moveaxis(buffer.transpose(tuple(range(n))[::-1] + (n,)), -1, 0)
            channel_axis: int | None = 0
        else:
            array = buffer.transpose(tuple(range(n))[::-1])
            channel_axis = None
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(n, n)
        lps = np.eye(4)
        lps[:n, :n] = direction * np.asarray(image.GetSpacing())[None, :]
        lps[:n, 3] = image.GetOrigin()
        return cls(np.ascontiguousarray(array), LPS_TO_RAS @ lps, dict(meta or {}), channel_axis)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        chans = f", channels={self.num_channels}" if self.channel_axis is not None else ""
        src = self.meta.get("path")
        return (
            f"Image(shape={self.spatial_shape}{chans}, dtype={self.array.dtype}, spacing=({spacing}), "
            f"orientation={self.orientation!r}" + (f", path={src!r})" if src else ")")
        )


def class_indices(array: Any, what: str) -> np.ndarray:
    """A label map as integers: integer and boolean arrays as they are, a float array of finite whole
    numbers (a label map saved as float, as many NIfTI writers do) as ``int64``.

    Raises:
        ValueError: anything else (fractions, NaN / Inf, complex, object), naming ``what``.
    """
    array = np.asarray(array)
    if array.dtype.kind in "iub":
        return array
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise ValueError(f"{what} must be an integer label map (one class per voxel); got dtype {array.dtype}"
                     + (" with fractional, NaN or Inf values" if array.dtype.kind == "f" else "")
                     + ". Take the argmax over the class axis of probabilities or logits first.")


def same_grid(a: Image, b: Image, *, atol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` have the same spatial shape and (within ``atol`` mm) the same affine."""
    return a.spatial_shape == b.spatial_shape and bool(np.allclose(a.affine, b.affine, rtol=1e-5, atol=atol))


def describe_grid(image: Image) -> str:
    """One-line grid description for error messages: shape, spacing, origin, orientation."""
    spacing = ", ".join(f"{s:.4g}" for s in image.spacing)
    origin = ", ".join(f"{o + 0.0:.4g}" for o in image.origin)  # + 0.0: print -0 as 0
    return f"shape {image.spatial_shape}, spacing ({spacing}) mm, origin ({origin}), orientation {image.orientation}"
