"""Benchmark ``predict`` vs MONAI's ``sliding_window_inference`` (see :mod:`medsegkit.inference.benchmark`).

The benchmark ships inside the package so that ``medsegkit bench`` works after ``pip install``; this file
lets ``benchmarks/run_all.py`` (``tox -e bench``) run it beside the other benchmarks.
"""

from __future__ import annotations

from medsegkit.inference.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
