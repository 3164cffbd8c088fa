"""medsegkit.show (three planes, world aspect) and medsegkit.view (napari layers with scale kept)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import medsegkit
from medsegkit.data import sample_path
from medsegkit.io import Image, read_image
from medsegkit.io.geometry import layer_geometry


def test_show_draws_three_planes_with_world_aspect_on_the_lsa_head():
    image = read_image(sample_path("itk_head_t1"))
    labels = read_image(sample_path("itk_head_brain_mask"))
    assert image.orientation == "LSA" and image.spatial_shape == (128, 128, 62)
    fig = medsegkit.show(image, labels, class_names=["background", "brain"], title="ITK head")
    axes = fig.axes
    assert [ax.get_title().split()[0] for ax in axes] == ["axial", "coronal", "sagittal"]
    # LSA (2, 2, 3) mm -> closest RAS: x = i (2 mm, 128), y = k (3 mm, 62), z = j (2 mm, 128)
    shapes = [ax.images[0].get_array().shape for ax in axes]
    assert shapes == [(62, 128), (128, 128), (128, 62)]  # (rows = vertical world axis, columns)
    assert [ax.get_aspect() for ax in axes] == pytest.approx([1.5, 1.0, 2 / 3])
    overlay = axes[0].images[1].get_array()
    assert np.ma.isMaskedArray(overlay) and overlay.mask.any() and (overlay.compressed() == 1).all()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["brain"]
    matplotlib.pyplot.close(fig)


def test_show_crosses_the_planes_at_the_labels_centre_and_checks_grids():
    image = np.zeros((20, 16, 12), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:14, 2:6, 8:10] = 2
    fig = medsegkit.show(image, labels)
    assert [ax.get_title() for ax in fig.axes] == ["axial z (k=8)", "coronal y (j=4)", "sagittal x (i=12)"]
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="must lie on the image's grid"):
        medsegkit.show(image, labels[:-1])
    with pytest.raises(ValueError, match="3D volume"):
        medsegkit.show(np.zeros((4, 4)))


def test_view_geometry_keeps_scale_and_origin():
    affine = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 20], [0, 0, 1.5, 5], [0, 0, 0, 1]])
    assert layer_geometry(affine, 3) == {"scale": (1.5, 3.0, 2.0), "translate": (5.0, 20.0, -10.0)}
    angle = np.deg2rad(10)
    oblique = affine.copy()
    oblique[:2, :2] = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([2.0, 3.0])
    geometry = layer_geometry(oblique, 3)
    assert geometry["scale"] == pytest.approx((1.5, 3.0, 2.0))
    # napari's data -> world: affine @ (scale * voxel + translate) must give the image's world point (z, y, x)
    voxel = np.array([3.0, 5.0, 7.0])  # (i, j, k)
    zyx = geometry["affine"][:3, :3] @ (np.array(geometry["scale"]) * voxel[::-1] + geometry["translate"])
    np.testing.assert_allclose(zyx, (oblique[:3, :3] @ voxel + oblique[:3, 3])[::-1], atol=1e-9)


class _RecordingViewer:
    def __init__(self):
        self.layers = []

    def add_image(self, data, **kwargs):
        self.layers.append(("image", data, kwargs))

    def add_labels(self, data, **kwargs):
        self.layers.append(("labels", data, kwargs))


def test_view_adds_image_and_labels_with_scale():
    pytest.importorskip("napari")
    image = Image(np.zeros((6, 5, 4), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1, 2, 3] = 1
    viewer = medsegkit.view(image, labels, viewer=_RecordingViewer())
    (kind_i, data_i, kw_i), (kind_l, data_l, kw_l) = viewer.layers
    assert (kind_i, kind_l) == ("image", "labels")
    assert data_i.shape == data_l.shape == (4, 5, 6)  # (k, j, i)
    assert kw_i["scale"] == kw_l["scale"] == (3.0, 2.0, 2.0)
    assert data_l[3, 2, 1] == 1


@pytest.mark.parametrize(("labels", "message"), [
    (np.full((6, 6, 6), 1.5), "labels must be an integer label map"),  # before: drawn as class 1
    (np.full((6, 6, 6), np.nan), "labels must be an integer label map"),  # before: 'cannot convert float NaN'
    (-np.ones((6, 6, 6), np.int8), "labels must be non-negative class indices"),
])
def test_show_refuses_labels_that_are_not_class_indices(labels, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        medsegkit.show(np.zeros((6, 6, 6), np.float32), labels)


def test_show_draws_huge_label_values_with_their_own_colours():
    labels = np.zeros((6, 6, 6), np.int64)
    labels[1:3, 1:3, 1:3] = 2**31  # before: MemoryError, a colour table of 2**31 + 1 entries (64 GiB)
    labels[3:5, 3:5, 3:5] = 2
    colors = {2: (255, 0, 0)}
    fig = medsegkit.show(np.zeros((6, 6, 6), np.float32), labels,
                         colors=[colors.get(v, (0, 0, 255)) for v in range(3)])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["2", str(2**31)]
    patches = legend.get_patches()
    assert tuple(patches[0].get_facecolor()) == (1.0, 0.0, 0.0, 1.0)  # label 2 keeps its colour
    assert tuple(patches[1].get_facecolor()) == pytest.approx(matplotlib.colormaps["tab10"]((2**31 - 1) % 10))
    matplotlib.pyplot.close(fig)
