"""Damaged images through every command that reads images: one line on stderr, exit code 2, nothing written.

The inputs are the classes the reader fuzzing (tests/io/test_fuzz_readers.py) found; here they go through
``medsegkit predict`` and ``medsegkit evaluate`` (in process), and once through the installed console
script in a child process, so the real exit code is checked too.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsegkit.cli import main


def _nifti(**fields) -> bytes:
    data = bytearray(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
    offsets = {"dim": (40, "<8h"), "datatype": (70, "<h"), "srow": (280, "<12f")}
    for name, values in fields.items():
        offset, fmt = offsets[name]
        struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def _damaged(root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (path, part of the expected message)}."""
    files = {
        "huge.nii.gz": (gzip.compress(_nifti(dim=[3, 10000, 10000, 10000, 1, 1, 1, 1])),
                        "claims (10000, 10000, 10000) voxels of int16"),
        "nan_affine.nii": (_nifti(srow=[float("nan")] * 12), "is not finite"),
        "datatype.nii": (_nifti(datatype=[1234]), "could not read"),
        "huge.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10000 10000 10000\nencoding: raw\n"
                      b"endian: little\n\nabcd", "10000 x 10000 x 10000 image (2000000000000 bytes)"),
        "nan_spacing.nrrd": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 1 1 1\nspacings: 1 nan 1\n"
                             b"encoding: raw\nendian: little\n\nab", "spacing must be finite and > 0"),
        "zero_spacing.mha": (b"NDims = 3\nDimSize = 1 1 1\nElementSpacing = 0 1 1\nElementType = MET_SHORT\n"
                             b"ElementDataFile = LOCAL\nab", "spacing must be finite and > 0"),
        "damaged_zlib.mha": (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nCompressedData = True\n"
                             b"ElementDataFile = LOCAL\nx\x9c" + bytes(range(40, 60)),
                             "compressed voxel data are damaged"),
        "device.nhdr": (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\nendian: little\n"
                        b"data file: /dev/zero\n\n", "is not a regular file"),
    }
    cases = {}
    for name, (data, message) in files.items():
        (root / name).write_bytes(data)
        cases[name] = (root / name, message)
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    duplicated = root / "duplicated_slices"
    duplicated.mkdir()
    for name in ("a.dcm", "b.dcm"):  # the same slice twice: two slices at one position
        shutil.copy(get_testdata_file("CT_small.dcm"), duplicated / name)
    cases["duplicated DICOM slices"] = (duplicated, "two slices are at the same position")
    assert pydicom is not None
    return cases


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _damaged(tmp_path_factory.mktemp("damaged"))


CASES = ["huge.nii.gz", "nan_affine.nii", "datatype.nii", "huge.nrrd", "nan_spacing.nrrd", "zero_spacing.mha",
         "damaged_zlib.mha", "device.nhdr", "duplicated DICOM slices"]


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"medsegkit {command}: error: "), lines[0]
    return lines[0]


def test_every_case_is_listed(damaged):
    assert sorted(damaged) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_predict_damaged_image_exit_2(damaged, case, tmp_path, capsys):
    path, message = damaged[case]
    out = tmp_path / "labels.nii.gz"
    # the image is read before the model is looked up, so any model name shows the reading error
    assert main(["predict", "UNet3d", str(path), "-o", str(out), "--quiet"]) == 2
    line = _one_error_line(capsys, "predict")
    assert message in line and str(path) in line, line
    assert not out.exists()


@pytest.mark.parametrize("case", CASES)
def test_evaluate_damaged_image_exit_2(damaged, case, tmp_path, capsys):
    path, message = damaged[case]
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4)), good)
    for argv in (["evaluate", str(path), str(good)], ["evaluate", str(good), str(path)]):
        assert main(argv) == 2
        line = _one_error_line(capsys, "evaluate")
        assert message in line, line


def test_console_script_exit_code_2(damaged, tmp_path):
    """The installed entry point, in its own process: exit status 2 and one line, no traceback."""
    path, message = damaged["huge.nii.gz"]
    script = Path(sys.executable).with_name("medsegkit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "medsegkit"]
    result = subprocess.run([*command, "predict", "UNet3d", str(path), "-o", str(tmp_path / "l.nii.gz"),
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_zlib_bound_is_what_gzip_can_reach():
    """The header-size bound for compressed data (1032x) is deflate's real limit, not a guess."""
    from medsegkit.io.nifti import GZIP_MAX_RATIO

    zeros = bytes(50 << 20)
    assert len(zeros) / len(zlib.compress(zeros, 9)) < GZIP_MAX_RATIO
    assert len(zeros) / len(gzip.compress(zeros, 9)) < GZIP_MAX_RATIO
