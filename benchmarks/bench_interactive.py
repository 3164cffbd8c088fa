"""Interactive sessions: progressive run timings and the simulated-user protocol (issue 15).

1. **progressive**: the shipped demo model (``UNet3d`` tissue, 4 classes) on the 2 mm MNI152 T1:
   time from ``Session.run(focus=axial slice)`` to the first ``on_update`` (the focused slice), total
   run time, and a plain ``segment`` for comparison (the labels are checked to be equal).
2. **simulated user** (the standard protocol of interactive segmentation papers) on the held-out
   axial slab (k >= 55, never seen in training) of the demo: each round marks one ball of radius 2
   voxels at the centre (the deepest voxel) of the largest error component in the slab, with its true
   class; ``Session.refine`` adapts the model. Reported per round: mean foreground Dice on the slab,
   seconds, and "paint only" (the same marks written into the start labels, no adaptation).

    python benchmarks/bench_interactive.py               # 10 rounds
    python benchmarks/bench_interactive.py --rounds 3 --seconds 1.5

Timings depend on the machine's load; the numbers are printed, not asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SLAB = 55  # the held-out axial slab of the demo starts at k = 55 (2 mm grid)


def mean_dice(pred: np.ndarray, truth: np.ndarray, classes=(1, 2, 3)) -> float:
    scores = []
    for c in classes:
        p, t = pred == c, truth == c
        total = p.sum() + t.sum()
        scores.append(1.0 if total == 0 else 2.0 * (p & t).sum() / total)
    return float(np.mean(scores))


def next_mark(pred: np.ndarray, truth: np.ndarray, radius: int = 2) -> tuple[np.ndarray, int] | None:
    """The ball (mask) at the deepest voxel of the largest error component and its true class."""
    from scipy import ndimage

    error = pred != truth
    components, count = ndimage.label(error)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (1 + int(np.argmax(sizes)))
    depth = ndimage.distance_transform_edt(largest)
    centre = np.unravel_index(int(np.argmax(depth)), largest.shape)
    grid = np.indices(pred.shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    return ball, int(truth[centre])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=None, help="adaptation budget per round (default: Session's)")
    args = parser.parse_args(argv)

    import torch

    from medsegkit.data import demo_checkpoint_path, sample_path
    from medsegkit.inference import segment
    from medsegkit.interactive import Session
    from medsegkit.io import read_image
    from medsegkit.weights import load_model

    print(f"torch threads: {torch.get_num_threads()}")
    model = load_model(demo_checkpoint_path())
    image = read_image(sample_path("mni152_t1"))
    truth = np.asarray(read_image(sample_path("mni152_tissue")).array).astype(np.int64)
    kw = {"roi_size": (112, 128, 96)}

    # 1. progressive
    t0 = time.perf_counter()
    reference = segment(model, image, **kw).array
    t_segment = time.perf_counter() - t0
    session = Session(model, image, **kw)
    first: list[float] = []
    focus = {"axis": 2, "index": image.spatial_shape[2] // 2}
    t0 = time.perf_counter()
    labels = session.run(focus=focus, on_update=lambda region, lab: first.append(time.perf_counter() - t0))
    t_run = time.perf_counter() - t0
    print("progressive (demo UNet3d, MNI152 2 mm", image.spatial_shape, f"{len(session.grid.slices)} window(s))")
    print(f"  segment            {t_segment:6.2f} s")
    print(f"  run: first update  {first[0]:6.2f} s   total {t_run:6.2f} s   "
          f"(excluding the session's set-up; equal to segment: {bool(np.array_equal(labels, reference))})")

    # 2. simulated user on the held-out slab
    slab = (slice(None), slice(None), slice(SLAB, None))
    start = labels.copy()
    paint = start.copy()
    print(f"simulated user: held-out slab k >= {SLAB}, ball radius 2, {args.rounds} rounds")
    print("round   Dice(refine)  Dice(paint only)  seconds  steps")
    print(f"  0     {mean_dice(start[slab], truth[slab]):.4f}        {mean_dice(paint[slab], truth[slab]):.4f}")
    for r in range(1, args.rounds + 1):
        current = session.labels[slab]
        found = next_mark(current, truth[slab])
        if found is None:
            print("  no error left")
            break
        ball_slab, cls = found
        ball = np.zeros(image.spatial_shape, bool)
        ball[slab] = ball_slab
        scribbles = np.zeros(image.spatial_shape, np.int32)
        scribbles[ball] = cls + 1
        paint[ball] = cls
        t0 = time.perf_counter()
        session.refine(scribbles, seconds=args.seconds)
        seconds = time.perf_counter() - t0
        print(f"  {r:<5} {mean_dice(session.labels[slab], truth[slab]):.4f}        "
              f"{mean_dice(paint[slab], truth[slab]):.4f}            {seconds:5.2f}   {session.last_steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
