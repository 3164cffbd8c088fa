"""Property-based MONAI fidelity of the U-Net family (hypothesis, derandomized "ci" profile).

Hypothesis draws valid configurations of MONAI's ``UNet`` (spatial_dims 1/2/3, 2–5 levels, strides incl. 1
and per-axis, kernel sizes scalar or per axis, ``num_res_units`` 0–3, act / norm / dropout specs with
arguments, bias, ``adn_ordering``) and of MONAI's ``AttentionUnet`` (kernel sizes, strides incl. 1, dropout).
For every configuration, with MONAI's network given random weights and BatchNorm statistics:

- ours, built with the same arguments, has the same parameter count;
- MONAI's state dict loads **strictly** into ours (``load_state_dict(..., strict=True)``);
- the outputs agree within 1e-5 (float64, eval mode) on a random input of a valid size;
- ``to_monai(ours)`` rebuilds MONAI's network (same ``repr``) with MONAI's state dict (same keys, equal
  tensors), and ``convert(monai_model)`` builds ours from the MONAI module alone (same state dict).

Networks and images are tiny (channels ≤ 6, ≤ 4,096 voxels) so that the suite runs in well under a minute
on two busy cores. ``HYPOTHESIS_MAX_EXAMPLES=N`` scales every test to N examples (e.g. a 2,000-example run:
``HYPOTHESIS_MAX_EXAMPLES=1000`` on both tests).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import randomise
from monai.networks.nets import AttentionUnet as MonaiAttentionUnet
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from medsegkit.nets import AttentionUNet, UNet
from medsegkit.weights.from_monai import convert, to_monai

TOLERANCE = 1e-5
# CI: 140 + 80 = 220 examples; HYPOTHESIS_MAX_EXAMPLES overrides both.
_SCALE = os.environ.get("HYPOTHESIS_MAX_EXAMPLES")
UNET_EXAMPLES = int(_SCALE) if _SCALE else 140
ATTENTION_EXAMPLES = int(_SCALE) if _SCALE else 80
# per-axis cap on the product of the strides: the input is 2 × that product per axis
_MAX_MULTIPLE = {1: 64, 2: 16, 3: 8}

ACTS = [
    None,
    "prelu",
    "PRELU",
    ("prelu", {"init": 0.2}),
    "relu",
    ("leakyrelu", {"negative_slope": 0.1}),
    "elu",
    ("elu", {"alpha": 0.5}),
    "gelu",
    "tanh",
    "sigmoid",
    "swish",
    "mish",
    "selu",
    ("celu", {"alpha": 2.0}),
    "relu6",
]
DROPOUTS = [
    0.0,
    0.1,
    0.5,
    None,
    ("dropout", {"p": 0.2}),
    ("alphadropout", {"p": 0.1}),
    ("dropout", {"p": 0.0}),
]
# every permutation of a non-empty subset of "ADN", some lower-case spellings (MONAI upper-cases them), none
ADN_ORDERINGS = ["NDA", "NAD", "ADN", "AND", "DNA", "DAN", "NA", "AN", "ND", "DN", "AD", "DA", "N", "A", "D"]
ADN_ORDERINGS += ["nda", "an", "Da", ""]


def _odd_kernel(dims: int):
    """An odd kernel: an int, or one per axis (MONAI's same-padding needs odd kernels)."""
    size = st.sampled_from([1, 3, 5])
    return st.one_of(size, st.tuples(*[size] * dims))


@st.composite
def _strides(draw, dims: int, levels: int):
    """``levels - 1`` strides in {1, 2, 3} (ints or per axis) whose per-axis product stays ≤ the cap.

    Sometimes one more: MONAI ignores strides beyond ``len(channels) - 1`` (its ``UNet`` warns).
    """
    cap = _MAX_MULTIPLE[dims]
    product = [1] * dims
    strides = []
    for _ in range(levels - 1):
        fits = [s for s in (1, 2, 3) if all(p * s <= cap for p in product)]
        if draw(st.booleans()):
            stride = draw(st.sampled_from(fits))
            product = [p * stride for p in product]
            strides.append(stride)
        else:
            per_axis = tuple(draw(st.sampled_from([s for s in (1, 2, 3) if p * s <= cap])) for p in product)
            product = [p * s for p, s in zip(product, per_axis)]
            strides.append(per_axis)
    if draw(st.sampled_from([False, False, False, True])):
        strides.append(draw(st.sampled_from([2, (2,) * dims])))
    return tuple(strides)


def _multiple(strides, dims: int, levels: int) -> tuple[int, ...]:
    per_axis = [(s,) * dims if isinstance(s, int) else s for s in strides[: levels - 1]]
    return tuple(math.prod(s[d] for s in per_axis) for d in range(dims))


@st.composite
def monai_unet_configs(draw):
    """``(kwargs, input shape)`` of a valid ``monai.networks.nets.UNet``."""
    dims = draw(st.sampled_from([1, 2, 3]))
    levels = draw(st.integers(2, 5))
    norm_kind = draw(
        st.sampled_from(["instance", "INSTANCE", "instance-affine", "batch", "batch-noaffine", "group", None])
    )
    groups = draw(st.sampled_from([1, 2, 3])) if norm_kind == "group" else 1
    channel = st.integers(1, 6 // groups).map(lambda c: c * groups)  # group norm: every count divisible
    norm = {
        "instance-affine": ("instance", {"affine": True}),
        "batch-noaffine": ("batch", {"affine": False}),
        "group": ("group", {"num_groups": groups}),
    }.get(norm_kind, norm_kind)
    strides = draw(_strides(dims, levels))
    kwargs = {
        "spatial_dims": dims,
        "in_channels": draw(st.integers(1, 3)),
        "out_channels": draw(channel),
        "channels": tuple(draw(channel) for _ in range(levels)),
        "strides": strides,
        "kernel_size": draw(_odd_kernel(dims)),
        "up_kernel_size": draw(_odd_kernel(dims)),
        "num_res_units": draw(st.integers(0, 3)),
        "act": draw(st.sampled_from(ACTS)),
        "norm": norm,
        "dropout": draw(st.sampled_from(DROPOUTS)),
        "bias": draw(st.booleans()),
        "adn_ordering": draw(st.sampled_from(ADN_ORDERINGS)),
    }
    batch = draw(st.integers(1, 2))
    shape = (batch, kwargs["in_channels"], *(2 * m for m in _multiple(strides, dims, levels)))
    return kwargs, shape


@st.composite
def monai_attention_unet_configs(draw):
    """``(kwargs, input shape)`` of a valid ``monai.networks.nets.AttentionUnet``.

    Channels are ≥ 2: MONAI's gates have ``channels // 2`` intermediate channels.
    """
    dims = draw(st.sampled_from([1, 2, 3]))
    levels = draw(st.integers(2, 5))
    strides = draw(_strides(dims, levels))
    kwargs = {
        "spatial_dims": dims,
        "in_channels": draw(st.integers(1, 3)),
        "out_channels": draw(st.integers(1, 3)),
        "channels": tuple(draw(st.integers(2, 6)) for _ in range(levels)),
        "strides": strides,
        "kernel_size": draw(_odd_kernel(dims)),
        "up_kernel_size": draw(_odd_kernel(dims)),
        "dropout": draw(st.sampled_from(DROPOUTS)),
    }
    batch = draw(st.integers(1, 2))
    shape = (batch, kwargs["in_channels"], *(2 * m for m in _multiple(strides, dims, levels)))
    return kwargs, shape



def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(cls: type, kwargs: dict) -> tuple[nn.Module, list[str]]:
    """``cls(**kwargs)`` and the messages of the warnings it gave about unused strides."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cls(**kwargs)
    return model, [str(w.message) for w in caught if "strides" in str(w.message)]


def check_fidelity(monai_cls: type, ours_cls: type, kwargs: dict, shape: tuple[int, ...]) -> None:
    """Every property of the module docstring for one configuration."""
    torch.manual_seed(0)
    reference, monai_warnings = _build(monai_cls, kwargs)
    reference = randomise(reference).double().eval()
    ours, our_warnings = _build(ours_cls, kwargs)
    ours = ours.double()
    if monai_cls is MonaiUNet:  # (MONAI's AttentionUnet ignores extra strides silently; ours warns)
        assert our_warnings == monai_warnings
    assert count(ours) == count(reference), (count(ours), count(reference))

    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
    assert got.shape == expected.shape == (shape[0], kwargs["out_channels"], *shape[2:])
    delta = float((got - expected).abs().max())
    assert delta <= TOLERANCE, f"max |Δ| = {delta:.3g}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused-strides warning again
        back = to_monai(ours)
        converted = convert(reference)
    assert type(back) is monai_cls and not back.training
    assert repr(back) == repr(reference)
    theirs, returned = reference.state_dict(), back.state_dict()
    assert list(returned) == list(theirs)
    for key, value in theirs.items():
        assert returned[key].dtype == value.dtype and torch.equal(returned[key], value), key

    assert type(converted) is ours_cls and not converted.training
    mine = ours.state_dict()
    assert list(converted.state_dict()) == list(mine)
    for key, value in converted.state_dict().items():
        assert value.dtype == mine[key].dtype and torch.equal(value, mine[key]), key


@settings(max_examples=UNET_EXAMPLES)
@given(monai_unet_configs())
def test_unet_matches_monai(config):
    kwargs, shape = config
    check_fidelity(MonaiUNet, UNet, kwargs, shape)


@settings(max_examples=ATTENTION_EXAMPLES)
@given(monai_attention_unet_configs())
def test_attention_unet_matches_monai(config):
    kwargs, shape = config
    check_fidelity(MonaiAttentionUnet, AttentionUNet, kwargs, shape)
