"""``medsegkit bench``: the inference benchmark (``benchmarks/bench_inference.py``) with small defaults.

The script lives in the source tree (and the sdist), not in the wheel; ``--script`` points at another copy.
Its options are the script's (``--sizes``, ``--roi``, ``--threads``, ``--sw-batch-size``, ``--repeats``,
``--no-rss``), with smaller default sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from medsegkit.cli import CommandError


def _default_script() -> Path:
    return Path(__file__).resolve().parents[3] / "benchmarks" / "bench_inference.py"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark predict vs MONAI's sliding_window_inference",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--script", default=None, help="path of bench_inference.py (default: the source checkout's)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cubic volume sizes (default 64 96)")
    p.add_argument("--roi", type=int, nargs="+", default=[64], help="window size (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method, best kept (default 1)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    script = Path(args.script) if args.script else _default_script()
    if not script.is_file():
        raise CommandError(
            f"benchmark script {script} not found; it ships in the source tree (benchmarks/bench_inference.py), "
            "not in the wheel: run from a source checkout or pass --script PATH"
        )
    spec = importlib.util.spec_from_file_location("medsegkit_bench_inference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--sizes", *map(str, args.sizes), "--roi", *map(str, args.roi), "--threads", str(args.threads),
            "--sw-batch-size", str(args.sw_batch_size), "--repeats", str(args.repeats)]
    return int(module.main(argv + (["--no-rss"] if args.no_rss else [])) or 0)
