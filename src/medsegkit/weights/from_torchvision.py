"""torchvision → medsegkit: FCN (``fcn_resnet50/101``), Mask R-CNN (``maskrcnn_resnet50_fpn``), ResNet.

Explicit key maps (no shape guessing):

============================================  ============================================
torchvision ``resnetXX``                       medsegkit :class:`~medsegkit.nets.backbones.resnet.ResNet`
============================================  ============================================
``conv1.*`` / ``bn1.*``                        ``stem.conv.*`` / ``stem.norm.*``
``layer{i}.{j}.conv{k}.*``                     ``stages.{i-1}.{j}.conv{k}.*``
``layer{i}.{j}.bn{k}.*``                       ``stages.{i-1}.{j}.norm{k}.*``
``layer{i}.{j}.downsample.{0,1}.*``            ``stages.{i-1}.{j}.downsample.{0,1}.*``
``fc.*``                                       ``fc.*``
FCN ``backbone.<resnet key>``                  ``backbone.<mapped key>``
FCN ``classifier.{0,1,4}`` / ``aux_classifier``  ``head.{conv,norm,out}`` / ``aux_head.{...}``
Mask R-CNN ``backbone.body.<resnet key>``       ``backbone.body.<mapped key>``
Mask R-CNN everything else                      unchanged (same torchvision modules)
============================================  ============================================

torchvision's pretrained detection checkpoints use ``FrozenBatchNorm2d`` (no ``num_batches_tracked``);
our BatchNorm fills that buffer itself, so the values load unchanged. Parity (tested): FCN max |Δ| ≤ 1e-5;
Mask R-CNN same boxes, labels and scores to 1e-4 and the same masks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["convert", "fcn_key", "mask_rcnn_key", "resnet_key", "target_arguments"]

_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(.+)$")
_HEAD_INDEX = {"0": "conv", "1": "norm", "4": "out"}


def resnet_key(key: str) -> str:
    """torchvision ResNet key → :class:`ResNet` key (``KeyError`` for a key that is not a ResNet's)."""
    if key.startswith("conv1."):
        return "stem.conv." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "stem.norm." + key[len("bn1.") :]
    if key.startswith("fc."):
        return key
    match = _LAYER_KEY.match(key)
    if match is None:
        raise KeyError(f"{key!r} is not a torchvision ResNet key (conv1, bn1, layer1-4, fc)")
    stage, block, part, rest = match.groups()
    part = part.replace("bn", "norm")
    return f"stages.{int(stage) - 1}.{block}.{part}.{rest}"


def fcn_key(key: str) -> str:
    """torchvision ``FCN`` key → :class:`medsegkit.nets.FCN` key."""
    if key.startswith("backbone."):
        return "backbone." + resnet_key(key[len("backbone.") :])
    for source, target in (("classifier.", "head."), ("aux_classifier.", "aux_head.")):
        if key.startswith(source):
            index, _, rest = key[len(source) :].partition(".")
            if index not in _HEAD_INDEX:
                raise KeyError(f"{key!r}: torchvision FCNHead has parameters at indices 0, 1 and 4 only")
            return f"{target}{_HEAD_INDEX[index]}.{rest}"
    raise KeyError(f"{key!r} is not a torchvision FCN key (backbone., classifier., aux_classifier.)")


def mask_rcnn_key(key: str) -> str:
    """torchvision ``MaskRCNN`` key → :class:`medsegkit.nets.MaskRCNN` key (only the body is renamed)."""
    if key.startswith("backbone.body."):
        return "backbone.body." + resnet_key(key[len("backbone.body.") :])
    return key


def _map(
    state: Mapping[str, torch.Tensor], key_map: Callable[[str], str], prefix: str = ""
) -> dict[str, Any]:
    return {prefix + key_map(k): v for k, v in state.items()}


def _is_resnet_state(state: Mapping[str, Any]) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def _resnet_depth(model: nn.Module) -> int:
    from medsegkit.nets.backbones.resnet import RESNET_LAYOUTS

    blocks = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    kind = "bottleneck" if hasattr(model.layer1[0], "conv3") else "basic"
    for depth, layout in RESNET_LAYOUTS.items():
        if layout == (kind, blocks):
            return depth
    raise ValueError(f"unsupported torchvision ResNet layout: {kind} blocks {blocks}")


def _resnet_dilation(model: nn.Module) -> tuple[bool, bool, bool]:
    # a dilated stage keeps stride 1 in its first block and dilates its last block's 3×3 conv
    flags = []
    for i in (2, 3, 4):
        last = getattr(model, f"layer{i}")[-1]
        conv = last.conv2 if hasattr(last, "conv3") else last.conv1
        flags.append(conv.dilation[0] > 1)
    return tuple(flags)  # type: ignore[return-value]


def _config_of(obj: nn.Module) -> tuple[str, dict[str, Any]]:
    """(kind, constructor arguments of the equivalent medsegkit model) for a torchvision model."""
    from torchvision.models import ResNet as TVResNet
    from torchvision.models.detection import MaskRCNN as TVMaskRCNN
    from torchvision.models.segmentation import FCN as TVFCN

    from medsegkit.nets.mask_rcnn import MaskRCNN

    if isinstance(obj, MaskRCNN):
        raise TypeError("this is already a medsegkit MaskRCNN; use load_state_dict or save_checkpoint")
    if isinstance(obj, TVResNet):
        return "resnet", {
            "depth": _resnet_depth(obj),
            "in_channels": obj.conv1.in_channels,
            "replace_stride_with_dilation": _resnet_dilation(obj),
            "num_fc_classes": obj.fc.out_features,
        }
    if isinstance(obj, TVFCN):
        body = obj.backbone
        head = obj.classifier
        if len(head) != 5 or not isinstance(head[4], nn.Conv2d):
            raise ValueError(
                "only torchvision FCN with an FCNHead classifier (fcn_resnet50/101) is supported"
            )
        return "fcn", {
            "depth": _resnet_depth(body),
            "in_channels": body.conv1.in_channels,
            "out_channels": head[4].out_channels,
            "aux_loss": obj.aux_classifier is not None,
        }
    if isinstance(obj, TVMaskRCNN):
        body = obj.backbone.body
        if set(body.return_layers) != {"layer1", "layer2", "layer3", "layer4"}:
            raise ValueError(
                f"only ResNet-FPN backbones returning layer1-4 are supported, got {dict(body.return_layers)}"
            )
        if hasattr(obj.rpn.head.conv[0], "__len__") and len(obj.rpn.head.conv) != 1:
            raise ValueError(
                "only the v1 RPN head (one 3×3 conv) is supported (maskrcnn_resnet50_fpn, not _v2)"
            )
        transform, rpn, roi = obj.transform, obj.rpn, obj.roi_heads
        return "mask_rcnn", {
            "num_classes": roi.box_predictor.cls_score.out_features - 1,
            "depth": _resnet_depth(body),
            "in_channels": body.conv1.in_channels,
            "keep_fc": False,
            "fpn_channels": obj.backbone.out_channels,
            "anchor_sizes": tuple(tuple(s) for s in rpn.anchor_generator.sizes),
            "aspect_ratios": tuple(tuple(float(r) for r in a) for a in rpn.anchor_generator.aspect_ratios),
            "min_size": tuple(transform.min_size) if len(transform.min_size) > 1 else transform.min_size[0],
            "max_size": transform.max_size,
            "image_mean": tuple(transform.image_mean),
            "image_std": tuple(transform.image_std),
            "rpn_pre_nms_top_n_train": rpn._pre_nms_top_n["training"],
            "rpn_pre_nms_top_n_test": rpn._pre_nms_top_n["testing"],
            "rpn_post_nms_top_n_train": rpn._post_nms_top_n["training"],
            "rpn_post_nms_top_n_test": rpn._post_nms_top_n["testing"],
            "rpn_nms_thresh": rpn.nms_thresh,
            "rpn_score_thresh": rpn.score_thresh,
            "box_score_thresh": roi.score_thresh,
            "box_nms_thresh": roi.nms_thresh,
            "box_detections_per_img": roi.detections_per_img,
        }
    raise TypeError(
        f"cannot convert {type(obj).__module__}.{type(obj).__name__}; supported torchvision models: "
        "ResNet (resnet18-152), FCN (fcn_resnet50/101), MaskRCNN (maskrcnn_resnet50_fpn), or a bare state dict "
        "with target="
    )


def target_arguments(obj: nn.Module) -> dict[str, Any]:
    """Constructor arguments read from a torchvision model: what :func:`medsegkit.convert` builds a
    registry-name target with (keeping those its builder accepts).

    Empty for a classification ``ResNet``: it fills the backbone of a target built with the name's own
    defaults (its ``depth`` / ``num_fc_classes`` describe the backbone, not the target).
    """
    kind, config = _config_of(obj)
    return {} if kind == "resnet" else config


def _build(kind: str, config: dict[str, Any], target: nn.Module | None) -> nn.Module:
    if target is not None:
        return target
    if kind == "resnet":
        from medsegkit.nets.backbones.resnet import ResNet

        depth = config.pop("depth")
        return ResNet(depth, **config)
    if kind == "fcn":
        from medsegkit.nets.fcn import FCN

        return FCN(**config)
    from medsegkit.nets.mask_rcnn import MaskRCNN

    return MaskRCNN(**config)


def _load(model: nn.Module, state: dict[str, Any], *, optional_prefixes: tuple[str, ...] = ()) -> None:
    """Strict load, except target keys under ``optional_prefixes`` may stay at their initial values."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: a different configuration (classes, anchors, widths)
        from medsegkit.weights.checkpoint import state_mismatch

        raise ValueError(f"torchvision weights do not fit {type(model).__name__}: {state_mismatch(err)}") from err
    missing = [k for k in result.missing_keys if not k.startswith(optional_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"torchvision weights do not fit {type(model).__name__}: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{' ...' if len(result.unexpected_keys) > 8 else ''}"
        )


def _load_resnet_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """A classification ResNet state dict into a ResNet, or into the backbone of an FCN / Mask R-CNN."""
    from medsegkit.nets.backbones.resnet import ResNet
    from medsegkit.nets.fcn import FCN
    from medsegkit.nets.mask_rcnn import MaskRCNN

    if isinstance(model, ResNet):
        body = model
    elif isinstance(model, FCN):
        body = model.backbone
    elif isinstance(model, MaskRCNN):
        body = model.backbone.body
    else:
        raise TypeError(f"a torchvision ResNet fills a ResNet, FCN or MaskRCNN, not {type(model).__name__}")
    mapped = _map(state, resnet_key)
    if body.fc is None:  # the target dropped the unused classifier
        mapped = {k: v for k, v in mapped.items() if not k.startswith("fc.")}
    _load(body, mapped)


def convert(obj: nn.Module | Mapping[str, torch.Tensor], target: nn.Module | None = None) -> nn.Module:
    """Convert a torchvision model (or a bare torchvision state dict) into the medsegkit equivalent.

    Args:
        obj: torchvision ``ResNet``, ``FCN`` (``fcn_resnet50/101``) or ``MaskRCNN``
            (``maskrcnn_resnet50_fpn``), or a state dict of one of them.
        target: a built medsegkit ``ResNet`` / ``FCN`` / ``MaskRCNN`` (a classification ResNet fills the
            backbone of an FCN / Mask R-CNN). Without it, the model is built from ``obj``'s
            configuration. Required with a state dict. (A registry name is resolved by
            :func:`medsegkit.convert`: built with :func:`target_arguments`, then filled here.)

    Returns:
        The target model with torchvision's weights (FCN without ``aux_head``: the aux weights are
        dropped; Mask R-CNN with ``keep_fc``: ``fc`` keeps its initial values unless a ResNet fills it).
    """
    from medsegkit.nets.backbones.resnet import ResNet
    from medsegkit.nets.fcn import FCN
    from medsegkit.nets.mask_rcnn import MaskRCNN

    if target is not None and not isinstance(target, nn.Module):
        raise TypeError(
            f"target must be a built medsegkit ResNet, FCN or MaskRCNN, got {type(target).__name__} (a registry "
            "name is resolved by medsegkit.convert)"
        )
    if isinstance(obj, nn.Module):
        kind, config = _config_of(obj)
        state = obj.state_dict()
        model = _build(kind, config, target)
    elif isinstance(obj, Mapping):
        if target is None:
            raise ValueError(
                "a bare state dict needs target= (a built medsegkit model, or a registry name via medsegkit.convert)"
            )
        state = dict(obj)
        if "model" in state and isinstance(
            state["model"], Mapping
        ):  # torchvision reference-script checkpoints
            state = dict(state["model"])
        model = target
        kind = "resnet" if _is_resnet_state(state) else None
    else:
        raise TypeError(f"obj must be a torchvision model or a state dict, got {type(obj).__name__}")

    if kind == "resnet":
        _load_resnet_into(model, state)
    elif isinstance(model, FCN):
        mapped = _map(state, fcn_key)
        if model.aux_head is None:
            mapped = {k: v for k, v in mapped.items() if not k.startswith("aux_head.")}
        _load(model, mapped)
    elif isinstance(model, MaskRCNN):
        _load(model, _map(state, mask_rcnn_key), optional_prefixes=("backbone.body.fc.",))
    elif isinstance(model, ResNet):
        _load(model, _map(state, resnet_key))
    else:
        raise TypeError(f"target must be a medsegkit ResNet, FCN or MaskRCNN, got {type(model).__name__}")
    return model
