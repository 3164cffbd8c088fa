"""MONAI → medsegkit (and back): ``UNet`` (any ``num_res_units``) and ``AttentionUnet``.

The key map is explicit and lives with the networks (:meth:`medsegkit.nets.unet.UNet.monai_key_map`,
a list of ``(monai_prefix, our_prefix)`` pairs such as ``("model.1.submodule.0.", "encoder.stages.1.units.0.")``);
our models apply it in a load pre-hook, so ``ours.load_state_dict(monai_model.state_dict())`` works
directly. Parity over MONAI's whole knob space (counts, strict loading, outputs within 1e-5, the
``to_monai`` round trip) is property-tested in ``tests/nets/test_unet_monai_properties.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["config_from_monai", "convert", "target_arguments", "to_monai"]


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
        return "AttentionUNet", {**common, "dropout": model.dropout}
    return "UNet", {
        **common,
        "num_res_units": int(model.num_res_units),
        "act": model.act,
        "norm": model.norm,
        "dropout": model.dropout,
        "bias": bool(model.bias),
        "adn_ordering": model.adn_ordering,
    }


def target_arguments(model: nn.Module) -> dict[str, Any]:
    """Constructor arguments of the medsegkit network equal to a MONAI ``model`` (those of
    :func:`config_from_monai`): what :func:`medsegkit.convert` builds a registry-name target with."""
    return config_from_monai(model)[1]


def convert(obj: nn.Module | Mapping[str, torch.Tensor], target: nn.Module | None = None) -> nn.Module:
    """Turn a MONAI ``UNet`` / ``AttentionUnet`` (or its state dict) into the equal medsegkit network.

    Args:
        obj: a MONAI model (its configuration is read from it), or a bare MONAI state dict.
        target: a built medsegkit model to load into. Required for a state dict; with a MONAI model, an
            optional model to fill instead of building one. (A registry name is resolved by
            :func:`medsegkit.convert`, which builds it and calls this function.)

    Returns:
        The medsegkit model holding ``obj``'s weights, in ``obj``'s train/eval mode (eval for a state dict);
        a model built here lives on ``obj``'s device in its dtype.

    Raises:
        TypeError: ``obj`` is neither a supported MONAI model nor a state dict, or ``target`` is not a model.
        ValueError: a state dict without ``target``.
        ValueError: the weights do not fit ``target`` (one line: the first of PyTorch's mismatching keys).
    """
    from medsegkit.nets import unet

    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        if target is None:
            cls_name, kwargs = config_from_monai(obj)
            model = getattr(unet, cls_name)(**kwargs)
            _follow(model, obj)
        else:
            model = _target_model(target)
        _load(model, state)
        return model.train(obj.training)
    if not isinstance(obj, Mapping):
        raise TypeError(f"obj must be a MONAI model or a state dict, got {type(obj).__name__}")
    if target is None:
        raise ValueError(
            "a bare MONAI state dict needs target= (a built medsegkit model, or a registry name via medsegkit.convert)"
        )
    model = _target_model(target)
    _load(model, dict(obj))
    return model.eval()


def _load(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strict load; weights of another architecture or configuration are one ``ValueError`` line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        from medsegkit.weights.checkpoint import state_mismatch

        raise ValueError(f"MONAI weights do not fit {type(model).__name__}: {state_mismatch(err)}") from None


def _follow(model: nn.Module, source: nn.Module) -> None:
    """Move ``model`` to ``source``'s device and floating-point dtype (those of its first float parameter)."""
    reference = next((p for p in source.parameters() if p.is_floating_point()), None)
    if reference is not None:
        model.to(device=reference.device, dtype=reference.dtype)


def _target_model(target: nn.Module) -> nn.Module:
    if isinstance(target, nn.Module):
        return target
    raise TypeError(
        f"target must be a built medsegkit model, got {type(target).__name__} (a registry name is resolved by "
        "medsegkit.convert)"
    )


def to_monai(model: nn.Module) -> nn.Module:
    """The MONAI ``UNet`` / ``AttentionUnet`` equal to a medsegkit model built with MONAI's layout.

    The MONAI model gets ``model``'s weights (MONAI's key names), device, dtype and train/eval mode.

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
    for name in ("kernel_size", "up_kernel_size"):
        if isinstance(kwargs[name], tuple) and any(isinstance(k, tuple) for k in kwargs[name]):
            raise ValueError(
                f"MONAI takes one {name} for every stage; this model has one per stage: {args[name]!r}"
            )
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
            and _all_three(args.get("merge_kernel_size"))
        )
        if not defaults_ok:
            raise ValueError(
                "MONAI's AttentionUnet hard-codes act, norm, bias, gates, dilation and the merge convs' kernel 3; "
                "this model changes them"
            )
        monai_model = monai_attention_unet(**kwargs, dropout=_tuples(args["dropout"]))
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
    _follow(monai_model, model)
    inverse = [(ours, theirs) for theirs, ours in pairs]
    state = {}
    for key, value in model.state_dict().items():
        renamed = model._rename(key, inverse)
        if renamed is None:
            raise ValueError(f"no MONAI counterpart for parameter {key!r}")
        state[renamed] = value
    monai_model.load_state_dict(state)
    return monai_model.train(model.training)


def _all_three(merge_kernel_size: Any) -> bool:
    """``merge_kernel_size`` builds MONAI's merge convs (kernel 3 on every axis of every level)."""
    if merge_kernel_size is None:
        return True
    if isinstance(merge_kernel_size, (list, tuple)):
        return all(_all_three(k) for k in merge_kernel_size)
    return merge_kernel_size == 3


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (MONAI factories want ``("group", {...})``)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
