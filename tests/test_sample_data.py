"""The shipped sample volumes: documented geometry and labels, and reproducible from their sources."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsegkit.data import MNI_CLASS_NAMES, MNI_LABEL_COLORS, SAMPLE_FILES, sample_path
from medsegkit.io import read_image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, shape, spacing, orientation, dtype",
    [
        ("mni152_t1", (99, 117, 95), (2.0, 2.0, 2.0), "RAS", np.uint8),
        ("mni152_tissue", (99, 117, 95), (2.0, 2.0, 2.0), "RAS", np.uint8),
        ("itk_head_t1", (128, 128, 62), (2.0, 2.0, 3.0), "LSA", np.int16),
        ("itk_head_brain_mask", (128, 128, 62), (2.0, 2.0, 3.0), "LSA", np.uint8),
    ],
)
def test_sample_geometry(name, shape, spacing, orientation, dtype):
    image = read_image(sample_path(name))
    assert image.spatial_shape == shape
    assert np.allclose(image.spacing, spacing)
    assert "".join(nib.aff2axcodes(image.affine)) == orientation
    assert np.asarray(nib.load(sample_path(name)).dataobj).dtype == dtype


def test_mni_grids_match_and_labels():
    t1 = read_image(sample_path("mni152_t1"))
    labels = read_image(sample_path("mni152_tissue"))
    assert np.allclose(t1.affine, labels.affine)
    # 2 mm block centres: origin moved +0.5 mm from the 1 mm template's (-98, -134, -72)
    assert np.allclose(t1.affine[:3, 3], [-97.5, -133.5, -71.5])
    values = np.asarray(labels.array)
    assert set(np.unique(values)) == {0, 1, 2, 3}
    fractions = np.bincount(values.ravel()) / values.size * 100
    assert np.allclose(fractions, [78.8, 1.5, 12.6, 7.2], atol=0.05)
    # tissue classes are ordered by T1 brightness (CSF dark, WM bright), as DATA.md measured
    means = [np.asarray(t1.array)[values == k].mean() for k in (1, 2, 3)]
    assert np.allclose(means, [99, 166, 214], atol=2.5)
    assert len(MNI_CLASS_NAMES) == len(MNI_LABEL_COLORS) == 4


def test_itk_mask_is_binary_brain_inside_head():
    head = np.asarray(read_image(sample_path("itk_head_t1")).array)
    mask = np.asarray(read_image(sample_path("itk_head_brain_mask")).array)
    assert set(np.unique(mask)) == {0, 1}
    assert 0.05 < mask.mean() < 0.5
    assert head[mask == 1].mean() > head[mask == 0].mean()


def test_unknown_sample_name():
    with pytest.raises(KeyError, match="available: mni152_t1"):
        sample_path("colin27")


def _script():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_reproduces_shipped_files(tmp_path):
    try:
        importlib.metadata.distribution("nilearn")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nilearn is not installed: the MNI152 source files ship in its wheel (pip install nilearn)")
    script = _script()
    if not script.ITK_T1.exists():
        pytest.skip("insighttoolkit5-examples is not installed (apt-get install insighttoolkit5-examples)")
    assert script.main(["--out", str(tmp_path)]) == 0
    assert set(script.OUTPUT_NAMES.values()) == set(SAMPLE_FILES.values())
    for name in SAMPLE_FILES.values():
        made, shipped = nib.load(tmp_path / name), nib.load(REPO / "sample_data" / name)
        a, b = np.asarray(made.dataobj), np.asarray(shipped.dataobj)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), name
        assert np.array_equal(made.affine, shipped.affine), name
