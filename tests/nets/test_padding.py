"""medsegkit.nets.layers.padding.pad_to_multiple: the package's one pad-to-multiple, parity with MONAI."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import DivisiblePad

from medsegkit.nets.layers.padding import pad_to_multiple


@pytest.mark.parametrize("method", ["end", "symmetric"])
@pytest.mark.parametrize("multiple", [4, (2, 8, 16)])
def test_matches_monai_divisible_pad_and_crop_undoes_it(method, multiple):
    x = torch.randn(2, 3, 7, 10, 13)
    padded, crop = pad_to_multiple(x, multiple, method=method)
    reference = torch.stack([DivisiblePad(multiple, method=method)(sample).as_tensor() for sample in x])
    torch.testing.assert_close(padded, reference, rtol=0, atol=0)
    assert all(size % m == 0 for size, m in zip(padded.shape[2:], (multiple,) * 3 if isinstance(multiple, int)
                                               else multiple))
    torch.testing.assert_close(padded[crop], x, rtol=0, atol=0)


def test_symmetric_puts_the_smaller_half_first():
    padded, crop = pad_to_multiple(torch.ones(1, 1, 5), 8, method="symmetric")
    assert padded.flatten().tolist() == [0, 1, 1, 1, 1, 1, 0, 0] and crop[2] == slice(1, 6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"^method must be 'end' or 'symmetric', got 'middle'$"):
        pad_to_multiple(torch.ones(1, 1, 5), 8, method="middle")
