"""Forward time and peak memory of medsegkit's MaskFormer / Mask2Former vs transformers', on CPU.

Both models hold the same weights (ours converted from the transformers model, random init, no
download); the outputs are asserted equal before anything is timed. Timings interleave the two
implementations and report the best of ``--repeats`` runs (the minimum is the least noisy estimate
on a shared machine), both wall-clock and process CPU time (``time.process_time``, all threads: the
work done, less sensitive than wall time to other processes competing for the cores); peak memory is the growth of the process's peak RSS during one forward
(Linux: ``/proc/self/status`` ``VmHWM``, reset through ``/proc/self/clear_refs``).

    python benchmarks/bench_transformers.py                 # all cases
    python benchmarks/bench_transformers.py --threads 2 --repeats 5 --cases mask2former_swin_tiny@224
    python benchmarks/bench_transformers.py --isolate       # every case in a fresh process

Case order matters on glibc: after the 512² cases the allocator keeps large freed blocks on its heap
(its mmap threshold has risen), so later cases page-fault less. transformers allocates more and gains
more from that (Mask2Former @ 224²: ~300 ms after the 512² cases, ~340-360 ms in a fresh process;
medsegkit ~210 / ~220 ms). ``--isolate`` removes the carry-over; the docs report both.

Targets (issue 7): Mask2Former >= 1.5x faster than transformers, MaskFormer >= 1.2x.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import subprocess
import sys
import time

import torch

CASES = {
    "maskformer_resnet_50@512": ("maskformer_resnet_50", 512),
    "mask2former_swin_tiny@512": ("mask2former_swin_tiny", 512),
    "mask2former_swin_tiny@224": ("mask2former_swin_tiny", 224),
}
TARGETS = {"maskformer": 1.2, "mask2former": 1.5}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def build_reference(name: str):
    """The transformers model of a registry name (num_labels=150, default sizes), random weights, eval."""
    import transformers

    if name == "maskformer_resnet_50":
        backbone = transformers.ResNetConfig(
            depths=[3, 4, 6, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            layer_type="bottleneck",
            out_features=STAGES,
        )
        model = transformers.MaskFormerForInstanceSegmentation(
            transformers.MaskFormerConfig(backbone_config=backbone, num_labels=150)
        )
    elif name == "mask2former_swin_tiny":
        backbone = transformers.SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=STAGES
        )
        model = transformers.Mask2FormerForUniversalSegmentation(
            transformers.Mask2FormerConfig(backbone_config=backbone, num_labels=150)
        )
    else:
        raise ValueError(f"no reference for {name}")
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run every case in a fresh Python process (no heap state carried over from earlier cases)",
    )
    parser.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
        f"{'peak MiB (hf / ours)':>21s} {'max |Δ| logits / masks':>24s}"
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


def run_case(case: str, repeats: int) -> str:
    """One table row: build both models, check equality, time them interleaved, measure peak memory."""
    from medsegkit.weights import convert

    name, size = CASES[case]
    torch.manual_seed(0)
    reference = build_reference(name)
    ours = convert(reference, source="transformers").eval()
    x = torch.randn(1, 3, size, size)

    def run_reference():
        return reference(pixel_values=x)

    def run_ours():
        return ours(x)

    with torch.inference_mode():
        expected, got = run_reference(), run_ours()
        diff_logits = (got["pred_logits"] - expected.class_queries_logits).abs().max().item()
        diff_masks = (got["pred_masks"] - expected.masks_queries_logits).abs().max().item()
        assert diff_logits <= 1e-4 and diff_masks <= 1e-4, (case, diff_logits, diff_masks)
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
    return (
        f"{case:28s} {best_hf:16.1f} {best_ours:13.1f} {best_hf / best_ours:8.2f}x "
        f"{cpu_hf:9.0f} / {cpu_ours:<9.0f} {cpu_hf / cpu_ours:5.2f}x {target:6.1f}x "
        f"{memory_hf:10.0f} / {memory_ours:<8.0f} {diff_logits:11.1e} / {diff_masks:.1e}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
