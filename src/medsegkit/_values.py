"""What counts as a number in medsegkit's argument checks. Depends on nothing in medsegkit, so every layer
(``nets`` included) may import it.

Python's ``True`` is an ``int`` and ``numpy.float32`` is not a ``float``; these say what the checks mean:
a bool is never a number or a size, and numpy scalars count as their Python kind.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["is_finite_number", "is_whole_number"]


def is_whole_number(value: Any) -> bool:
    """``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """``value`` is a finite real number (Python or numpy int / float), not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))
