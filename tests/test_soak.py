"""A short soak (benchmarks/soak.py): repeated predict calls and worker jobs, cancelled and killed ones
among them, leave no files, child processes or threads behind. Memory bounds: the benchmark only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("medsegkit_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_soak_leaves_nothing_behind():
    soak = _soak_module()
    result = soak.run_soak(predict_calls=30, worker_jobs=10, worker_cancels=2, worker_kills=1, warmup=4,
                           check_rss=False, log=lambda text: None)
    assert result.problems == []
    assert result.leaks == []
    predict_phase, worker_phase = result.phases
    assert predict_phase.counts == {"completed": 27, "cancelled": 3}
    assert worker_phase.counts == {"completed": 7, "cancelled": 2, "worker killed": 1}
    assert len(result.worker_rss) == 2  # the killed process and the fresh one that took the next jobs
    assert len(predict_phase.rss) == 30 and len(worker_phase.rss) == 10


def test_leak_check_sees_files_children_and_threads(tmp_path):
    import subprocess
    import threading

    soak = _soak_module()
    folders = {"tmp": tmp_path}
    before = soak.snapshot(folders)
    (tmp_path / "left.npy").write_bytes(b"x")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="left-thread")
    thread.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        found, _ = soak.leaks(before, soak.snapshot(folders))
    finally:
        stop.set()
        thread.join()
        child.kill()
        child.wait()
    assert any("left.npy" in x for x in found)
    assert any("left-thread" in x for x in found)
    assert any(f"{child.pid} " in x for x in found)
    assert soak.leaks(before, soak.snapshot({"tmp": tmp_path / "absent"}))[0] == []
