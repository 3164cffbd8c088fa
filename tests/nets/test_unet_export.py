"""TorchScript (MONAI's ``ckpt_export`` scripts the model) and ``torch.export`` on the U-Net family."""

from __future__ import annotations

import pytest
import torch

from medsegkit.nets import AttentionUNet, ResUNet, UNet

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:`torch.jit.script_method` is deprecated:FutureWarning",
)

MODELS = {
    "UNet-2d": (lambda: UNet(2, 1, 2, (4, 8, 16), (2, 2)), (1, 1, 16, 16)),
    "ResUNet-3d": (lambda: ResUNet(3, 1, 2, (4, 8, 16), ((1, 2, 2), (2, 2, 2))), (1, 1, 8, 16, 16)),
    "AttentionUNet-3d": (lambda: AttentionUNet(3, 1, 2, (4, 8, 16), (2, 2)), (1, 1, 16, 16, 16)),
    "UNet-seed-knobs": (
        lambda: UNet(
            3,
            1,
            2,
            (4, 8, 16),
            (2, 2),
            layout="classic",
            downsample="maxpool",
            upsample="trilinear",
            stem_channels=4,
            stage_attention=(False, False, True),
            deep_supervision=True,
            skip_merge="add",
        ),
        (1, 1, 16, 16, 16),
    ),
    "AttentionUNet-seed-knobs": (
        lambda: AttentionUNet(
            2,
            1,
            2,
            (4, 8, 16),
            (2, 2),
            downsample="maxpool",
            upsample="bilinear",
            gate_signal="coarse",
            gate_norm=None,
            gate_levels=(1,),
            gate_bias_init=2.0,
            deep_supervision=True,
        ),
        (1, 1, 16, 16),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript(name):
    build, shape = MODELS[name]
    model = build().eval()
    x = torch.randn(shape)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-6)
    # the input checks survive scripting
    bad = torch.randn(*shape[:2], *(s + 1 for s in shape[2:]))
    with pytest.raises(torch.jit.Error, match="must be a multiple of"):
        scripted(bad)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export(name):
    build, shape = MODELS[name]
    model = build().eval()
    x = torch.randn(shape)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=1e-6)
