"""Process-level settings for the processes medsegkit owns (the ``medsegkit`` command, the napari worker).

Torch-free: this must run before torch allocates its first CPU tensor.
"""

from __future__ import annotations

import os

__all__ = ["prefer_huge_pages"]


def prefer_huge_pages() -> None:
    """Ask PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``).

    A 3D network's activations are hundreds of MB that are freed and allocated again for every window
    batch, and each fresh 4 kB page costs a page fault (a 64 MB tensor: 16,387 faults; with huge pages
    546). PyTorch reads the variable once, at its first CPU allocation, so it only takes effect when set
    before that; a value the user set (``THP_MEM_ALLOC_ENABLE=0`` turns it off) is kept. Only the
    processes medsegkit starts call this: importing the library changes nothing in a user's process.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
