"""Constructor arguments → JSON values, for checkpoints (``medsegkit_config``), models' ``init_args``
and bundle configs. Depends on nothing in medsegkit, so every layer (``nets`` included) may import it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["json_kind", "jsonable", "label_metadata_problem"]


def jsonable(value: Any, *, strict: bool = True) -> Any:
    """``value`` with mappings → ``dict`` (string keys), sequences (not strings) → ``list``, numpy scalars → Python.

    Strings, ints, floats, bools and ``None`` pass through. Any other value raises ``TypeError`` naming
    it (``strict=True``: the value must be rebuilt from the JSON later, as a checkpoint's overrides are),
    or is recorded as ``str(value)`` (``strict=False``: a description only, as for a module class given
    to a network's ``act`` argument).
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, strict=strict) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [jsonable(v, strict=strict) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if not strict:
        return str(value)
    raise TypeError(
        f"value {value!r} of type {type(value).__name__} cannot be recorded in a checkpoint; "
        "use plain numbers, strings, lists or dicts"
    )


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages (``[1]`` -> ``"array"``, ``None`` -> ``"null"``)."""
    kinds = {list: "array", dict: "object", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def label_metadata_problem(metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with the label entries of metadata read back from JSON (a checkpoint's record, an
    export's sidecar, a label map's sidecar), or ``None``: ``class_names`` must be a list of strings and
    ``label_colors`` a list of RGB(A) lists of numbers, when present. A string of names would otherwise be
    read letter by letter, and a number fail deep inside napari or the writers."""
    names, colors = metadata.get("class_names"), metadata.get("label_colors")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return f"class_names = {names!r:.60} is not a list of strings"
    if colors is not None and not (isinstance(colors, list) and all(
            isinstance(c, list) and len(c) in (3, 4)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in c) for c in colors)):
        return f"label_colors = {colors!r:.60} is not a list of RGB(A) triples"
    return None
