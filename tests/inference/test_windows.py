"""The window engine: one iterator with order / subset, progress after use, cancel, slab reads, one runner site."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medsegkit.errors import Cancelled
from medsegkit.inference.windows import WindowGrid, as_source, iterate_windows


class _CountingArray:
    """A lazy array (shape, dtype, slicing) that records every read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


def _setup(shape=(40, 24, 24), roi=(16, 16, 16)):
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    source, dims = as_source(volume, 3, 1, None)
    return volume, source, WindowGrid(source.spatial, roi, (0.5,) * dims)


def test_order_subset_progress_after_use_and_one_call_per_batch():
    volume, source, grid = _setup()
    events, calls = [], []

    def run(batch):
        calls.append(tuple(batch.shape))
        return batch.sum(dim=(1, 2, 3, 4))

    order = [5, 0, 3]
    batches = iterate_windows(source, grid, run, batch_size=2, order=order, progress=lambda d, t: events.append(("progress", d, t)))
    for batch in batches:
        events.append(("used", batch.indices))
        expected = [volume[w].sum() for w in batch.windows]
        np.testing.assert_allclose(batch.output.numpy(), expected, rtol=1e-6)
        assert batch.windows == [grid.slices[i] for i in batch.indices]
    assert events == [("used", [5, 0]), ("progress", 1, 2), ("used", [3]), ("progress", 2, 2)]
    assert calls == [(2, 1, 16, 16, 16), (1, 1, 16, 16, 16)]


def test_cancel_is_checked_before_each_batch():
    _, source, grid = _setup()
    cancel = threading.Event()
    seen = []
    with pytest.raises(Cancelled, match=r"^inference cancelled after 1 of 3 window batches$"):
        for batch in iterate_windows(source, grid, lambda b: b, batch_size=len(grid.slices) // 3 + 1, cancel=cancel):
            seen.append(batch.indices)
            cancel.set()
    assert len(seen) == 1


def test_slab_reads_read_each_slab_of_a_lazy_array_once():
    volume, _, _ = _setup()
    lazy = _CountingArray(volume)
    source, _ = as_source(lazy, 3, 1, None)
    grid = WindowGrid(source.spatial, (16, 16, 16), (0.5, 0.5, 0.5))
    slab = grid.slab_axis
    windows = {}
    for batch in iterate_windows(source, grid, torch.clone, batch_size=3, order=grid.slab_order(), slab_reads=True):
        for window, data in zip(batch.windows, batch.output):
            torch.testing.assert_close(data[0], torch.from_numpy(volume[window]))
            windows[tuple((s.start, s.stop) for s in window)] = data
    assert len(windows) == len(grid.slices)
    assert len(lazy.reads) == len({(w[slab].start, w[slab].stop) for w in grid.slices})  # one read per slab
