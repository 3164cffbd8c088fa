"""medsegkit.postprocess against transformers' MaskFormer / Mask2Former image processors (exact equality)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medsegkit.postprocess import instance_map, panoptic_map, semantic_map, semantic_probabilities

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_processors():
    return {
        "maskformer": transformers.MaskFormerImageProcessor(),
        "mask2former": transformers.Mask2FormerImageProcessor(),
    }


def _outputs(n=2, q=7, k=4, spatial=(12, 16), seed=0, class_scale=3.0, mask_scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, q, k + 1, generator=g) * class_scale
    # smooth blobs (coarse noise, upsampled) so that queries own coherent regions, as trained ones do
    coarse = torch.randn(n, q, *[max(2, s // 4) for s in spatial], generator=g) * mask_scale
    masks = torch.nn.functional.interpolate(coarse, size=spatial, mode="bilinear" if len(spatial) == 2 else "trilinear")
    return {"pred_logits": logits, "pred_masks": masks}


def _hf(outputs):
    return SimpleNamespace(class_queries_logits=outputs["pred_logits"], masks_queries_logits=outputs["pred_masks"])


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for (seg, info), ref in zip(ours, theirs):
        assert seg.shape == ref["segmentation"].shape
        assert torch.equal(seg.to(ref["segmentation"].dtype), ref["segmentation"])
        assert info == ref["segments_info"]


def test_semantic_probabilities_shape_and_value():
    out = _outputs(n=1, q=3, k=2, spatial=(4, 5, 6))
    scores = semantic_probabilities(out["pred_logits"], out["pred_masks"])
    assert scores.shape == (1, 2, 4, 5, 6)
    manual = (out["pred_logits"].softmax(-1)[0, :, :2, None, None, None] * out["pred_masks"][0].sigmoid()[:, None]).sum(0)
    torch.testing.assert_close(scores[0], manual)


@pytest.mark.parametrize("target_size", [None, (23, 31)])
def test_semantic_map_equals_maskformer_processor(hf_processors, target_size):
    out = _outputs()
    sizes = None if target_size is None else [target_size] * 2
    ref = hf_processors["maskformer"].post_process_semantic_segmentation(_hf(out), target_sizes=sizes)
    ours = semantic_map(out, target_size=target_size)
    assert ours.shape == (2, *(target_size or (12, 16)))
    for i in range(2):
        assert torch.equal(ours[i], ref[i])


def test_semantic_map_equals_mask2former_processor(hf_processors):
    # transformers' Mask2Former processor first resizes masks to 384x384; at that size the resize is exact
    out = _outputs(n=1, q=5, k=3, spatial=(384, 384), seed=1)
    ref = hf_processors["mask2former"].post_process_semantic_segmentation(_hf(out), target_sizes=[(200, 300)])
    assert torch.equal(semantic_map(out, target_size=(200, 300))[0], ref[0])


@pytest.mark.parametrize("target_size", [None, (25, 17)])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_instance_map_equals_maskformer_processor(hf_processors, target_size, threshold):
    out = _outputs(seed=2, class_scale=4.0)
    sizes = None if target_size is None else [target_size] * 2
    ref = hf_processors["maskformer"].post_process_instance_segmentation(
        _hf(out), threshold=threshold, target_sizes=sizes
    )
    ours = instance_map(out, threshold=threshold, target_size=target_size)
    assert sum(len(info) for _, info in ours) > 0
    _assert_same(ours, ref)


def test_instance_map_equals_mask2former_processor(hf_processors):
    out = _outputs(n=1, q=4, k=3, spatial=(384, 384), seed=3, class_scale=5.0)
    ref = hf_processors["mask2former"].post_process_instance_segmentation(_hf(out), threshold=0.2)
    ours = instance_map(out, threshold=0.2)
    assert len(ours[0][1]) > 0
    _assert_same(ours, ref)


def test_instance_map_mask_threshold_and_bad_values():
    out = _outputs(n=1, q=3, k=2, seed=4)
    loose = instance_map(out, threshold=0.0, mask_threshold=0.1)[0][0]
    strict = instance_map(out, threshold=0.0, mask_threshold=0.9)[0][0]
    assert (loose >= 0).sum() > (strict >= 0).sum()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        instance_map(out, mask_threshold=1.0)
    with pytest.raises(ValueError, match="target_size must give 2"):
        instance_map(out, target_size=(4, 4, 4))


@pytest.mark.parametrize("target_size", [None, (20, 26)])
@pytest.mark.parametrize("fuse", [None, {1}])
def test_panoptic_map_equals_processors(hf_processors, target_size, fuse):
    out = _outputs(n=3, q=6, k=3, seed=7, class_scale=4.0)
    # batch item 2: every query says "no object" -> the all -1 map
    out["pred_logits"][2, :, -1] = 50.0
    sizes = None if target_size is None else [target_size] * 3
    ref = hf_processors["maskformer"].post_process_panoptic_segmentation(
        _hf(out), threshold=0.3, overlap_mask_area_threshold=0.5, label_ids_to_fuse=fuse, target_sizes=sizes
    )
    ours = panoptic_map(
        out, threshold=0.3, overlap_mask_area_threshold=0.5, label_ids_to_fuse=fuse, target_size=target_size
    )
    assert len(ours[0][1]) > 0 and ours[2][1] == [] and bool((ours[2][0] == -1).all())
    _assert_same(ours, ref)


def test_panoptic_map_equals_mask2former_processor(hf_processors):
    out = _outputs(n=1, q=5, k=3, spatial=(384, 384), seed=6, class_scale=4.0)
    kwargs = {"threshold": 0.3, "overlap_mask_area_threshold": 0.5, "label_ids_to_fuse": {0}}
    ref = hf_processors["mask2former"].post_process_panoptic_segmentation(_hf(out), **kwargs)
    ours = panoptic_map(out, **kwargs)
    assert len(ours[0][1]) > 0
    _assert_same(ours, ref)


def test_panoptic_ids_stay_distinct_after_a_fused_segment(hf_processors):
    # four queries, each owning one quadrant: classes 0 (fused), 1, 0 (fused), 2
    masks = torch.full((1, 4, 8, 8), -10.0)
    for q, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        masks[0, q, r : r + 4, c : c + 4] = 10.0
    logits = torch.full((1, 4, 4), -10.0)
    for q, label in enumerate([0, 1, 0, 2]):
        logits[0, q, label] = 10.0
    out = {"pred_logits": logits, "pred_masks": masks}
    seg, info = panoptic_map(out, label_ids_to_fuse={0})[0]
    assert [s["id"] for s in info] == [1, 2, 1, 3]
    assert sorted(torch.unique(seg).tolist()) == [1, 2, 3]
    # transformers gives the class-2 segment id 2 again, the id of the class-1 segment
    ref = hf_processors["maskformer"].post_process_panoptic_segmentation(_hf(out), label_ids_to_fuse={0})[0]
    assert [s["id"] for s in ref["segments_info"]] == [1, 2, 1, 2]


def test_3d_outputs():
    out = _outputs(n=2, q=5, k=3, spatial=(6, 7, 8), seed=7, class_scale=4.0)
    sem = semantic_map(out, target_size=(12, 14, 16))
    assert sem.shape == (2, 12, 14, 16) and sem.dtype == torch.int64 and int(sem.max()) < 3
    # semantic map without resizing = argmax of the per-class scores
    assert torch.equal(semantic_map(out), semantic_probabilities(out["pred_logits"], out["pred_masks"]).argmax(1))
    inst = instance_map(out, threshold=0.0, target_size=(12, 14, 16))
    assert all(seg.shape == (12, 14, 16) for seg, _ in inst)
    seg, info = inst[0]
    assert len(info) > 0 and set(torch.unique(seg).tolist()) - {-1} <= {s["id"] for s in info}
    pan = panoptic_map(out, threshold=0.2, target_size=(12, 14, 16))
    assert all(seg.shape == (12, 14, 16) for seg, _ in pan)


def test_3d_instance_map_equals_slicewise_2d_rule():
    # a 3D map with depth 1 is the 2D result: the same code path, one more axis
    out2d = _outputs(n=1, q=5, k=3, seed=8, class_scale=4.0)
    out3d = {"pred_logits": out2d["pred_logits"], "pred_masks": out2d["pred_masks"][:, :, None]}
    for (s2, i2), (s3, i3) in zip(instance_map(out2d, threshold=0.1), instance_map(out3d, threshold=0.1)):
        assert torch.equal(s2, s3[0]) and i2 == i3


def test_bad_outputs():
    with pytest.raises(TypeError, match="pred_logits"):
        semantic_map({"logits": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\(N, Q, K\+1\)"):
        semantic_map({"pred_logits": torch.zeros(1, 3, 4), "pred_masks": torch.zeros(1, 2, 8, 8)})
    with pytest.raises(ValueError, match="target_size"):
        semantic_map(_outputs(), target_size=(0, 4))


def test_real_tiny_maskformer_outputs_equal_processor(hf_processors):
    from medsegkit.nets.maskformer import MaskFormer

    torch.manual_seed(0)
    model = MaskFormer(
        num_classes=3, backbone="resnet_18", in_channels=1, num_queries=6, hidden_dim=32, num_heads=2,
        decoder_layers=1, ffn_dim=64, fpn_dim=32, mask_dim=32,
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    processor = hf_processors["maskformer"]
    sizes = [(64, 64)] * 2
    ref = processor.post_process_semantic_segmentation(_hf(out), target_sizes=sizes)
    assert torch.equal(semantic_map(out, target_size=(64, 64)), torch.stack(ref))
    _assert_same(
        instance_map(out, threshold=0.0, target_size=(64, 64)),
        processor.post_process_instance_segmentation(_hf(out), threshold=0.0, target_sizes=sizes),
    )
    _assert_same(
        panoptic_map(out, threshold=0.0, overlap_mask_area_threshold=0.0, target_size=(64, 64)),
        processor.post_process_panoptic_segmentation(_hf(out), threshold=0.0, overlap_mask_area_threshold=0.0, target_sizes=sizes),
    )


def _nan_at(outputs, key, index):
    spoiled = {k: v.clone() for k, v in outputs.items()}
    spoiled[key][index] = float("nan")
    return spoiled


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        # before 2026-12-08: NaN gave an all-class-0 semantic map, an all -1 instance / panoptic map, no error
        (lambda o: semantic_map(_nan_at(o, "pred_logits", (0, 0, 0))), ValueError,
         r"^pred_logits contains NaN or Inf values; the maps would be meaningless \(check the model\)$"),
        (lambda o: instance_map(_nan_at(o, "pred_masks", (0, 1, 3, 3))), ValueError, "^pred_masks contains NaN or Inf"),
        (lambda o: panoptic_map({**o, "pred_masks": o["pred_masks"] * float("inf")}), ValueError,
         "^pred_masks contains NaN or Inf"),
        # before: AttributeError 'numpy.ndarray' object has no attribute 'softmax'
        (lambda o: semantic_map({k: v.numpy() for k, v in o.items()}), TypeError,
         "^pred_logits and pred_masks must be torch tensors, got ndarray and ndarray$"),
        # before: NotImplementedError "softmax_lastdim_kernel_impl" not implemented for 'Long'
        (lambda o: semantic_map({**o, "pred_logits": o["pred_logits"].long()}), ValueError,
         r"^pred_logits and pred_masks must be logits of one floating dtype, got torch.int64 and torch.float32$"),
        # before: RuntimeError expected scalar type Float but found Double (einsum)
        (lambda o: semantic_map({**o, "pred_logits": o["pred_logits"].double()}), ValueError,
         "got torch.float64 and torch.float32$"),
        # before: a boolean mask was read as logits 0 / 1, silently
        (lambda o: semantic_map({**o, "pred_masks": o["pred_masks"] > 0}), ValueError, "got torch.float32 and torch.bool$"),
        # before: (8.7, 16) resized to 8 rows, (True, 16) to 1 row and "88" to (8, 8), silently
        (lambda o: semantic_map(o, target_size=(8.7, 16)), ValueError,
         r"^target_size must give 2 positive sizes \(one per spatial dim of pred_masks\), got \(8.7, 16\)$"),
        (lambda o: semantic_map(o, target_size=(True, 16)), ValueError, r"got \(True, 16\)$"),
        (lambda o: semantic_map(o, target_size="88"), ValueError, "got '88'$"),
        # before: TypeError 'int' object is not iterable
        (lambda o: semantic_map(o, target_size=8), ValueError, "got 8$"),
        # before: RuntimeError DefaultCPUAllocator: can't allocate memory (12 TB)
        (lambda o: semantic_map(o, target_size=(10**6, 10**6)), ValueError,
         r"^target_size \(1000000, 1000000\) is 1,000,000,000,000 voxels; at most 2,147,483,647 \(2\*\*31 - 1\)$"),
        # before: a NaN threshold dropped every segment; -1 / 2 / True were compared as given, silently
        (lambda o: instance_map(o, threshold=float("nan")), ValueError, r"^threshold must be a number in \[0, 1\], got nan$"),
        (lambda o: panoptic_map(o, threshold=-1), ValueError, r"^threshold must be a number in \[0, 1\], got -1$"),
        (lambda o: panoptic_map(o, mask_threshold=True), ValueError, r"^mask_threshold must be a number in \[0, 1\], got True$"),
        (lambda o: panoptic_map(o, overlap_mask_area_threshold=2.0), ValueError,
         r"^overlap_mask_area_threshold must be a number in \[0, 1\], got 2.0$"),
        # before: TypeError "'>=' not supported between instances of 'float' and 'str'"
        (lambda o: instance_map(o, threshold="0.5"), ValueError, r"got '0.5'$"),
        (lambda o: instance_map(o, mask_threshold="0.5"), ValueError,
         r"^mask_threshold must lie strictly between 0 and 1, got '0.5'$"),
        # before: "12" fused classes 1 and 2, [1.7] class 1, silently; 1 gave TypeError 'int' object is not iterable
        (lambda o: panoptic_map(o, label_ids_to_fuse="12"), ValueError, r"^label_ids_to_fuse must be class ids \(ints\), got '12'$"),
        (lambda o: panoptic_map(o, label_ids_to_fuse=[1.7]), ValueError, r"got \[1.7\]$"),
        (lambda o: panoptic_map(o, label_ids_to_fuse=1), ValueError, "got 1$"),
    ],
)
def test_bad_outputs_and_options_are_one_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(_outputs(n=1, q=3, k=2, spatial=(8, 8)))


@settings(max_examples=40)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.integers(-3, 3)))
def test_thresholds_outside_zero_one_are_refused_and_inside_accepted(value):
    outputs = _outputs(n=1, q=3, k=2, spatial=(6, 6))
    inside = not isinstance(value, bool) and 0.0 <= value <= 1.0
    for call in (lambda: instance_map(outputs, threshold=value), lambda: panoptic_map(outputs, threshold=value),
                 lambda: panoptic_map(outputs, overlap_mask_area_threshold=value)):
        if inside:
            call()
        else:
            with pytest.raises(ValueError, match=r"must be a number in \[0, 1\], got "):
                call()
