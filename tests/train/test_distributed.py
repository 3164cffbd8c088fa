"""torchrun with 2 CPU processes (gloo): both ranks finish, gradients agree, one checkpoint, and the
distributed losses equal one process on the whole batch; workers end without the gloo-at-exit abort."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from medsegkit.train.distributed import end_worker_process, shard

# Two gloo ranks (plain processes, file:// rendezvous, so nothing kills rank 0 for us). Rank 0 leaves a collective
# whose tensor only gloo's work still holds and keeps the GIL (switch interval 600 s, a busy loop that makes no
# call releasing it) until rank 1 reports through shared memory that the collective completed, and 2 s more:
# the gloo thread that must drop the tensor now waits for the GIL. Then the interpreter shuts down and hands
# the GIL over. That is the race a busy machine produces by chance at the end of a torchrun job.
# The "go" to rank 1 is a store into the shared byte too (0 -> 2), not a file: writing and closing a file
# releases the GIL, and rank 1 saw a file as soon as it was opened, so the collective could complete, and the
# gloo thread drop the tensor normally, while rank 0 was still inside those calls (a CI run exited 0 once).
_GIL_AT_EXIT = textwrap.dedent("""
    import atexit, mmap, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    rank, mode, flag, store = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    done = flag.with_suffix(".done")
    if rank == 0:
        done.write_bytes(b"\\0")
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{store}")
    if rank == 1:
        with done.open("r+b") as file, mmap.mmap(file.fileno(), 1) as shared:
            deadline = time.time() + 120
            while shared[0] != 2 and time.time() < deadline:  # rank 0's go
                time.sleep(0.01)
            dist.all_reduce(torch.ones(4))
            shared[0] = 1
        if mode == "end_worker_process":
            dist.barrier()  # pairs with rank 0's cleanup_distributed()
        import os
        os._exit(0)
    tensor = torch.ones(4)
    work = dist.all_reduce(tensor, async_op=True)
    del tensor, work  # the gloo work now holds the tensor's last reference
    sys.setswitchinterval(600)
    file = done.open("r+b")
    shared = mmap.mmap(file.fileno(), 1)
    shared[0] = 2  # go: a store into shared memory, the GIL stays with this thread from here on
    end = time.perf_counter() + 120
    while shared[0] == 0 and time.perf_counter() < end:  # rank 1 completes the work ...
        pass
    end = time.perf_counter() + 2.0
    while time.perf_counter() < end:  # ... and our gloo thread, done with it, waits for the GIL
        pass

    class Teardown:
        def __del__(self):  # runs once interpreter finalisation has begun, and hands the GIL over
            time.sleep(0.5)

    teardown = Teardown()
    if mode == "end_worker_process":
        from medsegkit.train.distributed import cleanup_distributed, end_worker_process

        atexit.register(lambda: flag.with_suffix(".atexit").write_text("ran"))
        print("buffered output", end="")
        cleanup_distributed()  # as multi_gpu_train.json's finalize: barrier, destroy, then end the worker
        end_worker_process(0)
""")


def _gil_at_exit(tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "gil_at_exit.py"
    script.write_text(_GIL_AT_EXIT)
    args = [mode, str(tmp_path / "flag"), str(tmp_path / "store")]
    peer = subprocess.Popen([sys.executable, str(script), "1", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        return subprocess.run([sys.executable, str(script), "0", *args], capture_output=True, text=True,
                              timeout=300)
    finally:
        peer.wait(timeout=120)


def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="outside"):
        shard(items, 3, 3)


def test_end_worker_process_returns_without_a_process_group():
    """In a plain process (no torchrun, no process group) it is a no-op: the entry point returns normally."""
    assert end_worker_process(0) is None


@pytest.mark.slow
def test_gloo_thread_needing_the_gil_at_interpreter_exit_aborts(tmp_path):
    """The root cause of the rare torchrun abort, made deterministic: a gloo worker thread releasing the last
    reference to a tensor once interpreter finalisation began is ended by CPython with pthread_exit, whose
    unwinding crosses ~AsyncWork (noexcept): std::terminate. If this stops aborting, torch guards the race
    itself and end_worker_process() is no longer needed."""
    result = _gil_at_exit(tmp_path, "interpreter_exit")
    assert result.returncode == -signal.SIGABRT, (result.returncode, result.stderr[-2000:])
    assert "terminate called without an active exception" in result.stderr


@pytest.mark.slow
def test_end_worker_process_ends_a_worker_without_the_abort(tmp_path):
    """The same race, ended through end_worker_process(): exit code 0, atexit handlers ran, output flushed."""
    result = _gil_at_exit(tmp_path, "end_worker_process")
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "terminate called" not in result.stderr
    assert (tmp_path / "flag.atexit").read_text() == "ran"
    assert result.stdout == "buffered output"


@pytest.mark.slow
def test_torchrun_two_ranks_reproduce_single_process(tmp_path):
    torchrun = shutil.which("torchrun") or None
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node", "2", "-m", "medsegkit.train.distributed", "selfcheck",
            "--steps", "5", "--global-batch", "4", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0.done").exists() and (tmp_path / "rank1.done").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["selfcheck.safetensors"]
    report = json.loads((tmp_path / "selfcheck.json").read_text())
    assert report["world_size"] == 2
    assert len(report["distributed_losses"]) == 5
    assert report["max_loss_difference"] <= 1e-4, report
    assert report["max_weight_difference_across_ranks"] == 0.0
    assert report["distributed_losses"][-1] < report["distributed_losses"][0]
