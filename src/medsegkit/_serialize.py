"""Constructor arguments → JSON values, for checkpoints (``medsegkit_config``), models' ``init_args``
and bundle configs. Depends on nothing in medsegkit, so every layer (``nets`` included) may import it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["json_kind", "jsonable"]


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
