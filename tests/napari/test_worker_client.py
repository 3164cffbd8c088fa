"""The parent side of the worker process without the widget: terminate on an unhonoured cancel, kills."""

from __future__ import annotations

import os
import signal
import time

import pytest

from medsegkit.errors import Cancelled
from medsegkit.napari._worker_client import WorkerDied, WorkerJob, WorkerProcess, describe_exit


@pytest.fixture
def hanging_worker(monkeypatch):
    monkeypatch.setenv("MEDSEGKIT_WORKER_TEST_CRASH", "hang")  # read by the child, at spawn
    worker = WorkerProcess()
    yield worker
    worker.stop()


def _run_until_started(job: WorkerJob, timeout_s: float = 120.0):
    gen = job.run()
    start = time.monotonic()
    while not job.info and time.monotonic() - start < timeout_s:
        try:
            next(gen)
        except StopIteration:  # pragma: no cover - the job cannot finish while hanging
            raise AssertionError("the hanging job finished") from None
    assert job.info, "the worker never started the job"
    return gen


@pytest.mark.slow  # spawns its own worker process
def test_cancel_not_honoured_terminates_the_worker(hanging_worker):
    job = WorkerJob({"action": "describe"}, worker=hanging_worker, cancel_grace_s=1.0)
    gen = _run_until_started(job)
    pid = job.info["pid"]
    started = time.monotonic()
    job.cancel()
    with pytest.raises(Cancelled, match="did not stop within 1 s and was terminated"):
        for _ in gen:
            pass
    assert time.monotonic() - started < 6
    assert not hanging_worker.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow  # spawns its own worker process
def test_killed_worker_is_reported_as_out_of_memory(hanging_worker):
    job = WorkerJob({"action": "describe"}, worker=hanging_worker)
    gen = _run_until_started(job)
    os.kill(job.info["pid"], signal.SIGKILL)  # what the kernel's OOM killer does
    with pytest.raises(WorkerDied, match=r"was killed \(SIGKILL; usually the system ran out of memory"):
        for _ in gen:
            pass
    assert not hanging_worker.is_alive()


def test_exit_descriptions():
    assert describe_exit(-signal.SIGSEGV) == "crashed (SIGSEGV, segmentation fault)"
    assert describe_exit(3).startswith("exited unexpectedly with code 3")
