"""Instance label maps: tiling + merging across tile borders, slice linking in 3D, a trained Mask R-CNN.

The fast tests use a transparent stand-in detector (connected components of bright pixels, in
torchvision's output format) so that the expected label maps are known exactly; the slow test trains a
small Mask R-CNN on synthetic shapes and checks what it finds on a 2D image and a 3D volume.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsegkit.errors import Cancelled
from medsegkit.inference import predict
from medsegkit.inference.instance import predict_instances
from medsegkit.inference.windows import window_slices


class ComponentDetector(torch.nn.Module):
    """Detects each connected component of pixels > 0.5 (channel 0) with score = its mean intensity."""

    medsegkit_task = "instance"
    spatial_dims = 2
    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[list[tuple[int, ...]]] = []
        self.detections = 0

    def forward(self, images):
        self.calls.append([tuple(i.shape) for i in images])
        results = []
        for image in images:
            assert image.shape[0] == 3 and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
            plane = image[0].numpy()
            labels, count = ndimage.label(plane > 0.5)
            self.detections += count
            masks = (
                np.stack([labels == i for i in range(1, count + 1)])
                if count
                else np.zeros((0, *plane.shape), bool)
            )
            scores = [float(plane[m].mean()) for m in masks]
            boxes = [
                [
                    np.flatnonzero(m.any(0))[0],
                    np.flatnonzero(m.any(1))[0],
                    np.flatnonzero(m.any(0))[-1] + 1,
                    np.flatnonzero(m.any(1))[-1] + 1,
                ]
                for m in masks
            ]
            results.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.ones(count, dtype=torch.int64),
                    "scores": torch.tensor(scores, dtype=torch.float32),
                    "masks": torch.from_numpy(masks[:, None].astype(np.float32)),
                }
            )
        return results


def _assert_same_partition(labels: np.ndarray, truth: np.ndarray) -> None:
    """Same instances (up to renumbering): a one-to-one map between label ids."""
    assert labels.max() == truth.max() == len(np.unique(truth)) - 1
    pairs = set(zip(labels.ravel().tolist(), truth.ravel().tolist()))
    assert len(pairs) == truth.max() + 1  # background<->background and one pair per instance
    assert all((a == 0) == (b == 0) for a, b in pairs)


def _starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis on the engine's grid (MONAI's), tiles clipped to the image."""
    slices, padded, _ = window_slices((size,), (min(tile, size),), overlap)
    assert padded == (size,)  # no padding: a tile is never larger than the image
    return sorted({s[0].start for s in slices})


def test_tiles_are_the_window_grid_and_cover_the_image():
    assert _starts(100, 48, 0.25) == [0, 36, 52]
    assert _starts(30, 48, 0.25) == [0]
    for size, tile, overlap in [(257, 64, 0.5), (64, 64, 0.0), (1000, 333, 0.1)]:
        starts = _starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile for a, b in zip(starts, starts[1:]))


def test_2d_image_labels_and_one_channel_repeat(caplog):
    truth = np.zeros((40, 50), np.int32)
    truth[2:10, 3:12] = 1
    truth[20:35, 5:9] = 2
    truth[15:30, 30:48] = 3
    image = np.where(truth > 0, 900.0, 100.0)  # any intensity range: scaled to [0, 1]
    model = ComponentDetector()
    with caplog.at_level("INFO", logger="medsegkit.inference"):
        labels = predict_instances(model, image)
    assert labels.dtype == np.uint16 and labels.shape == (40, 50)
    _assert_same_partition(labels, truth)
    assert "repeating the single image channel" in caplog.text
    assert model.calls == [[(3, 40, 50)]]


def test_score_and_mask_thresholds():
    image = np.zeros((30, 30), np.float32)
    image[2:8, 2:8] = 0.9
    image[15:25, 15:25] = 0.6
    model = ComponentDetector()
    assert predict_instances(model, image, score_threshold=0.5).max() == 2
    kept = predict_instances(model, image, score_threshold=0.7)
    assert kept.max() == 1 and kept[4, 4] == 1 and kept[20, 20] == 0
    with pytest.raises(ValueError, match="score_threshold must be in"):
        predict_instances(model, image, score_threshold=1.5)


def test_tiles_merge_objects_crossing_tile_borders():
    truth = np.zeros((100, 100), np.int32)
    truth[30:45, 40:60] = 1  # crosses the tile border at 48 (tiles start 0, 36, 52)
    truth[5:95, 70:78] = 2  # spans every tile row
    truth[60:70, 10:20] = 3  # inside the overlap of two tiles
    truth[2:6, 2:6] = 4  # inside one tile
    image = (truth > 0).astype(np.float32) * 0.8
    model = ComponentDetector()
    labels = predict_instances(model, image, roi_size=48, overlap=0.25)
    _assert_same_partition(labels, truth)
    shapes = [s for call in model.calls for s in call]
    assert len(shapes) == 9 and all(s == (3, 48, 48) for s in shapes)
    # tiles start at 0, 36, 52 on both axes: the objects were seen 6 + 6 + 2 + 1 times, merged into one each
    assert model.detections == 15


def _cylinders(axis: int) -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((10, 32, 32), np.int32)
    truth[1:8, 4:12, 4:12] = 1
    truth[3:10, 18:28, 16:30] = 2
    truth[4, 20:24, 2:6] = 3  # one slice only
    truth[6:8, 2:6, 24:30] = 4
    image = np.where(truth > 0, 0.9, 0.05).astype(np.float32)
    return np.moveaxis(image, 0, axis), np.moveaxis(truth, 0, axis)


@pytest.mark.parametrize("axis", [0, 2])
def test_3d_slice_linking(axis):
    image, truth = _cylinders(axis)
    labels = predict_instances(ComponentDetector(), image, spatial_dims=3, slice_axis=axis)
    assert labels.shape == truth.shape
    _assert_same_partition(labels, truth)


def test_tensor_batch_progress_and_cancel():
    image, truth = _cylinders(0)
    batch = torch.from_numpy(np.stack([image[:, None][3:5, 0], image[:, None][6:8, 0]]))[
        :, :1
    ]  # (2, 1, 32, 32)
    calls = []
    labels = predict_instances(
        ComponentDetector(), batch, sw_batch_size=1, progress=lambda d, t: calls.append((d, t))
    )
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int32 and labels.shape == (2, 32, 32)
    assert calls == [(1, 2), (2, 2)]
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        predict_instances(ComponentDetector(), image, spatial_dims=3, cancel=event)


def test_predict_dispatches_instance_models():
    image, truth = _cylinders(2)
    model = ComponentDetector()
    via_predict = predict(model, image, slice_axis=2)
    direct = predict_instances(model, image, slice_axis=2)
    assert np.array_equal(via_predict, direct)
    _assert_same_partition(via_predict, truth)


def test_bad_inputs():
    model = ComponentDetector()
    with pytest.raises(ValueError, match="labels"):
        predict_instances(model, np.zeros((8, 8)), output="probabilities")
    with pytest.raises(ValueError, match="tta_flips"):
        predict_instances(model, np.zeros((8, 8)), tta_flips=(0,))
    with pytest.raises(ValueError, match="NaN"):
        predict_instances(model, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="channel"):
        predict_instances(model, np.zeros((2, 8, 8)), spatial_dims=2)
    with pytest.raises(ValueError, match="slice_axis"):
        predict_instances(model, np.zeros((4, 8, 8)), spatial_dims=3, slice_axis=3)
    with pytest.raises(ValueError, match="dimension"):
        predict_instances(model, np.zeros((1, 1, 1, 4, 8, 8)))


# ----------------------------------------------------------------------------------------------
# a small Mask R-CNN trained on synthetic shapes
SMALL = dict(
    depth=18, keep_fc=False, fpn_channels=32, representation_size=64, mask_layers=(32, 32),
    anchor_sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=(1.0,),  # objects are 9-20 px
    min_size=64, max_size=64, rpn_batch_size_per_image=64, box_batch_size_per_image=32,
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=50,
)  # fmt: skip
_GRID = np.mgrid[:64, :64]


def _shape_mask(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    r = rng.uniform(5, 10)
    cy, cx = rng.uniform(r, size - r, 2)
    yy, xx = _GRID[0][:size, :size], _GRID[1][:size, :size]
    if rng.random() < 0.5:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return (abs(yy - cy) <= 0.9 * r) & (abs(xx - cx) <= 0.9 * r)


def _scene(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    masks: list[np.ndarray] = []
    while len(masks) < count:
        m = _shape_mask(rng)
        if not any((ndimage.binary_dilation(o, iterations=2) & m).any() for o in masks):
            masks.append(m)
    return masks


def _render(rng: np.random.Generator, masks: list[np.ndarray]) -> np.ndarray:
    image = rng.normal(0.1, 0.03, masks[0].shape).astype(np.float32)
    for m in masks:
        image[m] = rng.uniform(0.6, 0.9)
    return image


@pytest.fixture(scope="module")
def trained_mask_rcnn():
    from medsegkit.nets import MaskRCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster than oversubscribed cores
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = MaskRCNN(num_classes=1, **SMALL).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(250):
            images, targets = [], []
            for _ in range(2):
                masks = _scene(rng, int(rng.integers(1, 4)))
                boxes = [
                    [
                        np.flatnonzero(m.any(0))[0],
                        np.flatnonzero(m.any(1))[0],
                        np.flatnonzero(m.any(0))[-1] + 1,
                        np.flatnonzero(m.any(1))[-1] + 1,
                    ]
                    for m in masks
                ]
                images.append(torch.from_numpy(_render(rng, masks)).expand(3, -1, -1))
                targets.append(
                    {
                        "boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.ones(len(masks), dtype=torch.int64),
                        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8)),
                    }
                )
            losses = model(images, targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        yield model.eval()
    finally:
        torch.set_num_threads(threads)


def _match(labels: np.ndarray, truth: list[np.ndarray]) -> list[float]:
    """IoU of each found instance with the true object it overlaps most."""
    ious = []
    for label in range(1, int(labels.max()) + 1):
        found = labels == label
        ious.append(max(np.count_nonzero(found & t) / np.count_nonzero(found | t) for t in truth))
    return ious


@pytest.mark.slow
def test_trained_mask_rcnn_2d_image(trained_mask_rcnn):
    rng = np.random.default_rng(123)
    for _ in range(3):
        masks = _scene(rng, 3)
        image = _render(rng, masks) * 4000 - 1000  # CT-like range, one channel
        labels = predict_instances(trained_mask_rcnn, image)
        ious = _match(labels, masks)
        assert len(ious) == len(masks) and min(ious) >= 0.5, ious


@pytest.mark.slow
def test_trained_mask_rcnn_3d_volume(trained_mask_rcnn):
    rng = np.random.default_rng(7)
    first, second = _scene(rng, 2)
    truth = np.zeros((2, 8, 64, 64), bool)
    truth[0, 0:5], truth[1, 3:8] = first, second  # two objects, overlapping in slice range 3-4
    volume = np.where(truth.any(0), 0.8, 0.1).astype(np.float32) + rng.normal(
        0, 0.03, truth.shape[1:]
    ).astype(np.float32)
    labels = predict_instances(trained_mask_rcnn, volume, spatial_dims=3, slice_axis=0)
    ious = _match(labels, list(truth))
    assert labels.shape == (8, 64, 64) and len(ious) == 2 and min(ious) >= 0.5, ious


def _two_objects() -> np.ndarray:
    image = np.zeros((16, 16), np.float32)
    image[2:6, 2:6], image[9:14, 9:14] = 1.0, 0.9
    return image


def _read_only_int32() -> np.ndarray:
    array = np.zeros((16, 16), np.int32)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("out", "message"),
    [
        # before 2026-12-08: instances 1 and 2 both written as True, silently
        (np.zeros((16, 16), bool), r"^out has dtype bool, which cannot hold labels 0 to 2; give an integer array"),
        # before: numpy's "assignment destination is read-only"
        (_read_only_int32(), r"^out is a read-only array; give a writeable one$"),
        (torch.zeros(16, 16, device="meta"), "^out is a tensor on the meta device, which holds no values"),
    ],
)
def test_out_that_cannot_hold_the_instances_is_refused(out, message):
    with pytest.raises(ValueError, match=message):
        predict_instances(ComponentDetector(), _two_objects(), out=out)


def test_out_of_another_integer_dtype_holds_the_instances():
    labels = predict_instances(ComponentDetector(), _two_objects())
    out = predict_instances(ComponentDetector(), _two_objects(), out=np.zeros((16, 16), np.int8))
    np.testing.assert_array_equal(out, labels)


class _Returns(ComponentDetector):
    """ComponentDetector whose per-batch result ``change`` rewrites."""

    def __init__(self, change) -> None:
        super().__init__()
        self.change = change

    def forward(self, images):
        return self.change(super().forward(images))


def _nan_scores(results):
    for result in results:
        result["scores"] = result["scores"] * float("nan")
    return results


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        # before 2026-12-08: an empty map (NaN fails every threshold), without a word
        (_Returns(_nan_scores), {}, r"^the detection model returned NaN or Inf scores; the instance map would be meaningless$"),
        # before: the second image's detections were dropped by zip, silently
        (_Returns(lambda results: results[:1]), {"sw_batch_size": 2},
         r"^a detection model must return a list of one dict per image; for 2 image\(s\) it returned 1$"),
        # before: KeyError 'scores' / IndexError 'too many indices for tensor of dimension 3'
        (_Returns(lambda results: [{} for _ in results]), {},
         r"^a detection model must return one dict per image with 'scores' \(n,\) and 'masks' \(n, 1, H, W\) "
         r"\(torchvision's convention\), got \[\]$"),
        (_Returns(lambda results: [{**r, "masks": r["masks"][:, 0]} for r in results]), {},
         r"got \['boxes', 'labels', 'masks', 'scores'\]$"),
        # before: True was taken as 1.0 and sw_batch_size=True as 1; "0.3" failed with TypeError in the comparison
        (ComponentDetector(), {"score_threshold": True}, r"^score_threshold must be in \[0, 1\], got True$"),
        (ComponentDetector(), {"link_iou": "0.3"}, r"^link_iou must be in \[0, 1\], got '0.3'$"),
        (ComponentDetector(), {"sw_batch_size": True}, "^sw_batch_size must be a positive int, got True$"),
        # before: TypeError 'NoneType' object is not iterable
        (ComponentDetector(), {"tta_flips": None}, r"^tta_flips is not supported for instance models .*; give \(\), got None$"),
    ],
)
def test_bad_detector_output_and_options_are_one_clear_error(model, kwargs, message):
    volume = np.stack([_two_objects()] * 2)  # two slices: two images per batch with sw_batch_size=2
    with pytest.raises(ValueError, match=message):
        predict_instances(model, volume, spatial_dims=3, slice_axis=0, **kwargs)
