"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from medsegkit.io.image import Image

__all__ = ["read_nifti", "write_nifti"]

# nibabel refuses these or NIfTI has no code for them; what they are stored as.
_WRITE_DTYPES = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}


def read_nifti(path: Path) -> Image:
    """Read a NIfTI file. A 4D file ``(i, j, k, t)`` becomes a channel image ``(t, i, j, k)``; a 5D
    vector file ``(i, j, k, 1, c)`` becomes ``(c, i, j, k)``. Unscaled integer data keep their dtype;
    scaled data (``scl_slope`` set) come back as float as nibabel returns them."""
    import nibabel as nib

    try:
        nii = nib.load(str(path))
        array = np.asarray(nii.dataobj)
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        raise ValueError(f"could not read {path}: the gzip stream is corrupt or truncated ({err})") from err
    except nib.filebasedimages.ImageFileError as err:
        raise ValueError(f"could not read {path} as NIfTI: {err}") from err
    except OSError as err:
        raise ValueError(f"could not read {path} as NIfTI (file truncated or damaged?): {err}") from err
    header = nii.header
    channel_axis = None
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0, :]
    if array.ndim == 4:
        array = np.moveaxis(array, -1, 0)
        channel_axis = 0
    if array.ndim not in ((2, 3) if channel_axis is None else (4,)):
        raise ValueError(
            f"{path}: only 2D/3D images (with optional 4th channel axis) are supported, got shape {nii.shape}"
        )
    meta = {
        "format": "nifti",
        "dtype": str(header.get_data_dtype()),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }
    return Image(np.ascontiguousarray(array), nii.affine, meta, channel_axis)


def write_nifti(image: Image, path: Path) -> None:
    """Write ``image`` to ``path`` (gzip-compressed when it ends with ``.gz``). Channels go to the 4th axis."""
    import nibabel as nib

    array = image.array
    dtype = _WRITE_DTYPES.get(array.dtype, array.dtype)
    array = array.astype(dtype, copy=False)
    if image.channel_axis == 0:
        array = np.moveaxis(array, 0, -1)
        if image.spatial_ndim == 2:  # (i, j, C) -> (i, j, 1, C): keep the channels on the 4th axis
            array = array[:, :, None, :]
    nii = nib.Nifti1Image(np.asarray(array), image.affine, dtype=dtype)
    # Both codes "scanner" unless the source said otherwise, so every reader (ITK uses the qform first)
    # finds the same geometry.
    qcode = int(image.meta.get("qform_code") or 1)
    scode = int(image.meta.get("sform_code") or 1)
    nii.set_qform(image.affine, code=qcode)
    nii.set_sform(image.affine, code=scode)
    nii.header.set_xyzt_units("mm", "sec")
    nib.save(nii, str(path))
