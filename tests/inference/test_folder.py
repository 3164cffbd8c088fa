"""predict_folder: rank shards cover the folder once, existing results are skipped, no partial files."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from medsegkit import create_model
from medsegkit.inference.folder import list_images, output_path_for, predict_folder
from medsegkit.io import Image, read_image, write_image

# the module (``medsegkit.inference.segment`` the attribute is the function of the same name)
folder_module = importlib.import_module("medsegkit.inference.folder")  # predict_folder calls its `segment`


@pytest.fixture
def images(tmp_path):
    """Three 16³ images in three formats, plus files that are not images."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.nii.gz", "b.nrrd", "c.mha"):
        write_image(Image(rng.random((16, 16, 16), dtype=np.float32), np.eye(4)), src / name)
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.nii.gz").write_bytes(b"")
    return src


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("UNet3d", out_channels=3, channels=(4, 8), strides=(2,)).eval()


def _run(model, src, out, **kw):
    return predict_folder(model, src, out, roi_size=(16, 16, 16), **kw)


def test_lists_images_sorted_and_names_outputs(images, tmp_path):
    assert [p.name for p in list_images(images)] == ["a.nii.gz", "b.nrrd", "c.mha"]
    assert output_path_for(images / "a.nii.gz", tmp_path) == tmp_path / "a_seg.nii.gz"
    assert output_path_for("x/scan.MHD", tmp_path, "_mask") == tmp_path / "scan_mask.mha"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(images / "a.nii.gz")


def test_two_ranks_write_disjoint_halves_covering_all(images, model, tmp_path):
    out = tmp_path / "out"
    rank0 = _run(model, images, out, rank=0, world_size=2)
    rank1 = _run(model, images, out, rank=1, world_size=2)
    assert [p.name for p in rank0] == ["a_seg.nii.gz", "c_seg.mha"]
    assert [p.name for p in rank1] == ["b_seg.nrrd"]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
    for path in rank0 + rank1:
        seg = read_image(path)
        assert seg.spatial_shape == (16, 16, 16)
        assert np.issubdtype(seg.array.dtype, np.integer) and set(np.unique(seg.array)) <= {0, 1, 2}


def test_rank_from_torchrun_environment(images, model, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert [p.name for p in _run(model, images, tmp_path / "out")] == ["b_seg.nrrd"]


def test_existing_outputs_are_skipped_unless_overwrite(images, model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = write_image(Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), out / "b_seg.nrrd")
    lines: list[str] = []
    written = _run(model, images, out, log=lines.append)
    assert [p.name for p in written] == ["a_seg.nii.gz", "c_seg.mha"]
    assert read_image(marker).spatial_shape == (2, 2, 2)  # untouched
    assert any("skipped" in line and "b_seg.nrrd" in line for line in lines)
    assert _run(model, images, out) == []  # everything done: nothing to do, model not even run
    assert [p.name for p in _run(model, images, out, overwrite=True)] == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
    assert read_image(marker).spatial_shape == (16, 16, 16)


def test_interrupted_run_leaves_no_partial_file_and_resumes(images, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_segment = folder_module.segment
    calls = []

    def failing(model, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("killed while segmenting")
        return real_segment(model, path, **kw)

    monkeypatch.setattr(folder_module, "segment", failing)
    with pytest.raises(RuntimeError, match="killed"):
        _run(model, images, out)
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz"]  # complete first result, no temp files
    assert read_image(out / "a_seg.nii.gz").spatial_shape == (16, 16, 16)

    # a failure inside the write itself leaves nothing either (write_image's temp file + rename)
    def broken_write(image, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(folder_module, "segment", real_segment)
    monkeypatch.setattr("medsegkit.io.nifti.write_nifti", broken_write)
    monkeypatch.setattr("medsegkit.io.sitk.write_sitk", lambda image, path, fmt: broken_write(image, path))
    with pytest.raises(OSError, match="disk full"):
        _run(model, images, out)
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz"]

    monkeypatch.undo()
    assert [p.name for p in _run(model, images, out)] == ["b_seg.nrrd", "c_seg.mha"]  # continues where it stopped


def test_refuses_to_replace_inputs(images, model):
    with pytest.raises(ValueError, match=r"a.nii.gz would replace it \(the output folder is the input folder"):
        predict_folder(model, images, images, suffix="")


def test_results_next_to_their_inputs_are_not_read_as_inputs_on_a_rerun(images, model):
    """With the output folder = the input folder, a rerun listed case_seg.nii.gz as an image and segmented
    it into case_seg_seg.nii.gz (a label map segmented as a scan); now only the scans are inputs."""
    written = _run(model, images, images)
    assert [p.name for p in written] == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
    assert _run(model, images, images) == []  # nothing left to do
    again = _run(model, images, images, overwrite=True)
    assert [p.name for p in again] == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
    assert sorted(p.name for p in images.iterdir() if "_seg" in p.name) == ["a_seg.nii.gz", "b_seg.nrrd", "c_seg.mha"]
