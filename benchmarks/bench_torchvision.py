"""Forward time of medsegkit's FCN-ResNet-50 and Mask R-CNN-ResNet-50-FPN vs torchvision's, CPU, 512×512.

Same work on both sides: our models are converted from the torchvision models they are timed against
(same weights, so Mask R-CNN keeps the same proposals and detections), the same input, eval mode,
``torch.inference_mode()``. FCN runs without the auxiliary head on both sides (torchvision evaluates it
in eval mode too when it exists; ours does not, which would flatter us). Mask R-CNN uses torchvision's
COCO layout with ``min_size = max_size = 512`` so the network sees 512×512 on both sides.

Runs alternate (ours, theirs, ours, ...) so that machine load affects both alike; the table reports the
median time of each and the median of the per-pair ratios. Target: ratio ≤ 1.05.

    python benchmarks/bench_torchvision.py [--repeats 7] [--threads N] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from medsegkit.weights import convert

TARGET_RATIO = 1.05


def _time(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def bench_pair(name: str, ours, theirs, x, repeats: int) -> dict:
    with torch.inference_mode():
        for _ in range(2):  # warm-up: allocator, oneDNN primitive caches
            ours(x)
            theirs(x)
        pairs = []
        for i in range(repeats):
            if i % 2 == 0:
                a, b = _time(ours, x), _time(theirs, x)
            else:
                b, a = _time(theirs, x), _time(ours, x)
            pairs.append((a, b))
    ours_t = statistics.median(p[0] for p in pairs)
    theirs_t = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    return {"model": name, "ours_s": ours_t, "torchvision_s": theirs_t, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--size", type=int, default=512)
    args, _ = parser.parse_known_args(argv)  # run_all.py passes the same extra arguments to every benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.size
    rows = []

    tv_fcn = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=False
    ).eval()
    fcn = convert(tv_fcn, source="torchvision").eval()
    x = torch.rand(1, 3, size, size)
    rows.append(bench_pair("fcn_resnet_50", fcn, lambda t: tv_fcn(t)["out"], x, args.repeats))

    tv_mrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size
    ).eval()
    mrcnn = convert(tv_mrcnn, source="torchvision").eval()
    images = [torch.rand(3, size, size)]
    with torch.inference_mode():
        same = [len(d["boxes"]) for d in (mrcnn(images)[0], tv_mrcnn(images)[0])]
    if same[0] != same[1]:
        raise RuntimeError(
            f"Mask R-CNN detection counts differ ({same}); the comparison would not be like for like"
        )
    rows.append(
        bench_pair(f"mask_rcnn_resnet_50_fpn ({same[0]} detections)", mrcnn, tv_mrcnn, images, args.repeats)
    )

    print(
        f"CPU forward time, {size}x{size}, batch 1, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"| {'model':<44} | {'medsegkit (s)':>13} | {'torchvision (s)':>15} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 15}|{'-' * 17}|{'-' * 8}|")
    for r in rows:
        print(
            f"| {r['model']:<44} | {r['ours_s']:>13.3f} | {r['torchvision_s']:>15.3f} | {r['ratio']:>6.3f} |"
        )
    worst = max(r["ratio"] for r in rows)
    print(
        f"target ratio <= {TARGET_RATIO}: {'met' if worst <= TARGET_RATIO else 'NOT met'} (worst {worst:.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
