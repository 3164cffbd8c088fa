"""Cold start: a cold ``medsegkit predict`` of the demo, the import profile, and the napari worker's memory.

Everything is measured in fresh subprocesses (nothing is imported in this process but the standard
library and psutil), and printed as tables:

1. **cold predict**: wall time and peak RSS of ``medsegkit predict <demo checkpoint> <MNI 2 mm T1> -o
   OUT --quiet`` (the command a user types; median of ``--repeats`` runs), then the same steps in one
   child with a timestamp and the RSS after each phase (interpreter, ``import torch``, ``import
   monai``, medsegkit's predict-path modules, read, load, segment, write).
2. **import profile**: ``python -X importtime -m medsegkit predict ...`` (same command), self time summed
   per top-level package, split into what MONAI's ``import`` pulled in and what was imported outside
   it; MONAI's share is the cumulative time of the ``monai`` import over all import time.
3. **memory per package**: in one fresh child, ``import torch`` and then each top-level package of the
   profile's list in the order the profile first finished it (every module the profile names, so the
   same submodules MONAI loads), then ``import monai`` (the rest of it) and medsegkit's modules; RSS
   growth after each.
4. **worker**: the napari worker (``medsegkit.napari._worker_client.WorkerProcess``, spawned as the
   plugin spawns it): RSS once it idles before its first job, after the ``describe`` job (the model
   catalogue, the first job the napari widget sends), and after a ``segment`` job of the demo
   checkpoint on the sample; wall time of each job.
5. **what if**: ``import monai`` with some of its optional packages made unimportable (a meta-path
   finder in the child, as if they were not installed), down to MONAI's floor with none of them.

The goals of issue 13.6 (cold predict <= 4 s on 2 cores; worker RSS before its first job <= 700 MB)
are checked and reported, not asserted: the exit code is 0 unless a measurement itself failed.

    python benchmarks/bench_cold_start.py              # 3 cold runs
    python benchmarks/bench_cold_start.py --repeats 1 --skip-worker
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

GOAL_PREDICT_S = 4.0
GOAL_WORKER_RSS_MB = 700.0
MB = 1024.0 * 1024.0


def _sample_paths() -> tuple[str, str]:
    code = ("from medsegkit.data import demo_checkpoint_path, sample_path; "
            "print(demo_checkpoint_path()); print(sample_path('mni152_t1'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1]


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def _run_child(cmd: list[str], *, stderr_path: Path | None = None) -> tuple[float, float, int]:
    """Run ``cmd``; ``(wall s, peak RSS MB, exit code)`` from ``os.wait4`` (the child's own rusage)."""
    err = open(stderr_path, "w") if stderr_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if stderr_path is not None:
            err.close()
    return wall, usage.ru_maxrss / 1024.0, proc.returncode


def _predict_cmd(checkpoint: str, image: str, out: Path, *, importtime: bool = False) -> list[str]:
    return [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "medsegkit", "predict",
            checkpoint, image, "-o", str(out), "--quiet", "--overwrite"]


def cold_predict(checkpoint: str, image: str, repeats: int, tmp: Path) -> dict:
    walls, rss = [], []
    for i in range(repeats):
        log = tmp / f"predict_{i}.log"
        wall, peak, code = _run_child(_predict_cmd(checkpoint, image, tmp / "labels.nii.gz"), stderr_path=log)
        if code != 0:
            raise RuntimeError(f"medsegkit predict failed (exit {code}): {log.read_text()[-2000:]}")
        walls.append(wall)
        rss.append(peak)
    return {"wall_s": walls, "median_wall_s": statistics.median(walls), "peak_rss_mb": max(rss)}


PHASES_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024.0
    marks = [("interpreter + stdlib", 0.0, rss())]
    def mark(name):
        marks.append((name, time.perf_counter() - t0, rss()))
    from medsegkit._runtime import prefer_huge_pages
    prefer_huge_pages()  # as the medsegkit command does
    import numpy; mark("import numpy")
    import torch; mark("import torch")
    import monai; mark("import monai (whole package: its __init__ loads every submodule)")
    from medsegkit.inference import segment
    from medsegkit.io import read_image, write_image
    from medsegkit.weights import load_model
    mark("import medsegkit predict path")
    image = read_image(sys.argv[2]); mark("read the image")
    model = load_model(sys.argv[1]); mark("build + load the model")
    result = segment(model, image); mark("segment (preprocess, windows, inverse)")
    write_image(result, sys.argv[3], overwrite=True); mark("write the labels")
    print(json.dumps(marks))
""")


def predict_phases(checkpoint: str, image: str, tmp: Path) -> tuple[float, list]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PHASES_CHILD, checkpoint, image, str(tmp / "phases.nii.gz")],
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    return wall, json.loads(out.strip().splitlines()[-1])


_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(text: str) -> list[dict]:
    """``-X importtime`` lines → a forest of ``{"name", "self_us", "cum_us", "children"}`` (import order)."""
    pending: dict[int, list[dict]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        depth = len(m.group(3)) // 2
        node = {"name": m.group(4), "self_us": int(m.group(1)), "cum_us": int(m.group(2)),
                "children": pending.pop(depth + 1, [])}
        pending.setdefault(depth, []).append(node)
    return [n for depth in sorted(pending) for n in pending[depth]]


def _walk(nodes: list[dict], inside_monai: bool = False):
    for node in nodes:
        here = inside_monai or node["name"].split(".")[0] == "monai"
        yield node, here
        yield from _walk(node["children"], here)


def import_profile(checkpoint: str, image: str, tmp: Path) -> dict:
    log = tmp / "importtime.log"
    wall, _, code = _run_child(_predict_cmd(checkpoint, image, tmp / "labels.nii.gz", importtime=True),
                               stderr_path=log)
    if code != 0:
        raise RuntimeError(f"medsegkit predict -X importtime failed (exit {code})")
    forest = parse_importtime(log.read_text())
    by_package: Counter = Counter()
    under_monai: Counter = Counter()
    order: list[str] = []
    for node, inside in _walk(forest):
        package = node["name"].split(".")[0]
        by_package[package] += node["self_us"]
        if inside:
            under_monai[package] += node["self_us"]
    # post-order: the first time a package's module finished importing
    for line in log.read_text().splitlines():
        m = _LINE.match(line)
        if m is not None:
            package = m.group(4).split(".")[0]
            if package not in order:
                order.append(package)
    modules: dict[str, list[str]] = {}
    for node, _ in _walk(forest):
        modules.setdefault(node["name"].split(".")[0], []).append(node["name"])
    total = sum(by_package.values())
    monai_cum = sum(n["cum_us"] for n, _ in _walk(forest) if n["name"] == "monai")
    return {"wall_s": wall, "total_us": total, "by_package": by_package, "under_monai": under_monai,
            "monai_cum_us": monai_cum, "order": order, "modules": modules}


MEMORY_CHILD = textwrap.dedent("""
    import importlib, json, sys, time
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024.0
    plan = json.loads(sys.stdin.read())
    rows, failed = [], []
    for package, names in plan:
        before, start = rss(), time.perf_counter()
        for name in names:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except Exception as err:  # reported below: a module the profile listed but that will not import alone
                failed.append(f"{name}: {type(err).__name__}")
        rows.append((package, time.perf_counter() - start, rss() - before, rss()))
    print(json.dumps({"rows": rows, "failed": failed}))
""")


def memory_by_package(profile: dict, packages: list[str]) -> dict:
    plan = [("torch", ["torch"])]
    ours = ("torch", "monai", "medsegkit")
    plan += [(p, profile["modules"][p]) for p in profile["order"] if p in packages and p not in ours]
    plan += [("monai", ["monai"]), ("medsegkit", profile["modules"].get("medsegkit", []))]
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD], input=json.dumps(plan),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


WHAT_IF_CHILD = textwrap.dedent("""
    import importlib.abc, json, sys, time
    blocked = set(json.loads(sys.argv[1]))

    class Absent(importlib.abc.MetaPathFinder):  # as if these packages were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024.0
    import torch
    before, start = rss(), time.perf_counter()
    import monai
    print(json.dumps([time.perf_counter() - start, rss() - before, rss()]))
""")

# MONAI's optional packages that this environment has and its __init__ imports (torch and numpy are required)
WHAT_IF = [
    ("as installed", []),
    ("without itk (a medsegkit dependency no medsegkit module imports)", ["itk"]),
    ("without itk and transformers (transformers: only medsegkit's test extra)", ["itk", "transformers"]),
    ("MONAI's floor: every optional package absent",
     ["itk", "transformers", "pandas", "matplotlib", "sklearn", "ignite", "zarr", "torchvision", "scipy", "skimage",
      "nibabel", "pydicom", "SimpleITK", "dask", "einops", "tensorboard", "h5py", "PIL", "cucim", "openslide",
      "tifffile", "lmdb", "psutil", "yaml", "fire", "jsonschema", "pynvml", "mlflow", "clearml", "huggingface_hub",
      "onnx", "onnxruntime", "optuna", "nni", "polygraphy", "tensorrt", "cupy", "lpips", "gdown", "tqdm",
      "napari", "vtk"]),
]


def what_if_absent() -> list:
    """``import monai`` (after ``import torch``) with optional packages made unimportable, as if not installed."""
    rows = []
    for name, blocked in WHAT_IF:
        out = subprocess.run([sys.executable, "-c", WHAT_IF_CHILD, json.dumps(blocked)],
                             capture_output=True, text=True, check=True).stdout
        seconds, growth, total = json.loads(out.strip().splitlines()[-1])
        rows.append((name, seconds, growth, total))
    return rows


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MB


def _wait_idle(pid: int, quiet_s: float = 1.0, limit_s: float = 120.0) -> float:
    """Seconds until the process's CPU time stops moving for ``quiet_s`` (it is blocked on its queue)."""
    import psutil

    proc = psutil.Process(pid)
    start = time.perf_counter()
    last, still_since = -1.0, time.perf_counter()
    while time.perf_counter() - start < limit_s:
        cpu = sum(proc.cpu_times()[:2])
        if cpu != last:
            last, still_since = cpu, time.perf_counter()
        elif time.perf_counter() - still_since >= quiet_s:
            return still_since - start
        time.sleep(0.1)
    raise RuntimeError(f"the worker process {pid} did not go idle within {limit_s:g} s")


WORKER_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import numpy as np
    from medsegkit.io import read_image
    from medsegkit.napari._worker_client import (WorkerJob, WorkerProcess, new_job_folder, remove_job_folder,
                                                 write_input_array)
    sys.path.insert(0, sys.argv[3])
    from bench_cold_start import _rss_mb, _wait_idle

    checkpoint, image_path = sys.argv[1], sys.argv[2]
    worker = WorkerProcess()
    rows = []
    start = time.perf_counter()
    worker.start()
    idle_after = _wait_idle(worker.pid)
    rows.append(("spawned, idle before its first job", idle_after, _rss_mb(worker.pid)))
    start = time.perf_counter()
    WorkerJob({"action": "describe", "checkpoints": [checkpoint]}, worker=worker).result()
    rows.append(("after the describe job (model catalogue)", time.perf_counter() - start, _rss_mb(worker.pid)))
    image = read_image(image_path)
    folder = new_job_folder()
    try:
        data = np.ascontiguousarray(np.asarray(image.array).transpose(2, 1, 0))  # napari axis order (z, y, x)
        job = {"action": "segment", "model": {"checkpoint": checkpoint}, "input": write_input_array(data, folder),
               "output_dir": str(folder / "out"), "world_affine": None, "predict": {}}
        start = time.perf_counter()
        WorkerJob(job, worker=worker).result()
        rows.append(("after the first segment job (demo on the sample)", time.perf_counter() - start,
                     _rss_mb(worker.pid)))
    finally:
        remove_job_folder(folder)
        worker.stop()
    print(json.dumps(rows))
""")


def worker_memory(checkpoint: str, image: str) -> list:
    out = subprocess.run([sys.executable, "-c", WORKER_CHILD, checkpoint, image, str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold predict runs (median reported)")
    parser.add_argument("--top", type=int, default=18, help="packages shown in the import profile")
    parser.add_argument("--skip-worker", action="store_true", help="skip the napari worker measurement")
    args = parser.parse_args(argv)
    checkpoint, image = _sample_paths()
    print(f"{_load_average()} (before)")
    print(f"python {sys.version.split()[0]}, checkpoint {Path(checkpoint).name}, image {Path(image).name}\n")
    with tempfile.TemporaryDirectory(prefix="medsegkit-bench-cold-") as tmp_name:
        tmp = Path(tmp_name)
        cold = cold_predict(checkpoint, image, args.repeats, tmp)
        print("1. cold `medsegkit predict` of the demo on the sample")
        print(_table(["runs (s)", "median (s)", "peak RSS (MB)", f"goal <= {GOAL_PREDICT_S:g} s"],
                     [[" ".join(f"{w:.2f}" for w in cold["wall_s"]), f"{cold['median_wall_s']:.2f}",
                       f"{cold['peak_rss_mb']:.0f}", "met" if cold["median_wall_s"] <= GOAL_PREDICT_S else "NOT met"]]))
        wall, marks = predict_phases(checkpoint, image, tmp)
        print(f"\n   the same steps in one child, by phase (child wall {wall:.2f} s incl. interpreter start)")
        rows, previous = [], 0.0
        for name, at, rss in marks:
            rows.append([name, f"{at - previous:.2f}", f"{at:.2f}", f"{rss:.0f}"])
            previous = at
        print(textwrap.indent(_table(["phase", "took (s)", "at (s)", "RSS (MB)"], rows), "   "))

        profile = import_profile(checkpoint, image, tmp)
        total, monai_cum = profile["total_us"], profile["monai_cum_us"]
        print(f"\n2. import profile of the same command (-X importtime; total import time {total / 1e6:.2f} s, "
              f"command wall {profile['wall_s']:.2f} s)")
        print(f"   MONAI's share: the `import monai` subtree took {monai_cum / 1e6:.2f} s = "
              f"{100 * monai_cum / total:.0f} % of all import time")
        rows = []
        for package, us in profile["by_package"].most_common(args.top):
            inside = profile["under_monai"][package]
            rows.append([package, f"{us / 1e3:.0f}", f"{inside / 1e3:.0f}", f"{100 * us / total:.1f}"])
        print(textwrap.indent(_table(["package", "self ms", "of it via monai", "% of imports"], rows), "   "))

        packages = [p for p, _ in profile["by_package"].most_common(args.top)]
        memory = memory_by_package(profile, packages)
        print("\n3. memory by package (fresh child; each package's modules imported in the profile's order)")
        rows = [[p, f"{s * 1e3:.0f}", f"{d:+.0f}", f"{r:.0f}"] for p, s, d, r in memory["rows"]]
        print(textwrap.indent(_table(["package", "ms", "RSS growth (MB)", "RSS (MB)"], rows), "   "))
        if memory["failed"]:
            print(f"   modules that did not import on their own: {', '.join(memory['failed'][:8])}"
                  + (" ..." if len(memory["failed"]) > 8 else ""))

    rows = what_if_absent()
    print("\n5. what if: `import monai` after `import torch`, with packages made unimportable (fresh child each)")
    table = [[name, f"{sec:.2f}", f"{growth:+.0f}", f"{total:.0f}"] for name, sec, growth, total in rows]
    print(textwrap.indent(_table(["case", "s", "RSS growth (MB)", "RSS (MB)"], table), "   "))

    if not args.skip_worker:
        rows = worker_memory(checkpoint, image)
        print("\n4. napari worker process (spawned as the plugin spawns it)")
        table = [[name, f"{s:.2f}", f"{rss:.0f}"] for name, s, rss in rows]
        print(textwrap.indent(_table(["state", "took (s)", "RSS (MB)"], table), "   "))
        idle = rows[0][2]
        print(f"   goal: RSS before its first job <= {GOAL_WORKER_RSS_MB:g} MB: "
              f"{'met' if idle <= GOAL_WORKER_RSS_MB else 'NOT met'} ({idle:.0f} MB)")
    print(f"\n{_load_average()} (after)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
