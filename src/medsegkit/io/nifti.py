"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from medsegkit.io.image import Image, matrix_text

__all__ = ["read_nifti", "write_nifti"]

# nibabel refuses these or NIfTI has no code for them; what they are stored as.
_WRITE_DTYPES = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}


# A gzip (deflate) stream expands at most ~1032-fold, so a .nii.gz of S bytes holds at most this many
# bytes of voxels: a header claiming more is damaged and is refused before anything is allocated.
GZIP_MAX_RATIO = 1032

# Voxel types read_image returns (numpy kinds): bool, signed and unsigned integers, floats.
_READ_KINDS = "biuf"

# NIfTI spatial units (xyzt_units) -> millimetres; "unknown" is taken as mm, as nibabel and ITK do.
_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


def read_nifti(path: Path) -> Image:
    """Read a NIfTI file. A 4D file ``(i, j, k, t)`` becomes a channel image ``(t, i, j, k)``; a 5D
    vector file ``(i, j, k, 1, c)`` becomes ``(c, i, j, k)``. Unscaled integer data keep their dtype;
    scaled data (``scl_slope`` set) come back as float as nibabel returns them. A header in metres or microns
    (``xyzt_units``) has its affine converted to mm.

    The header is checked before any voxel is read (sizes the file can hold, a known numeric voxel type,
    a finite non-singular affine); every problem raises :class:`~medsegkit.errors.ImageReadError`.
    """
    import nibabel as nib

    from medsegkit.errors import ImageReadError

    def fail(what: str) -> ImageReadError:
        return ImageReadError(f"could not read {path} as NIfTI: {what}")

    try:
        # mmap=False: voxels are copied into memory, so a file changed on disk later cannot fault the process
        nii = nib.load(str(path), mmap=False)
        header = nii.header
        shape = tuple(int(n) for n in nii.shape)
        dtype = np.dtype(header.get_data_dtype())
        offset = int(nii.dataobj.offset)
        affine = np.asarray(nii.affine, dtype=np.float64)
        unit = header.get_xyzt_units()[0]
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        raise fail(f"the gzip stream is corrupt or truncated ({_one_line(err)})") from err
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as err:
        raise fail(f"damaged or unsupported header ({_one_line(err)}); NIfTI-1 and NIfTI-2 files are accepted") from err
    except (OSError, ValueError, TypeError, KeyError, OverflowError) as err:
        raise fail(f"the file is truncated or its header is damaged ({_one_line(err)})") from err
    if not shape or min(shape) < 1:
        raise fail(f"the header's image size {shape} has an axis of length < 1 (damaged header)")
    if dtype.kind not in _READ_KINDS or dtype.fields is not None:
        raise fail(f"voxel type {dtype} (datatype code {int(header['datatype'])}) is not supported; "
                   "accepted: integer, float and bool voxels")
    needed = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    available = size * GZIP_MAX_RATIO if compressed else size - offset
    if needed > available:
        held = (f"a {size}-byte gzip file holds at most {available} bytes" if compressed
                else f"the file holds {max(available, 0)} bytes after the {offset}-byte header")
        raise fail(f"the header claims {shape} voxels of {dtype} ({needed} bytes) but {held} "
                   "(truncated file or damaged header)")
    if int(header["sform_code"]) <= 0:
        # The affine comes from the qform (or pixdim alone). nibabel's header check on load quietly turns a
        # zero voxel size into 1 and a negative one positive, so look at the stored values.
        try:
            with nib.openers.ImageOpener(str(path)) as fh:
                stored = type(header).from_fileobj(fh, check=False)["pixdim"]
        except (OSError, EOFError, zlib.error, ValueError) as err:
            raise fail(f"the header is truncated or damaged ({_one_line(err)})") from err
        pixdim = [float(v) for v in stored[1 : 1 + min(len(shape), 3)]]
        if not all(math.isfinite(v) and v > 0 for v in pixdim):
            raise fail(f"voxel sizes (pixdim) {pixdim} are not accepted without an sform: spacing must be "
                       "finite and > 0")
    # nibabel's affine is in the header's spatial unit; Image.affine is in mm (ITK converts the same way)
    affine[:3] *= _MM_PER_UNIT.get(unit, 1.0)
    if not np.all(np.isfinite(affine)):
        raise fail(f"the affine (voxel -> mm) is not finite: {matrix_text(affine)}; "
                   "check pixdim, the qform quaternion and the sform rows")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise fail(f"the affine (voxel -> mm) is singular (zero spacing or collapsed axes): {matrix_text(affine)}; "
                   "spacing must be > 0 and the axes independent")
    try:
        array = np.asarray(nii.dataobj)
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        raise fail(f"the gzip stream is corrupt or truncated ({_one_line(err)})") from err
    except (OSError, ValueError) as err:
        raise fail(f"the voxel data are truncated or damaged ({_one_line(err)})") from err
    channel_axis = None
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0, :]
    if array.ndim == 4:
        array = np.moveaxis(array, -1, 0)
        channel_axis = 0
    if array.ndim not in ((2, 3) if channel_axis is None else (4,)):
        raise fail(f"shape {nii.shape} is not supported; accepted: 2D/3D images with an optional 4th "
                   "(channel) axis")
    meta = {
        "format": "nifti",
        "dtype": str(dtype),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }
    try:
        return Image(np.ascontiguousarray(array), affine, meta, channel_axis)
    except ValueError as err:
        raise fail(str(err)) from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def write_nifti(image: Image, path: Path) -> None:
    """Write ``image`` to ``path`` (gzip-compressed when it ends with ``.gz``). Channels go to the 4th axis.

    The affine goes to the sform and, when a rotation can hold it, to the qform too; an affine with shear
    (non-perpendicular axes) gets no qform (``qform_code`` 0), so no reader can take a rotated approximation.
    """
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
    if not np.allclose(nii.get_qform(), image.affine, rtol=1e-5, atol=1e-4):
        # A shear: the qform (a rotation, spacing and qfac) cannot hold it, and ITK would read that
        # approximation instead of the sform. Without a qform, readers use the exact sform (ITK refuses the file).
        nii.set_qform(None)
    nii.set_sform(image.affine, code=scode)
    nii.header.set_xyzt_units("mm", "sec")
    nib.save(nii, str(path))
