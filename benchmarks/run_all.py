"""Run every benchmark in this folder in one go (``tox -e bench``), each printing its table and ratios.

Each ``bench_*.py`` module exposes ``main(argv) -> int`` and runs with its own defaults here; extra
arguments go to the benchmark chosen with ``--only`` (``python benchmarks/run_all.py --only inference
--sizes 96 128``). ``bench_cold_start.py`` (cold ``medsegkit predict``, import profile, worker memory) is
one of them; ``soak.py`` (minutes; exit code 1 on a leak) runs on its own: ``python benchmarks/soak.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="substring of a benchmark file name")
    args, rest = parser.parse_known_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(o in s.stem for o in args.only)]
    if not scripts:
        print("no benchmark matched", file=sys.stderr)
        return 2
    if rest and len(scripts) != 1:
        parser.error("extra arguments need exactly one benchmark chosen with --only")
    failures = 0
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        start = time.perf_counter()
        code = load(script).main(rest)
        print(f"--- {script.stem}: exit {code}, {time.perf_counter() - start:.1f} s", flush=True)
        failures += int(bool(code))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
