"""NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series through SimpleITK.

SimpleITK buffers are ``(k, j, i)`` in LPS; :meth:`Image.from_sitk` / :meth:`Image.to_sitk` convert them
to medsegkit's ``(i, j, k)`` RAS convention.

ITK trusts headers: it allocates the image a header describes before reading a byte, reads any "data
file" a header names (a device or a pipe hangs it), and MetaIO returns zeros for a damaged zlib stream.
So every header is parsed and checked here first (:func:`check_nrrd_header`,
:func:`check_metaimage_header`; DICOM headers with pydicom), and a problem raises
:class:`~medsegkit.errors.ImageReadError` before ITK or GDCM sees the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medsegkit.errors import ImageReadError
from medsegkit.io.image import Image, matrix_text

__all__ = [
    "check_metaimage_header",
    "check_nrrd_header",
    "dicom_series",
    "read_dicom_file_series",
    "read_dicom_series",
    "read_sitk",
    "write_sitk",
]

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


def _sitk_error(path: Path, what: str, err: RuntimeError) -> ImageReadError:
    # SimpleITK's messages carry a C++ file/line prefix; keep the informative last line.
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else str(err)
    return ImageReadError(f"could not read {path} as {what}: {detail}")


# -- header checks before ITK sees a file ---------------------------------------------------------------
# ITK allocates the whole image from the header's sizes before reading a byte, reads "data files" that
# are devices or pipes (a hang), and reads non-gzip data under a gzip header as raw bytes. So the text
# headers of NRRD and MetaImage are parsed and checked here first: sizes the file can hold, a known voxel
# type, finite spacing > 0, a finite non-singular direction, data files that are regular files.

_MAX_HEADER_BYTES = 1 << 20  # a text header longer than 1 MiB is not a real header
_ZLIB_MAX_RATIO = 1032  # deflate expands at most ~1032-fold

_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
                     "uint64", "uint64_t", "double"), 8),
}
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "ascii": "ascii", "text": "ascii",
                   "txt": "ascii", "hex": "hex"}
_NRRD_DOMAIN_KINDS = ("domain", "space", "time", "???", "none")
# teem (ITK's NRRD reader) also accepts these spellings of the fields checked here: read them as the same field
_NRRD_FIELD_ALIASES = {"datafile": "data file", "byteskip": "byte skip", "lineskip": "line skip",
                       "spacedirections": "space directions", "spaceorigin": "space origin"}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _header_lines(path: Path, fail, *, last_key: str | None = None) -> tuple[list[str], int]:
    """The text header's lines and its length in bytes: up to a blank line (NRRD), or through the line
    starting with ``last_key`` (MetaImage's ``ElementDataFile``), or to the end of the file."""
    lines: list[str] = []
    read = 0
    with open(path, "rb") as fh:
        while True:
            raw = fh.readline(_MAX_HEADER_BYTES + 1 - read)
            if not raw:
                break
            read += len(raw)
            if read > _MAX_HEADER_BYTES:
                raise fail(f"no end of the text header in the first {_MAX_HEADER_BYTES} bytes")
            line = raw.decode("latin-1").rstrip("\r\n")
            if last_key is None and not line.strip():
                break
            lines.append(line)
            if last_key is not None and line.split("=", 1)[0].strip().lower() == last_key:
                break
    return lines, read


def _numbers(text: str, count: int, what: str, fail, *, integer: bool = False) -> list:
    parts = text.replace(",", " ").replace("(", " ").replace(")", " ").split()
    if len(parts) != count:
        raise fail(f"{what} needs {count} values, got {text.strip()!r}")
    try:
        return [int(v) for v in parts] if integer else [float(v) for v in parts]
    except ValueError:
        raise fail(f"{what} must be {'integers' if integer else 'numbers'}, got {text.strip()!r}") from None


def _check_sizes(sizes: list[int], fail) -> None:
    if any(n < 1 for n in sizes):
        raise fail(f"image size {sizes} has an axis of length < 1")


def _check_spacing(spacing: list[float], field: str, fail) -> None:
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise fail(f"{field} {spacing} is not accepted: spacing must be finite and > 0")


def _check_directions(vectors: np.ndarray, field: str, fail) -> None:
    """``vectors``: one row per voxel axis (its length is the spacing), in a space of as many or more
    dimensions (a 2D slice may lie in 3D space)."""
    if not np.all(np.isfinite(vectors)):
        raise fail(f"{field} {matrix_text(vectors)} is not finite")
    norms = np.linalg.norm(vectors, axis=1)
    if np.any(norms <= 0):
        raise fail(f"{field} {matrix_text(vectors)} has a zero-length axis")
    if np.linalg.svd(vectors / norms[:, None], compute_uv=False).min() < 1e-6:
        raise fail(f"{field} {matrix_text(vectors)} is singular: the voxel axes must be independent")


def _data_file(header: Path, name: str, fail) -> Path:
    """A detached data file: it must be a regular file (not a device or a pipe, which would hang ITK)."""
    target = Path(name).expanduser()
    target = target if target.is_absolute() else header.parent / target
    if not target.is_file():
        state = "does not exist" if not target.exists() else "is not a regular file"
        raise fail(f"its data file {target} {state}; a detached header must name a regular file")
    if os.path.samefile(target, header):  # ITK would read the header's own text as voxels
        raise fail(f"its data file {name!r} is the header itself; a detached header must name another file "
                   "(data in the same file: LOCAL in MetaImage, no data file line in NRRD)")
    return target


def _check_room(needed: int, available: int, encoding: str, sizes: list[int], fail) -> None:
    if encoding in ("gzip", "zlib"):
        limit, kind = available * _ZLIB_MAX_RATIO, f"{available} compressed bytes, which expand to at most"
    elif encoding == "ascii":
        limit, kind = (available + 1) // 2, f"{available} bytes of text, which hold at most"
        needed = math.prod(sizes)  # values, not bytes
    elif encoding == "hex":
        limit, kind = available // 2, f"{available} hex digits, which hold at most"
    else:
        limit, kind = available, "the file holds only"
    if needed > limit:
        unit = "values" if encoding == "ascii" else "bytes"
        raise fail(f"the header claims a {' x '.join(map(str, sizes))} image ({needed} {unit}) but "
                   f"{kind} {max(limit, 0)} {unit} (truncated file or damaged header)")


def check_nrrd_header(path: Path) -> None:
    """Check a ``.nrrd`` / ``.nhdr`` header before ITK reads the file; raise :class:`ImageReadError`."""

    def fail(what: str) -> ImageReadError:
        return ImageReadError(f"could not read {path} as NRRD: {what}")

    with open(path, "rb") as fh:
        magic = fh.read(8)
    if not (magic.startswith(b"NRRD000") and magic[7:8] in b"12345"):
        raise fail("it does not start with the NRRD magic line (NRRD0001 .. NRRD0005)")
    lines, header_bytes = _header_lines(path, fail)
    fields: dict[str, str] = {}
    list_files: list[str] = []
    for line in lines[1:]:
        if fields.get("data file", "").split()[:1] == ["LIST"]:
            list_files.append(line.strip())
            continue
        if line.startswith("#") or (":=" in line and (": " not in line or line.index(":=") < line.index(": "))):
            continue  # a comment or a "key:=value" pair
        if ": " not in line:
            raise fail(f"header line {line[:60]!r} is not 'field: value'")
        key, value = line.split(": ", 1)
        key = key.strip().lower()
        fields[_NRRD_FIELD_ALIASES.get(key, key)] = value.strip()
    for required in ("type", "dimension", "sizes", "encoding"):
        if required not in fields:
            raise fail(f"the header has no {required!r} field (required: type, dimension, sizes, encoding)")
    esize = _NRRD_TYPES.get(fields["type"].lower())
    if esize is None:
        raise fail(f"voxel type {fields['type']!r} is not supported; accepted: integer types of 8-64 bits, "
                   "float, double")
    try:
        dimension = int(fields["dimension"])
    except ValueError:
        raise fail(f"dimension {fields['dimension']!r} is not an integer") from None
    if not 1 <= dimension <= 16:
        raise fail(f"dimension {dimension} is outside NRRD's range 1..16")
    sizes = _numbers(fields["sizes"], dimension, "sizes", fail, integer=True)
    _check_sizes(sizes, fail)
    kinds = fields.get("kinds", "").split() or ["domain"] * dimension
    if len(kinds) != dimension:
        raise fail(f"kinds {fields['kinds']!r} needs {dimension} values")
    domain = [a for a, kind in enumerate(kinds) if kind.lower() in _NRRD_DOMAIN_KINDS]
    if len(domain) not in (2, 3) or dimension - len(domain) > 1:
        raise fail(f"{dimension} axes of kinds {kinds} are not supported; accepted: 2 or 3 spatial axes "
                   "and at most one vector (channel) axis")
    if "spacings" in fields:
        values = fields["spacings"].split()
        if len(values) != dimension:
            raise fail(f"spacings {fields['spacings']!r} needs {dimension} values")
        try:
            spacing = [float(values[a]) for a in domain]
        except ValueError:
            raise fail(f"spacings {fields['spacings']!r} must be numbers") from None
        _check_spacing(spacing, "spacings", fail)
    if "space directions" in fields:
        vectors = fields["space directions"].split()
        if len(vectors) != dimension:
            raise fail(f"space directions {fields['space directions']!r} needs {dimension} entries")
        rows = [vectors[a] for a in domain]
        if any(v.lower() == "none" for v in rows):
            raise fail("space directions has 'none' for a spatial axis")
        width = len(rows[0].split(","))
        if width < len(domain):
            raise fail(f"space directions {fields['space directions']!r}: {len(domain)} spatial axes need "
                       f"vectors of at least {len(domain)} values")
        _check_directions(np.array([_numbers(v, width, "a space direction", fail) for v in rows]),
                          "space directions", fail)
    if "space origin" in fields:
        origin = fields["space origin"].replace("(", " ").replace(")", " ").replace(",", " ").split()
        try:
            finite = all(math.isfinite(float(v)) for v in origin)
        except ValueError:
            finite = False
        if not finite:
            raise fail(f"space origin {fields['space origin']!r} must be finite numbers")
    encoding = _NRRD_ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        raise fail(f"encoding {fields['encoding']!r} is not supported; accepted: raw, gzip, ascii, hex "
                   "(bzip2 is not built into ITK's NRRD reader)")
    skip = 0
    for key in ("byte skip", "line skip"):
        if key in fields:
            try:
                value = int(fields[key])
            except ValueError:
                raise fail(f"{key} {fields[key]!r} is not an integer") from None
            if value < (-1 if key == "byte skip" and encoding == "raw" else 0):
                raise fail(f"{key} {value} is not accepted (>= 0; -1 only for raw byte skip)")
            skip += max(value, 0)
    if "data file" in fields:
        parts = fields["data file"].split()
        if parts[:1] == ["LIST"]:
            names = list_files
        elif len(parts) >= 4 and "%" in parts[0]:
            start, stop, step = _numbers(" ".join(parts[1:4]), 3, "data file range", fail, integer=True)
            count = (stop - start) // step + 1 if step != 0 else 0
            if step == 0 or count < 1 or count > sizes[-1]:
                raise fail(f"data file pattern {fields['data file']!r} names {max(count, 0)} files for "
                           f"{sizes[-1]} slices")
            try:
                names = [parts[0] % i for i in range(start, stop + (1 if step > 0 else -1), step)]
            except (TypeError, ValueError):
                raise fail(f"data file pattern {parts[0]!r} is not a printf pattern for one integer") from None
        else:
            names = [fields["data file"]]
        if not names:
            raise fail("data file LIST names no files")
        files = [_data_file(path, name, fail) for name in names]
        available = sum(f.stat().st_size for f in files) - skip * len(files)
        first = files[0]
    else:
        available = path.stat().st_size - header_bytes - skip
        first = None
    _check_room(math.prod(sizes) * esize, available, encoding, sizes, fail)
    if encoding == "gzip" and skip == 0:
        with open(first or path, "rb") as fh:
            fh.seek(0 if first else header_bytes)
            if fh.read(2) != b"\x1f\x8b":
                raise fail("the header says gzip encoding but the data are not gzip-compressed")


def check_metaimage_header(path: Path) -> None:
    """Check a ``.mha`` / ``.mhd`` header before ITK reads the file; raise :class:`ImageReadError`."""

    def fail(what: str) -> ImageReadError:
        return ImageReadError(f"could not read {path} as MetaImage: {what}")

    lines, header_bytes = _header_lines(path, fail, last_key="elementdatafile")
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        if "=" not in line:
            raise fail(f"header line {line[:60]!r} is not 'Key = Value'")
        key, value = line.split("=", 1)
        fields[key.strip().lower()] = value.strip()
    if "elementdatafile" not in fields:
        raise fail("the header has no ElementDataFile line (required: NDims, DimSize, ElementType, "
                   "ElementDataFile)")
    for key, name in (("ndims", "NDims"), ("dimsize", "DimSize"), ("elementtype", "ElementType")):
        if key not in fields:
            raise fail(f"the header has no {name} field (required: NDims, DimSize, ElementType, ElementDataFile)")
    if fields.get("objecttype", "Image").lower() != "image":
        raise fail(f"ObjectType {fields['objecttype']!r} is not an image")
    ndims = _numbers(fields["ndims"], 1, "NDims", fail, integer=True)[0]
    if ndims not in (2, 3):
        raise fail(f"NDims {ndims} is not supported; accepted: 2 or 3 (channels as ElementNumberOfChannels)")
    sizes = _numbers(fields["dimsize"], ndims, "DimSize", fail, integer=True)
    _check_sizes(sizes, fail)
    esize = _MET_TYPES.get(fields["elementtype"].upper().removesuffix("_ARRAY"))
    if esize is None:
        raise fail(f"ElementType {fields['elementtype']!r} is not supported; accepted: {', '.join(_MET_TYPES)}")
    channels = _numbers(fields.get("elementnumberofchannels", "1"), 1, "ElementNumberOfChannels", fail,
                        integer=True)[0]
    if channels < 1:
        raise fail(f"ElementNumberOfChannels {channels} must be >= 1")
    for key, name in (("elementspacing", "ElementSpacing"), ("elementsize", "ElementSize")):
        if key in fields:
            _check_spacing(_numbers(fields[key], ndims, name, fail), name, fail)
    for key, name in (("offset", "Offset"), ("origin", "Origin"), ("position", "Position")):
        if key in fields and not all(math.isfinite(v) for v in _numbers(fields[key], ndims, name, fail)):
            raise fail(f"{name} {fields[key]!r} must be finite numbers")
    for key, name in (("transformmatrix", "TransformMatrix"), ("rotation", "Rotation"),
                      ("orientation", "Orientation")):
        if key in fields:
            matrix = np.array(_numbers(fields[key], ndims * ndims, name, fail)).reshape(ndims, ndims)
            _check_directions(matrix, name, fail)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    binary = fields.get("binarydata", "true").lower() == "true"
    header_size = _numbers(fields.get("headersize", "0"), 1, "HeaderSize", fail, integer=True)[0]
    if header_size < -1 or (header_size == -1 and compressed):
        raise fail(f"HeaderSize {header_size} is not accepted (>= 0, or -1 for uncompressed data)")
    data_file = fields["elementdatafile"]
    parts = data_file.split()
    if data_file.upper() == "LOCAL":
        available = path.stat().st_size - header_bytes
    elif parts[:1] == ["LIST"] or (len(parts) >= 4 and "%" in parts[0]):
        raise fail(f"ElementDataFile {data_file!r} (one file per slice) is not supported; accepted: LOCAL "
                   "or one data file")
    else:
        available = _data_file(path, data_file, fail).stat().st_size
    available -= max(header_size, 0)
    if compressed and "compresseddatasize" in fields:
        stated = _numbers(fields["compresseddatasize"], 1, "CompressedDataSize", fail, integer=True)[0]
        if not 0 < stated <= available:
            raise fail(f"CompressedDataSize {stated} does not fit the {max(available, 0)} bytes of data in "
                       "the file (truncated file or damaged header)")
    encoding = "zlib" if compressed else ("raw" if binary else "ascii")
    needed = math.prod(sizes) * channels * esize
    _check_room(needed, available, encoding, [*sizes, channels], fail)
    if compressed:
        # MetaIO prints "Uncompress failed" and returns zeros for a damaged zlib stream: check it here
        start = header_bytes + max(header_size, 0) if data_file.upper() == "LOCAL" else max(header_size, 0)
        source = path if data_file.upper() == "LOCAL" else _data_file(path, data_file, fail)
        _check_zlib_stream(source, start, needed, fail)


def _check_zlib_stream(path: Path, start: int, needed: int, fail) -> None:
    """Decompress the zlib stream at byte ``start`` of ``path`` in bounded pieces (nothing is kept) and
    check that it is intact and holds exactly ``needed`` bytes."""
    import zlib

    stream = zlib.decompressobj()
    total = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while not stream.eof:
            chunk = fh.read(1 << 20)
            if not chunk:
                raise fail(f"the compressed voxel data end early after {total} of {needed} bytes (truncated file)")
            while chunk and not stream.eof:
                try:
                    total += len(stream.decompress(chunk, 1 << 22))
                except zlib.error as err:
                    raise fail(f"the compressed voxel data are damaged ({err})") from None
                if total > needed:
                    raise fail(f"the compressed voxel data hold more than the {needed} bytes the header "
                               "says (damaged header)")
                chunk = stream.unconsumed_tail
    if total != needed:
        raise fail(f"the compressed voxel data hold {total} bytes, not the {needed} the header says "
                   "(truncated file or damaged header)")


def read_sitk(path: Path, fmt: str) -> Image:
    """Read one NRRD / MetaImage file (``fmt`` is ``"nrrd"`` or ``"metaimage"``); the header is checked
    first (:func:`check_nrrd_header`, :func:`check_metaimage_header`)."""
    import SimpleITK as sitk

    (check_nrrd_header if fmt == "nrrd" else check_metaimage_header)(path)
    what = "NRRD" if fmt == "nrrd" else "MetaImage"
    io_name = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}[fmt]
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(path, what, err) from err
    meta: dict[str, Any] = {"format": fmt, "dtype": str(sitk.GetArrayViewFromImage(image).dtype)}
    return _from_sitk(image, meta, path, what)


def _from_sitk(image, meta: dict[str, Any], path: Path, what: str) -> Image:
    """:meth:`Image.from_sitk` with its refusals (4D, a voxel type we do not read, a degenerate geometry)
    as :class:`ImageReadError` naming the file."""
    import SimpleITK as sitk

    if sitk.GetArrayViewFromImage(image).dtype.kind not in "iuf":
        raise ImageReadError(f"could not read {path} as {what}: voxel type {image.GetPixelIDTypeAsString()} is "
                             "not supported; accepted: integer and float voxels (optionally vectors)")
    try:
        return Image.from_sitk(image, meta)
    except ValueError as err:
        raise ImageReadError(f"could not read {path} as {what}: {err}") from err


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


# -- DICOM: headers read and checked with pydicom (pure Python) before GDCM reads the voxels ------------

_PIXEL_DATA = 0x7FE00010
_DICOM_KEYWORDS = ("SeriesInstanceUID", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames",
                   "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope",
                   "RescaleIntercept", "PixelRepresentation")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _dicom_header(path: Path) -> dict[Any, Any] | None:
    """The header values of a DICOM image file that the checks need (``_DICOM_KEYWORDS`` and the raw
    pixel-data element, whose value is not loaded), or ``None`` for a file that is not DICOM or holds no
    image. A file with the ``DICM`` magic that cannot be parsed raises :class:`ImageReadError`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        return None
    except Exception as err:  # noqa: BLE001  pydicom raises many types on damaged data; all mean "damaged"
        with open(path, "rb") as fh:
            fh.seek(128)
            if fh.read(4) != b"DICM":
                return None
        raise ImageReadError(
            f"could not read {path} as DICOM: the file is damaged ({' '.join(str(err).split()) or type(err).__name__})"
        ) from err
    try:
        if _PIXEL_DATA not in header:
            return None
        # pydicom decodes values when they are read: do it here, so a damaged element (an unknown VR, a
        # value that is not a number) is reported as a damaged file
        fields = {keyword: header.get(keyword) for keyword in _DICOM_KEYWORDS}
        fields[_PIXEL_DATA] = header.get_item(_PIXEL_DATA, keep_deferred=True)
    except Exception as err:  # noqa: BLE001  same: any decoding failure means a damaged element
        raise ImageReadError(
            f"could not read {path} as DICOM: a header element is damaged ({' '.join(str(err).split()) or type(err).__name__})"
        ) from err
    return fields


def _dicom_int(header, keyword: str, default: int | None, path: Path) -> int:
    value = header.get(keyword)
    value = default if value is None else value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ImageReadError(f"could not read {path} as DICOM: {keyword} is {value!r}, not an integer") from None
    return number


def _dicom_floats(header, keyword: str, count: int, path: Path) -> np.ndarray | None:
    if header.get(keyword) in (None, ""):
        return None
    from pydicom.multival import MultiValue

    value = header.get(keyword)
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        values = np.array([float(v) for v in items])
    except (TypeError, ValueError):
        raise ImageReadError(f"could not read {path} as DICOM: {keyword} {value!r} is not numbers") from None
    if values.size != count or not np.all(np.isfinite(values)):
        raise ImageReadError(f"could not read {path} as DICOM: {keyword} {values.tolist()} needs {count} finite numbers")
    return values


def _check_dicom_pixels(header, path: Path) -> tuple:
    """Check the image module and that the pixel data can hold it; return the values slices must share."""
    rows, columns = _dicom_int(header, "Rows", None, path), _dicom_int(header, "Columns", None, path)
    samples = _dicom_int(header, "SamplesPerPixel", 1, path)
    bits = _dicom_int(header, "BitsAllocated", None, path)
    frames = _dicom_int(header, "NumberOfFrames", 1, path)
    signed = _dicom_int(header, "PixelRepresentation", 0, path)
    if (rows < 1 or columns < 1 or frames < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64)
            or signed not in (0, 1)):
        raise ImageReadError(
            f"could not read {path} as DICOM: Rows {rows}, Columns {columns}, NumberOfFrames {frames}, "
            f"SamplesPerPixel {samples}, BitsAllocated {bits}, PixelRepresentation {signed}; accepted: sizes >= 1, "
            "1 or 3 samples, 1/8/16/32/64 bits, PixelRepresentation 0 (unsigned) or 1 (signed)")
    needed = (rows * columns * samples * frames * bits + 7) // 8
    element = header[_PIXEL_DATA]
    size = path.stat().st_size
    length = getattr(element, "length", None)
    tell = getattr(element, "value_tell", None)
    if length is not None and tell is not None and length != _UNDEFINED_LENGTH:
        if tell + length > size:
            raise ImageReadError(f"could not read {path} as DICOM: its pixel data claim {length} bytes but the "
                                 f"file ends {max(size - tell, 0)} bytes after their start (truncated file)")
        if length < needed:
            raise ImageReadError(f"could not read {path} as DICOM: {rows} x {columns} x {frames} pixels of "
                                 f"{bits} bits need {needed} bytes but the pixel data hold {length} "
                                 "(truncated or damaged file)")
    elif needed > size * _ZLIB_MAX_RATIO:  # compressed (encapsulated) pixel data
        raise ImageReadError(f"could not read {path} as DICOM: {rows} x {columns} x {frames} pixels cannot "
                             f"come from {size} bytes of compressed data (damaged header)")
    spacing = _dicom_floats(header, "PixelSpacing", 2, path)
    if spacing is not None:
        _check_spacing(spacing.tolist(), "PixelSpacing", lambda what: ImageReadError(
            f"could not read {path} as DICOM: {what}"))
    return (rows, columns, samples, bits, signed,
            None if spacing is None else tuple(float(v) for v in np.round(spacing, 4)))


def _scan_dicom_folder(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """``{series_uid: [(file, header), ...]}`` for the DICOM image files directly in ``folder``."""
    series: dict[str, list[tuple[Path, Any]]] = {}
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        header = _dicom_header(entry)
        if header is not None:
            uid = str(header.get("SeriesInstanceUID") or "").strip()
            series.setdefault(uid, []).append((entry, header))
    return series


def _order_slices(folder: Path, uid: str, members: list[tuple[Path, Any]]) -> list[str]:
    """The files of one series sorted along the slice normal, after checking that they form one regular
    volume: the same image size, pixel type, spacing and orientation, no duplicate or missing slice, even
    spacing, slices stacked along their normal."""
    first_path, first = members[0]
    series = f"could not read DICOM series {uid} in {folder}:"
    shared = _check_dicom_pixels(first, first_path)
    for path, header in members[1:]:
        if _check_dicom_pixels(header, path) != shared:
            raise ImageReadError(
                f"{series} it mixes slice formats: {first_path.name} has (rows, columns, samples, bits, "
                f"signed, spacing) {shared}, {path.name} has {_check_dicom_pixels(header, path)}; a series must be one "
                "volume: read the files separately or split the folder")
    orientation = _dicom_floats(first, "ImageOrientationPatient", 6, first_path)
    if orientation is not None:
        row, column = orientation[:3], orientation[3:]
        normal = np.cross(row, column)
        if np.linalg.norm(row) < 1e-3 or np.linalg.norm(column) < 1e-3 or np.linalg.norm(normal) < 1e-3:
            raise ImageReadError(f"could not read {first_path} as DICOM: ImageOrientationPatient "
                                 f"{orientation.tolist()} is degenerate (zero or parallel row/column vectors)")
        cosine = abs(row @ column) / (np.linalg.norm(row) * np.linalg.norm(column))
        if cosine >= 1e-3:  # GDCM replaces such an orientation with the identity, silently
            raise ImageReadError(f"could not read {first_path} as DICOM: ImageOrientationPatient "
                                 f"{orientation.tolist()} has row and column directions that are not "
                                 f"perpendicular (cosine {cosine:.3g}); accepted: perpendicular directions "
                                 "(cosine < 0.001)")
    if len(members) == 1:
        if _dicom_int(first, "NumberOfFrames", 1, first_path) < 1:
            raise ImageReadError(f"could not read {first_path} as DICOM: NumberOfFrames < 1")
        return [str(first_path)]
    positions = []
    for path, header in members:
        if _dicom_int(header, "NumberOfFrames", 1, path) > 1:
            raise ImageReadError(f"{series} it has {len(members)} files and {path.name} is multi-frame; "
                                 "accepted: one multi-frame file, or single-frame slices")
        this = _dicom_floats(header, "ImageOrientationPatient", 6, path)
        position = _dicom_floats(header, "ImagePositionPatient", 3, path)
        if this is None or position is None or orientation is None:
            raise ImageReadError(f"{series} {path.name} has no ImageOrientationPatient or "
                                 "ImagePositionPatient, so its slices cannot be placed in space")
        if not np.allclose(this, orientation, atol=1e-4):
            raise ImageReadError(
                f"{series} it mixes orientations: {first_path.name} has {orientation.tolist()}, "
                f"{path.name} has {this.tolist()}; a series must be one volume (split the folder)")
        positions.append(position)
    positions_mm = np.array(positions)
    unit = normal / np.linalg.norm(normal)
    depth = positions_mm @ unit
    order = np.argsort(depth, kind="stable")
    depth, positions_mm = depth[order], positions_mm[order]
    names = [members[k][0].name for k in order]
    gaps = np.diff(depth)
    tiny = np.flatnonzero(gaps < 1e-3)
    if tiny.size:
        a, b = names[tiny[0]], names[tiny[0] + 1]
        raise ImageReadError(f"{series} two slices are at the same position ({a} and {b}, "
                             f"{depth[tiny[0]]:.4g} mm along the normal): a duplicated slice or two acquisitions "
                             "in one series; remove the duplicates")
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise ImageReadError(f"{series} uneven slice spacing (gaps from {gaps.min():.4g} to "
                             f"{gaps.max():.4g} mm): a slice is missing or the series mixes acquisitions; "
                             "accepted: evenly spaced slices")
    in_plane = positions_mm - positions_mm[:1] - np.outer(depth - depth[0], unit)
    if np.abs(in_plane).max() > 0.01 * gaps.mean() + 1e-3:
        raise ImageReadError(f"{series} the slices are not stacked along their normal (shifted in "
                             f"plane by up to {np.abs(in_plane).max():.4g} mm, e.g. a gantry tilt); resample "
                             "the series to a regular grid first")
    return [str(members[k][0]) for k in order]


def _rescales(members: list[tuple[Path, Any]]) -> set[tuple[float, float]]:
    """The distinct (RescaleSlope, RescaleIntercept) pairs of a series' files (default (1, 0))."""
    pairs = set()
    for path, header in members:
        slope = _dicom_floats(header, "RescaleSlope", 1, path)
        intercept = _dicom_floats(header, "RescaleIntercept", 1, path)
        pairs.add((1.0 if slope is None else float(slope[0]), 0.0 if intercept is None else float(intercept[0])))
    return pairs


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """The DICOM series in ``folder``: ``{series_uid: [file names sorted along the slice axis]}``.

    Each series is checked to be one regular volume (see :func:`read_dicom_series`)."""
    return {uid: _order_slices(folder, uid, members) for uid, members in _scan_dicom_folder(folder).items()}


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Image:
    """Read a DICOM series from ``folder``: the one with most files (a tie is an error), or the one with
    ``series_uid``.

    Headers are read and checked with pydicom first: every file of the series must have the same image
    size, pixel type, pixel spacing and orientation, with one slice per position, evenly spaced and
    stacked along the slice normal, and pixel data the size the header says. The voxels are then read
    by GDCM (through SimpleITK), which applies the rescale slope/intercept; when the slices' slopes or
    intercepts differ, the volume is ``float64`` so that no slice is truncated to the first one's type.
    """
    import SimpleITK as sitk

    scanned = _scan_dicom_folder(folder)
    if not scanned:
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ImageReadError(
            f"no DICOM series found in folder {folder} ({len(names)} entries: {shown or 'empty'}); "
            "read_image accepts a folder holding a DICOM series, or a file ending in "
            ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or .dcm"
        )
    listing = "; ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(files)} files)" for uid, files in scanned.items())
    if series_uid is None:
        counts = sorted((len(files) for files in scanned.values()), reverse=True)
        if len(counts) > 1 and counts[0] == counts[1]:
            raise ImageReadError(f"could not read {folder}: it holds several DICOM series of the same size "
                                 f"({listing}); choose one with series_uid=...")
        series_uid = max(scanned, key=lambda uid: len(scanned[uid]))
    elif series_uid not in scanned:
        raise ImageReadError(f"could not read {folder}: series_uid {series_uid!r} is not in it; the folder "
                             f"holds: {listing}")
    files = _order_slices(folder, series_uid, scanned[series_uid])
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(files)
    if len(_rescales(scanned[series_uid])) > 1:
        # GDCM rescales each slice, but the volume takes the first slice's voxel type: an integer one
        # would truncate the other slices' fractional values (per-slice slopes are common in PET)
        reader.SetOutputPixelType(sitk.sitkFloat64)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _sitk_error(folder, f"DICOM series {series_uid}", err) from err
    meta: dict[str, Any] = {
        "format": "dicom",
        "dtype": str(sitk.GetArrayViewFromImage(image).dtype),
        "dicom_files": len(files),
        "series_uids": sorted(scanned),
    }
    for tag, key in DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    meta["series_uid"] = series_uid
    return _from_sitk(image, meta, folder, f"DICOM series {series_uid}")


def read_dicom_file_series(path: Path) -> Image:
    """Read the whole series that the DICOM file ``path`` belongs to (from the files in its folder)."""
    header = _dicom_header(path)
    if header is None:
        raise ImageReadError(f"could not read {path} as DICOM: it is not a DICOM image file (no DICM "
                             "header or no pixel data)")
    uid = str(header.get("SeriesInstanceUID") or "").strip()
    if not uid:
        raise ImageReadError(f"could not read {path} as DICOM: it has no SeriesInstanceUID (0020,000E); "
                             "give its folder instead")
    return read_dicom_series(path.parent, uid)
