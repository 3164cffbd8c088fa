"""``medsegkit bench``: the inference benchmark (:mod:`medsegkit.inference.benchmark`) with small defaults.

Its options are the benchmark's (``--sizes``, ``--roi``, ``--threads``, ``--sw-batch-size``, ``--repeats``,
``--no-rss``), with smaller default sizes.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark predict vs MONAI's sliding_window_inference",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cubic volume sizes (default 64 96)")
    p.add_argument("--roi", type=int, nargs="+", default=[64], help="window size (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method, best kept (default 1)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from medsegkit.cli import CommandError
    from medsegkit.inference.benchmark import main

    for option, values in (("--sizes", args.sizes), ("--roi", args.roi), ("--threads", [args.threads]),
                           ("--sw-batch-size", [args.sw_batch_size]), ("--repeats", [args.repeats])):
        if any(v < 1 for v in values):
            raise CommandError(f"{option} must be >= 1, got {' '.join(map(str, values))}")
    if len(args.roi) not in (1, 3):
        raise CommandError(f"--roi takes 1 or 3 sizes, got {len(args.roi)}")
    argv = ["--sizes", *map(str, args.sizes), "--roi", *map(str, args.roi), "--threads", str(args.threads),
            "--sw-batch-size", str(args.sw_batch_size), "--repeats", str(args.repeats)]
    return int(main(argv + (["--no-rss"] if args.no_rss else [])) or 0)
