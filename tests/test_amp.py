"""The one mixed-precision choice (medsegkit.amp), used by predict, detection and training."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from medsegkit import amp


@pytest.fixture
def native_bf16(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(amp, "bf16_supported", lambda device: value)

    return set_native


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_bf16_support_reads_the_cpu_feature_flags(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert amp.bf16_supported("cpu") is expected
    assert amp.bf16_supported("meta") is False


@pytest.mark.parametrize(
    "device, requested, native, expected",
    [
        ("cpu", False, True, (None, None)),
        ("cpu", None, True, (None, None)),
        ("cpu", True, True, (torch.bfloat16, None)),
        ("cpu", "bf16", True, (torch.bfloat16, None)),
        ("cpu", torch.bfloat16, True, (torch.bfloat16, None)),
        ("cpu", True, False, (None, "cpu has no native bfloat16 support")),
        ("cpu", "bfloat16", False, (None, "cpu has no native bfloat16 support")),
        ("cpu", "fp16", True, (None, "fp16 autocast is not supported on cpu")),
        ("cuda", True, True, (torch.bfloat16, None)),
        ("cuda", True, False, (torch.float16, None)),  # pre-Ampere GPU: fp16
        ("cuda", "fp16", True, (torch.float16, None)),
        ("cuda", torch.float16, False, (torch.float16, None)),
        ("cuda", "bf16", False, (None, "cuda has no native bfloat16 support")),
        ("mps", True, False, (None, "mps has no native bfloat16 support")),
    ],
)
def test_amp_choice(native_bf16, device, requested, native, expected):
    native_bf16(native)
    assert amp.amp_choice(device, requested) == expected


@pytest.mark.parametrize("bad", ["int8", 1, torch.float32])
def test_unknown_amp_value_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match=r"^amp must be True, False, 'bf16' or 'fp16' \(or torch.bfloat16 / torch.float16\), got "):
        amp.amp_dtype("cpu", bad)


def test_amp_dtype_logs_the_float32_fallback(native_bf16, caplog):
    native_bf16(False)
    with caplog.at_level(logging.WARNING, logger="medsegkit.inference"):
        assert amp.amp_dtype("cpu", True) is None
    assert caplog.messages == ["cpu has no native bfloat16 support; running in float32"]


def test_autocast_runs_matmuls_in_the_chosen_dtype(native_bf16):
    x = torch.randn(4, 4)
    native_bf16(True)
    with amp.autocast("cpu", True):
        assert torch.mm(x, x).dtype == torch.bfloat16
    native_bf16(False)
    context = amp.autocast("cpu", True)
    assert isinstance(context, contextlib.nullcontext)
    with context:
        assert torch.mm(x, x).dtype == torch.float32
    assert isinstance(amp.autocast(torch.device("cpu"), False), contextlib.nullcontext)


def test_inference_fast_reexports_the_same_functions():
    from medsegkit.inference import fast

    assert fast.amp_dtype is amp.amp_dtype and fast.bf16_supported is amp.bf16_supported
