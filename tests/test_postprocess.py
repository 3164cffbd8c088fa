"""medsegkit.postprocess against transformers' MaskFormer / Mask2Former image processors (exact equality)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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
