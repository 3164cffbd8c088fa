"""Soak: hundreds of ``predict`` calls and napari-worker jobs in one process; nothing may leak.

Two phases, both in this process:

1. **predict**: ``--predict-calls`` (300) calls of :func:`medsegkit.predict` cycling through four small
   models (a 2D U-Net, a 3D U-Net, a 2D FCN on ResNet-18, a 2D MaskFormer on ResNet-18 in its semantic
   task) and three input sizes each, numpy or torch input, labels or probabilities, every 5th call
   writing into a zarr store (``out=path``). Every 10th call is cancelled through ``cancel=`` after its
   first window batch: it must raise :class:`medsegkit.Cancelled` and leave no store behind.
2. **worker**: ``--worker-jobs`` (100) jobs through the client the napari plugin uses
   (:mod:`medsegkit.napari._worker_client`, no viewer) on tiny checkpoints: ``--worker-cancels`` (10) of
   them cancelled after their first progress message, and ``--worker-kills`` (2) whose worker process
   is killed (SIGKILL) mid-job: the client must report :class:`WorkerDied` and the next job must run in
   a fresh process.

Bounds (exit code 1 when one fails, after the table):

- resident memory of this process after the warm-up (``--warmup`` calls / jobs) stays within
  ``--rss-tolerance`` (± 5 %) of its value at the end of the warm-up, in both phases, and so does the
  worker process's (per process: a kill restarts it; one that served no more jobs than the warm-up is
  reported, not bounded);
- no files are left in the temporary folder or in ``MEDSEGKIT_HOME`` (both pointed at fresh private
  folders for the run, so other programs' files cannot interfere);
- no child processes (zombies included) and no extra threads (Python threads and OS threads of this
  process) are left once the worker is stopped.

    python benchmarks/soak.py                         # the full soak (minutes on 2 cores)
    python benchmarks/soak.py --predict-calls 30 --worker-jobs 10 --worker-cancels 2 --worker-kills 1
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1024.0 * 1024.0


@dataclass
class Snapshot:
    """What a leak would change: files in the private folders, child processes, threads."""

    files: dict[str, list[str]]
    children: list[str]
    python_threads: list[str]
    os_threads: int


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def snapshot(folders: dict[str, Path]) -> Snapshot:
    import psutil

    me = psutil.Process()
    children = [f"{c.pid} {c.name()} ({c.status()})" for c in me.children(recursive=True)]
    threads = sorted(f"{t.name}" for t in threading.enumerate())
    return Snapshot({name: _listing(path) for name, path in folders.items()}, children, threads, me.num_threads())


# Thread pools that grow on demand up to a fixed size and then live as long as the process (not per call):
# zarr's IO loop ("zarr_io") and its executor (asyncio's default, "asyncio_N", at most min(32, cores + 4)).
BOUNDED_POOLS = {"asyncio_": min(32, (os.cpu_count() or 1) + 4), "zarr_io": 1}


def _resource_tracker_pid() -> int | None:
    """multiprocessing's resource tracker: one helper process per parent, started with the first spawn
    context queue and ended at exit (by design, not per job)."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def leaks(before: Snapshot, after: Snapshot) -> tuple[list[str], list[str]]:
    """``(leaks, notes)``: differences that count as leaks, and ones explained as bounded singletons."""
    found, notes = [], []
    for name, files in after.files.items():
        new = sorted(set(files) - set(before.files.get(name, [])))
        if new:
            found.append(f"{len(new)} new file(s) in {name}: {', '.join(new[:5])}" + (" ..." if len(new) > 5 else ""))
    tracker = _resource_tracker_pid()
    for child in sorted(set(after.children) - set(before.children)):
        if tracker is not None and child.split()[0] == str(tracker):
            notes.append(f"multiprocessing's resource tracker {child} (one per process, by design)")
        else:
            found.append(f"child process left: {child}")
    extra = list(after.python_threads)
    for name in before.python_threads:
        if name in extra:
            extra.remove(name)
    pooled = {prefix: [t for t in after.python_threads if t.startswith(prefix)] for prefix in BOUNDED_POOLS}
    unexplained = [t for t in extra
                   if not any(t.startswith(p) and len(pooled[p]) <= BOUNDED_POOLS[p] for p in BOUNDED_POOLS)]
    if unexplained:
        found.append(f"Python thread(s) left: {', '.join(unexplained)}")
    if len(extra) > len(unexplained):
        notes.append(f"bounded pool thread(s) started: {', '.join(t for t in extra if t not in unexplained)}")
    if after.os_threads - before.os_threads > len(extra) - len(unexplained):
        found.append(f"OS threads: {before.os_threads} before, {after.os_threads} after")
    return found, notes


def rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / MB


@dataclass
class Phase:
    """RSS samples (MB, one per call / job) and counts of one phase."""

    name: str
    rss: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def drift(self, warmup: int) -> tuple[float, float, float]:
        """``(reference MB, lowest %, highest %)`` of the samples after ``warmup`` against the last warm-up sample."""
        reference = self.rss[warmup - 1]
        after = self.rss[warmup:] or [reference]
        return reference, 100 * (min(after) / reference - 1), 100 * (max(after) / reference - 1)


def _tiny_models() -> dict[str, Any]:
    import torch

    from medsegkit import create_model
    from medsegkit.nets.fcn import FCN
    from medsegkit.nets.maskformer import MaskFormer

    torch.manual_seed(0)
    return {
        "UNet2d": create_model("UNet2d", channels=(4, 8), strides=(2,)).eval(),
        "UNet3d": create_model("UNet3d", channels=(4, 8), strides=(2,)).eval(),
        "FCN-18 2d": FCN(out_channels=3, depth=18).eval(),
        "MaskFormer-18 2d": MaskFormer(3, backbone="resnet_18", num_queries=6, hidden_dim=32, num_heads=4,
                                       decoder_layers=2, ffn_dim=64, fpn_dim=32, mask_dim=32).eval(),
    }


# model -> (input sizes cycled through, roi, channels, extra predict arguments)
PREDICT_CASES: dict[str, tuple[list[tuple[int, ...]], int, int, dict[str, Any]]] = {
    "UNet2d": ([(48, 40), (72, 64), (96, 80)], 32, 1, {}),
    "UNet3d": ([(24, 20, 16), (32, 28, 24), (40, 36, 32)], 16, 1, {}),
    "FCN-18 2d": ([(48, 40), (64, 56), (80, 72)], 32, 3, {}),
    "MaskFormer-18 2d": ([(64, 64), (80, 72), (96, 96)], 64, 3, {"task": "semantic"}),
}


def predict_soak(calls: int, warmup: int, workdir: Path, log: Callable[[str], None],
                 on_warm: Callable[[], None] = lambda: None) -> tuple[Phase, list[str]]:
    """``calls`` predict calls; returns the phase record and the problems found (wrong results)."""
    import numpy as np
    import torch

    from medsegkit import Cancelled, predict

    models = _tiny_models()
    names = list(PREDICT_CASES)
    rng = np.random.default_rng(0)
    phase = Phase("predict")
    problems: list[str] = []
    start = time.perf_counter()
    for i in range(calls):
        name = names[i % len(names)]
        sizes, roi, channels, extra = PREDICT_CASES[name]
        cancel = threading.Event() if i % 10 == 9 else None
        # a cancelled call gets the largest size: several window batches, so the cancel lands mid-run
        size = sizes[-1] if cancel is not None else sizes[(i // len(names)) % len(sizes)]
        array = rng.normal(size=(channels, *size)).astype(np.float32)
        image: Any = torch.from_numpy(array) if i % 3 == 1 else array
        output = "probabilities" if i % 4 == 3 else "labels"
        store = workdir / f"call_{i}.zarr" if i % 5 == 0 else None

        def progress(done: int, total: int, cancel: threading.Event | None = cancel) -> None:
            if cancel is not None and done >= 1:
                cancel.set()

        try:
            result = predict(models[name], image, roi_size=roi, overlap=0.25, sw_batch_size=1, output=output,
                             out=str(store) if store is not None else None, progress=progress, cancel=cancel,
                             **extra)
        except Cancelled:
            phase.count("cancelled")
            if cancel is None:
                problems.append(f"call {i} ({name}) raised Cancelled without a cancel")
            if store is not None and store.exists():
                problems.append(f"call {i} ({name}): the cancelled call left its store {store.name}")
        else:
            phase.count("completed")
            if cancel is not None:
                problems.append(f"call {i} ({name}) was not cancelled")
            expected = size if output == "labels" else (None, *size)
            got = tuple(result.shape)
            if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
                problems.append(f"call {i} ({name}): result shape {got}, expected {expected}")
            del result
            if store is not None:
                import shutil

                shutil.rmtree(store)  # ours to remove: a completed call's store is the result
        phase.rss.append(rss_mb())
        if i + 1 == warmup:
            on_warm()
        if (i + 1) % 50 == 0:
            log(f"  predict {i + 1}/{calls}: RSS {phase.rss[-1]:.0f} MB, {time.perf_counter() - start:.0f} s")
    phase.seconds = time.perf_counter() - start
    return phase, problems


def _worker_checkpoints(folder: Path) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """Tiny checkpoints for the worker: ``(label, path, roi, napari-order input shape)``."""
    import torch

    from medsegkit import create_model, save_checkpoint

    torch.manual_seed(0)
    unet2d = create_model("UNet2d", channels=(4, 8), strides=(2,)).eval()
    unet3d = create_model("UNet3d", channels=(4, 8), strides=(2,)).eval()
    meta = {"class_names": ["background", "foreground"]}
    return [
        ("UNet2d", str(save_checkpoint(unet2d, folder / "unet2d.safetensors", metadata=meta)), 32, (72, 64)),
        ("UNet3d", str(save_checkpoint(unet3d, folder / "unet3d.safetensors", metadata=meta)), 16, (28, 32, 24)),
    ]


def worker_soak(jobs: int, cancels: int, kills: int, warmup: int, folder: Path, log: Callable[[str], None],
                on_warm: Callable[[], None] = lambda: None) -> tuple[Phase, dict[int, list[float]], list[str]]:
    """``jobs`` worker jobs; returns the phase (this process's RSS), the worker RSS per pid, problems."""
    import numpy as np

    from medsegkit import Cancelled
    from medsegkit.napari._worker_client import (
        WorkerDied,
        WorkerJob,
        WorkerProcess,
        new_job_folder,
        read_output,
        remove_job_folder,
        write_input_array,
    )

    checkpoints = _worker_checkpoints(folder)
    # spread the cancels and kills over the post-warm-up jobs (a kill never on the last job)
    span = max(jobs - warmup - 1, 1)
    cancel_at = {warmup + (k * span) // max(cancels, 1) for k in range(cancels)} if cancels else set()
    kill_at = {warmup + (k * span) // max(kills, 1) + span // (2 * max(kills, 1)) for k in range(kills)} if kills else set()
    kill_at -= cancel_at
    while len(kill_at) < kills:  # collisions with cancel_at: take the next free job
        kill_at.add(next(j for j in range(warmup, jobs - 1) if j not in cancel_at | kill_at))
    rng = np.random.default_rng(1)
    worker = WorkerProcess()
    phase = Phase("worker")
    worker_rss: dict[int, list[float]] = {}
    problems: list[str] = []
    start = time.perf_counter()
    try:
        for i in range(jobs):
            label, path, roi, shape = checkpoints[i % len(checkpoints)]
            if i in cancel_at or i in kill_at:  # long enough (1,331 window batches) to be stopped mid-run
                label, path, roi, shape = checkpoints[1][0], checkpoints[1][1], 16, (128, 128, 128)
            job_folder = new_job_folder()
            try:
                data = rng.normal(size=shape).astype(np.float32)
                job = {"action": "segment", "model": {"checkpoint": path}, "input": write_input_array(data, job_folder),
                       "output_dir": str(job_folder / "out"), "world_affine": None, "threads": 1,
                       "predict": {"roi_size": roi, "overlap": 0.25, "sw_batch_size": 1}}
                handle = WorkerJob(job, worker=worker)
                gen = handle.run()
                killed_pid = None
                try:
                    while True:
                        done, _total = next(gen)
                        if done >= 1 and i in cancel_at:
                            handle.cancel()
                        if done >= 1 and i in kill_at and killed_pid is None:
                            killed_pid = worker.pid
                            if killed_pid is not None:
                                os.kill(killed_pid, signal.SIGKILL)
                except StopIteration as stop:
                    result = stop.value
                    phase.count("completed")
                    if i in cancel_at or i in kill_at:
                        problems.append(f"job {i} ({label}) completed although it was cancelled / killed")
                    labels = read_output(result)
                    if tuple(labels.shape) != shape:
                        problems.append(f"job {i} ({label}): output shape {labels.shape}, expected {shape}")
                    del labels
                except Cancelled:
                    phase.count("cancelled")
                    if i not in cancel_at:
                        problems.append(f"job {i} ({label}) was cancelled without a cancel")
                except WorkerDied as err:
                    phase.count("worker killed")
                    if i not in kill_at:
                        problems.append(f"job {i} ({label}): the worker died: {err}")
                    elif "SIGKILL" not in str(err):
                        problems.append(f"job {i}: WorkerDied does not name SIGKILL: {err}")
            finally:
                remove_job_folder(job_folder)
            pid = worker.pid
            if pid is not None:
                worker_rss.setdefault(pid, []).append(rss_mb(pid))
            phase.rss.append(rss_mb())
            if i + 1 == warmup:
                on_warm()
            if (i + 1) % 20 == 0:
                log(f"  worker job {i + 1}/{jobs}: RSS here {phase.rss[-1]:.0f} MB, worker "
                    f"{worker_rss[pid][-1] if pid in worker_rss else float('nan'):.0f} MB, "
                    f"{time.perf_counter() - start:.0f} s")
    finally:
        worker.stop()
    phase.seconds = time.perf_counter() - start
    if phase.counts.get("worker killed", 0) != len(kill_at):
        problems.append(f"{phase.counts.get('worker killed', 0)} worker deaths reported, {len(kill_at)} kills made")
    if len(worker_rss) != len(kill_at) + 1:
        problems.append(f"{len(worker_rss)} worker processes served jobs; expected {len(kill_at) + 1} (one per kill + 1)")
    return phase, worker_rss, problems


def _compare(before: Snapshot, warm: list[Snapshot], folders: dict[str, Path],
             settle_s: float = 5.0) -> tuple[list[str], list[str]]:
    """Leaks of a phase: files and children against ``before``, threads against the warm-up snapshot.
    Exiting threads and processes get ``settle_s`` to finish (they count as leaks if they do not)."""
    reference = Snapshot(before.files, before.children,
                         (warm or [before])[0].python_threads, (warm or [before])[0].os_threads)
    deadline = time.monotonic() + settle_s
    while True:
        found, notes = leaks(reference, snapshot(folders))
        if not found or time.monotonic() > deadline:
            return found, notes
        time.sleep(0.2)


@dataclass
class SoakResult:
    phases: list[Phase]
    worker_rss: dict[int, list[float]]
    problems: list[str]
    leaks: list[str]
    rss_failures: list[str]
    rows: list[list[str]]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not (self.problems or self.leaks or self.rss_failures)


def run_soak(*, predict_calls: int = 300, worker_jobs: int = 100, worker_cancels: int = 10, worker_kills: int = 2,
             warmup: int = 40, rss_tolerance: float = 0.05, threads: int = 1, check_rss: bool = True,
             log: Callable[[str], None] = print) -> SoakResult:
    """Run both phases in private temporary / ``MEDSEGKIT_HOME`` folders; see the module docstring."""
    import torch

    torch.set_num_threads(threads)
    private = Path(tempfile.mkdtemp(prefix="medsegkit-soak-"))
    tmp, home, work, inductor = private / "tmp", private / "home", private / "work", private / "torch-cache"
    for folder in (tmp, home, work, inductor):
        folder.mkdir()
    # `import monai` imports torch._dynamo, which creates torch's per-user cache folder
    # ($TMPDIR/torchinductor_$USER) once per machine; it gets its own folder here, checked like the others
    saved_env = {k: os.environ.get(k) for k in ("TMPDIR", "MEDSEGKIT_HOME", "TORCHINDUCTOR_CACHE_DIR")}
    saved_tempdir = tempfile.tempdir
    os.environ["TMPDIR"], os.environ["MEDSEGKIT_HOME"] = str(tmp), str(home)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    tempfile.tempdir = str(tmp)
    folders = {"the temporary folder": tmp, "MEDSEGKIT_HOME": home, "torch's cache folder": inductor}
    phases, problems, leaks_found, rss_failures, notes = [], [], [], [], []
    worker_rss: dict[int, list[float]] = {}
    try:
        # files and child processes are compared with the state before a phase; threads with the state
        # after its warm-up (torch's and zarr's pools start on first use and then stay)
        if predict_calls:
            before = snapshot(folders)
            warm: list[Snapshot] = []
            phase, found = predict_soak(predict_calls, min(warmup, predict_calls), work, log,
                                        on_warm=lambda: warm.append(snapshot(folders)))
            problems += found
            phases.append(phase)
            found, explained = _compare(before, warm, folders)
            leaks_found += [f"predict: {x}" for x in found]
            notes += [f"predict: {x}" for x in explained]
        if worker_jobs:
            before = snapshot(folders)
            warm = []
            phase, worker_rss, found = worker_soak(worker_jobs, worker_cancels, worker_kills,
                                                   min(warmup, worker_jobs), work, log,
                                                   on_warm=lambda: warm.append(snapshot(folders)))
            problems += found
            phases.append(phase)
            found, explained = _compare(before, warm, folders)
            leaks_found += [f"worker: {x}" for x in found]
            notes += [f"worker: {x}" for x in explained]
    finally:
        tempfile.tempdir = saved_tempdir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import shutil

        shutil.rmtree(private, ignore_errors=True)
    rows = []
    for phase in phases:
        warm = min(warmup, len(phase.rss))
        reference, low, high = phase.drift(warm)
        inside = -100 * rss_tolerance <= low and high <= 100 * rss_tolerance
        if check_rss and not inside:
            rss_failures.append(f"{phase.name}: RSS after warm-up {low:+.1f} % .. {high:+.1f} % of {reference:.0f} MB "
                                f"(bound ± {100 * rss_tolerance:g} %)")
        counts = ", ".join(f"{v} {k}" for k, v in sorted(phase.counts.items()))
        rows.append([f"{phase.name} ({len(phase.rss)}: {counts})", f"{phase.seconds:.0f}",
                     f"{phase.rss[0]:.0f}", f"{reference:.0f}", f"{min(phase.rss[warm:] or [reference]):.0f}",
                     f"{max(phase.rss[warm:] or [reference]):.0f}", f"{low:+.1f} / {high:+.1f}",
                     "ok" if inside else "OUT"])
    for pid, samples in worker_rss.items():
        # bounded like this process when the worker process lived past the warm-up (a kill restarts it)
        warm = min(warmup, len(phases[-1].rss))
        if len(samples) > warm:
            worker = Phase(f"worker process {pid}", samples)
            reference, low, high = worker.drift(warm)
            inside = -100 * rss_tolerance <= low and high <= 100 * rss_tolerance
            if check_rss and not inside:
                rss_failures.append(f"{worker.name}: RSS after warm-up {low:+.1f} % .. {high:+.1f} % of "
                                    f"{reference:.0f} MB (bound ± {100 * rss_tolerance:g} %)")
            rows.append([f"  worker process {pid} ({len(samples)} jobs)", "", f"{samples[0]:.0f}", f"{reference:.0f}",
                         f"{min(samples[warm:]):.0f}", f"{max(samples[warm:]):.0f}", f"{low:+.1f} / {high:+.1f}",
                         "ok" if inside else "OUT"])
        else:
            rows.append([f"  worker process {pid} ({len(samples)} jobs)", "", f"{samples[0]:.0f}", "",
                         f"{min(samples):.0f}", f"{max(samples):.0f}", "", ""])
    return SoakResult(phases, worker_rss, problems, leaks_found, rss_failures, rows, notes)


def format_table(rows: list[list[str]]) -> str:
    header = ["phase", "s", "RSS first (MB)", "after warm-up", "min", "max", "drift % (min/max)", "± bound"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict-calls", type=int, default=300)
    parser.add_argument("--worker-jobs", type=int, default=100)
    parser.add_argument("--worker-cancels", type=int, default=10)
    parser.add_argument("--worker-kills", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=40, help="calls / jobs before the RSS reference is taken")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS drift after warm-up (0.05 = 5 %%)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    args = parser.parse_args(argv)
    if args.worker_cancels + args.worker_kills > max(args.worker_jobs - args.warmup - 1, 0):
        parser.error("--worker-cancels + --worker-kills must fit in the jobs after --warmup (minus the last)")
    one, five, _ = os.getloadavg()
    print(f"load average {one:.2f} {five:.2f} on {os.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    result = run_soak(predict_calls=args.predict_calls, worker_jobs=args.worker_jobs,
                      worker_cancels=args.worker_cancels, worker_kills=args.worker_kills, warmup=args.warmup,
                      rss_tolerance=args.rss_tolerance, threads=args.threads,
                      log=lambda text: print(text, flush=True))
    print()
    print(format_table(result.rows))
    print(f"\nleaks: {'; '.join(result.leaks) if result.leaks else 'none (files, child processes, threads)'}")
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems + result.rss_failures:
        print(f"FAIL: {problem}")
    one, five, _ = os.getloadavg()
    print(f"load average after: {one:.2f} {five:.2f}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
