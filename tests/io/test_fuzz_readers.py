"""Fuzzing every reader behind ``read_image`` (NIfTI, NRRD, MetaImage, DICOM series) with hypothesis.

Every damaged, truncated, impossible or inconsistent input must either read correctly or raise
:class:`medsegkit.errors.ImageReadError` with a one-line message; never a crash, a hang, another
exception type, or an attempt to allocate more than the file could hold.

The reads run in a child process (one for the whole module, fed paths over a pipe), so a segfault or an
abort inside nibabel / ITK / GDCM shows up as a failing example instead of a dead pytest. The child runs
under an address-space limit: a reader that tried to allocate a header's 10^12 voxels would hit it and
report ``MemoryError`` / "not enough memory", which the tests refuse.
"""

from __future__ import annotations

import gzip
import json
import os
import select
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pydicom = pytest.importorskip("pydicom")

READ_TIMEOUT_S = 30.0
CHILD_MEMORY_LIMIT = 3 << 30  # bytes of address space for the reading child

CHILD = r"""
import json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import numpy as np
from medsegkit.errors import ImageReadError
from medsegkit.io import read_image
import SimpleITK, nibabel, pydicom  # loaded before the first example, not inside its time limit
print(json.dumps({{"ready": True}}), flush=True)
for line in sys.stdin:
    path = json.loads(line)["path"]
    try:
        image = read_image(path)
        reply = {{"outcome": "ok", "shape": list(image.array.shape), "dtype": str(image.array.dtype),
                  "affine": image.affine.tolist(), "sum": float(np.asarray(image.array, np.float64).sum())}}
    except ImageReadError as err:
        reply = {{"outcome": "error", "message": str(err)}}
    except BaseException as err:
        reply = {{"outcome": "other", "type": type(err).__name__, "message": str(err),
                  "traceback": traceback.format_exc()}}
    print(json.dumps(reply), flush=True)
"""


class ReaderChild:
    """A child process that runs ``read_image`` on the paths it is sent (``code``: the child's program)."""

    def __init__(self, code: str = CHILD, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.process: subprocess.Popen | None = None
        self.code, self.timeout_s = code, timeout_s

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.code.format(limit=CHILD_MEMORY_LIMIT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        assert json.loads(self._reply(120.0)) == {"ready": True}

    def _reply(self, timeout: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            self.process.wait()
            self.process = None
            pytest.fail(f"read_image hung for more than {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.process = None
            pytest.fail(f"the reading process died (exit code {code}: a crash inside a reader)")
        return line

    def read(self, path: Path) -> dict:
        if self.process is None or self.process.poll() is not None:
            self._start()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.process.stdin.flush()
        return json.loads(self._reply(self.timeout_s))

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def child():
    reader = ReaderChild()
    yield reader
    reader.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


FAKE_CHILD = r"""
import json, os, sys, time
print(json.dumps({{"ready": True}}), flush=True)
for line in sys.stdin:
    path = json.loads(line)["path"]
    if path == "crash":
        os.abort()
    time.sleep(60)
"""


@pytest.mark.parametrize(("path", "reason"), [("crash", "the reading process died"), ("hang", "hung")])
def test_harness_turns_a_crash_or_a_hang_into_a_failure(path, reason):
    """The fuzz tests can fail: a reader that aborts or hangs fails the example, pytest lives on."""
    reader = ReaderChild(FAKE_CHILD, timeout_s=2.0)
    with pytest.raises(pytest.fail.Exception, match=reason):
        reader.read(Path(path))
    assert reader.process is None  # the dead or killed child was reaped


def check(result: dict, *, must_fail: bool = False) -> dict:
    """The invariant every input must meet: read, or ImageReadError with one line (never memory)."""
    assert result["outcome"] != "other", f"{result['type']}: {result['message']}\n{result['traceback']}"
    if result["outcome"] == "error":
        message = result["message"]
        assert "\n" not in message and message.strip() == message, message
        assert "not enough memory" not in message, message
        assert message.startswith(("could not read ", "no DICOM series found", "unknown image format")), message
    else:
        assert not must_fail, f"expected ImageReadError, got an image {result['shape']}"
        assert np.all(np.isfinite(result["affine"]))
    return result


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# -- NIfTI ----------------------------------------------------------------------------------------------

VOLUME = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
AFFINE = np.array([[-2.0, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def _nifti_bytes() -> bytes:
    image = nib.Nifti1Image(VOLUME, AFFINE)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    return image.to_bytes()


NIFTI = _nifti_bytes()

# (offset, struct format) of the NIfTI-1 header fields the fuzzer rewrites
NIFTI_FIELDS = {
    "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "qform_code": (252, "<h"), "sform_code": (254, "<h"),
    "quatern": (256, "<6f"), "srow": (280, "<12f"),
}
FLOATS = st.sampled_from([0.0, -1.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-30, 1e30, 2.0])
INT16 = st.integers(-32768, 32767)


@st.composite
def nifti_damage(draw):
    data = bytearray(NIFTI)
    must_fail = False
    field = draw(st.sampled_from([*NIFTI_FIELDS, "flip", "truncate"]))
    if field == "flip":
        for _ in range(draw(st.integers(1, 6))):
            position = draw(st.integers(0, 351))
            data[position] ^= draw(st.integers(1, 255))
    elif field == "truncate":
        cut = draw(st.integers(1, len(data) - 1))
        data = data[:cut]
        must_fail = True
    else:
        offset, fmt = NIFTI_FIELDS[field]
        count = struct.calcsize(fmt) // struct.calcsize(fmt[-1])
        if fmt[-1] == "h":
            values = draw(st.lists(INT16, min_size=count, max_size=count))
        else:
            values = draw(st.lists(FLOATS, min_size=count, max_size=count))
        if field == "dim" and draw(st.booleans()):  # a header claiming ~10^12 voxels
            values = [3, 10000, 10000, 10000, 1, 1, 1, 1]
            must_fail = True
        struct.pack_into(fmt, data, offset, *values)
    return bytes(data), must_fail


@settings(max_examples=100)
@given(damage=nifti_damage(), compressed=st.booleans())
def test_fuzz_nifti(child, workdir, damage, compressed):
    data, must_fail = damage
    if compressed and data:
        data = gzip.compress(data)
    path = write(workdir, "fuzz.nii.gz" if compressed else "fuzz.nii", data)
    check(child.read(path), must_fail=must_fail)


def test_nifti_damage_is_refused_with_the_reason(child, workdir):
    """The cases the fuzzer found, each with its message (these failed before the header checks)."""
    cases = {
        "huge": ("dim", [3, 10000, 10000, 10000, 1, 1, 1, 1], r"claims \(10000, 10000, 10000\) voxels"),
        "zero_spacing": ("pixdim", [1, 0, 0, 0, 1, 1, 1, 1], None),
        "nan_srow": ("srow", [float("nan")] * 12, "not finite"),
        "datatype": ("datatype", [1234], None),
        "complex": ("datatype", [32], r"voxel type complex64 .* not supported"),
    }
    for name, (field, values, message) in cases.items():
        data = bytearray(NIFTI)
        offset, fmt = NIFTI_FIELDS[field]
        if field == "pixdim":  # zero spacing reaches the affine only through the qform
            struct.pack_into("<h", data, 254, 0)
        struct.pack_into(fmt, data, offset, *values)
        result = check(child.read(write(workdir, f"{name}.nii", bytes(data))), must_fail=True)
        if message is not None:
            import re

            assert re.search(message, result["message"]), result["message"]
    good = check(child.read(write(workdir, "good.nii.gz", gzip.compress(NIFTI))))
    assert good["shape"] == [4, 5, 6] and good["sum"] == VOLUME.sum()
    np.testing.assert_allclose(good["affine"], AFFINE)


# -- NRRD and MetaImage ------------------------------------------------------------------------------

SIZES = st.one_of(
    st.lists(st.integers(1, 4), min_size=3, max_size=3),
    st.lists(st.sampled_from([0, -3, 10**4, 2**31, 10**6]), min_size=3, max_size=3),
)
SPACINGS = st.lists(st.sampled_from(["1", "0.5", "0", "-1", "nan", "inf", "1e-300", "x"]), min_size=3, max_size=3)
VECTORS = st.sampled_from(["(1,0,0) (0,1,0) (0,0,1)", "(1,0,0) (1,0,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)",
                           "(0,0,0) (0,1,0) (0,0,1)", "(0,1,0) (0,0,2) (3,0,0)", "(1,0) (0,1) (0,0,1)"])
NRRD_TYPES = st.sampled_from(["short", "uchar", "float", "double", "int64", "block", "complex", "junk"])


@st.composite
def nrrd_file(draw):
    sizes = draw(SIZES)
    type_name = draw(NRRD_TYPES)
    encoding = draw(st.sampled_from(["raw", "gzip", "bzip2", "ascii", "hex", "junk"]))
    lines = ["NRRD0004", f"type: {type_name}", "dimension: 3", f"sizes: {' '.join(map(str, sizes))}",
             f"encoding: {encoding}", "endian: little"]
    if draw(st.booleans()):
        lines.append(f"spacings: {' '.join(draw(SPACINGS))}")
    else:
        lines += ["space: left-posterior-superior", f"space directions: {draw(VECTORS)}",
                  f"space origin: ({draw(st.sampled_from(['0,0,0', '1,2,3', 'nan,0,0']))})"]
    if draw(st.booleans()):
        lines.append(f"byte skip: {draw(st.sampled_from([0, 1, -1, 10**12]))}")
    lines += draw(st.lists(st.sampled_from(["dimension: 99", "kinds: vector domain domain",
                                            "line skip: 100000000", "data file: /dev/zero", "bogus"]),
                           max_size=1))
    esize = {"short": 2, "uchar": 1, "float": 4, "double": 8, "int64": 8}.get(type_name, 2)
    count = int(np.prod([max(n, 0) for n in sizes])) if max(sizes) <= 4 else 8
    body = np.random.default_rng(count).integers(0, 255, count * esize, dtype=np.uint8).tobytes()
    if encoding == "gzip" and draw(st.booleans()):
        body = gzip.compress(body)
    body = body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    return ("\n".join(lines) + "\n\n").encode() + body


@st.composite
def metaimage_file(draw):
    sizes = draw(SIZES)
    element = draw(st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_OTHER", "junk"]))
    compressed = draw(st.booleans())
    lines = ["ObjectType = Image", f"NDims = {draw(st.sampled_from([3, 3, 3, 2, 0, 40]))}",
             f"DimSize = {' '.join(map(str, sizes))}", f"ElementSpacing = {' '.join(draw(SPACINGS))}",
             f"TransformMatrix = {draw(st.sampled_from(['1 0 0 0 1 0 0 0 1', '1 0 0 1 0 0 0 0 1', 'nan 0 0 0 1 0 0 0 1', '0 1 0 0 0 1 1 0 0']))}",
             f"Offset = {draw(st.sampled_from(['0 0 0', '1 2 3', 'nan 0 0']))}",
             f"CompressedData = {compressed}"]
    esize = {"MET_SHORT": 2, "MET_UCHAR": 1, "MET_FLOAT": 4, "MET_DOUBLE": 8}.get(element, 2)
    count = int(np.prod([max(n, 0) for n in sizes])) if max(sizes) <= 4 else 8
    body = np.random.default_rng(count).integers(0, 255, count * esize, dtype=np.uint8).tobytes()
    if compressed:
        body = zlib.compress(body)
        lines.append(f"CompressedDataSize = {draw(st.sampled_from([len(body), len(body) + 7, 10**11, 0]))}")
    lines += draw(st.lists(st.sampled_from(["ElementNumberOfChannels = 0", "ElementNumberOfChannels = 100000000",
                                            "HeaderSize = 100000000000", "HeaderSize = -1", "BinaryData = False"]),
                           max_size=1))
    lines += [f"ElementType = {element}", f"ElementDataFile = {draw(st.sampled_from(['LOCAL', 'LOCAL', '/dev/zero', 'missing.raw']))}"]
    if draw(st.booleans()):  # damage the data: truncate, or flip a byte
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))]
        elif body:
            position = draw(st.integers(0, len(body) - 1))
            body = body[:position] + bytes([body[position] ^ 0x5A]) + body[position + 1:]
    return ("\n".join(lines) + "\n").encode() + body


@settings(max_examples=80)
@given(data=nrrd_file())
def test_fuzz_nrrd(child, workdir, data):
    check(child.read(write(workdir, "fuzz.nrrd", data)))


@settings(max_examples=80)
@given(data=metaimage_file())
def test_fuzz_metaimage(child, workdir, data):
    check(child.read(write(workdir, "fuzz.mha", data)))


def _itk_files(folder: Path) -> dict[str, bytes]:
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5))
    volume.SetSpacing((0.5, 1.0, 2.0))
    files = {}
    for name, compress in (("raw.nrrd", False), ("gz.nrrd", True), ("raw.mha", False), ("z.mha", True)):
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(folder / name))
        writer.SetUseCompression(compress)
        writer.Execute(volume)
        files[name] = (folder / name).read_bytes()
    return files


@settings(max_examples=60)
@given(name=st.sampled_from(["raw.nrrd", "gz.nrrd", "raw.mha", "z.mha"]), flips=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_fuzz_itk_written_files(child, workdir, name, flips, cut):
    """Byte flips anywhere (header or data) and truncation of files SimpleITK itself wrote."""
    if not _ITK_FILES:
        _ITK_FILES.update(_itk_files(workdir))
    source = _ITK_FILES[name]
    data = bytearray(source)
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if cut is not None:
        data = data[: max(1, int(cut * len(data)))]
    result = check(child.read(write(workdir, "flipped" + name[name.index("."):], bytes(data))))
    if not flips and cut is None:
        assert result["outcome"] == "ok" and result["shape"] == [5, 4, 3]


_ITK_FILES: dict[str, bytes] = {}


def test_itk_damage_is_refused_with_the_reason(child, workdir):
    """The NRRD / MetaImage inputs that crashed, allocated or silently misread before the header checks."""
    cases = {
        "huge.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10000 10000 10000\nencoding: raw\n"
                      b"endian: little\n\nabcd", r"10000 x 10000 x 10000 image \(2000000000000 bytes\)"),
        "nan.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1 1 1\nspacings: 1 nan 1\nencoding: raw\n"
                     b"endian: little\n\nab", "spacing must be finite and > 0"),
        "notgz.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: gzip\n"
                       b"endian: little\n\n0123456789abcdef", "not gzip-compressed"),
        "device.nhdr": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                        b"endian: little\ndata file: /dev/zero\n\n", "not a regular file"),
        "size.mha": (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nCompressedData = True\n"
                     b"CompressedDataSize = 100000000000\nElementDataFile = LOCAL\n" + zlib.compress(bytes(16)),
                     "CompressedDataSize 100000000000 does not fit"),
        "zlib.mha": (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nCompressedData = True\n"
                     b"ElementDataFile = LOCAL\nx\x9c" + bytes(range(40, 60)), "compressed voxel data are damaged"),
        "singular.mha": (b"NDims = 3\nDimSize = 2 2 2\nTransformMatrix = 1 0 0 1 0 0 0 0 1\nElementType = MET_SHORT\n"
                         b"ElementDataFile = LOCAL\n" + bytes(16), "singular"),
    }
    import re

    for name, (data, message) in cases.items():
        result = check(child.read(write(workdir, name, data)), must_fail=True)
        assert re.search(message, result["message"]), result["message"]


def test_nrrd_field_spellings_without_space_are_checked(child, workdir):
    """teem reads ``datafile:``, ``spacedirections:`` (...) as ``data file:``, ``space directions:``. Before,
    the header check looked only for the spaced names: ``datafile: <a fifo>`` hung the reader, ``datafile:
    /dev/zero`` read as zeros and a singular ``spacedirections`` reached ITK (message ``0 0 1``)."""
    fifo = workdir / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    head = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
    cases = {
        "fifo.nhdr": (head + f"datafile: {fifo}\n\n".encode() + bytes(8),
                      f"its data file {fifo} is not a regular file; a detached header must name a regular file"),
        "zero.nhdr": (head + b"DataFile: /dev/zero\n\n" + bytes(8),
                      "its data file /dev/zero is not a regular file; a detached header must name a regular file"),
        "singular.nrrd": (head + b"space: left-posterior-superior\nspacedirections: (1,0,0) (1,0,0) (0,0,1)\n\n"
                          + bytes(8), "space directions [[1, 0, 0], [1, 0, 0], [0, 0, 1]] is singular: the "
                          "voxel axes must be independent"),
        "skip.nrrd": (head + b"byteskip: -2\n\n" + bytes(8), "byte skip -2 is not accepted (>= 0; -1 only for raw "
                      "byte skip)"),
    }
    for name, (data, message) in cases.items():
        path = write(workdir, name, data)
        result = check(child.read(path), must_fail=True)
        assert result["message"] == f"could not read {path} as NRRD: {message}"


def test_detached_header_naming_itself_is_refused(child, workdir):
    """Before, a header naming itself as its data file was read with its own text as voxels: ``raw.mhd`` with
    ``ElementDataFile = raw.mhd`` gave a 2 x 2 x 2 int16 image summing to 144308 (the bytes of ``NDims = ...``)."""
    cases = {
        "self.mhd": (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = self.mhd\n",
                     "MetaImage", "'self.mhd'"),
        "self.nhdr": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\nendian: little\n"
                      b"data file: ./self.nhdr\n\n", "NRRD", "'./self.nhdr'"),
    }
    for name, (data, what, named) in cases.items():
        path = write(workdir, name, data)
        result = check(child.read(path), must_fail=True)
        assert result["message"] == (
            f"could not read {path} as {what}: its data file {named} is the header itself; a detached header must "
            "name another file (data in the same file: LOCAL in MetaImage, no data file line in NRRD)")


# -- DICOM series ---------------------------------------------------------------------------------------

ROWS, COLUMNS = 4, 5
STUDY = "1.2.826.0.1.3680043.2.1125.9"


def _dicom_slice(path: Path, series: str, k: int, position, orientation, *, spacing=(0.5, 0.7),
                 pixels: np.ndarray | None = None) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{series}.{k + 1}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, f"{series}.{k + 1}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, series, "CT"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    ds.SliceThickness = "2"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if pixels is None:
        pixels = np.full((ROWS, COLUMNS), k * 10, dtype=np.int16) + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@st.composite
def dicom_folder_case(draw):
    """A folder of slices with one drawn defect (or none): returns (files to write, expected outcome)."""
    n = draw(st.integers(2, 5))
    gap = draw(st.sampled_from([1.0, 2.5]))
    depths = [k * gap for k in range(n)]
    orientations = [AXIAL] * n
    in_plane = [(0.0, 0.0)] * n
    series = ["1.2.826.0.1.3680043.2.1125.9.1"] * n
    defect = draw(st.sampled_from(["none", "missing", "duplicate", "uneven", "orientation", "two_series",
                                   "tilt", "nan_position", "zero_spacing", "truncated", "flip", "extra_file"]))
    expect = "ok"
    if defect == "missing" and n >= 4:  # two slices left would just be a coarser series
        del depths[draw(st.integers(1, n - 2))]
        expect = "error"
    elif defect == "duplicate":
        depths.append(depths[draw(st.integers(0, n - 1))])
        expect = "error"
    elif defect == "uneven" and n >= 3:
        depths[-1] += draw(st.sampled_from([0.3, -0.4, 5.0])) * gap
        expect = "error"
    elif defect == "orientation":
        orientations[draw(st.integers(0, n - 1))] = draw(st.sampled_from([(1.0, 0, 0, 0, 0, 1.0), (0, 1.0, 0, 1.0, 0, 0)]))
        expect = "error"
    elif defect == "two_series":
        series = series[: len(depths)]
        extra = draw(st.integers(1, n))
        depths += [k * gap for k in range(extra)]
        series += ["1.2.826.0.1.3680043.2.1125.9.2"] * extra
        expect = "error" if extra == n else "ok"  # a tie has no "largest series"
    elif defect == "tilt":
        in_plane = [(0.0, k * 0.5 * gap) for k in range(n)]
        expect = "error"
    elif defect in ("nan_position", "zero_spacing", "truncated"):
        expect = "error"
    elif defect == "flip":
        expect = "any"
    n_files = len(depths)
    orientations += [AXIAL] * (n_files - len(orientations))
    in_plane += [(0.0, 0.0)] * (n_files - len(in_plane))
    series += [series[-1]] * (n_files - len(series))
    order = draw(st.permutations(range(n_files)))
    flips = draw(st.lists(st.tuples(st.integers(0, n_files - 1), st.floats(0, 1, exclude_max=True),
                                    st.integers(1, 255)), min_size=1, max_size=3)) if defect == "flip" else []
    return dict(depths=depths, orientations=orientations, in_plane=in_plane, series=series, order=order,
                defect=defect, flips=flips, victim=draw(st.integers(0, n_files - 1))), expect


_dicom_case_number = iter(range(10**9))


@settings(max_examples=70)
@given(case=dicom_folder_case())
def test_fuzz_dicom_series(child, workdir, case):
    spec, expect = case
    folder = workdir / f"dicom{next(_dicom_case_number)}"
    folder.mkdir()
    for name_index, k in enumerate(spec["order"]):
        x, y = spec["in_plane"][k]
        position = (x - 10.0, y + 20.0, spec["depths"][k])
        path = folder / f"slice{name_index:03d}.dcm"
        spacing = (0.0, 0.7) if spec["defect"] == "zero_spacing" and k == spec["victim"] else (0.5, 0.7)
        _dicom_slice(path, spec["series"][k], k, position, spec["orientations"][k], spacing=spacing)
        if spec["defect"] == "nan_position" and k == spec["victim"]:
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = ["nan", "0", "0"]
            ds.save_as(path)
        if spec["defect"] == "truncated" and k == spec["victim"]:
            path.write_bytes(path.read_bytes()[:-7])
    if spec["defect"] == "extra_file":
        (folder / "notes.txt").write_text("not DICOM")
    files = sorted(folder.iterdir())
    for which, where, mask in spec["flips"]:
        data = bytearray(files[which].read_bytes())
        data[int(where * len(data))] ^= mask
        files[which].write_bytes(bytes(data))
    result = check(child.read(folder))
    if expect == "error":
        assert result["outcome"] == "error", f"{spec['defect']}: expected ImageReadError, got {result}"
    elif expect == "ok":
        assert result["outcome"] == "ok", f"{spec['defect']}: {result}"
        n = spec["series"].count(max(set(spec["series"]), key=spec["series"].count))
        assert result["shape"] == [COLUMNS, ROWS, n]
        np.testing.assert_allclose(np.linalg.norm(np.array(result["affine"])[:3, :3], axis=0), [0.7, 0.5, abs(
            np.diff(sorted(spec["depths"][: n]))[0])], rtol=1e-4)  # PixelSpacing is (row, column) spacing


def test_dicom_damage_is_refused_with_the_reason(child, workdir):
    """DICOM inputs the fuzzing found, each with its message."""
    import re

    def series(name: str, depths, series_uids=None) -> Path:
        folder = workdir / name
        folder.mkdir()
        for k, depth in enumerate(depths):
            uid = (series_uids or ["1.2.826.0.1.3680043.2.1125.9.1"] * len(depths))[k]
            _dicom_slice(folder / f"s{k}.dcm", uid, k, (0.0, 0.0, depth), AXIAL)
        return folder

    # a flipped byte turned the VR of ImageOrientationPatient into "DR": pydicom parses the file and only
    # fails when the value is decoded (this escaped as NotImplementedError before)
    damaged_vr = series("damaged_vr", [0.0, 2.0, 4.0])
    data = (damaged_vr / "s1.dcm").read_bytes()
    tag = b"\x20\x00\x37\x00DS"
    assert data.count(tag) == 1
    (damaged_vr / "s1.dcm").write_bytes(data.replace(tag, b"\x20\x00\x37\x00DR"))
    truncated = series("truncated", [0.0, 2.0, 4.0])
    (truncated / "s2.dcm").write_bytes((truncated / "s2.dcm").read_bytes()[:-9])
    cases = {
        damaged_vr: "s1.dcm as DICOM: a header element is damaged",
        truncated: r"s2.dcm as DICOM: its pixel data claim 40 bytes but the file ends 31 bytes after their start",
        series("missing", [0.0, 2.0, 4.0, 8.0]): r"uneven slice spacing \(gaps from 2 to 4 mm\)",
        series("duplicate", [0.0, 2.0, 2.0]): "two slices are at the same position",
        series("tie", [0.0, 2.0, 0.0, 2.0], ["1.2.826.0.1.3680043.2.1125.9.1"] * 2 + ["1.2.826.0.1.3680043.2.1125.9.2"] * 2):
            r"several DICOM series of the same size .*choose one with series_uid",
    }
    for folder, message in cases.items():
        result = check(child.read(folder), must_fail=True)
        assert re.search(message, result["message"]), result["message"]
    good = check(child.read(series("good", [4.0, 0.0, 2.0])))
    assert good["shape"] == [COLUMNS, ROWS, 3]


def test_dicom_orientation_that_is_not_perpendicular_is_refused(child, workdir):
    """GDCM replaces an ImageOrientationPatient whose row and column are not perpendicular (cosine >= 0.001)
    with the identity. Before, such a series (row (1, 0, 0), column (0.5, 0.866, 0): 60 degrees apart) was
    read with an axial identity direction; now it is refused. Scaled but perpendicular vectors still read."""

    def folder(name: str, orientation) -> Path:
        path = workdir / name
        path.mkdir()
        normal = np.cross(orientation[:3], orientation[3:])
        normal = normal / np.linalg.norm(normal)
        for k in range(3):
            _dicom_slice(path / f"s{k}.dcm", "1.2.826.0.1.3680043.2.1125.9.1", k, normal * 2.0 * k, orientation)
        return path

    skewed = folder("skewed", (1.0, 0.0, 0.0, 0.5, 0.866025, 0.0))
    result = check(child.read(skewed), must_fail=True)
    assert result["message"] == (
        f"could not read {skewed / 's0.dcm'} as DICOM: ImageOrientationPatient [1.0, 0.0, 0.0, 0.5, 0.866025, 0.0] "
        "has row and column directions that are not perpendicular (cosine 0.5); accepted: perpendicular "
        "directions (cosine < 0.001)")
    c, s = np.cos(0.3), np.sin(0.3)
    scaled = check(child.read(folder("scaled", (2 * c, 2 * s, 0.0, -3 * s, 3 * c, 0.0))))
    direction = np.array(scaled["affine"])[:3, :3] / np.array([0.7, 0.5, 2.0])
    # LPS row / column / normal directions as RAS columns (x and y negated)
    np.testing.assert_allclose(direction, [[-c, s, 0], [-s, -c, 0], [0, 0, 1]], atol=1e-4)


def test_dicom_slices_of_another_format_are_named_in_plain_numbers(child, workdir):
    """Before, the spacing in this message was printed as ``(np.float64(0.5), np.float64(0.7))``."""
    folder = workdir / "mixed_spacing"
    folder.mkdir()
    for k in range(3):
        _dicom_slice(folder / f"s{k}.dcm", "1.2.826.0.1.3680043.2.1125.9.1", k, (0.0, 0.0, 2.0 * k), AXIAL,
                     spacing=(0.6, 0.7) if k == 1 else (0.5, 0.7))
    result = check(child.read(folder), must_fail=True)
    assert result["message"] == (
        f"could not read DICOM series 1.2.826.0.1.3680043.2.1125.9.1 in {folder}: it mixes slice formats: s0.dcm "
        "has (rows, columns, samples, bits, signed, spacing) (4, 5, 1, 16, 1, (0.5, 0.7)), s1.dcm has "
        "(4, 5, 1, 16, 1, (0.6, 0.7)); a series must be one volume: read the files separately or split the folder")


def test_dicom_slices_of_mixed_signedness_are_refused(child, workdir):
    """A slice whose PixelRepresentation differs from the first one's. Before, GDCM read every slice with the
    first slice's signedness: raw -5, -4, -3 with the first slice unsigned came back as uint16 65531, 65532,
    65533 (and with the second slice unsigned its 65532 came back as -4)."""
    folder = workdir / "mixed_signedness"
    folder.mkdir()
    for k in range(3):
        path = folder / f"s{k}.dcm"
        _dicom_slice(path, "1.2.826.0.1.3680043.2.1125.9.1", k, (0.0, 0.0, 2.0 * k), AXIAL,
                     pixels=np.full((ROWS, COLUMNS), k - 5))
        if k == 0:
            ds = pydicom.dcmread(path)
            ds.PixelRepresentation = 0
            ds.save_as(path)
    result = check(child.read(folder), must_fail=True)
    assert result["message"] == (
        f"could not read DICOM series 1.2.826.0.1.3680043.2.1125.9.1 in {folder}: it mixes slice formats: s0.dcm "
        "has (rows, columns, samples, bits, signed, spacing) (4, 5, 1, 16, 0, (0.5, 0.7)), s1.dcm has "
        "(4, 5, 1, 16, 1, (0.5, 0.7)); a series must be one volume: read the files separately or split the folder")
