"""Every model family trains through the one engine: the family's objective lowers its loss."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from training_data import blob_volume, small_config

from medsegkit import create_model
from medsegkit.train.data import LabelledVolume
from medsegkit.train.engine import train
from medsegkit.train.objectives import (
    DetectionObjective,
    QueryObjective,
    SemanticObjective,
    instance_targets,
    objective_for,
    query_targets,
)

QUERY_HEADS = {"num_queries": 6, "hidden_dim": 32, "num_heads": 2, "ffn_dim": 64, "mask_dim": 32, "in_channels": 1}


def test_query_targets_are_one_mask_per_present_class():
    labels = torch.tensor([[[[0, 0, 2], [0, 2, 2]]], [[[1, 1, 1], [1, 1, 1]]]])  # (2, 1, 2, 3)
    first, second = query_targets(labels)
    assert first["labels"].tolist() == [0, 2] and second["labels"].tolist() == [1]
    assert torch.equal(first["masks"][1], (labels[0, 0] == 2).float())
    assert first["masks"].shape == (2, 2, 3)


def test_instance_targets_split_each_class_into_connected_components():
    label = np.zeros((1, 1, 12, 12), np.int64)
    label[0, 0, 1:4, 1:5] = 1
    label[0, 0, 8:11, 8:10] = 1
    label[0, 0, 6:8, 1:3] = 2
    (target,) = instance_targets(torch.from_numpy(label))
    assert sorted(target["labels"].tolist()) == [1, 1, 2]
    boxes = {tuple(b) for b in target["boxes"].tolist()}
    assert (1.0, 1.0, 5.0, 4.0) in boxes and (8.0, 8.0, 10.0, 11.0) in boxes  # xyxy, exclusive max
    assert target["masks"].shape == (3, 12, 12) and int(target["masks"].sum()) == 12 + 6 + 4
    (empty,) = instance_targets(torch.zeros(1, 1, 5, 5, dtype=torch.long))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 5, 5)


def test_objective_for_picks_the_family():
    assert isinstance(objective_for(create_model("UNet2d", out_channels=3), 3), SemanticObjective)
    fcn = create_model("fcn_resnet_50", out_channels=3, in_channels=1, depth=18, aux_loss=True)
    assert isinstance(objective_for(fcn, 3), SemanticObjective)
    query = create_model("maskformer_resnet_18", num_classes=3, **QUERY_HEADS)
    assert isinstance(objective_for(query, 3), QueryObjective)
    detector = create_model("mask_rcnn_resnet_50_fpn", num_classes=2, depth=18, keep_fc=False)
    assert isinstance(objective_for(detector, 3), DetectionObjective)


def test_semantic_objective_keeps_logits_only_for_a_step_that_returns_them():
    """The objective holds no batch of logits past its call unless a TrainStep with ``outputs=True`` (the
    bundles' train metric) reads them: then they are the main head's detached logits."""
    from medsegkit.train.step import TrainStep

    torch.manual_seed(0)
    network = create_model("UNet2d", channels=(4, 8), strides=(2,), out_channels=3)
    images, labels = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 1, 16, 16))
    objective = SemanticObjective()
    loss = objective(network, images, labels)
    assert torch.isfinite(loss) and objective.last_output is None
    TrainStep(network, objective)
    objective(network, images, labels)
    assert objective.last_output is None
    TrainStep(network, objective, outputs=True)
    objective(network, images, labels)
    assert objective.last_output.shape == (2, 3, 16, 16) and not objective.last_output.requires_grad
    with pytest.raises(ValueError, match="outputs=True needs an objective that keeps its logits"):
        TrainStep(network, QueryObjective(create_model("maskformer_resnet_18", num_classes=3, **QUERY_HEADS), 3),
                  outputs=True)


def _blobs(seed: int, binary: bool) -> LabelledVolume:
    volume = blob_volume(seed, size=32)
    return replace(volume, label=(volume.label > 0).astype(np.int64)) if binary else volume


def _losses(model, tmp_path, name, patch, epochs=3, names=("bg", "shell", "core"), **config):
    torch.manual_seed(0)
    binary = len(names) == 2  # one foreground class: shell and core together
    result = train(model, [_blobs(0, binary)], [_blobs(1, binary)], checkpoint=tmp_path / f"{name}.pt",
                   class_names=list(names), preprocessing="none",
                   config=small_config(patch_size=patch, epochs=epochs, **config), progress=False, log=lambda _: None)
    return [row["train_loss"] for row in result.history], result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maskformer_resnet_18", "mask2former_resnet_18"])
def test_query_models_train_on_slices_with_the_set_criterion(tmp_path, name):
    extra = {"decoder_layers": 2} if name.startswith("maskformer") else {"decoder_layers": 3, "encoder_layers": 1,
                                                                          "encoder_ffn_dim": 64, "feature_dim": 32}
    torch.manual_seed(0)  # initial weights independent of the tests that ran before
    model = create_model(name, num_classes=3, **QUERY_HEADS, **extra)
    losses, result = _losses(model, tmp_path, name, (32, 32), epochs=6, steps_per_epoch=8, lr=3e-3, batch_size=2,
                             augmentation="none")
    # the set criterion (class + mask + Dice terms over every decoder layer) falls from its start
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    assert set(result.validation["dice"]) == {"shell", "core"}  # validated through segment (SemanticAdapter)


@pytest.mark.slow
def test_fcn_with_auxiliary_head_trains(tmp_path):
    torch.manual_seed(0)
    model = create_model("fcn_resnet_50", out_channels=3, in_channels=1, aux_loss=True, depth=18)
    losses, _ = _losses(model, tmp_path, "fcn", (32, 32), epochs=3, batch_size=2)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_mask_rcnn_trains_on_instances_from_label_maps(tmp_path):
    torch.manual_seed(0)
    model = create_model("mask_rcnn_resnet_50_fpn", num_classes=1, depth=18, keep_fc=False, in_channels=1,
                         image_mean=[0.5], image_std=[0.25], min_size=64, max_size=64, fpn_channels=64,
                         representation_size=128, mask_layers=(32, 32), anchor_sizes=(8, 16, 32, 64, 128))
    losses, result = _losses(model, tmp_path, "maskrcnn", (48, 48), epochs=3, lr=1e-3, batch_size=2,
                             names=("bg", "blob"))
    assert losses[-1] < losses[0], losses
    assert set(result.validation["dice"]) == {"blob"}
