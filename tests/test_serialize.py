"""medsegkit._serialize.jsonable: one conversion for checkpoints, init_args and bundle configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch import nn

from medsegkit._serialize import jsonable


def test_nested_values_become_json():
    value = {"channels": (16, 32), 3: [np.int64(2), np.float32(0.5)], "norm": ("group", {"num_groups": 4}),
             "flag": np.bool_(True), "none": None, "name": "x"}
    out = jsonable(value)
    assert out == {"channels": [16, 32], "3": [2, 0.5], "norm": ["group", {"num_groups": 4}], "flag": True,
                   "none": None, "name": "x"}
    assert type(out["3"][0]) is int and type(out["flag"]) is bool
    assert json.loads(json.dumps(out)) == out


def test_strict_refuses_values_that_cannot_be_rebuilt():
    with pytest.raises(TypeError, match=r"^value <class 'torch.nn.modules.activation.ReLU'> of type type cannot be "
                                        r"recorded in a checkpoint; use plain numbers, strings, lists or dicts$"):
        jsonable({"act": [nn.ReLU]})


def test_lenient_records_a_description():
    assert jsonable({"act": (nn.ReLU, {"inplace": True})}, strict=False) == {
        "act": ["<class 'torch.nn.modules.activation.ReLU'>", {"inplace": True}]}


def test_registry_and_unet_record_json_arguments():
    from medsegkit import create_model

    model = create_model("UNet2d", channels=(4, 8), strides=(2,), dropout=np.float64(0.25))
    assert model.medsegkit_config == {"name": "UNet2d",
                                      "overrides": {"channels": [4, 8], "strides": [2], "dropout": 0.25}}
    assert model.init_args["channels"] == [4, 8]
