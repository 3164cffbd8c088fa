"""MONAI → medsegkit (and back): ``UNet`` (any ``num_res_units``) and ``AttentionUnet``.

The key map is explicit and lives with the networks (:meth:`medsegkit.nets.unet.UNet.monai_key_map`,
a list of ``(monai_prefix, our_prefix)`` pairs such as ``("model.1.submodule.0.", "encoder.stages.1.units.0.")``);
our models apply it in a load pre-hook, so ``ours.load_state_dict(monai_model.state_dict())`` works
directly. Parity: outputs equal MONAI's within 1e-5 (fp32, eval mode); see ``tests/weights/test_from_monai.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["config_from_monai", "convert", "to_monai"]


def _monai_classes():
    from monai.networks.nets import AttentionUnet, UNet

    return UNet, AttentionUnet


def config_from_monai(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(class name, constructor arguments)`` of the medsegkit network equal to a MONAI ``model``.

    The configuration is read from the module's attributes (``dimensions``, ``in_channels``,
    ``out_channels``, ``channels``, ``strides``, ``kernel_size``, ``up_kernel_size``, ``num_res_units``,
    ``act``, ``norm``, ``dropout``, ``bias``, ``adn_ordering``).
    """
    monai_unet, monai_attention_unet = _monai_classes()
    if type(model).__name__ == "CheckpointUNet":
        raise TypeError(
            "MONAI's CheckpointUNet wraps its blocks for activation checkpointing (different keys); build a plain "
            "monai.networks.nets.UNet with the same arguments, load the weights into it, then convert that"
        )
    if not isinstance(model, (monai_unet, monai_attention_unet)):
        raise TypeError(
            f"cannot convert {type(model).__module__}.{type(model).__name__}: medsegkit.weights.from_monai converts "
            "monai.networks.nets.UNet and monai.networks.nets.AttentionUnet models (or their state dicts with target=)"
        )
    common = {
        "spatial_dims": int(model.dimensions),
        "in_channels": int(model.in_channels),
        "out_channels": int(model.out_channels),
        "channels": tuple(model.channels),
        "strides": tuple(model.strides),
        "kernel_size": model.kernel_size,
        "up_kernel_size": model.up_kernel_size,
    }
    if isinstance(model, monai_attention_unet):
        return "AttentionUNet", {**common, "dropout": float(model.dropout)}
    return "UNet", {
        **common,
        "num_res_units": int(model.num_res_units),
        "act": model.act,
        "norm": model.norm,
        "dropout": model.dropout,
        "bias": bool(model.bias),
        "adn_ordering": model.adn_ordering,
    }


def convert(obj: nn.Module | Mapping[str, torch.Tensor], target: str | nn.Module | None = None) -> nn.Module:
    """Turn a MONAI ``UNet`` / ``AttentionUnet`` (or its state dict) into the equal medsegkit network.

    Args:
        obj: a MONAI model (its configuration is read from it), or a bare MONAI state dict.
        target: a registry name (``"UNet3d"``; pass the configuration through a built model if it is not
            the registry default) or a built medsegkit model to load into. Required for a state dict;
            with a MONAI model, an optional model to fill instead of building one.

    Returns:
        The medsegkit model holding ``obj``'s weights, in ``obj``'s train/eval mode (eval for a state dict).

    Raises:
        TypeError: ``obj`` is neither a supported MONAI model nor a state dict.
        ValueError: a state dict without ``target``.
        RuntimeError: the weights do not fit ``target`` (PyTorch's message lists the mismatching keys).
    """
    from medsegkit.nets import unet

    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        if target is None:
            cls_name, kwargs = config_from_monai(obj)
            model = getattr(unet, cls_name)(**kwargs)
        else:
            model = _target_model(target)
        model.load_state_dict(state)
        return model.train(obj.training)
    if not isinstance(obj, Mapping):
        raise TypeError(f"obj must be a MONAI model or a state dict, got {type(obj).__name__}")
    if target is None:
        raise ValueError("a bare MONAI state dict needs target= (a registry name or a built medsegkit model)")
    model = _target_model(target)
    model.load_state_dict(dict(obj))
    return model.eval()


def _target_model(target: str | nn.Module) -> nn.Module:
    if isinstance(target, nn.Module):
        return target
    if isinstance(target, str):
        from medsegkit.registry import create_model

        return create_model(target)
    raise TypeError(f"target must be a registry name or a medsegkit model, got {type(target).__name__}")


def to_monai(model: nn.Module) -> nn.Module:
    """The MONAI ``UNet`` / ``AttentionUnet`` equal to a medsegkit model built with MONAI's layout.

    Raises:
        ValueError: the model uses knobs MONAI has no counterpart for (pooling, stem, deep supervision,
            other act/norm in an ``AttentionUNet``, ...).
    """
    from medsegkit.nets.unet import AttentionUNet, UNet, _act_spec, _norm_spec

    monai_unet, monai_attention_unet = _monai_classes()
    if not isinstance(model, (UNet, AttentionUNet)):
        raise TypeError(
            f"to_monai converts medsegkit UNet / ResUNet / AttentionUNet, got {type(model).__name__}"
        )
    pairs = model.monai_key_map()  # raises ValueError for layouts MONAI lacks
    args = dict(model.init_args)
    positional = (
        "spatial_dims",
        "in_channels",
        "out_channels",
        "channels",
        "strides",
        "kernel_size",
        "up_kernel_size",
    )
    kwargs: dict[str, Any] = {name: _tuples(args[name]) for name in positional}
    if isinstance(model, AttentionUNet):
        defaults_ok = (
            args["act"] is None
            and args["norm"] is None
            and args["bias"] is True
            and args["adn_ordering"] == "NDA"
            and args["gate_norm"] in ("batch", "BATCH")
            and args["inter_channels"] is None
            and args["dilation"] == 1
            and args["num_res_units"] == 0
        )
        if not defaults_ok:
            raise ValueError(
                "MONAI's AttentionUnet hard-codes act, norm, bias, gates and dilation; this model changes them"
            )
        monai_model = monai_attention_unet(**kwargs, dropout=args["dropout"])
    else:
        if args.get("dilation", 1) != 1:
            raise ValueError("MONAI's UNet has no dilation argument; this model uses dilation != 1")
        monai_model = monai_unet(
            **kwargs,
            num_res_units=model.init_args["num_res_units"] if args.get("block") != "res" else 2,
            act=_act_spec(_tuples(args["act"])),
            norm=_norm_spec(_tuples(args["norm"])),
            dropout=args["dropout"],
            bias=args["bias"],
            adn_ordering=args["adn_ordering"],
        )
    inverse = [(ours, theirs) for theirs, ours in pairs]
    state = {}
    for key, value in model.state_dict().items():
        renamed = model._rename(key, inverse)
        if renamed is None:
            raise ValueError(f"no MONAI counterpart for parameter {key!r}")
        state[renamed] = value
    monai_model.load_state_dict(state)
    return monai_model.train(model.training)


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (MONAI factories want ``("group", {...})``)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
