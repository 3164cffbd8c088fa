"""The parent side of the worker process without the widget: terminate on an unhonoured cancel, kills."""

from __future__ import annotations

import os
import signal
import threading
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


def _start_in_thread(job: WorkerJob, timeout_s: float = 180.0) -> tuple[threading.Thread, list]:
    """Run ``job`` in a thread (as the widget does); returns the thread and a list that receives the
    result or the exception, once the child has reported that it started."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(job.result())
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not job.info and not outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.info and not outcome, f"the worker never started the job: {outcome}"
    return thread, outcome


@pytest.mark.slow  # spawns its own worker process
def test_cancel_not_honoured_terminates_the_worker(hanging_worker):
    job = WorkerJob({"action": "describe"}, worker=hanging_worker, cancel_grace_s=1.0)
    thread, outcome = _start_in_thread(job)
    pid = job.info["pid"]
    started = time.monotonic()
    job.cancel()
    thread.join(30)
    assert time.monotonic() - started < 6
    assert isinstance(outcome[0], Cancelled) and "did not stop within 1 s and was terminated" in str(outcome[0])
    assert not hanging_worker.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow  # spawns its own worker process
def test_killed_worker_is_reported_as_out_of_memory(hanging_worker):
    job = WorkerJob({"action": "describe"}, worker=hanging_worker)
    thread, outcome = _start_in_thread(job)
    os.kill(job.info["pid"], signal.SIGKILL)  # what the kernel's OOM killer does
    thread.join(30)
    assert isinstance(outcome[0], WorkerDied)
    assert "was killed (SIGKILL; usually the system ran out of memory" in str(outcome[0])
    assert not hanging_worker.is_alive()


def test_exit_descriptions():
    assert describe_exit(-signal.SIGSEGV) == "crashed (SIGSEGV, segmentation fault)"
    assert describe_exit(3).startswith("exited unexpectedly with code 3")
