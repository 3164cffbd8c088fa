"""``medsegkit predict``: labels on the input grid; every bad input → one line, exit 2, no output file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegkit import create_model
from medsegkit.cli import main
from medsegkit.io import read_image
from medsegkit.weights import save_checkpoint

SPEC = {"orientation": "RAS", "spacing": None, "intensity": {"name": "zscore"}}
LSA = np.array([[-2.0, 0, 0, 100], [0, 0, 3.0, -50], [0, 2.0, 0, -80], [0, 0, 0, 1]])  # L, S, A axes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cli")
    torch.manual_seed(0)
    model = create_model("UNet3d", channels=(4, 8, 16), strides=(2, 2))
    checkpoint = save_checkpoint(model, root / "unet3d.safetensors", metadata={"preprocessing": SPEC})
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((20, 18, 16)).astype(np.float32)
    image = root / "t1.nii.gz"
    nib.save(nib.Nifti1Image(volume, LSA), image)
    return {"root": root, "model": model, "checkpoint": checkpoint, "image": image}


def _error(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_predict_with_checkpoint_alone_writes_labels_on_input_grid(files, tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    assert main(["predict", str(files["checkpoint"]), str(files["image"]), "-o", str(out), "--roi", "16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    result, source = read_image(out), read_image(files["image"])
    assert result.spatial_shape == source.spatial_shape and result.dtype == np.uint8
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    from medsegkit.inference import segment

    expected = segment(files["model"].eval(), source, preprocessing=SPEC, roi_size=(16, 16, 16))
    np.testing.assert_array_equal(result.array, expected.array)


def test_predict_name_with_checkpoint_and_options(files, tmp_path, capsys):
    out = tmp_path / "labels.nrrd"
    argv = ["predict", "UNet3d", str(files["image"]), "-o", str(out), "--checkpoint", str(files["checkpoint"]),
            "--roi", "16", "16", "16", "--overlap", "0.25", "--tta", "--fast", "--largest-component"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "fast path on cpu: BatchNorm folding" in err
    assert read_image(out).spatial_shape == (20, 18, 16)
    # an existing output is replaced only with --overwrite
    assert main(argv + ["--overwrite"]) == 0


def test_tta_mirrors_left_right_for_a_reorienting_checkpoint(files, tmp_path):
    """The checkpoint's preprocessing reorients to RAS, so --tta mirrors the left-right axis only."""
    out = tmp_path / "tta.nii.gz"
    assert main(["predict", str(files["checkpoint"]), str(files["image"]), "-o", str(out), "--roi", "16",
                 "--tta", "--quiet"]) == 0
    from medsegkit.inference import segment

    source = read_image(files["image"])
    expected = segment(files["model"].eval(), source, preprocessing=SPEC, roi_size=(16, 16, 16), tta_flips=(0,))
    np.testing.assert_array_equal(read_image(out).array, expected.array)


def test_real_itk_head(files, tmp_path, capsys):
    head = Path(__file__).resolve().parents[2] / "src" / "medsegkit" / "sample_data" / "itk_head_t1.nii.gz"
    out = tmp_path / "head_labels.nii.gz"
    assert main(["predict", str(files["checkpoint"]), str(head), "-o", str(out), "--roi", "32", "--quiet"]) == 0
    result, source = read_image(out), read_image(head)
    assert result.spatial_shape == source.spatial_shape == (128, 128, 62)
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    assert result.orientation == "LSA"


def _bad_inputs(root: Path, files: dict) -> dict[str, tuple[list[str], str]]:
    """name -> (argv without the leading 'predict', expected message part)."""
    ckpt, image = str(files["checkpoint"]), str(files["image"])
    two_d = root / "slice2d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), two_d)
    nan = root / "nan.nii.gz"
    volume = np.zeros((16, 16, 16), np.float32)
    volume[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), nan)
    empty = root / "empty.nii.gz"
    empty.write_bytes(b"")
    not_gzip = root / "corrupt.nii.gz"
    not_gzip.write_bytes(b"this is not gzip data at all")
    truncated = root / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(b"\x00" * 100))
    unknown_ext = root / "scan.xyz"
    unknown_ext.write_bytes(b"data")
    no_dicom = root / "folder_without_dicom"
    no_dicom.mkdir(exist_ok=True)
    (no_dicom / "notes.txt").write_text("no DICOM here")
    no_images = root / "folder_without_images"
    no_images.mkdir(exist_ok=True)
    (no_images / "notes.txt").write_text("scans go here")
    existing = root / "existing.nii.gz"
    existing.write_bytes(b"keep me")
    other_arch = save_checkpoint(create_model("UNet2d", channels=(4, 8), strides=(2,)), root / "unet2d.safetensors",
                                 overwrite=True)  # the shared folder is filled again for each case
    foreign = root / "foreign_state_dict.pt"
    torch.save(create_model("UNet2d", channels=(4, 8), strides=(2,)).state_dict(), foreign)
    pickled = root / "pickled_code.pt"
    torch.save({"state_dict": files["model"].state_dict(), "trainer": _PickledThing()}, pickled)
    empty_ckpt = root / "empty.pt"
    empty_ckpt.write_bytes(b"")
    second = root / "t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 16), np.float32), LSA), second)
    out = str(root / "out.nii.gz")
    return {
        "wrong dims": ([ckpt, str(two_d), "-o", out], "image is 2D (shape (20, 20)) but UNet is a 3D model"),
        "NaN": ([ckpt, str(nan), "-o", out], "NaN or Inf"),
        "empty file": ([ckpt, str(empty), "-o", out], "is empty (0 bytes)"),
        "corrupt gzip": ([ckpt, str(not_gzip), "-o", out], "is not gzip-compressed"),
        "truncated NIfTI": ([ckpt, str(truncated), "-o", out], "truncated.nii.gz"),
        "unknown extension": ([ckpt, str(unknown_ext), "-o", out], "unknown image format"),
        "folder without DICOM": ([ckpt, str(no_dicom), "-o", out], "DICOM"),
        "missing input": ([ckpt, str(root / "missing.nii.gz"), "-o", out], "no such file"),
        "folder without images": (  # until 2026-12-08: "cannot write 'results': the output must end in .nii.gz, ..."
            [ckpt, str(no_images), "-o", str(root / "results")],
            f"folder {no_images} holds no image file (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) to segment into the "
            f"folder {root / 'results'}; for a DICOM series folder, -o names one output file ending in .nii.gz"),
        "existing output": ([ckpt, image, "-o", str(existing)], "exists; pass --overwrite"),
        "output is the input": ([ckpt, image, "-o", image, "--overwrite"], "is the input image"),
        "unknown output extension": ([ckpt, image, "-o", str(root / "labels.xyz")], "cannot write 'labels.xyz'"),
        "missing output folder": ([ckpt, image, "-o", str(root / "nowhere" / "l.nii.gz")], "does not exist"),
        "unknown model": (["UNet9d", image, "-o", out], "unknown model name 'UNet9d'"),
        "random weights": (["UNet3d", image, "-o", out], "no registered weights; refusing"),
        "checkpoint for another architecture": (
            ["UNet3d", image, "-o", out, "--checkpoint", str(other_arch)], "was made for UNet2d, not UNet3d"),
        "foreign weights that do not fit": (
            ["UNet3d", image, "-o", out, "--checkpoint", str(foreign)], "does not fit this model"),
        "pickled checkpoint with code": ([str(pickled), image, "-o", out], "pickled Python objects"),
        "empty checkpoint": ([str(empty_ckpt), image, "-o", out], "is empty (0 bytes)"),
        "missing checkpoint": ([str(root / "nope.safetensors"), image, "-o", out], "does not exist"),
        "wrong channel count": ([ckpt, image, str(second), "-o", out], "image has 2 channel(s)"),
        "overlap out of range": ([ckpt, image, "-o", out, "--overlap", "1.5"], "--overlap must be in [0, 1)"),
        "roi of wrong length": ([ckpt, image, "-o", out, "--roi", "16", "16"], "--roi takes 1 or 3 sizes"),
        "unknown option value": ([ckpt, image, "-o", out, "--preprocessing", "pet"], "unknown preprocessing preset"),
    }


class _PickledThing:
    """Any class instance: unpickling it would run code, so the checkpoint must be refused."""


CASES = [
    "wrong dims", "NaN", "empty file", "corrupt gzip", "truncated NIfTI", "unknown extension", "folder without DICOM",
    "missing input", "folder without images", "existing output", "output is the input", "unknown output extension", "missing output folder",
    "unknown model", "random weights", "checkpoint for another architecture", "foreign weights that do not fit",
    "pickled checkpoint with code", "empty checkpoint", "missing checkpoint", "wrong channel count",
    "overlap out of range", "roi of wrong length", "unknown option value",
]


def test_every_bad_input_is_tested(files):
    assert sorted(_bad_inputs(files["root"], files)) == sorted(CASES) and len(CASES) >= 15


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2_no_output(files, case, capsys):
    root = files["root"]
    argv, message = _bad_inputs(root, files)[case]
    before = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert main(["predict", *argv, "--quiet"]) == 2
    line = _error(capsys)
    assert line.startswith("medsegkit predict: error: ") and message in line, line
    after = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert after == before  # nothing written, nothing changed (no output, no partial file)


@pytest.mark.slow
def test_bench_command_prints_table(capsys):
    assert main(["bench", "--sizes", "20", "--roi", "16", "--no-rss"]) == 0
    out = capsys.readouterr().out
    assert "| volume | windows | MONAI s | predict s | ratio |" in out and "| 20^3 |" in out
    assert "max |logits predict - MONAI| at 20^3:" in out


def test_bench_bad_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sizes", "twenty"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'twenty'" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "message"), [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--roi", "-4"], "--roi must be >= 1, got -4"),
    (["--roi", "16", "16"], "--roi takes 1 or 3 sizes, got 2"),
    (["--sizes", "0"], "--sizes must be >= 1, got 0"),
    (["--sw-batch-size", "0"], "--sw-batch-size must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
])
def test_bench_bad_numbers_are_one_line_exit_2_before_any_work(option, message, capsys):
    """Before 2026-12-08 ``--threads 0`` and ``--roi -4`` ended in a RuntimeError traceback (exit 1) and the others
    built the model and failed on an unrelated size message."""
    assert main(["bench", "--sizes", "32", "--roi", "16", "--no-rss", *option]) == 2
    assert _error(capsys) == f"medsegkit bench: error: {message}"


def test_predict_folder_of_images(tmp_path, capsys):
    """`medsegkit predict CKPT INPUT_DIR -o OUTPUT_DIR`: one labelled output per input, reruns skip them."""
    import numpy as np

    from medsegkit import create_model, save_checkpoint
    from medsegkit.io import read_image, write_image

    ckpt = save_checkpoint(create_model("UNet3d", channels=(4, 8), strides=(2,)), tmp_path / "m.safetensors")
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.nii.gz", "b.nrrd"):
        write_image(rng.random((12, 10, 8)).astype(np.float32), inputs / name)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(inputs), "-o", str(out), "--quiet"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_seg.nii.gz", "b_seg.nrrd"]
    assert read_image(out / "a_seg.nii.gz").array.shape == (12, 10, 8)
    before = (out / "a_seg.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(inputs), "-o", str(out), "--quiet"]) == 0
    assert (out / "a_seg.nii.gz").stat().st_mtime_ns == before  # existing outputs are skipped
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("option", "message"), [
    (["--min-size", "-1"], "--min-size must be >= 0 voxels, got -1"),
    (["--output-kind", "probabilities", "--fill-holes"],
     "--largest-component, --fill-holes and --min-size clean up labels; they do not apply to --output-kind probabilities"),
])
def test_folder_predict_refuses_clean_up_options_before_creating_the_output_folder(tmp_path, capsys, option, message):
    """Before 2026-12-08 these were found by ``segment`` on the first image: the output folder had been created
    (left empty) and the model loaded, and the message named the Python arguments (min_size, output='labels')."""
    from medsegkit import create_model, save_checkpoint
    from medsegkit.io import write_image

    ckpt = save_checkpoint(create_model("UNet3d", channels=(4, 8), strides=(2,)), tmp_path / "m.safetensors")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(np.random.default_rng(0).random((12, 10, 8)).astype(np.float32), inputs / "a.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(inputs), "-o", str(out), "--quiet", *option]) == 2
    assert _error(capsys) == f"medsegkit predict: error: {message}"
    assert not out.exists()


def test_two_inputs_that_would_write_one_result_are_refused_before_any_work(tmp_path, capsys):
    """``a.mhd`` and ``a.mha`` both give ``a_seg.mha``: before 2026-12-07 the second replaced the first's result
    (``--overwrite``) or failed after the first was computed."""
    import numpy as np
    import SimpleITK as sitk

    from medsegkit import create_model, save_checkpoint

    ckpt = save_checkpoint(create_model("UNet3d", channels=(4, 8), strides=(2,)), tmp_path / "m.safetensors")
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = sitk.GetImageFromArray(np.random.default_rng(0).random((8, 10, 12)).astype(np.float32))
    for name in ("a.mhd", "a.mha"):
        sitk.WriteImage(volume, str(inputs / name))
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(inputs), "-o", str(out), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.mha and a.mhd would both write a_seg.mha" in err[0], err
    assert not out.exists() or not any(out.iterdir())
