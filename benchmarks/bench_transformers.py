"""Forward time and peak memory of medsegkit's MaskFormer / Mask2Former vs transformers', on CPU.

Every registered 2D MaskFormer / Mask2Former backbone (ResNet-18/34/50/101; Mask2Former also Swin-T/S)
at 224², 384² and 512². Both models hold the same weights (ours converted from the transformers model,
random init, no download). Ours is the plain model made ready by
``medsegkit.inference.fast.prepare_model(..., fast=False, amp=False, winograd=True)``: float32, the
inference copy with module swaps (in-place adds / ReLUs, channels-last ResNet stem, Winograd 3×3
convolutions outside Mask2Former). Before anything is timed, the plain model is asserted equal to
transformers (max |Δ| ≤ 1e-4 on logits and masks, the column shown; for Mask2Former, whose masked
attention thresholds mask logits at 0, a float32 disagreement must vanish in float64, where no
random-weight logit lies within rounding of the threshold; the row says ``f32`` or ``f64``), and the
prepared copy equal to the plain model within 1e-5 of the output scale (Winograd's rounding; bit-equal
without it). Timings interleave
the two implementations and report the best of ``--repeats`` runs (the minimum is the least noisy
estimate on a shared machine), both wall-clock and process CPU time (``time.process_time``, all
threads: the work done, less sensitive than wall time to other processes competing for the cores);
peak memory is the growth of the process's peak RSS during one forward (Linux: ``/proc/self/status``
``VmHWM``, reset through ``/proc/self/clear_refs``). The load average is printed with every row.

    python benchmarks/bench_transformers.py                 # all 30 cells, one process
    python benchmarks/bench_transformers.py --threads 2 --repeats 5 --cases mask2former_swin_tiny@224
    python benchmarks/bench_transformers.py --models maskformer_resnet_18 --sizes 224 384
    python benchmarks/bench_transformers.py --isolate       # every case in a fresh process

Case order matters on glibc: after the 512² cases the allocator keeps large freed blocks on its heap
(its mmap threshold has risen), so later cases page-fault less. transformers allocates more and gains
more from that (Mask2Former Swin-T @ 224²: ~300 ms after the 512² cases, ~340-360 ms in a fresh
process; medsegkit ~210 / ~220 ms). ``--isolate`` removes the carry-over.

Targets (issues 7 and 17): Mask2Former >= 1.5x faster than transformers, MaskFormer >= 1.2x, in every cell.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import platform
import subprocess
import sys
import time

import torch

MODELS = {
    "maskformer": ["maskformer_resnet_18", "maskformer_resnet_34", "maskformer_resnet_50", "maskformer_resnet_101"],
    "mask2former": [
        "mask2former_resnet_18", "mask2former_resnet_34", "mask2former_resnet_50", "mask2former_resnet_101",
        "mask2former_swin_tiny", "mask2former_swin_small",
    ],
}
SIZES = (224, 384, 512)
CASES = {f"{name}@{size}": (name, size) for names in MODELS.values() for name in names for size in SIZES}
TARGETS = {"maskformer": 1.2, "mask2former": 1.5}
STAGES = ["stage1", "stage2", "stage3", "stage4"]
RESNETS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
           101: ("bottleneck", [3, 4, 23, 3])}
SWINS = {"tiny": [2, 2, 6, 2], "small": [2, 2, 18, 2]}


def build_reference(name: str):
    """The transformers model of a registry name (num_labels=150, default sizes), random weights, eval."""
    import transformers

    family, _, backbone = name.partition("_")
    kind, _, variant = backbone.partition("_")
    if kind == "resnet" and int(variant) in RESNETS:
        layer_type, depths = RESNETS[int(variant)]
        widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
        backbone_config = transformers.ResNetConfig(
            depths=depths, hidden_sizes=widths, layer_type=layer_type, out_features=STAGES
        )
    elif kind == "swin" and variant in SWINS and family == "mask2former":
        backbone_config = transformers.SwinConfig(
            embed_dim=96, depths=SWINS[variant], num_heads=[3, 6, 12, 24], window_size=7, out_features=STAGES
        )
    else:
        raise ValueError(f"no reference for {name}")
    if family == "maskformer":
        model = transformers.MaskFormerForInstanceSegmentation(
            transformers.MaskFormerConfig(backbone_config=backbone_config, num_labels=150)
        )
    else:
        model = transformers.Mask2FormerForUniversalSegmentation(
            transformers.Mask2FormerConfig(backbone_config=backbone_config, num_labels=150)
        )
    return model.eval()


def peak_memory_mib(fn) -> float:
    """Growth of the peak resident set size while ``fn()`` runs, in MiB (Linux only).

    Freed heap memory is first handed back to the OS (``malloc_trim``) so that memory the previous
    run left in the allocator's free lists does not hide this run's growth.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    from medsegkit.inference.benchmark import current_rss_mb, peak_rss_mb

    before = current_rss_mb()
    fn()
    return peak_rss_mb() - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--models", nargs="*", help="only these registry names (with --sizes: their cells)")
    parser.add_argument("--sizes", nargs="*", type=int, choices=SIZES, help="only these input sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run every case in a fresh Python process (no heap state carried over from earlier cases)",
    )
    parser.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [case for case in args.cases if (not args.models or CASES[case][0] in args.models)
                  and (not args.sizes or CASES[case][1] in args.sizes)]
    torch.set_num_threads(args.threads)
    if args.row_only:
        for case in args.cases:
            print(run_case(case, args.repeats), flush=True)
        return 0
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"best of {args.repeats}"
    )
    header = (
        f"{'case':28s} {'transformers ms':>16s} {'medsegkit ms':>13s} {'speed-up':>9s} "
        f"{'CPU ms (hf / ours)':>20s} {'CPU x':>6s} {'target':>7s} "
        f"{'peak MiB (hf / ours)':>21s} {'max |Δ| logits / masks (checked in)':>28s} {'met':>4s} {'load':>5s}"
    )
    print(header)
    print("-" * len(header))
    for case in args.cases:
        if not args.isolate:
            print(run_case(case, args.repeats), flush=True)
            continue
        command = [sys.executable, __file__, "--row-only", "--cases", case]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        row = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
        print(row.splitlines()[-1], flush=True)
    return 0


def max_differences(output: dict, expected) -> tuple[float, float]:
    """Max |Δ| of class logits and of mask logits between our output dict and a transformers output
    (or another of our dicts)."""
    logits = getattr(expected, "class_queries_logits", None)
    masks = getattr(expected, "masks_queries_logits", None)
    if logits is None:
        logits, masks = expected["pred_logits"], expected["pred_masks"]
    return (output["pred_logits"] - logits).abs().max().item(), (output["pred_masks"] - masks).abs().max().item()


def run_case(case: str, repeats: int) -> str:
    """One table row: build both models, check equality, time them interleaved, measure peak memory."""
    from medsegkit.inference.fast import prepare_model
    from medsegkit.weights import convert

    name, size = CASES[case]
    torch.manual_seed(0)
    reference = build_reference(name)
    plain = convert(reference, source="transformers").eval()
    prepared = prepare_model(plain, device=torch.device("cpu"), fast=False, amp=False,
                             example_shape=(1, 3, size, size), winograd=True)
    ours = prepared.module
    x = torch.randn(1, 3, size, size)

    def run_reference():
        return reference(pixel_values=x)

    def run_ours():
        return ours(x)

    with torch.inference_mode():
        expected, got, unprepared = run_reference(), run_ours(), plain(x)
        diff_logits, diff_masks = max_differences(unprepared, expected)
        # the prepared copy: bit-equal without Winograd; Winograd moves outputs by ~1e-5 of their scale
        scale = max(unprepared["pred_masks"].abs().max().item(), unprepared["pred_logits"].abs().max().item(), 1.0)
        copy_logits, copy_masks = max_differences(got, unprepared)
        assert max(copy_logits, copy_masks) <= 1e-5 * scale, (case, "prepared copy != plain model", copy_masks, scale)
        checked = "f32"
        if max(diff_logits, diff_masks) > 1e-4:
            # Mask2Former's masked attention thresholds mask logits at 0: with random weights a logit
            # within float32 rounding of 0 can flip and change the attention (seen with transformers
            # 5.25: 0.034 at Swin-T 224²). In float64 nothing is that close: both must agree there.
            assert name.startswith("mask2former"), (case, diff_logits, diff_masks)
            with torch.inference_mode(False), torch.no_grad():  # float64 weights as ordinary tensors
                reference64, plain64 = copy.deepcopy(reference).double(), copy.deepcopy(plain).double()
                diff64 = max_differences(plain64(x.double()), reference64(pixel_values=x.double()))
            assert max(diff64) <= 1e-4, (case, diff_logits, diff_masks, diff64)
            del reference64, plain64
            checked = "f64"
        del unprepared, got, expected
        times: dict[str, list[float]] = {"hf": [], "ours": []}
        cpu: dict[str, list[float]] = {"hf": [], "ours": []}
        for _ in range(repeats):
            for key, run in (("hf", run_reference), ("ours", run_ours)):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                times[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
        memory_hf = peak_memory_mib(run_reference)
        memory_ours = peak_memory_mib(run_ours)
    best_hf, best_ours = min(times["hf"]) * 1000, min(times["ours"]) * 1000
    cpu_hf, cpu_ours = min(cpu["hf"]) * 1000, min(cpu["ours"]) * 1000
    target = TARGETS[name.split("_")[0]]
    met = "yes" if best_hf / best_ours >= target else "no"
    return (
        f"{case:28s} {best_hf:16.1f} {best_ours:13.1f} {best_hf / best_ours:8.2f}x "
        f"{cpu_hf:9.0f} / {cpu_ours:<9.0f} {cpu_hf / cpu_ours:5.2f}x {target:6.1f}x "
        f"{memory_hf:10.0f} / {memory_ours:<8.0f} {diff_logits:11.1e} / {diff_masks:.1e} {checked} {met:>4s} "
        f"{os.getloadavg()[0]:5.1f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
