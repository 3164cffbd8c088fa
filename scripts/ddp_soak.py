"""Soak the three torchrun (2 CPU ranks, gloo) entry points and count passes and failures.

    python scripts/ddp_soak.py --runs 50                       # all three commands, one busy core
    python scripts/ddp_soak.py --runs 20 --commands bundle     # only the MONAI bundle train config
    python scripts/ddp_soak.py --runs 50 --spin 0 --cores /tmp/cores

Commands (the same as the slow tests run):

* ``bundle``: ``torch.distributed.run --standalone --nproc_per_node 2 -m monai.bundle run --config_file
  "['configs/train.json','configs/multi_gpu_train.json']" --max_epochs 1`` in a tiny UNet3d bundle
  (tests/bundle/test_bundle.py::test_multi_gpu_train_config_under_torchrun_on_cpu);
* ``selfcheck``: ``-m medsegkit.train.distributed selfcheck`` (tests/train/test_distributed.py);
* ``train``: ``-m medsegkit train --sample`` with a tiny model (tests/train/test_engine.py).

``--spin K`` keeps K extra processes spinning on the CPU for the whole soak (load on top of whatever else
runs). A run passes when torchrun exits 0 and both ranks' expected output is there. Failures keep their
stderr tail in ``--log-dir``; with ``--cores DIR`` the ranks may dump core (``ulimit -c unlimited``; point
/proc/sys/kernel/core_pattern at DIR yourself, e.g. ``DIR/core.%e.%p``) for ``gdb -batch -ex "thread apply all bt"``.
Exit code: 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS = ("bundle", "selfcheck", "train")
TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}


def _spin(parent: int) -> None:
    """Keep one core busy until the soak process ends (also when it is killed)."""
    x = 0
    while os.getppid() == parent:
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) % 2147483648


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _bundle_dir(root: Path) -> Path:
    from medsegkit.bundle import init_bundle

    return init_bundle("UNet3d", root / "ddp_bundle", overrides=TINY, roi_size=(32, 32, 32))


def _command(name: str, work: Path, bundle: Path | None) -> tuple[list[str], Path | None, Callable]:
    """(argv, cwd, check(stdout, stderr) -> problem or None)."""
    if name == "bundle":
        argv = _torchrun() + ["-m", "monai.bundle", "run", "--config_file",
                              "['configs/train.json','configs/multi_gpu_train.json']", "--max_epochs", "1"]
        model = bundle / "models" / "model.pt"
        if model.exists():
            model.unlink()

        def check(out: str, err: str) -> str | None:
            if not model.is_file():
                return "models/model.pt was not written"
            if (out + err).count("Epoch[1] Complete") < 2:
                return "fewer than 2 ranks completed epoch 1"
            return None

        return argv, bundle, check
    if name == "selfcheck":
        out_dir = work / "selfcheck"
        for stale in out_dir.glob("*"):
            stale.unlink()
        argv = _torchrun() + ["-m", "medsegkit.train.distributed", "selfcheck", "--steps", "3",
                              "--global-batch", "4", "--out", str(out_dir)]

        def check(out: str, err: str) -> str | None:
            missing = [f for f in ("rank0.done", "rank1.done", "selfcheck.json") if not (out_dir / f).exists()]
            return f"missing {missing}" if missing else None

        return argv, None, check
    out_dir = work / "train"
    for stale in out_dir.glob("*"):
        stale.unlink()
    checkpoint = out_dir / "m.safetensors"
    argv = _torchrun() + ["-m", "medsegkit", "train", "--sample", "--set", "channels=[4,8]", "--set", "strides=[2]",
                          "--epochs", "1", "--steps-per-epoch", "2", "--patch-size", "16", "16", "16",
                          "--threads", "1", "--no-progress", "-o", str(checkpoint)]

    def check(out: str, err: str) -> str | None:
        return None if checkpoint.is_file() else f"{checkpoint.name} was not written"

    return argv, None, check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="iterations of each command (default 50)")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--spin", type=int, default=1, help="extra busy-spinning processes (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it counts as failed")
    parser.add_argument("--log-dir", type=Path, default=None, help="where failing runs' output goes")
    parser.add_argument("--cores", type=Path, default=None, help="allow core dumps (ulimit -c unlimited)")
    parser.add_argument("--stop-on-failure", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1; got {args.runs}")
    if args.cores is not None:
        args.cores.mkdir(parents=True, exist_ok=True)
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    spinners = [multiprocessing.Process(target=_spin, args=(os.getpid(),), daemon=True) for _ in range(args.spin)]
    for process in spinners:
        process.start()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    counts = {name: [0, 0] for name in args.commands}  # passed, failed
    try:
        with tempfile.TemporaryDirectory(prefix="ddp_soak_") as tmp:
            work = Path(tmp)
            for sub in ("selfcheck", "train"):
                (work / sub).mkdir()
            log_dir = args.log_dir or work / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            bundle = _bundle_dir(work) if "bundle" in args.commands else None
            for i in range(1, args.runs + 1):
                for name in args.commands:
                    cmd, cwd, check = _command(name, work, bundle)
                    started = time.perf_counter()
                    try:
                        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                                                timeout=args.timeout)
                        rc, out, err = result.returncode, result.stdout, result.stderr
                    except subprocess.TimeoutExpired as timeout:
                        rc, out, err = "timeout", str(timeout.stdout or ""), str(timeout.stderr or "")
                    problem = f"exit code {rc}" if rc != 0 else check(out, err)
                    seconds = time.perf_counter() - started
                    if problem is None:
                        counts[name][0] += 1
                    else:
                        counts[name][1] += 1
                        log = log_dir / f"{name}_{i:03d}.log"
                        log.write_text(f"$ {' '.join(cmd)}\n{problem}\n--- stdout\n{out}\n--- stderr\n{err}")
                    status = "ok  " if problem is None else f"FAIL ({problem}; see {log})"
                    print(f"[{i:3d}/{args.runs}] {name:9s} {seconds:6.1f} s {status}", flush=True)
                    if problem is not None and args.stop_on_failure:
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("stopped early", flush=True)
    finally:
        for process in spinners:
            process.terminate()
    print(f"load: {args.spin} extra spinning process(es) on {os.cpu_count()} cores")
    for name, (passed, failed) in counts.items():
        print(f"{name:9s} {passed} passed of {passed + failed}")
    return 0 if all(failed == 0 for _, failed in counts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
