"""NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series through SimpleITK.

SimpleITK buffers are ``(k, j, i)`` in LPS; :meth:`Image.from_sitk` / :meth:`Image.to_sitk` convert them
to medsegkit's ``(i, j, k)`` RAS convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsegkit.io.image import Image

__all__ = ["dicom_series", "read_dicom_file_series", "read_dicom_series", "read_sitk", "write_sitk"]

# DICOM tags copied into Image.meta (tag -> meta key).
DICOM_TAGS = {
    "0020|000e": "series_uid",
    "0020|000d": "study_uid",
    "0008|0060": "modality",
    "0008|103e": "series_description",
    "0010|0020": "patient_id",
    "0028|1052": "rescale_intercept",
    "0028|1053": "rescale_slope",
}

_SITK_WRITE_DTYPES = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}


def _sitk_error(path: Path, what: str, err: RuntimeError) -> ValueError:
    # SimpleITK's messages carry a C++ file/line prefix; keep the informative last line.
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else str(err)
    return ValueError(f"could not read {path} as {what}: {detail}")


def read_sitk(path: Path, fmt: str) -> Image:
    """Read one NRRD / MetaImage file (``fmt`` is ``"nrrd"`` or ``"metaimage"``)."""
    import SimpleITK as sitk

    io_name = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}[fmt]
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(path, fmt.upper() if fmt == "nrrd" else "MetaImage", err) from err
    meta: dict[str, Any] = {"format": fmt, "dtype": str(sitk.GetArrayViewFromImage(image).dtype)}
    return Image.from_sitk(image, meta)


def write_sitk(image: Image, path: Path, fmt: str, *, compress: bool = True) -> None:
    """Write ``image`` as NRRD or MHA (``fmt`` is ``"nrrd"`` or ``"metaimage"``, whatever ``path``'s
    suffix); channels become vector components. Compressed (gzip) by default."""
    import SimpleITK as sitk

    dtype = _SITK_WRITE_DTYPES.get(image.array.dtype)
    if dtype is not None:
        image = Image(image.array.astype(dtype), image.affine, image.meta, image.channel_axis)
    sitk_image = image.to_sitk()
    io_name = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}[fmt]
    writer = sitk.ImageFileWriter()
    writer.SetImageIO(io_name)
    writer.SetFileName(str(path))
    writer.SetUseCompression(compress)
    writer.Execute(sitk_image)


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """The DICOM series in ``folder``: ``{series_uid: [file names sorted along the slice axis]}``."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        uids = reader.GetGDCMSeriesIDs(str(folder))
        return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    except RuntimeError as err:
        raise ValueError(
            f"could not scan {folder} for DICOM series: a file in it is not readable DICOM "
            f"({_sitk_error(folder, 'DICOM', err).args[0].split(': ', 1)[-1]}); "
            "put the series in a folder of its own"
        ) from err


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Image:
    """Read a DICOM series from ``folder``: the one with most files, or the one with ``series_uid``.

    The rescale slope/intercept are applied (GDCM); slices are ordered by position along the normal.
    """
    import SimpleITK as sitk

    series = dicom_series(folder)
    if not series:
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"no DICOM series found in folder {folder} ({len(names)} entries: {shown or 'empty'}); "
            "read_image accepts a folder holding a DICOM series, or a file ending in "
            ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or .dcm"
        )
    if series_uid is None:
        series_uid = max(series, key=lambda uid: len(series[uid]))
    elif series_uid not in series:
        listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
        raise ValueError(f"series_uid {series_uid!r} is not in {folder}; the folder holds: {listing}")
    files = series[series_uid]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(folder, f"DICOM series {series_uid}", err) from err
    meta: dict[str, Any] = {
        "format": "dicom",
        "dtype": str(sitk.GetArrayViewFromImage(image).dtype),
        "dicom_files": len(files),
        "series_uids": sorted(series),
    }
    for tag, key in DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    meta["series_uid"] = series_uid
    return Image.from_sitk(image, meta)


def read_dicom_file_series(path: Path) -> Image:
    """Read the whole series that the DICOM file ``path`` belongs to (from the files in its folder)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _sitk_error(path, "DICOM", err) from err
    if not reader.HasMetaDataKey("0020|000e"):
        raise ValueError(f"{path} has no SeriesInstanceUID (0020,000E); give its folder instead")
    return read_dicom_series(path.parent, reader.GetMetaData("0020|000e").strip())
