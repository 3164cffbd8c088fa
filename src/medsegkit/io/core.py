"""``read_image`` / ``write_image``: pick the backend from the file name, check inputs, write atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsegkit.errors import ImageReadError
from medsegkit.files import same_file
from medsegkit.io.image import Image, describe_grid, same_grid

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "read_image", "write_image"]

# suffix -> format name (longest suffixes first so ".nii.gz" wins over ".gz")
READ_SUFFIXES = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".dcm": "dicom",
}
WRITE_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "metaimage"}

_WRITE_KINDS = "biuf"  # bool, signed, unsigned, float


def _suffix(path: Path, table: dict[str, str]) -> str | None:
    name = path.name.lower()
    for suffix in table:
        if name.endswith(suffix):
            return suffix
    return None


def _accepted(table: dict[str, str], extra: str = "") -> str:
    return ", ".join(table) + extra


def _read_one(path: str | os.PathLike, series_uid: str | None) -> Image:
    try:
        return _read_backend(Path(path).expanduser(), series_uid)
    except MemoryError as err:
        # headers are checked against the file size first, so this is a real image too big for this machine
        raise ImageReadError(f"could not read {path}: not enough memory for its voxels ({err})") from err


def _read_backend(path: Path, series_uid: str | None) -> Image:
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        from medsegkit.io.sitk import read_dicom_series

        image = read_dicom_series(path, series_uid)
    else:
        suffix = _suffix(path, READ_SUFFIXES)
        if suffix is None:
            raise ImageReadError(
                f"unknown image format for {path.name!r}; read_image accepts files ending in "
                f"{_accepted(READ_SUFFIXES)}, or a folder holding a DICOM series"
            )
        if series_uid is not None:
            raise ValueError(f"series_uid is only for DICOM folders, but {path} is a {suffix} file")
        if path.stat().st_size == 0:
            raise ImageReadError(f"could not read {path}: it is empty (0 bytes); was it written completely?")
        fmt = READ_SUFFIXES[suffix]
        if suffix.endswith(".gz"):
            with open(path, "rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    raise ImageReadError(
                        f"could not read {path}: it ends in .gz but is not gzip-compressed (corrupt or misnamed file)"
                    )
        if fmt == "nifti":
            from medsegkit.io.nifti import read_nifti

            image = read_nifti(path)
        elif fmt == "dicom":
            from medsegkit.io.sitk import read_dicom_file_series

            image = read_dicom_file_series(path)
        else:
            from medsegkit.io.sitk import read_sitk

            image = read_sitk(path, fmt)
    image.meta["path"] = str(path)
    image.meta["paths"] = [str(path)]
    return image


def read_image(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike], *, series_uid: str | None = None
) -> Image:
    """Read a medical image into an :class:`Image` (``(i, j, k)`` voxel order, RAS affine).

    Args:
        path_or_paths: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, a folder holding
            a DICOM series (or one ``.dcm`` file of it: its whole series is read), or a list of them on
            one grid: each becomes a channel (channels first,
            ``(C, i, j, k)``, in the order given; a file that already has channels adds all of them).
        series_uid: for a DICOM folder holding several series, the one to read (default: the series
            with the most files; several series of that size are an error asking for ``series_uid``).

    Returns:
        The image; ``meta`` holds ``"path"`` (the first input), ``"paths"`` (all inputs), ``"format"``
        and ``"dtype"`` (the on-disk dtype), plus DICOM tags for DICOM series.

    Raises:
        FileNotFoundError: a path does not exist.
        medsegkit.errors.ImageReadError: (a ``ValueError``) the file cannot be read: unknown extension (the
            message lists the accepted ones), empty, truncated or corrupt file, a damaged or impossible
            header (sizes the file cannot hold, spacing not finite and > 0, a non-finite or singular
            orientation, an unknown voxel type), a folder without DICOM, an inconsistent DICOM series.
            Headers are checked before any voxel buffer is allocated. See ``docs/io.md``.
        ValueError: several inputs whose grids differ (the message names both grids).
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        return _read_one(path_or_paths, series_uid)
    paths = list(path_or_paths)
    if not paths:
        raise ValueError("read_image got an empty list of paths; give one path or several on one grid")
    if len(paths) == 1:
        return _read_one(paths[0], series_uid)
    images = [_read_one(p, series_uid) for p in paths]
    first = images[0]
    for other in images[1:]:
        if not same_grid(first, other):
            raise ValueError(
                "images given as channels must share one grid, but\n"
                f"  {first.meta['path']}: {describe_grid(first)}\n"
                f"  {other.meta['path']}: {describe_grid(other)}\n"
                "resample one onto the other first (e.g. with MONAI's ResampleToMatch)"
            )
    arrays = [im.array if im.channel_axis == 0 else im.array[None] for im in images]
    dtype = np.result_type(*arrays)
    array = np.concatenate([a.astype(dtype, copy=False) for a in arrays], axis=0)
    formats = [im.meta["format"] for im in images]
    meta: dict[str, Any] = {
        "path": first.meta["path"],
        "paths": [im.meta["path"] for im in images],
        "format": formats[0] if len(set(formats)) == 1 else formats,
        "dtype": str(dtype),
        "channel_sources": [im.meta["path"] for im in images for _ in range(im.num_channels)],
    }
    return Image(array, first.affine, meta, channel_axis=0)


def _as_image(image_or_array: Image | np.ndarray, like: Image | None) -> Image:
    if isinstance(image_or_array, Image):
        image = image_or_array
        if like is not None and not same_grid(image, like):
            # an Image keeps its own affine: a like on another grid would be ignored without a word
            raise ValueError(
                f"image grid ({describe_grid(image)}) does not match like's grid ({describe_grid(like)}); "
                "write the image without like, or resample it onto like's grid first"
            )
        return image
    if hasattr(image_or_array, "detach"):  # torch tensor
        image_or_array = image_or_array.detach().cpu().numpy()
    array = np.asanyarray(image_or_array)
    if like is not None:
        try:
            return like.with_array(array)
        except ValueError as err:
            raise ValueError(f"cannot write with like={like!r}: {err}") from None
    if array.ndim in (2, 3):
        return Image(array, np.eye(4), {}, None)
    if array.ndim == 4:
        return Image(array, np.eye(4), {}, 0)
    raise ValueError(
        f"write_image needs an array of shape (i, j), (i, j, k) or (C, i, j, k), got shape {array.shape}"
    )


def write_image(
    image_or_array: Image | np.ndarray,
    path: str | os.PathLike,
    *,
    like: Image | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an image to ``path`` as NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``) or MetaImage (``.mha``).

    Args:
        image_or_array: an :class:`Image`, or an array ``(*spatial)`` / ``(C, *spatial)`` in ``(i, j, k)``
            order. An array without ``like`` gets an identity affine (1 mm, RAS, origin 0).
        path: output file; the format follows its suffix.
        like: a reference image whose grid (affine) an array is written on — its spatial shape must
            match. An :class:`Image` keeps its own affine, so with ``like`` its grid (shape and affine) must
            be like's. ``path`` may never be one of ``like``'s source files (``like.meta["path"]``), even with
            ``overwrite=True``: a segmentation must not replace the scan it came from.
        overwrite: replace an existing ``path``. Without it an existing file raises ``FileExistsError``.

    Label dtypes are kept exactly (uint8, int16, int32, ...); ``bool`` is stored as uint8 and float16 as
    float32; floats wider than 64 bits (``float128``) are refused with a ``ValueError``. Float arrays may contain NaN (a valid "no value" in these formats); the affine must be finite.
    The file is written to a temporary name in the target folder and renamed into place, so a failed
    write leaves nothing behind.

    Returns:
        The written path.
    """
    path = Path(path).expanduser()
    suffix = _suffix(path, WRITE_SUFFIXES)
    if suffix is None:
        read_only = " (DICOM is read-only)" if path.name.lower().endswith(".dcm") else ""
        raise ValueError(
            f"cannot write {path.name!r}: write_image writes files ending in {_accepted(WRITE_SUFFIXES)}{read_only}"
        )
    protected = [] if like is None else like.source_paths()
    if isinstance(image_or_array, Image):
        protected += image_or_array.meta.get("derived_from", []) or []
    for source in protected:
        if same_file(path, Path(source)):
            raise ValueError(
                f"refusing to write {path}: it is the source image {source} of this result "
                "(overwrite=True does not apply to inputs); choose another output path"
            )
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name ending in {_accepted(WRITE_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder; choose an output path in a folder")
    image = _as_image(image_or_array, like)
    if image.array.dtype.kind not in _WRITE_KINDS:
        raise ValueError(
            f"cannot write arrays of dtype {image.array.dtype}; use bool, integer or float arrays"
        )
    if image.array.dtype.kind == "f" and image.array.dtype.itemsize > 8:
        raise ValueError(
            f"cannot write {path.name!r}: arrays of dtype {image.array.dtype} do not fit; NIfTI, NRRD and MetaImage "
            "store floats of at most 64 bits (convert with array.astype(np.float64))"
        )
    fmt = WRITE_SUFFIXES[suffix]

    from medsegkit.files import atomic_write

    def write(tmp: Path) -> None:
        # The backends choose compression and layout from the file name, so write to a sibling name with
        # the right suffix and move it onto atomic_write's temporary file.
        named = tmp.with_name(tmp.name + suffix)
        try:
            if fmt == "nifti":
                from medsegkit.io.nifti import write_nifti

                write_nifti(image, named)
            else:
                from medsegkit.io.sitk import write_sitk

                write_sitk(image, named, fmt)
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)

    return atomic_write(path, write)
