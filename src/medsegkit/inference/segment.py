"""Segment an :class:`~medsegkit.io.Image`: preprocessing → :func:`predict` → inverse → clean-up.

This is what the CLI and the napari worker call. The steps:

1. the model: a ``nn.Module``, a checkpoint path/URL (:func:`medsegkit.weights.load_model` rebuilds it
   from the record inside) or a registry name that has registered weights (a name without weights is
   refused: segmenting with random weights would give a plausible-looking but meaningless result);
2. the preprocessing the model expects: ``preprocessing=`` if given, else the checkpoint's
   ``metadata["preprocessing"]``, else the registry's ``default_preprocessing`` preset, else none
   (:func:`medsegkit.transforms.preprocess`: orientation, spacing, intensity);
3. :func:`medsegkit.inference.predict` on the preprocessed ``(1, C, *spatial)`` tensor;
4. :func:`medsegkit.transforms.restore` puts the result back on the input grid (MONAI ``Invertd``:
   nearest neighbours for labels, linear for probabilities / logits);
5. optional label clean-up with MONAI's ``KeepLargestConnectedComponent``, ``FillHoles`` and
   ``RemoveSmallObjects`` (per class);
6. an :class:`~medsegkit.io.Image` on the input's grid (the input's affine).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medsegkit._values import is_whole_number
from medsegkit.inference.predict import OUTPUTS, predict
from medsegkit.inference.windows import model_spatial_dims

if TYPE_CHECKING:  # pragma: no cover
    from medsegkit.io import Image

__all__ = ["clean_labels", "resolve_model", "resolve_tta_flips", "segment"]

logger = logging.getLogger("medsegkit.inference")


def resolve_model(model_or_checkpoint: nn.Module | str | os.PathLike, *, map_location: str = "cpu") -> nn.Module:
    """A ready model from a module, a checkpoint path / URL, an export of :func:`medsegkit.export` (its
    folder or network file, opened on its own backend as an
    :class:`~medsegkit.inference.backends.ExportedNetwork`), or a registry name with registered weights.

    Raises:
        FileNotFoundError: a path-like string that names no file.
        KeyError: neither a file nor a registered name (the message lists the closest names).
        ValueError: a registered name without weights (never segment with random weights).
        medsegkit.CheckpointError: an unreadable or unsafe checkpoint, or one for another architecture.
    """
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint
    if not isinstance(model_or_checkpoint, (str, os.PathLike)):
        raise TypeError(
            f"model must be a torch.nn.Module, a checkpoint path or a registry name, got {type(model_or_checkpoint).__name__}"
        )
    from medsegkit.weights import load_model

    text = os.fspath(model_or_checkpoint)
    from medsegkit.inference.backends import is_exported, load_exported

    if is_exported(text):  # an export of medsegkit.export: the sidecar holds what the checkpoint would
        return load_exported(text)
    if "://" in text or Path(text).expanduser().exists():
        return load_model(text, map_location=map_location)
    looks_like_path = os.sep in text or Path(text).suffix in (".pt", ".pth", ".ckpt", ".safetensors")
    if looks_like_path:
        raise FileNotFoundError(f"checkpoint {text} does not exist")
    from medsegkit.registry import create_model, get_model_spec

    spec = get_model_spec(text)  # KeyError with the closest names
    if not spec.has_weights:
        raise ValueError(
            f"model {spec.name} has no registered weights; refusing to segment with random weights. "
            f"Give a trained checkpoint (--checkpoint FILE, or the checkpoint path instead of the name)"
        )
    return create_model(spec.name, pretrained=True).eval()


def resolve_tta_flips(tta_flips: Any, preprocessing: Any, spatial_ndim: int) -> Any:
    """The axes that ``tta_flips="auto"`` mirrors on the preprocessed grid (other values are returned
    unchanged).

    When ``preprocessing`` reorients the image to an anatomical frame (an ``orientation`` code such as
    ``"RAS"``, as every MR / CT preset and the training recipe do), only the left-right axis: a body is
    mirror-symmetric about its mid-sagittal plane alone, so a model never meets upside-down or
    back-to-front anatomy in a scan, nor in the training recipe's augmentation (which flips left-right
    only). Mirroring those axes too fed such inputs to the model and lowered its Dice
    (``docs/inference.md``). Without an orientation step (microscopy, unknown frames): every spatial axis,
    as nnU-Net mirrors.

    Args:
        tta_flips: ``"auto"``, or explicit axes (returned as given).
        preprocessing: the preset name or spec the image is preprocessed with.
        spatial_ndim: spatial dimensions of the preprocessed image.
    """
    if not (isinstance(tta_flips, str) and tta_flips == "auto"):
        return tta_flips
    from medsegkit.transforms import resolve_preprocessing

    orientation = resolve_preprocessing(preprocessing).get("orientation")
    if isinstance(orientation, str):
        left_right = [axis for axis, code in enumerate(orientation.upper()[:spatial_ndim]) if code in "LR"]
        if left_right:
            return tuple(left_right)
    return tuple(range(spatial_ndim))


def preprocessing_for(model: nn.Module, preprocessing: Any) -> Any:
    if preprocessing is not None:
        return preprocessing
    metadata = getattr(model, "medsegkit_metadata", None) or {}
    if metadata.get("preprocessing") is not None:
        return metadata["preprocessing"]
    config = getattr(model, "medsegkit_config", None)
    if isinstance(config, Mapping) and "name" in config:
        from medsegkit.registry import get_model_spec

        try:
            preset = get_model_spec(config["name"]).default_preprocessing
        except KeyError:
            preset = None
        if preset is not None:
            return preset
    return "none"


def clean_labels(
    labels: np.ndarray,
    *,
    largest_component: bool = False,
    fill_holes: bool = False,
    min_size: int = 0,
) -> np.ndarray:
    """Label clean-up with MONAI's post-processing transforms, per foreground class.

    Args:
        labels: integer label map ``(*spatial)`` (0 = background).
        largest_component: keep only the largest connected component of each class
            (``KeepLargestConnectedComponent``).
        fill_holes: fill enclosed holes of each class (``FillHoles``).
        min_size: remove connected components smaller than this many voxels (``RemoveSmallObjects``,
            applied to each class mask); removed voxels become background.

    Returns:
        The cleaned label map, same shape and dtype.
    """
    from monai.transforms import FillHoles, KeepLargestConnectedComponent, RemoveSmallObjects

    if not is_whole_number(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a whole number of voxels >= 0, got {min_size!r}")
    result = torch.from_numpy(np.array(labels, copy=True))[None]  # (1, *spatial); MONAI works in place
    classes = [int(c) for c in torch.unique(result) if int(c) != 0]
    if not classes:
        return np.asarray(labels)
    if min_size > 0:
        remover = RemoveSmallObjects(min_size=int(min_size), connectivity=1)
        for c in classes:
            mask = result == c
            with warnings.catch_warnings():
                # MONAI 1.x passes scikit-image's deprecated `min_size` (same meaning as MONAI's)
                warnings.filterwarnings("ignore", message="Parameter `min_size` is deprecated", category=FutureWarning)
                kept = torch.as_tensor(remover(mask)).bool()
            result[mask & ~kept] = 0
    if largest_component:
        result = torch.as_tensor(KeepLargestConnectedComponent(applied_labels=classes, is_onehot=False)(result))
    if fill_holes:
        result = torch.as_tensor(FillHoles(applied_labels=classes)(result))
    return result[0].numpy().astype(np.asarray(labels).dtype, copy=False)


def segment(
    model_or_checkpoint: nn.Module | str | os.PathLike,
    image: Image | str | os.PathLike,
    *,
    preprocessing: str | Mapping[str, Any] | None = None,
    largest_component: bool = False,
    fill_holes: bool = False,
    min_size: int = 0,
    output: str = "labels",
    **predict_kwargs: Any,
) -> Image:
    """Segment ``image`` and return the result on the input's grid.

    Args:
        model_or_checkpoint: a model, a checkpoint path / URL, an export (folder or ``.onnx`` / ``.xml`` /
            ``.pt2`` / ``.ts`` file with its ``medsegkit.json`` sidecar), or a registry name with
            registered weights.
        image: an :class:`~medsegkit.io.Image` ``(i, j, k)`` / ``(C, i, j, k)`` (or a path to read).
        preprocessing: preset name (``"mr"``, ``"ct"``, ``"none"``) or spec dict; default: the
            checkpoint's recorded preprocessing, else the registry's preset, else none.
        largest_component, fill_holes, min_size: label clean-up (see :func:`clean_labels`); labels only.
        output: ``"labels"`` (``(i, j, k)`` integer map), ``"probabilities"`` or ``"logits"``
            (``(K, i, j, k)`` float32, resampled linearly).
        **predict_kwargs: passed to :func:`medsegkit.inference.predict` (``roi_size``, ``overlap``,
            ``device``, ``fast``, ``tta_flips``, ``progress``, ``cancel``, ...; ``tta_flips="auto"``: see
            :func:`resolve_tta_flips`). A 2D model on a 3D image
            runs slice by slice along the last (axial, after RAS orientation) axis unless
            ``slice_axis`` is given.

    Returns:
        An :class:`~medsegkit.io.Image` with the input's affine; ``meta["class_names"]`` when the
        checkpoint records them.
    """
    from medsegkit.io import Image, read_image
    from medsegkit.transforms import preprocess, restore

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if output != "labels" and (largest_component or fill_holes or min_size):
        raise ValueError("largest_component, fill_holes and min_size clean up labels; use output='labels'")
    if "out" in predict_kwargs:
        raise ValueError("segment writes no out= store (it resamples the result); use predict(..., out=...) instead")
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if not isinstance(image, Image):
        raise TypeError(f"image must be a medsegkit.io.Image or a path, got {type(image).__name__}")
    model = resolve_model(model_or_checkpoint)
    sidecar = getattr(model, "sidecar", None)  # an export records the window settings it was made for
    if isinstance(sidecar, Mapping):
        for key in ("overlap", "mode"):
            if key in sidecar:
                predict_kwargs.setdefault(key, sidecar[key])
    spec = preprocessing_for(model, preprocessing)
    model_dims = model_spatial_dims(model)
    if model_dims > image.spatial_ndim:
        raise ValueError(
            f"image is {image.spatial_ndim}D (shape {image.spatial_shape}) but {type(model).__name__} is a "
            f"{model_dims}D model; give a {model_dims}D image"
        )
    tensor, state = preprocess(image, spec)
    batch = tensor.as_tensor()[None]  # (1, C, *spatial): unambiguous layout for predict
    if "tta_flips" in predict_kwargs:
        predict_kwargs["tta_flips"] = resolve_tta_flips(predict_kwargs["tta_flips"], spec, batch.ndim - 2)
    if model_dims == 2 and image.spatial_ndim == 3 and predict_kwargs.get("slice_axis") is None:
        predict_kwargs["slice_axis"] = 2
    prediction = predict(model, batch, output=output, **predict_kwargs)[0]
    restored = restore(prediction, state, is_label=output == "labels")
    if output == "labels" and (largest_component or fill_holes or min_size):
        restored = clean_labels(restored, largest_component=largest_component, fill_holes=fill_holes, min_size=min_size)
    metadata = getattr(model, "medsegkit_metadata", None) or {}
    meta: dict[str, Any] = {"preprocessing": state.spec, "output": output}
    for key in ("class_names", "label_colors"):
        if metadata.get(key):
            meta[key] = metadata[key]
    return image.with_array(restored, meta=meta)
