"""The one mixed-precision choice for the whole package (inference, instance detection, training).

``amp`` arguments everywhere mean the same thing:

- ``False`` / ``None``: float32, no autocast.
- ``True``: bfloat16 where the device computes it natively (CPU: AVX-512 BF16 or AMX; CUDA: compute
  capability ≥ 8.0), else float16 on CUDA, else float32 with a note saying why.
- ``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` and ``"fp16"`` / ``"float16"`` / ``torch.float16``:
  that type where the device supports it, else float32 with a note (an emulated bf16 is slower than
  float32, so it is never chosen).

:func:`amp_choice` returns the dtype and the note; :func:`amp_dtype` logs the note; :func:`autocast`
is the context manager the network calls run under.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

__all__ = ["amp_choice", "amp_dtype", "autocast", "autocast_as", "bf16_supported"]

logger = logging.getLogger("medsegkit.inference")

_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_ACCEPTED = "True, False, 'bf16' or 'fp16' (or torch.bfloat16 / torch.float16)"


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX-512 BF16 or AMX; CUDA: capability ≥ 8)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        # torch exposes the CPU feature flags only as private helpers; a torch without them has no
        # way to tell, so bf16 is treated as unsupported (float32 is always correct)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def _requested(amp: Any) -> torch.dtype | None | bool:
    """``amp`` parsed: ``False`` (off), ``None`` (automatic) or the dtype asked for."""
    if amp is False or amp is None:
        return False
    if amp is True:
        return None
    if isinstance(amp, str):
        if amp not in _NAMES:
            raise ValueError(f"amp must be {_ACCEPTED}, got {amp!r}")
        return _NAMES[amp]
    if isinstance(amp, torch.dtype):
        if amp not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp must be {_ACCEPTED}, got {amp}")
        return amp
    raise ValueError(f"amp must be {_ACCEPTED}, got {amp!r}")


def amp_choice(device: torch.device | str, amp: Any) -> tuple[torch.dtype | None, str | None]:
    """``(autocast dtype or None for float32, reason float32 was chosen over what was asked or None)``.

    The reason is a clause such as ``"cpu has no native bfloat16 support"``; callers add what they do
    instead (``"; running in float32"``). Raises ``ValueError`` for an ``amp`` value not listed in the
    module docstring.
    """
    device = torch.device(device)
    wanted = _requested(amp)
    if wanted is False:
        return None, None
    if wanted in (None, torch.bfloat16) and bf16_supported(device):
        return torch.bfloat16, None
    if device.type == "cuda" and wanted in (None, torch.float16):
        return torch.float16, None
    if wanted is torch.float16:
        return None, f"fp16 autocast is not supported on {device.type}"
    return None, f"{device.type} has no native bfloat16 support"


def amp_dtype(device: torch.device | str, amp: Any) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None``: run in float32; the reason is logged)."""
    dtype, reason = amp_choice(device, amp)
    if reason is not None:
        logger.warning("%s; running in float32", reason)
    return dtype


def autocast_as(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` (a dtype already chosen), or a null context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def autocast(device: torch.device | str, amp: Any) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the dtype :func:`amp_dtype` picks, or a null context for float32."""
    return autocast_as(device, amp_dtype(device, amp))
