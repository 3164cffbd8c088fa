"""Swin Transformer backbone: shapes, padding, shifted-window mask, parity with transformers' SwinBackbone."""

from __future__ import annotations

import pytest
import torch

from medsegkit.nets.backbones.swin import SWIN_CONFIGS, SwinTransformer, _shift_mask

SMALL = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8), "window_size": 4}


def test_shapes_strides_and_padding():
    body = SwinTransformer(**SMALL).eval()
    assert body.stage_channels == (16, 32, 64, 128)
    assert body.stage_strides == (4, 8, 16, 32)
    with torch.no_grad():
        features = body(torch.randn(2, 3, 70, 45))  # neither side a multiple of 4, windows or strides
    assert [tuple(f.shape) for f in features] == [
        (2, 16, 18, 12),
        (2, 32, 9, 6),
        (2, 64, 5, 3),
        (2, 128, 3, 2),
    ]
    assert all(torch.isfinite(f).all() for f in features)


def test_out_stages_and_errors():
    body = SwinTransformer(**SMALL, out_stages=(2, 4))
    assert body.stage_channels == (32, 128) and len(body.out_norms) == 2
    assert len(body(torch.randn(1, 3, 64, 64))) == 2
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        body(torch.randn(1, 3, 8, 64, 64))
    with pytest.raises(ValueError, match="out_stages"):
        SwinTransformer(**SMALL, out_stages=(3, 1))
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinTransformer(embed_dim=16, depths=(1, 1), num_heads=(1,))


def test_shift_mask_separates_regions():
    mask = _shift_mask(8, 8, 4, 2, "cpu", torch.float32)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    last = mask[3]  # bottom-right window mixes 4 regions: each token sees 4 of 16 tokens
    assert ((last == 0).sum(-1) == 4).all()
    assert set(last.unique().tolist()) == {0.0, -100.0}


def test_no_final_layernorm_and_counts():
    transformers = pytest.importorskip("transformers")
    for name, config in SWIN_CONFIGS.items():
        with torch.device("meta"):
            ours = SwinTransformer(**config)
            hf_config = transformers.SwinConfig(
                **{**config, "depths": list(config["depths"]), "num_heads": list(config["num_heads"])},
                out_features=["stage1", "stage2", "stage3", "stage4"],
            )
            reference = transformers.SwinBackbone(hf_config)
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in reference.parameters()) - 16 * config["embed_dim"], name


def test_parity_with_transformers_swin_backbone():
    transformers = pytest.importorskip("transformers")
    from medsegkit.nets import Mask2Former
    from medsegkit.weights.from_transformers import _fetch, key_map

    hf_config = transformers.SwinConfig(
        embed_dim=16,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    torch.manual_seed(0)
    reference = transformers.SwinBackbone(hf_config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    holder = Mask2Former(
        2,
        backbone="swin",
        backbone_kwargs={**SMALL},
        hidden_dim=32,
        feature_dim=32,
        mask_dim=32,
        decoder_layers=1,
        encoder_layers=1,
        num_queries=2,
    )
    prefix = "model.pixel_level_module.encoder."
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    mapping = {k: v for k, v in key_map(holder).items() if k.startswith("backbone.")}
    weights = {k.removeprefix("backbone."): _fetch(state, spec, set()) for k, spec in mapping.items()}
    ours = SwinTransformer(**SMALL).eval()
    ours.load_state_dict(weights)
    x = torch.randn(2, 3, 72, 40)
    with torch.no_grad():
        expected = reference(x).feature_maps
        actual = ours(x)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert (a - e).abs().max().item() <= 1e-4


def test_drop_path_only_in_training():
    body = SwinTransformer(**SMALL, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    body.eval()
    with torch.no_grad():
        assert torch.equal(body(x)[-1], body(x)[-1])
    body.train()
    torch.manual_seed(0)
    first = body(x)[-1]
    torch.manual_seed(1)
    assert not torch.allclose(first, body(x)[-1])
    first.sum().backward()
    assert body.patch_embed.proj.weight.grad is not None


def test_window_gather_equals_roll_and_partition():
    from medsegkit.nets.backbones.swin import _window_order

    height, width, window, shift, channels = 8, 12, 4, 2, 3
    x = torch.randn(2, height, width, channels)
    order, inverse = _window_order(height, width, window, shift, x.device)
    rolled = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    expected = rolled.view(2, height // window, window, width // window, window, channels).transpose(2, 3)
    expected = expected.reshape(2, -1, channels)
    windows = x.reshape(2, -1, channels).index_select(1, order)
    assert torch.equal(windows, expected)
    back = windows.index_select(1, inverse).view(2, height, width, channels)
    assert torch.equal(back, x)


def test_inference_path_matches_the_autograd_path_and_caches_the_bias():
    """Without autograd: window gathers and the cached attention bias. Equal to
    the autograd path up to the attention kernel (SDPA picks another one when gradients flow); the
    cache follows the bias table and the grid size."""
    torch.manual_seed(0)
    body = SwinTransformer(**SMALL, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 70, 45)  # padding and shifted windows
    graded = [f.detach() for f in body(x)]
    with torch.no_grad():
        first = body(x)
        again = body(x)  # cached attention biases
    for a, b, c in zip(graded, first, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)
    shifted = body.stages[2].blocks[1].attn
    cached_key = shifted.__dict__["_attention_bias"][0]
    with torch.no_grad():
        shifted.relative_position_bias_table.add_(1.0)  # the table changes: the cache is rebuilt
        changed = body(x)
        assert shifted.__dict__["_attention_bias"][0] != cached_key
        shifted.relative_position_bias_table.sub_(1.0)
    assert not all(torch.equal(a, b) for a, b in zip(changed, first))
    with torch.no_grad():
        other = body(torch.randn(1, 3, 64, 64))  # another grid: another bias
    assert [tuple(f.shape[-2:]) for f in other] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_a_model_built_under_inference_mode_runs_without_the_bias_cache():
    """Inference tensors have no version counter, so their attention bias is not cached (no error)."""
    torch.manual_seed(0)
    body = SwinTransformer(**SMALL, drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        expected = body(x)
    with torch.inference_mode():
        built = SwinTransformer(**SMALL, drop_path_rate=0.0).eval()
        built.load_state_dict(body.state_dict())
        assert built.stages[0].blocks[0].attn.relative_position_bias_table.is_inference()
        got = built(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert "_attention_bias" not in built.stages[0].blocks[0].attn.__dict__
