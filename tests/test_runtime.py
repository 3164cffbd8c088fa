"""Process settings of the processes medsegkit starts: transparent huge pages for torch's allocator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

SCRIPT = textwrap.dedent(
    """
    import os, resource, sys
    from medsegkit.cli import main
    main(["list", "UNet3d"])  # the command line sets the variable before torch is imported
    import torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = torch.ones(16 * 2**20)  # 64 MB, allocated and freed ten times
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    print(os.environ.get("THP_MEM_ALLOC_ENABLE"), faults)
    """
)


def _run(env_value: str | None) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    value, faults = done.stdout.strip().splitlines()[-1].split()
    return value, float(faults)


def test_command_line_asks_torch_for_huge_pages_and_keeps_a_users_choice():
    value, faults = _run(None)
    assert value == "1"
    kept, faults_off = _run("0")
    assert kept == "0"
    # 64 MB in 4 kB pages is 16,384 first-touch faults; 2 MB huge pages need 32 (+ the rest of the process)
    assert faults_off > 16_000
    if "[never]" in (THP.read_text() if THP.exists() else "[never]"):
        pytest.skip("transparent huge pages are disabled on this kernel")
    assert faults < faults_off / 4, (faults, faults_off)


def test_napari_worker_sets_it_before_importing_torch(monkeypatch):
    import medsegkit.worker as worker
    from medsegkit.napari import _worker_client

    seen = {}
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(worker, "serve", lambda *args: seen.update(value=os.environ.get("THP_MEM_ALLOC_ENABLE")))
    _worker_client._child_entry(None, None, None)
    assert seen == {"value": "1"}
