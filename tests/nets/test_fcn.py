"""FCN-ResNet: exact seed counts, output conventions, 2D/3D, registry weights metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsegkit import create_model, list_models, model_info
from medsegkit.nets import FCN
from medsegkit.registry import get_model_spec


@pytest.mark.parametrize("name,count", [("fcn_resnet_50", 35_322_218), ("fcn_resnet_101", 54_314_346)])
def test_seed_parameter_counts(name, count):
    info = model_info(name)
    assert info.num_params == count
    assert (info.task, info.spatial_dims, info.in_channels, info.out_channels) == ("semantic", 2, 3, 21)
    assert get_model_spec(name).weights.num_params == count


def test_aux_head_counts_and_3d_names():
    with torch.device("meta"):
        with_aux, without_aux = FCN(depth=50), FCN(depth=50, aux_loss=False)
    aux = sum(p.numel() for p in with_aux.aux_head.parameters())
    # FCNHead(1024 -> 256 -> 21): 3x3 conv without bias, BatchNorm, 1x1 conv with bias
    assert aux == 1024 * 256 * 9 + 2 * 256 + 256 * 21 + 21
    assert sum(p.numel() for p in without_aux.parameters()) == 35_322_218 - aux
    assert set(list_models("fcn_*", spatial_dims=3)) == {"fcn_resnet_50_3d", "fcn_resnet_101_3d"}
    info = model_info("fcn_resnet_50_3d")
    assert (info.spatial_dims, info.in_channels, info.out_channels) == (3, 1, 2)


def test_outputs_train_and_eval_2d():
    model = FCN(out_channels=4, depth=18)
    x = torch.randn(2, 3, 24, 40)
    model.train()
    out = model(x)
    assert set(out) == {"out", "aux"}
    assert (
        out["out"].shape == (2, 4, 24, 40) and len(out["aux"]) == 1 and out["aux"][0].shape == (2, 4, 24, 40)
    )
    (out["out"].mean() + out["aux"][0].mean()).backward()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4, 24, 40)
    no_aux = FCN(out_channels=4, depth=18, aux_loss=False).train()
    assert isinstance(no_aux(x), torch.Tensor)


def test_3d_forward_training_step():
    model = create_model("fcn_resnet_50_3d", depth=18, norm=("instance", {"affine": True}))
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    x = torch.randn(1, 1, 24, 32, 32)
    model.train()
    out = model(x)
    assert out["out"].shape == (1, 2, 24, 32, 32)
    before = model.head.out.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(out["out"], torch.zeros(1, 24, 32, 32, dtype=torch.long))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss) and not torch.equal(before, model.head.out.weight)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 2, 24, 32, 32)


def test_bad_input_and_pretrained_conflict():
    model = FCN(depth=18).eval()
    with pytest.raises(ValueError, match=r"\(N, 3, \*spatial\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="out_channels=21"):
        create_model("fcn_resnet_50", pretrained=True, out_channels=5)
    spec = get_model_spec("fcn_resnet_50")
    assert (
        spec.weights.url.endswith("fcn_resnet50_coco-1167a1af.pth") and spec.weights.source == "torchvision"
    )
    assert get_model_spec("fcn_resnet_101").weights.url.endswith("fcn_resnet101_coco-7ecb50ca.pth")


def test_predict_2d_fcn_on_volume_and_3d_fcn(caplog):
    """FCN through medsegkit.predict: 2D model slice-wise on a one-channel volume, 3D model on the volume."""
    from medsegkit.inference import predict

    volume = np.random.default_rng(0).normal(size=(20, 24, 6)).astype(np.float32)
    fcn_2d = FCN(out_channels=3, depth=18).eval()
    with caplog.at_level("INFO", logger="medsegkit.inference"):
        labels = predict(fcn_2d, volume, slice_axis=2, roi_size=(20, 24))
    assert labels.shape == (20, 24, 6) and labels.max() < 3
    assert "repeating the single image channel" in caplog.text
    with torch.no_grad():  # slice k of the result is the 2D model's argmax on slice k, 3 channels
        expected = fcn_2d(torch.from_numpy(volume[:, :, 4]).expand(1, 3, -1, -1)).argmax(1)[0].numpy()
    assert np.array_equal(labels[:, :, 4], expected)
    fcn_3d = FCN(spatial_dims=3, in_channels=1, out_channels=2, depth=18).eval()
    probabilities = predict(fcn_3d, volume, roi_size=(16, 16, 6), output="probabilities")
    assert probabilities.shape == (2, 20, 24, 6)
    assert np.allclose(probabilities.sum(0), 1.0, atol=1e-5)
