"""The Segment widget runs a MONAI bundle folder (its network, pre- and post-processing) on a layer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A tiny UNet3d bundle (random weights: no models/model.pt), written by a subprocess: this process
    stays torch-free."""
    folder = tmp_path_factory.mktemp("bundles") / "tiny_unet"
    done = subprocess.run(
        [sys.executable, "-m", "medsegkit", "bundle", "init", "UNet3d", str(folder), "--set", "channels=[4,8]",
         "--set", "strides=[2]", "--roi", "16", "16", "16"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def _choose_bundle(widget, layer, bundle) -> None:
    widget.image.value = layer
    widget.checkpoint.line_edit.value = ""
    widget.bundle.line_edit.value = str(bundle)


def test_bundle_folder_runs_on_a_layer(segment_widget, tiny_bundle, errors, wait_for_run):
    viewer, widget = segment_widget
    volume = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    layer = viewer.add_image(volume, name="vol", scale=(2.0, 1.5, 1.0), translate=(4.0, -3.0, 7.5))
    _choose_bundle(widget, layer, tiny_bundle)
    job, _, _ = widget.build_job()
    assert job["action"] == "bundle" and job["label"] == "tiny_unet"
    n_layers = len(viewer.layers)
    widget.run()
    wait_for_run(widget, timeout_s=180)
    assert errors == []
    assert len(viewer.layers) == n_layers + 1
    labels = viewer.layers["vol [tiny_unet]"]
    assert labels.data.shape == (20, 24, 16) and labels.data.dtype.kind in "iu"
    channel_def = json.loads((tiny_bundle / "configs" / "metadata.json").read_text())[
        "network_data_format"]["outputs"]["pred"]["channel_def"]
    assert set(np.unique(labels.data)) <= set(range(len(channel_def)))
    np.testing.assert_allclose(labels.scale, layer.scale)
    np.testing.assert_allclose(labels.translate, layer.translate)
    np.testing.assert_allclose(labels.affine.affine_matrix, layer.affine.affine_matrix)
    assert labels.metadata["medsegkit"]["class_names"] == [channel_def[k] for k in sorted(channel_def, key=int)]
    assert widget.status.value.startswith("done in")
    heavy = [m for m in ("torch", "monai") if m in sys.modules]
    assert heavy == [], f"napari's process imported {heavy}"


def test_folder_that_is_not_a_bundle_is_an_error(segment_widget, tmp_path, errors, wait_for_run):
    viewer, widget = segment_widget
    layer = viewer.add_image(np.zeros((8, 8, 8), np.float32), name="empty")
    (tmp_path / "configs").mkdir()  # a folder, but no configs/metadata.json
    _choose_bundle(widget, layer, tmp_path)
    n_layers = len(viewer.layers)
    widget.run()
    wait_for_run(widget)
    assert len(viewer.layers) == n_layers
    assert len(errors) == 1
    assert errors[0].startswith("segmentation failed: FileNotFoundError:")
    assert f"{tmp_path} is not a MONAI bundle folder: configs/metadata.json is missing" in errors[0]
    assert "\n" not in errors[0]


def test_missing_bundle_folder_and_probabilities_are_refused(segment_widget, tiny_bundle, tmp_path, errors):
    viewer, widget = segment_widget
    layer = viewer.add_image(np.zeros((8, 8, 8), np.float32), name="empty")
    _choose_bundle(widget, layer, tmp_path / "nowhere")
    widget.run()
    assert not widget.running
    assert errors == [f"bundle folder {tmp_path / 'nowhere'} does not exist or is not a folder"]
    _choose_bundle(widget, layer, tiny_bundle)
    widget.output.value = "probabilities"
    widget.run()
    assert not widget.running and len(errors) == 2 and "choose output 'labels'" in errors[1]
