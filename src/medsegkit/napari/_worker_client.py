"""Parent side of the model worker: spawn it, hand it files, relay its progress. No torch, no Qt.

The child side and the protocol are described in :mod:`medsegkit.worker`. This module is
what napari's process uses; it imports only numpy (and dask/zarr for lazy layers), so importing it
never pulls torch, MONAI or triton into the viewer's process. The spawned child is started through
:func:`_child_entry`, which imports :mod:`medsegkit.worker` only inside the child.

One :class:`WorkerProcess` per session (:func:`default_worker`) serves the jobs one after another, so
torch and MONAI are imported once, not at every Run; a :class:`WorkerJob` is one job's handle
(progress, result, cancel).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import queue as queue_module
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medsegkit.errors import Cancelled, MedsegkitError

__all__ = [
    "Update",
    "WorkerDied",
    "WorkerError",
    "WorkerJob",
    "WorkerProcess",
    "default_worker",
    "describe_models",
    "new_job_folder",
    "read_output",
    "remove_job_folder",
    "write_input_array",
]


def _child_entry(requests: Any, messages: Any, cancel: Any) -> None:
    """Runs in the spawned process: the first place torch-side code may be imported."""
    from medsegkit._runtime import prefer_huge_pages

    prefer_huge_pages()  # before torch's first allocation in this process
    from medsegkit.worker import serve

    serve(requests, messages, cancel)


class Update(NamedTuple):
    """A ``("update", job_id, info)`` message of a ``"session_run"`` job, as :meth:`WorkerJob.run` yields it:
    ``info = {"path", "format", "shape", "dtype", "region"}`` (the labels file and the region, napari order
    ``[[start, stop], ...]``, just finished in it)."""

    info: dict[str, Any]


class WorkerError(MedsegkitError):
    """The worker process reported an error (the message is the core's one-line message)."""


class WorkerDied(MedsegkitError):
    """The worker process ended without reporting a result (crash, out-of-memory kill, ``os._exit``)."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        super().__init__(f"the model worker process {describe_exit(exitcode)}; the viewer is unaffected")


def describe_exit(exitcode: int | None) -> str:
    """Human words for a ``multiprocessing.Process.exitcode``."""
    if exitcode is None:
        return "stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"was killed ({name}; usually the system ran out of memory — try a smaller roi size)"
        if -exitcode == signal.SIGSEGV:
            return f"crashed ({name}, segmentation fault)"
        return f"was ended by {name}"
    return f"exited unexpectedly with code {exitcode} (out of memory or a crash in native code)"


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start spawned children without re-running the parent's ``__main__`` script.

    ``spawn`` re-imports the parent's main script in the child (as ``__mp_main__``). A napari script
    without an ``if __name__ == "__main__"`` guard would then open a second viewer in the worker.
    The worker needs nothing from ``__main__``, so the child is given an empty stand-in while
    ``Process.start()`` records the preparation data.
    """
    real_main = sys.modules.get("__main__")
    stand_in = types.ModuleType("__main__")
    stand_in.__spec__ = None
    sys.modules["__main__"] = stand_in
    try:
        yield
    finally:
        if real_main is not None:
            sys.modules["__main__"] = real_main


class WorkerProcess:
    """A spawned process that runs jobs one at a time; started on first use, restarted after it ends.

    Keeping the process between jobs pays torch's and MONAI's import (seconds) once per session instead
    of once per Run, and lets the child keep the last model loaded. A crash, an out-of-memory kill, or a
    cancel the child does not honour in time ends the process; the next job starts a fresh one.
    Thread-safe: jobs from several threads queue behind one lock.
    """

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._requests: Any = None
        self._messages: Any = None
        self._cancel: Any = None
        self._next_id = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _start(self) -> None:
        self._requests = self._ctx.Queue()
        self._messages = self._ctx.Queue()
        self._cancel = self._ctx.Event()
        self._process = self._ctx.Process(
            target=_child_entry, args=(self._requests, self._messages, self._cancel),
            name="medsegkit-worker", daemon=True,
        )
        with _main_module_hidden():
            self._process.start()

    def start(self) -> None:
        """Start the process now if it is not running (otherwise the first job starts it)."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._discard()
                self._start()

    def _discard(self) -> None:
        """End the process (terminate, then kill) and drop its queues."""
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        for q in (self._requests, self._messages):
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._process = self._requests = self._messages = self._cancel = None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the process to exit (ending it if it does not within ``timeout_s``)."""
        with self._lock:
            if self._process is not None and self._process.is_alive():
                self._requests.put(None)
                self._process.join(timeout_s)
            self._discard()

    def run(self, handle: WorkerJob) -> Iterator[tuple[int, int]]:
        """Run ``handle``'s job; yields ``(done, total)``, returns the result dict (see :meth:`WorkerJob.run`)."""
        with self._lock:
            if handle.cancel_requested:
                raise Cancelled(handle.cancel_message)
            if self._process is None or not self._process.is_alive():
                self._discard()
                self._start()
            self._next_id += 1
            job_id = self._next_id
            self._cancel.clear()
            handle._attach(self, self._cancel)
            self._requests.put((job_id, handle.job))
            try:
                result = yield from self._follow(job_id, handle)
            except WorkerDied:
                self._discard()
                raise
            except GeneratorExit:  # the caller stopped listening: stop the child's work too
                if self._cancel is not None:
                    self._cancel.set()
                raise
            finally:
                handle._detach()
            return result

    def _follow(self, job_id: int, handle: WorkerJob) -> Iterator[tuple[int, int]]:
        while True:
            message = self._next_message(handle)
            if message is None or message[1] != job_id:
                continue  # a poll tick, or a stale message of an earlier job
            kind, payload = message[0], message[2:]
            if kind == "progress":
                yield int(payload[0]), int(payload[1])
            elif kind == "update":
                yield Update(payload[0])
            elif kind == "started":
                handle.info.update(payload[0])
            elif kind == "result":
                return payload[0]
            elif kind == "error":
                raise WorkerError(payload[0])
            elif kind == "cancelled":
                raise Cancelled(handle.cancel_message)
            else:  # pragma: no cover - protocol violation
                raise WorkerError(f"unexpected message from the worker: {message!r}")

    def _next_message(self, handle: WorkerJob) -> tuple | None:
        assert self._process is not None
        try:
            return self._messages.get(timeout=handle.poll_s)
        except queue_module.Empty:
            pass
        if handle.cancel_deadline is not None and time.monotonic() > handle.cancel_deadline:
            handle.terminated = True
            exitcode = self._process.exitcode
            self._discard()
            raise Cancelled(
                f"cancelled; the worker did not stop within {handle.cancel_grace_s:g} s and was terminated"
                + (f" (it had {describe_exit(exitcode)})" if exitcode is not None else "")
            )
        if not self._process.is_alive():
            # its last message may still be in the pipe
            try:
                return self._messages.get(timeout=0.5)
            except queue_module.Empty:
                if handle.cancel_requested:
                    raise Cancelled("cancelled; the worker process ended") from None
                raise WorkerDied(self._process.exitcode) from None
        return None


_default: WorkerProcess | None = None
_default_lock = threading.Lock()


def default_worker() -> WorkerProcess:
    """The session's shared :class:`WorkerProcess` (stopped when Python exits)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WorkerProcess()
            atexit.register(_default.stop)
        return _default


class WorkerJob:
    """One job for a :class:`WorkerProcess` (the session's shared one by default).

    Use :meth:`run` (a generator of ``(done, total)`` progress pairs whose return value is the result
    dict), or :meth:`result` to wait for the result. :meth:`cancel` may be called from any thread, also
    before the job reached the process.

    Args:
        job: the job dict (see :mod:`medsegkit.worker`); may be completed (``job.job[...]``)
            until :meth:`run` starts.
        worker: the process to run in; default :func:`default_worker`.
        cancel_grace_s: after :meth:`cancel`, how long the child may take to reach its next cancel
            check (one window batch) before the process is terminated outright.
        poll_s: how often the parent wakes up to check the child.
        cancel_message: the :class:`medsegkit.Cancelled` message when the job is cancelled.
    """

    def __init__(self, job: Mapping[str, Any], *, worker: WorkerProcess | None = None,
                 cancel_grace_s: float = 10.0, poll_s: float = 0.05,
                 cancel_message: str = "cancelled; no layer was added"):
        self.job = dict(job)
        self.cancel_message = cancel_message
        self.worker = worker
        self.cancel_grace_s = float(cancel_grace_s)
        self.poll_s = float(poll_s)
        self.info: dict[str, Any] = {}
        self.cancel_deadline: float | None = None
        self.terminated = False
        self._cancel_flag = threading.Event()
        self._process_event: Any = None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_flag.is_set()

    def cancel(self) -> None:
        """Ask the child to stop at its next window batch; it is terminated if it does not in time."""
        self._cancel_flag.set()
        if self.cancel_deadline is None:
            self.cancel_deadline = time.monotonic() + self.cancel_grace_s
        event = self._process_event
        if event is not None:
            event.set()

    def _attach(self, worker: WorkerProcess, event: Any) -> None:
        self._process_event = event
        if self._cancel_flag.is_set():
            event.set()

    def _detach(self) -> None:
        self._process_event = None

    def run(self) -> Iterator[tuple[int, int] | Update]:
        """Send the job and yield ``(done, total)`` (and :class:`Update` for session runs) until it
        finishes; returns the result dict.

        Raises:
            WorkerError: the child reported an error (message from the core).
            WorkerDied: the child ended without a result (crash, OOM kill).
            medsegkit.Cancelled: the job was cancelled (the child stopped, or was terminated).
        """
        worker = self.worker or default_worker()
        return (yield from worker.run(self))

    def result(self) -> dict[str, Any]:
        """Run to completion, ignoring progress; return the result dict."""
        gen = self.run()
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value


def write_input_array(data: Any, folder: str | os.PathLike, *, name: str = "input") -> dict[str, Any]:
    """Put ``data`` where the worker can read it without pickling: ``{"format", "path", "shape", "dtype"}``.

    A ``numpy.ndarray`` is copied into ``<folder>/<name>.npy`` (a memory map: one sequential write).
    A zarr array stored in a local folder is read by the worker in place (nothing is copied). Anything
    else array-like (dask, in-memory zarr, other lazy arrays) is streamed block by block into a zarr
    store ``<folder>/<name>.zarr`` without loading it whole; the worker then reads it window by window.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    local = _local_zarr_path(data)
    if local is not None:
        return {"format": "zarr", "path": str(local), "shape": list(data.shape), "dtype": str(data.dtype)}
    if isinstance(data, np.ndarray):
        path = folder / f"{name}.npy"
        target = np.lib.format.open_memmap(path, mode="w+", dtype=data.dtype, shape=data.shape)
        target[...] = data
        target.flush()
        del target
        return {"format": "npy", "path": str(path), "shape": list(data.shape), "dtype": str(data.dtype)}
    import dask.array as da

    path = folder / f"{name}.zarr"
    lazy = data if isinstance(data, da.Array) else da.from_array(data, chunks=_chunks_of(data))
    lazy.to_zarr(str(path), overwrite=True)
    return {"format": "zarr", "path": str(path), "shape": list(lazy.shape), "dtype": str(lazy.dtype)}


def _local_zarr_path(data: Any) -> Path | None:
    """The folder of a zarr array kept on the local disk, else ``None``."""
    if type(data).__module__.split(".")[0] != "zarr":
        return None
    root = getattr(getattr(data, "store", None), "root", None)
    if root is None:
        return None
    path = Path(str(root)) / str(getattr(data, "path", "") or "")
    return path if path.is_dir() else None


def _chunks_of(data: Any) -> Any:
    chunks = getattr(data, "chunks", None)
    if isinstance(chunks, tuple) and all(isinstance(c, int) for c in chunks):
        return chunks
    return "auto"


def read_output(result: Mapping[str, Any]) -> Any:
    """Open the worker's output: a numpy array (``.npy``, read into memory) or a zarr array (writable,
    so a Labels layer on it can be painted)."""
    if result["format"] == "npy":
        return np.load(result["path"])
    if result["format"] == "zarr":
        import zarr

        return zarr.open_array(result["path"], mode="r+")
    raise ValueError(f"unknown output format {result['format']!r}; expected 'npy' or 'zarr'")


def describe_models(checkpoints: Sequence[str | os.PathLike] = (), *,
                    worker: WorkerProcess | None = None) -> dict[str, Any]:
    """Ask the worker process for the model catalogue (the ``"describe"`` job); blocks until it answers."""
    return WorkerJob({"action": "describe", "checkpoints": [str(p) for p in checkpoints]}, worker=worker).result()


def new_job_folder(parent: str | os.PathLike | None = None) -> Path:
    """A fresh folder for one job's files (``tempfile.mkdtemp``); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix="medsegkit-job-", dir=parent))


def remove_job_folder(folder: str | os.PathLike) -> None:
    shutil.rmtree(folder, ignore_errors=True)
