"""Checkpoints: safe to load (safetensors or ``torch.load(weights_only=True)``), written atomically.

A medsegkit checkpoint holds the state dict and a JSON record::

    {"format": "medsegkit-checkpoint", "version": 1,
     "model": {"name": "UNet3d", "overrides": {...}}       # or {"target": "pkg.Class", "args": {...}}
                                                           # (+ "output_map": {"classes": K}: MappedOutput)
     "metadata": {"class_names": [...], "label_colors": [...], "preprocessing": {...}, ...}}

so that :func:`medsegkit.load_model` (registry layer: it resolves the recorded name) rebuilds the
model from the file alone; this module only reads, writes and loads tensors into built modules. ``.safetensors`` files keep the
record as JSON in the header metadata; other suffixes (``.pt``, ``.pth``, ``.ckpt``) use a plain dict
``{"state_dict": ..., "medsegkit": json_string}`` saved by ``torch.save`` and read with
``weights_only=True`` (no code is ever unpickled).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsegkit._serialize import json_kind, label_metadata_problem
from medsegkit.errors import CheckpointError
from medsegkit.files import atomic_write

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "check_checkpoint_name",
    "check_weights",
    "checkpoint_record",
    "fetch_checkpoint",
    "load_checkpoint",
    "load_state",
    "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "medsegkit-checkpoint"
RECORD_KEY = "medsegkit"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")  # what writers that choose a name accept


def check_checkpoint_name(checkpoint: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``checkpoint`` as a path, if its name ends in one of :data:`CHECKPOINT_SUFFIXES`.

    Used where a user names a checkpoint to write (training, an interactive session's adapted model), so
    that a mistyped name cannot write a checkpoint over an image.

    Raises:
        ValueError: any other name (``t1.nii.gz``, for example).
    """
    path = Path(checkpoint)
    if not path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"{what} {path} is not a checkpoint name; accepted endings: {', '.join(CHECKPOINT_SUFFIXES)} "
                         "(.safetensors recommended)")
    return path


def _model_record(model: nn.Module) -> dict[str, Any]:
    from medsegkit.nets.layers.output_map import MappedOutput

    if isinstance(model, MappedOutput):  # the model's own record plus its appended map of the logits
        return {**_model_record(model.model), "output_map": {"classes": model.classes}}
    config = getattr(model, "medsegkit_config", None)
    if config is not None:
        return {"name": config["name"], "overrides": config.get("overrides", {})}
    args = getattr(model, "init_args", None)
    if args is not None:
        cls = type(model)
        return {"target": f"{cls.__module__}.{cls.__qualname__}", "args": args}
    return {}


def checkpoint_record(model: nn.Module, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record :func:`save_checkpoint` writes beside the weights."""
    return {
        "format": FORMAT,
        "version": 1,
        "model": _model_record(model),
        "metadata": dict(metadata or {}),
    }


def save_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and its rebuild record to ``path`` atomically.

    Args:
        model: a model (built by :func:`medsegkit.create_model`, so its name and arguments are
            recorded) or a bare state dict (then pass ``record``).
        path: ``*.safetensors`` for safetensors; ``*.pt``, ``*.pth`` or ``*.ckpt`` for a weights-only torch
            file; any other name raises ``ValueError`` (:func:`check_checkpoint_name`: a mistyped name must
            not write a checkpoint over a scan).
        metadata: JSON-serialisable facts: class names, label colours, preprocessing, training data,
            metrics.
        overwrite: replace an existing ``path``; without it (the default since 2026-12-08) an existing
            ``path`` raises ``FileExistsError``.
        record: the full record to store instead of the one built from ``model``.

    Returns:
        The path written.
    """
    path = check_checkpoint_name(path, "path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if isinstance(model, nn.Module):
        state = model.state_dict()
        rec = dict(record) if record is not None else checkpoint_record(model, metadata)
    else:
        state = dict(model)
        rec = dict(record) if record is not None else {"format": FORMAT, "version": 1, "model": {}}
        if metadata:
            rec["metadata"] = {**rec.get("metadata", {}), **metadata}
    try:
        text = json.dumps(rec)
    except TypeError as err:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
    # safetensors refuses shared storage and non-contiguous views; clone into plain tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={RECORD_KEY: text})
    else:

        def write(tmp: Path) -> None:
            torch.save({"state_dict": tensors, RECORD_KEY: text}, tmp)

    return atomic_write(path, write)


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"):
    """Read ``(state_dict, record)`` from a local file without unpickling any code.

    ``record`` is the medsegkit record, or ``{}`` for a foreign checkpoint (a plain state dict, a
    torchvision ``.pth``, a MONAI bundle ``model.pt``, a dict holding ``"state_dict"`` / ``"model"``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, corrupt, or containing pickled code.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .safetensors / .pt file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                header = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items)
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
        return state, (_parse_record(header[RECORD_KEY], path) if RECORD_KEY in header else {})
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err) and "GLOBAL" not in str(err):
            raise CheckpointError(f"checkpoint {path} is not a readable PyTorch or safetensors file") from err
        raise CheckpointError(
            f"checkpoint {path} contains pickled Python objects, which medsegkit refuses to load "
            f"(only tensors and plain containers are allowed: weights_only=True). Re-save it with "
            f"medsegkit.save_checkpoint or as a plain state dict. Detail: {_unsupported_global(err)}"
        ) from err
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch or safetensors file: {err}") from err
    return _split_loaded(obj, path)


def _unsupported_global(err: Exception) -> str:
    for line in str(err).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()
    return str(err).splitlines()[0]


RECORD_FIELDS = {"model": dict, "metadata": dict}  # the record's entries that must be JSON objects when present
MODEL_FIELDS = {"name": str, "target": str, "overrides": dict, "args": dict}  # and those of its "model" entry


def _parse_record(text: str, path: Path) -> dict[str, Any]:
    """The medsegkit record stored as ``text`` in checkpoint ``path``, checked to have the structure
    :func:`checkpoint_record` writes (a damaged or hand-edited record would otherwise fail later as a
    ``JSONDecodeError`` or an ``AttributeError`` deep inside the loader).

    Raises:
        CheckpointError: the text is not JSON, not a JSON object, or one of its known entries has the wrong type.
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has a damaged {RECORD_KEY!r} record (not JSON: {err}); "
                              "re-save the model with medsegkit.save_checkpoint") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path}'s {RECORD_KEY!r} record is a JSON {json_kind(record)}, "
                              "expected an object with 'model' and 'metadata'")
    # present entries are checked, null included: a null name reached the registry as None ('NoneType' object
    # has no attribute 'lower'), null args were splatted into the constructor
    entries = [(key, record[key], kind) for key, kind in RECORD_FIELDS.items() if key in record]
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    entries += [(f"model.{key}", model[key], kind) for key, kind in MODEL_FIELDS.items() if key in model]
    for key, value, kind in entries:
        if not isinstance(value, kind):
            raise CheckpointError(f"checkpoint {path}'s {RECORD_KEY!r} record has {key} = {value!r:.60}, expected "
                                  f"a JSON {'object' if kind is dict else 'string'}")
    problem = label_metadata_problem(record.get("metadata") or {})
    if problem:
        raise CheckpointError(f"checkpoint {path}'s {RECORD_KEY!r} record has metadata.{problem}")
    return record


def _split_loaded(obj: Any, path: Path):
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    record: dict[str, Any] = {}
    if RECORD_KEY in obj and isinstance(obj[RECORD_KEY], str):
        record = _parse_record(obj[RECORD_KEY], path)
    for key in ("state_dict", "model", "network", "model_state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), record
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), record
    raise CheckpointError(
        f"checkpoint {path} has no state dict: expected tensors or one of the keys "
        f"'state_dict', 'model', 'network'; found keys {sorted(map(str, obj))[:10]}"
    )


def fetch_checkpoint(path_or_url: str | os.PathLike) -> Path:
    """A local path for ``path_or_url``: URLs are downloaded once into the cache (:mod:`.hub`)."""
    text = str(path_or_url)
    if "://" in text:
        from medsegkit.weights.hub import download

        return download(text)
    return Path(text).expanduser()


def load_checkpoint(
    model: nn.Module,
    path_or_url: str | os.PathLike,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (in place) and return it.

    Accepts medsegkit checkpoints and foreign state dicts whose keys the model's load pre-hooks map
    (a MONAI ``UNet`` state dict into :class:`medsegkit.nets.UNet`, for example).

    Raises:
        CheckpointError: the file was written for another architecture (the message names the record's
            model and the first mismatching keys), it is unsafe/corrupt, or its weights are not finite or not
            floating-point (:func:`check_weights`).
    """
    state, record = read_checkpoint(fetch_checkpoint(path_or_url), map_location=map_location)
    check_weights(model, state, f"checkpoint {path_or_url}")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        saved = record.get("model", {}).get("name") or record.get("model", {}).get("target") or "unknown"
        mine = getattr(model, "medsegkit_config", {}).get("name", type(model).__name__)
        raise CheckpointError(
            f"checkpoint {path_or_url} does not fit this model ({mine}; checkpoint made for {saved}): "
            + state_mismatch(err)
        ) from err
    if record.get("metadata"):
        model.medsegkit_metadata = record["metadata"]
    return model


def check_weights(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Refuse weights that would load without an error but cannot be right: a NaN / inf value, or a bool /
    integer tensor for one of the model's floating-point tensors (``load_state_dict`` casts both silently).

    Raises:
        CheckpointError: one line naming ``source``, the first such tensor and what is accepted.
    """
    own = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        mine = own.get(key)
        if mine is not None and mine.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{source}: {key} holds {value.dtype} values where the model has {mine.dtype} "
                                  "weights; a checkpoint's weights are floating-point tensors")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: {key} holds {bad} NaN or infinite value(s) of {value.numel()}; "
                                  "weights must be finite (was the training diverging when it was saved?)")


def state_mismatch(err: RuntimeError, lines: int = 3) -> str:
    """``load_state_dict``'s error (one line per missing / unexpected / mismatched key, tab-indented) as one
    line: its first ``lines`` lines, at most 600 characters."""
    return " ".join(line.strip() for line in str(err).strip().splitlines()[:lines])[:600]


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Strictly load ``state`` into the freshly built ``model`` (in place); ``source`` names the file in errors.

    Raises:
        CheckpointError: the weights do not fit the model (missing / unexpected keys, shapes), or are not
            finite / not floating-point (:func:`check_weights`).
    """
    check_weights(model, state, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not fit the recorded model: {state_mismatch(err)}") from err
    return model
