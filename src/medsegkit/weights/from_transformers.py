"""Convert transformers' MaskFormer / Mask2Former models and state dicts to medsegkit's.

Supported sources:

- ``MaskFormerForInstanceSegmentation`` with a ResNet backbone (basic or bottleneck blocks),
- ``Mask2FormerForUniversalSegmentation`` with a ResNet or Swin backbone,

as model objects (the architecture is read from ``model.config``) or as bare state dicts (then
``target``, a built :class:`~medsegkit.nets.MaskFormer` / :class:`~medsegkit.nets.Mask2Former`, or a
registry name through :func:`medsegkit.convert`, says which architecture they fill). Keys are mapped by an
explicit table (regular expressions on *our* keys, below); Swin's separate query/key/value projections
are concatenated into our fused ``qkv``, and ``nn.MultiheadAttention``'s ``in_proj`` is split into our
``q/k/v_proj``. Dropped on purpose: Swin's final LayerNorm (``swin.layernorm``, unused by the backbone),
the loss's ``criterion.empty_weight`` buffer and Swin's ``relative_position_index`` buffers. Anything
else left over, or missing, is an error.

After conversion (eval mode) our outputs equal transformers' ``class_queries_logits`` /
``masks_queries_logits`` within 1e-4 (fp32).

transformers is imported lazily and only for ``isinstance``-free duck typing on ``.config``; this
module works on bare state dicts without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["config_to_kwargs", "convert", "key_map", "target_arguments"]

_HF = "model.pixel_level_module.encoder."
_PIX = "model.pixel_level_module.decoder."
_TR = "model.transformer_module."

# (regex on our key, transformers key template). First match wins. Templates use \1, \2 ... groups.
# Alternatives (older transformers releases) are separated by "|".
_RESNET_RULES = [
    (r"backbone\.stem\.conv\.weight", _HF + "embedder.embedder.convolution.weight"),
    (r"backbone\.stem\.norm\.(\w+)", _HF + r"embedder.embedder.normalization.\1"),
    (
        r"backbone\.stages\.(\d+)\.(\d+)\.downsample\.0\.weight",
        _HF + r"encoder.stages.\1.layers.\2.shortcut.convolution.weight",
    ),
    (
        r"backbone\.stages\.(\d+)\.(\d+)\.downsample\.1\.(\w+)",
        _HF + r"encoder.stages.\1.layers.\2.shortcut.normalization.\3",
    ),
    (
        r"backbone\.stages\.(\d+)\.(\d+)\.conv(\d)\.weight",
        _HF + r"encoder.stages.\1.layers.\2.layer.<\3-1>.convolution.weight",
    ),
    (
        r"backbone\.stages\.(\d+)\.(\d+)\.norm(\d)\.(\w+)",
        _HF + r"encoder.stages.\1.layers.\2.layer.<\3-1>.normalization.\4",
    ),
]

_SWIN_BLOCK = _HF + r"swin.encoder.layers.\1.blocks.\2."
_SWIN_RULES = [
    (r"backbone\.patch_embed\.proj\.(\w+)", _HF + r"swin.embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.patch_embed\.norm\.(\w+)", _HF + r"swin.embeddings.norm.\1"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.(\w+)", _SWIN_BLOCK + r"layernorm_before.\3"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm2\.(\w+)", _SWIN_BLOCK + r"layernorm_after.\3"),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(\w+)",
        "cat:" + _SWIN_BLOCK + r"attention.{q_proj,k_proj,v_proj}.\3"
        "|cat:" + _SWIN_BLOCK + r"attention.self.{query,key,value}.\3",
    ),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(\w+)",
        _SWIN_BLOCK + r"attention.o_proj.\3|" + _SWIN_BLOCK + r"attention.output.dense.\3",
    ),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
        _SWIN_BLOCK
        + "attention.relative_position_bias.relative_position_bias_table|"
        + _SWIN_BLOCK
        + "attention.self.relative_position_bias_table",
    ),
    (
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)",
        _SWIN_BLOCK + r"mlp.\3.\4|" + _SWIN_BLOCK + r"<\3>.dense.\4",
    ),
    (r"backbone\.stages\.(\d+)\.downsample\.(\w+)\.(\w+)", _HF + r"swin.encoder.layers.\1.downsample.\2.\3"),
    (r"backbone\.out_norms\.(\d+)\.(\w+)", _HF + r"hidden_states_norms.stage<\1+1>.\2"),
]

_MASKFORMER_RULES = [
    (r"pixel_decoder\.stem\.conv\.weight", _PIX + "fpn.stem.0.weight"),
    (r"pixel_decoder\.stem\.norm\.(\w+)", _PIX + r"fpn.stem.1.\1"),
    (r"pixel_decoder\.layers\.(\d+)\.lateral\.conv\.weight", _PIX + r"fpn.layers.\1.proj.0.weight"),
    (r"pixel_decoder\.layers\.(\d+)\.lateral\.norm\.(\w+)", _PIX + r"fpn.layers.\1.proj.1.\2"),
    (r"pixel_decoder\.layers\.(\d+)\.output\.conv\.weight", _PIX + r"fpn.layers.\1.block.0.weight"),
    (r"pixel_decoder\.layers\.(\d+)\.output\.norm\.(\w+)", _PIX + r"fpn.layers.\1.block.1.\2"),
    (r"pixel_decoder\.mask_projection\.(\w+)", _PIX + r"mask_projection.\1"),
    (r"input_projection\.(\w+)", _TR + r"input_projection.\1"),
    (r"query_embed\.weight", _TR + "queries_embedder.weight"),
    (
        r"decoder_layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)",
        _TR + r"decoder.layers.\1.self_attn.\2_proj.\3",
    ),
    (
        r"decoder_layers\.(\d+)\.self_attn\.out_proj\.(\w+)",
        _TR + r"decoder.layers.\1.self_attn.o_proj.\2|" + _TR + r"decoder.layers.\1.self_attn.out_proj.\2",
    ),
    (r"decoder_layers\.(\d+)\.self_attn_norm\.(\w+)", _TR + r"decoder.layers.\1.self_attn_layer_norm.\2"),
    (
        r"decoder_layers\.(\d+)\.cross_attn\.([qkv])_proj\.(\w+)",
        _TR + r"decoder.layers.\1.encoder_attn.\2_proj.\3",
    ),
    (
        r"decoder_layers\.(\d+)\.cross_attn\.out_proj\.(\w+)",
        _TR
        + r"decoder.layers.\1.encoder_attn.o_proj.\2|"
        + _TR
        + r"decoder.layers.\1.encoder_attn.out_proj.\2",
    ),
    (r"decoder_layers\.(\d+)\.cross_attn_norm\.(\w+)", _TR + r"decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (
        r"decoder_layers\.(\d+)\.ffn\.(fc\d)\.(\w+)",
        _TR + r"decoder.layers.\1.mlp.\2.\3|" + _TR + r"decoder.layers.\1.\2.\3",
    ),
    (r"decoder_layers\.(\d+)\.ffn_norm\.(\w+)", _TR + r"decoder.layers.\1.final_layer_norm.\2"),
    (r"decoder_norm\.(\w+)", _TR + r"decoder.layernorm.\1"),
    (r"class_head\.(\w+)", r"class_predictor.\1"),
    (r"mask_embed\.layers\.(\d+)\.(\w+)", r"mask_embedder.\1.0.\2"),
]

_MASK2FORMER_RULES = [
    (r"pixel_decoder\.input_projections\.(\d+)\.conv\.(\w+)", _PIX + r"input_projections.\1.0.\2"),
    (r"pixel_decoder\.input_projections\.(\d+)\.norm\.(\w+)", _PIX + r"input_projections.\1.1.\2"),
    (r"pixel_decoder\.level_embed", _PIX + "level_embed"),
    (
        r"pixel_decoder\.encoder_layers\.(\d+)\.self_attn\.(\w+)\.(\w+)",
        _PIX + r"encoder.layers.\1.self_attn.\2.\3",
    ),
    (
        r"pixel_decoder\.encoder_layers\.(\d+)\.self_attn_norm\.(\w+)",
        _PIX + r"encoder.layers.\1.self_attn_layer_norm.\2",
    ),
    (r"pixel_decoder\.encoder_layers\.(\d+)\.ffn\.(fc\d)\.(\w+)", _PIX + r"encoder.layers.\1.\2.\3"),
    (
        r"pixel_decoder\.encoder_layers\.(\d+)\.ffn_norm\.(\w+)",
        _PIX + r"encoder.layers.\1.final_layer_norm.\2",
    ),
    (r"pixel_decoder\.mask_projection\.(\w+)", _PIX + r"mask_projection.\1"),
    (r"pixel_decoder\.lateral_convs\.(\d+)\.conv\.weight", _PIX + r"adapter_<\1+1>.0.weight"),
    (r"pixel_decoder\.lateral_convs\.(\d+)\.norm\.(\w+)", _PIX + r"adapter_<\1+1>.1.\2"),
    (r"pixel_decoder\.output_convs\.(\d+)\.conv\.weight", _PIX + r"layer_<\1+1>.0.weight"),
    (r"pixel_decoder\.output_convs\.(\d+)\.norm\.(\w+)", _PIX + r"layer_<\1+1>.1.\2"),
    (r"input_projections\.(\d+)\.(\w+)", _TR + r"input_projections.\1.\2"),
    (r"level_embed\.weight", _TR + "level_embed.weight"),
    (r"query_embed\.weight", _TR + "queries_embedder.weight"),
    (r"query_feat\.weight", _TR + "queries_features.weight"),
    (
        r"decoder_layers\.(\d+)\.cross_attn\.([qkv])_proj\.(weight|bias)",
        "split:\\2:" + _TR + r"decoder.layers.\1.cross_attn.in_proj_\3",
    ),
    (
        r"decoder_layers\.(\d+)\.cross_attn\.out_proj\.(\w+)",
        _TR + r"decoder.layers.\1.cross_attn.out_proj.\2",
    ),
    (r"decoder_layers\.(\d+)\.cross_attn_norm\.(\w+)", _TR + r"decoder.layers.\1.cross_attn_layer_norm.\2"),
    (r"decoder_layers\.(\d+)\.self_attn\.(\w+)\.(\w+)", _TR + r"decoder.layers.\1.self_attn.\2.\3"),
    (r"decoder_layers\.(\d+)\.self_attn_norm\.(\w+)", _TR + r"decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"decoder_layers\.(\d+)\.ffn\.(fc\d)\.(\w+)", _TR + r"decoder.layers.\1.\2.\3"),
    (r"decoder_layers\.(\d+)\.ffn_norm\.(\w+)", _TR + r"decoder.layers.\1.final_layer_norm.\2"),
    (r"decoder_norm\.(\w+)", _TR + r"decoder.layernorm.\1"),
    (r"mask_embed\.layers\.(\d+)\.(\w+)", _TR + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
    (r"class_head\.(\w+)", r"class_predictor.\1"),
]

# transformers keys that have no counterpart on purpose
_DROPPED = (
    re.compile(r"criterion\.empty_weight"),
    re.compile(r".*swin\.layernorm\.(weight|bias)"),  # the Swin backbone's unused final LayerNorm
    re.compile(r".*relative_position_index"),
)

_ARITH = re.compile(r"<(\d+)([+-])1>")
_HF_MLP_NAMES = {"fc1": "intermediate", "fc2": "output"}


def _expand(template: str, match: re.Match) -> str:
    key = match.expand(template)
    key = _ARITH.sub(lambda m: str(int(m.group(1)) + (1 if m.group(2) == "+" else -1)), key)
    return re.sub(r"<(fc\d)>", lambda m: _HF_MLP_NAMES[m.group(1)], key)


def key_map(model: nn.Module) -> dict[str, str]:
    """Our state-dict key → transformers key (template with ``cat:``/``split:`` markers and ``|`` alternatives).

    Raises:
        ValueError: ``model`` is not a MaskFormer / Mask2Former, or has a key no rule covers.
    """
    from medsegkit.nets.mask2former import Mask2Former
    from medsegkit.nets.maskformer import MaskFormer

    if isinstance(model, Mask2Former):
        head_rules = _MASK2FORMER_RULES
    elif isinstance(model, MaskFormer):
        head_rules = _MASKFORMER_RULES
    else:
        raise ValueError(
            f"transformers conversion fills medsegkit MaskFormer or Mask2Former models, got {type(model).__name__}"
        )
    rules = [
        (re.compile(pattern), template) for pattern, template in _RESNET_RULES + _SWIN_RULES + head_rules
    ]
    mapping = {}
    for key in model.state_dict():
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match:
                mapping[key] = _expand(template, match)
                break
        else:
            raise ValueError(f"no transformers key rule for {key!r} (medsegkit {type(model).__name__})")
    return mapping


def _fetch(state: Mapping[str, torch.Tensor], spec: str, used: set[str]) -> torch.Tensor | None:
    """Read one of the ``|``-separated alternatives of ``spec`` from ``state``; ``None`` if none exists."""
    for alternative in spec.split("|"):
        if alternative.startswith("cat:"):
            head, _, rest = alternative[4:].partition("{")
            names, _, tail = rest.partition("}")
            keys = [head + name + tail for name in names.split(",")]
            if all(k in state for k in keys):
                used.update(keys)
                return torch.cat([state[k] for k in keys], 0)
        elif alternative.startswith("split:"):
            _, which, key = alternative.split(":", 2)
            if key in state:
                used.add(key)
                return state[key].chunk(3, 0)["qkv".index(which)]
        elif alternative in state:
            used.add(alternative)
            return state[alternative]
    return None


def convert_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers state dict → our state dict for ``model`` (strict both ways).

    Raises:
        KeyError: a key of ``model`` has no source, or the source has keys nothing maps (listed).
        ValueError: a tensor has the wrong shape (the configurations differ).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    ours = model.state_dict()
    used: set[str] = set()
    converted, missing = {}, []
    for key, spec in key_map(model).items():
        tensor = _fetch(state, spec, used)
        if tensor is None:
            missing.append(f"{key} <- {spec}")
            continue
        if tuple(tensor.shape) != tuple(ours[key].shape):
            raise ValueError(
                f"shape mismatch for {key}: medsegkit {tuple(ours[key].shape)} vs transformers "
                f"{tuple(tensor.shape)} ({spec}); build the target with the source's configuration"
            )
        converted[key] = tensor
    leftover = sorted(k for k in state if k not in used and not any(p.fullmatch(k) for p in _DROPPED))
    if missing or leftover:
        parts = []
        if missing:
            parts.append(f"{len(missing)} medsegkit keys have no transformers source: {missing[:5]}")
        if leftover:
            parts.append(f"{len(leftover)} transformers keys are not used: {leftover[:5]}")
        raise KeyError(
            "the state dict does not fit the target architecture: "
            + "; ".join(parts)
            + " (is it a MaskFormer/Mask2Former of the same backbone and sizes?)"
        )
    return converted


def _resnet_kwargs(config: Any) -> tuple[str, dict[str, Any]]:
    layouts = {
        ("basic", (2, 2, 2, 2)): 18,
        ("basic", (3, 4, 6, 3)): 34,
        ("bottleneck", (3, 4, 6, 3)): 50,
        ("bottleneck", (3, 4, 23, 3)): 101,
    }
    layer_type, depths = config.layer_type, tuple(config.depths)
    depth = layouts.get((layer_type, depths))
    widths = (64, 128, 256, 512) if layer_type == "basic" else (256, 512, 1024, 2048)
    problems = []
    if depth is None:
        problems.append(f"layer_type={layer_type!r} with depths={list(depths)}")
    if tuple(config.hidden_sizes) != widths:
        problems.append(f"hidden_sizes={list(config.hidden_sizes)} (expected {list(widths)})")
    if config.embedding_size != 64:
        problems.append(f"embedding_size={config.embedding_size} (expected 64)")
    if getattr(config, "downsample_in_bottleneck", False) or getattr(
        config, "downsample_in_first_stage", False
    ):
        problems.append("downsample_in_bottleneck/downsample_in_first_stage=True (we stride on the 3x3 conv)")
    if config.hidden_act != "relu":
        problems.append(f"hidden_act={config.hidden_act!r}")
    if problems:
        raise ValueError(
            "unsupported ResNet backbone configuration: "
            + "; ".join(problems)
            + ". Supported: ResNet-18/34 (basic) and ResNet-50/101 (bottleneck) with torchvision's widths"
        )
    return f"resnet_{depth}", {}


def _swin_kwargs(config: Any) -> tuple[str, dict[str, Any]]:
    from medsegkit.nets.backbones.swin import SWIN_CONFIGS

    if getattr(config, "use_absolute_embeddings", False):
        raise ValueError("Swin with use_absolute_embeddings=True is not supported")
    if config.hidden_act != "gelu":
        raise ValueError(f"Swin with hidden_act={config.hidden_act!r} is not supported (gelu only)")
    shape = {
        "embed_dim": int(config.embed_dim),
        "depths": tuple(int(d) for d in config.depths),
        "num_heads": tuple(int(h) for h in config.num_heads),
        "window_size": int(config.window_size),
    }
    extra = {
        "patch_size": int(config.patch_size),
        "mlp_ratio": float(config.mlp_ratio),
        "qkv_bias": bool(config.qkv_bias),
        "drop_path_rate": float(config.drop_path_rate),
    }
    defaults = {"patch_size": 4, "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.3}
    extra = {k: v for k, v in extra.items() if defaults[k] != v}
    for name, preset in SWIN_CONFIGS.items():
        if preset == shape:
            return f"swin_{name}", extra
    return "swin", {**shape, "depths": list(shape["depths"]), "num_heads": list(shape["num_heads"]), **extra}


def _backbone_kwargs(config: Any, allow_swin: bool) -> tuple[str, dict[str, Any]]:
    backbone_config = getattr(config, "backbone_config", None)
    model_type = getattr(backbone_config, "model_type", None)
    out_features = list(getattr(backbone_config, "out_features", None) or [])
    if out_features and out_features != ["stage1", "stage2", "stage3", "stage4"]:
        raise ValueError(f"the backbone must return stage1..stage4, got out_features={out_features}")
    if model_type == "resnet":
        return _resnet_kwargs(backbone_config)
    if model_type in ("swin", "maskformer-swin") and allow_swin:
        return _swin_kwargs(backbone_config)
    accepted = "resnet and swin" if allow_swin else "resnet"
    raise ValueError(f"unsupported backbone {model_type!r}; medsegkit converts {accepted} backbones here")


def config_to_kwargs(config: Any) -> tuple[str, dict[str, Any]]:
    """A transformers ``MaskFormerConfig`` / ``Mask2FormerConfig`` → (medsegkit class name, constructor kwargs)."""
    model_type = getattr(config, "model_type", None)
    in_channels = int(getattr(config.backbone_config, "num_channels", 3))
    if model_type == "maskformer":
        backbone, backbone_kwargs = _backbone_kwargs(config, allow_swin=False)
        decoder = config.decoder_config
        if decoder.activation_function != "relu":
            raise ValueError(
                f"decoder activation {decoder.activation_function!r} is not supported (relu only)"
            )
        kwargs = {
            "num_classes": int(config.num_labels),
            "backbone": backbone,
            "in_channels": in_channels,
            "num_queries": int(decoder.num_queries),
            "hidden_dim": int(decoder.d_model),
            "num_heads": int(decoder.decoder_attention_heads),
            "decoder_layers": int(decoder.decoder_layers),
            "ffn_dim": int(decoder.decoder_ffn_dim),
            "dropout": float(decoder.dropout),
            "fpn_dim": int(config.fpn_feature_size),
            "mask_dim": int(config.mask_feature_size),
        }
        name = "MaskFormer"
    elif model_type == "mask2former":
        backbone, backbone_kwargs = _backbone_kwargs(config, allow_swin=True)
        problems = []
        if config.pre_norm:
            problems.append("pre_norm=True")
        if config.activation_function != "relu":
            problems.append(f"activation_function={config.activation_function!r}")
        if int(config.common_stride) != 4 or tuple(config.feature_strides) != (4, 8, 16, 32):
            problems.append(
                f"common_stride={config.common_stride}, feature_strides={list(config.feature_strides)}"
            )
        if config.enforce_input_projection and config.feature_size == config.hidden_dim:
            problems.append("enforce_input_projection=True")
        if problems:
            raise ValueError("unsupported Mask2Former configuration: " + "; ".join(problems))
        kwargs = {
            "num_classes": int(config.num_labels),
            "backbone": backbone,
            "in_channels": in_channels,
            "num_queries": int(config.num_queries),
            "hidden_dim": int(config.hidden_dim),
            "num_heads": int(config.num_attention_heads),
            "decoder_layers": int(config.decoder_layers),
            "ffn_dim": int(config.dim_feedforward),
            "encoder_layers": int(config.encoder_layers),
            "encoder_ffn_dim": int(config.encoder_feedforward_dim),
            "feature_dim": int(config.feature_size),
            "mask_dim": int(config.mask_feature_size),
            "dropout": float(config.dropout),
        }
        name = "Mask2Former"
    else:
        raise ValueError(
            f"unsupported transformers model type {model_type!r}; accepted: MaskFormerForInstanceSegmentation "
            "(maskformer) and Mask2FormerForUniversalSegmentation (mask2former)"
        )
    if backbone_kwargs:
        kwargs["backbone_kwargs"] = backbone_kwargs
    return name, kwargs


_SUPPORTED_CLASSES = ("MaskFormerForInstanceSegmentation", "Mask2FormerForUniversalSegmentation")


def _source(obj: Any) -> tuple[Mapping[str, torch.Tensor], Any, bool | None]:
    """``(state dict, config or None, training flag or None)`` of a supported model or a bare state dict."""
    if isinstance(obj, Mapping):
        return dict(obj), None, None
    if isinstance(obj, nn.Module) and hasattr(obj, "config"):
        if type(obj).__name__ not in _SUPPORTED_CLASSES:
            raise ValueError(
                f"unsupported transformers class {type(obj).__name__}; accepted: {', '.join(_SUPPORTED_CLASSES)}"
            )
        return obj.state_dict(), obj.config, obj.training
    raise TypeError(
        f"expected a transformers MaskFormer/Mask2Former model or a state dict, got {type(obj).__name__}"
    )


def target_arguments(obj: nn.Module) -> dict[str, Any]:
    """Constructor arguments read from a transformers model's ``config`` (:func:`config_to_kwargs`): what
    :func:`medsegkit.convert` builds a registry-name target with (keeping those its builder accepts)."""
    _, config, _ = _source(obj)
    return config_to_kwargs(config)[1] if config is not None else {}


def convert(obj: Any, target: nn.Module | None = None) -> nn.Module:
    """transformers MaskFormer / Mask2Former (model or state dict) → medsegkit model.

    Args:
        obj: a ``MaskFormerForInstanceSegmentation`` or ``Mask2FormerForUniversalSegmentation``, or
            a bare state dict of one.
        target: built medsegkit model to fill; optional with a model (then built from its config),
            required with a state dict. (A registry name is resolved by :func:`medsegkit.convert`:
            built with :func:`target_arguments`, then filled here.)

    Returns:
        The medsegkit model holding the converted weights (train/eval mode copied from a source model).
    """
    from medsegkit.nets.mask2former import Mask2Former
    from medsegkit.nets.maskformer import MaskFormer

    state, config, training = _source(obj)
    if target is None:
        if config is None:
            raise ValueError(
                "a bare state dict needs target= (a built medsegkit model, or a registry name via medsegkit.convert)"
            )
        name, kwargs = config_to_kwargs(config)
        model = (Mask2Former if name == "Mask2Former" else MaskFormer)(**kwargs)
        model.init_args = kwargs
    elif isinstance(target, nn.Module):
        model = target
    else:
        raise TypeError(
            f"target must be a built medsegkit model, got {type(target).__name__} (a registry name is resolved by "
            "medsegkit.convert)"
        )

    converted = convert_state_dict(state, model)
    model.load_state_dict(converted, strict=True)
    if training is not None:
        model.train(training)
    return model
