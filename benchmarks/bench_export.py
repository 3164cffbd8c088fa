"""Benchmark: the inference backends and precisions on the shipped demo model, in one interleaved run.

For each configuration (torch float32, torch bf16 fast path, ONNX Runtime float32, OpenVINO float32,
OpenVINO int8 from ``medsegkit export --quantize int8``) it prints

- **ms per window batch**: one batch of ``--sw-batch-size`` windows of ``--roi``³, the best of
  ``--rounds`` interleaved rounds after a warm-up, measured by
  :func:`medsegkit.inference.autobackend.choose_backend` (what ``backend="auto"`` measures);
- **end-to-end predict seconds** on a ``--size``³ volume (the MNI152 sample, intensity-scaled as the model
  expects and resized to the size), the best of ``--e2e-rounds`` interleaved rounds after a warm-up call
  (the warm-up also makes the ONNX conversion, which is cached per model);
- **label agreement** of that prediction with torch float32's;
- **peak RSS** during the configuration's end-to-end calls (``VmHWM`` of ``/proc/self/status``, reset
  before each configuration through ``/proc/self/clear_refs``), and the RSS before it;

then ``backend="auto"``'s pick (measured in a fresh ``MEDSEGKIT_HOME``) against the best configuration,
and the int8 model's Dice change on the demo's held-out slab (``k >= 55``, ``segment`` with the export's
96³ windows for both precisions) with the int8 / bf16 speed ratio.

Run: ``python benchmarks/bench_export.py`` (or ``tox -e bench``); ``--threads 2 --size 160 --rounds 5``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); false where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def demo_volume(size: int) -> np.ndarray:
    """The MNI152 T1 sample scaled by 1/255 (the demo model's intensity step) and resized to ``size``³."""
    from medsegkit.data import sample_path
    from medsegkit.io import read_image

    t1 = torch.from_numpy(np.asarray(read_image(sample_path("mni152_t1")).array, dtype=np.float32) / 255.0)
    resized = torch.nn.functional.interpolate(t1[None, None], size=(size,) * 3, mode="trilinear", align_corners=False)
    return resized[0, 0].numpy()


def held_out_dice(labels: np.ndarray) -> float:
    from medsegkit.cli.demo import held_out_scores
    from medsegkit.data import MNI_CLASS_NAMES, sample_path
    from medsegkit.io import read_image

    reference = np.asarray(read_image(sample_path("mni152_tissue")).array)
    return held_out_scores(labels, reference, list(MNI_CLASS_NAMES))["mean_foreground_dice"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=160, help="end-to-end volume size (cube)")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the window batch")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="timed rounds of the end-to-end predict")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    home = tempfile.mkdtemp(prefix="medsegkit-bench-export-")
    os.environ["MEDSEGKIT_HOME"] = home  # a fresh cache: auto measures, and the int8 export is recorded here

    import medsegkit
    from medsegkit.data import demo_checkpoint_path, sample_path
    from medsegkit.inference.autobackend import choose_backend, cpu_name, measurement_batch
    from medsegkit.inference.backends import load_exported
    from medsegkit.inference.windows import WindowGrid, as_source
    from medsegkit.weights import load_model

    model = load_model(demo_checkpoint_path()).eval()
    roi = (args.roi,) * 3
    shape = (args.sw_batch_size, 1, *roi)
    print(f"demo model {getattr(model, 'medsegkit_config', None) or type(model).__name__}, window batch {shape}, {args.threads} threads, {cpu_name()}, "
          f"torch {torch.__version__}; load average before: {os.getloadavg()}")

    started = time.perf_counter()
    int8 = medsegkit.export(demo_checkpoint_path(), Path(home) / "int8", format="openvino", quantize="int8",
                            roi_size=roi, batch_size=args.sw_batch_size, log=print)
    print(f"int8 export (NNCF, calibrated on the MNI152 sample windows): {time.perf_counter() - started:.1f} s")

    volume = demo_volume(args.size)
    source, _ = as_source(volume, 3, 1, None)
    grid = WindowGrid(source.spatial, roi, (0.5,) * 3)
    batch = measurement_batch(grid, source, args.sw_batch_size, None, 0.0)  # the batch auto measures
    choice = choose_backend(model, batch, spatial_dims=3, use_cache=False, rounds=args.rounds, log=None)
    if choice.skipped:
        print("left out of auto's choice: " + "; ".join(f"{k}: {v}" for k, v in choice.skipped.items()))

    common = dict(roi_size=roi, sw_batch_size=args.sw_batch_size, overlap=0.5)
    int8_network = load_exported(int8)  # opened (compiled) once, as the converted float32 networks are cached
    runs = {
        "torch float32": lambda: medsegkit.predict(model, volume, backend="torch", **common),
        "torch bf16": lambda: medsegkit.predict(model, volume, backend="torch", fast=True, **common),
        "onnxruntime float32": lambda: medsegkit.predict(model, volume, backend="onnxruntime", **common),
        "openvino float32": lambda: medsegkit.predict(model, volume, backend="openvino", **common),
        "openvino int8": lambda: medsegkit.predict(int8_network, volume, sw_batch_size=args.sw_batch_size, overlap=0.5),
    }
    runs = {name: run for name, run in runs.items() if name in choice.measured}
    labels: dict[str, np.ndarray] = {}
    seconds = {name: float("inf") for name in runs}
    peak: dict[str, float] = {}
    before: dict[str, float] = {}
    can_reset = True
    for name, run in runs.items():  # warm-up (conversion, first-shape set-up) and the peak RSS of each
        can_reset = reset_peak_rss() and can_reset
        before[name] = status_mb("VmRSS")
        labels[name] = run()
        peak[name] = status_mb("VmHWM")
    for _ in range(args.e2e_rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name] = min(seconds[name], time.perf_counter() - start)

    reference = labels["torch float32"]
    print(f"\n| backend, precision | ms per window batch | predict {args.size}³ (s) | labels = float32 | "
          f"peak RSS (MB) | RSS before (MB) |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        agreement = float((labels[name] == reference).mean())
        print(f"| {name} | {choice.measured[name]['ms']:.0f} | {seconds[name]:.2f} | {100 * agreement:.3f} % | "
              f"{peak[name]:.0f} | {before[name]:.0f} |")
    if not can_reset:
        print("(peak RSS could not be reset between configurations: each value is the process peak so far)")

    # auto: a fresh cache, the first call measures, the second uses the cached choice
    start = time.perf_counter()
    auto_labels = medsegkit.predict(model, volume, backend="auto", **common)
    first = time.perf_counter() - start
    start = time.perf_counter()
    medsegkit.predict(model, volume, backend="auto", **common)
    auto_seconds = time.perf_counter() - start
    best = min(seconds, key=seconds.get)
    print(f"\nauto: first call {first:.2f} s (measuring included), cached call {auto_seconds:.2f} s; best measured "
          f"configuration {best} {seconds[best]:.2f} s: auto / best = {auto_seconds / seconds[best]:.3f}; auto "
          f"labels = float32 on {100 * float((auto_labels == reference).mean()):.3f} %")

    # int8: Dice on the demo's held-out slab, float32 and int8 through segment with the same 96³ windows
    if "openvino int8" in runs:
        t1 = sample_path("mni152_t1")
        dice32 = held_out_dice(np.asarray(medsegkit.segment(model, t1, roi_size=roi, sw_batch_size=args.sw_batch_size,
                                                            overlap=0.5).array))
        dice8 = held_out_dice(np.asarray(medsegkit.segment(int8, t1, sw_batch_size=args.sw_batch_size).array))
        if "torch bf16" in choice.measured:
            ratio = choice.measured["torch bf16"]["ms"] / choice.measured["openvino int8"]["ms"]
            speed = f"{ratio:.2f}x the bf16 fast path per window batch ({'meets' if ratio >= 1.3 else 'misses'} the 1.3x target)"
        else:
            speed = f"no bf16 fast path to compare with ({choice.skipped.get('torch bf16')})"
        print(f"int8: held-out mean foreground Dice {dice8:.4f} vs float32 {dice32:.4f} (change {dice8 - dice32:+.4f}); "
              f"speed: {speed}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
