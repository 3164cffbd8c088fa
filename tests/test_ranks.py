"""medsegkit._ranks: this process's rank (process group, else torchrun's environment, else 0 of 1) and shard."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medsegkit._ranks import process_rank, shard


def test_rank_comes_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_rank() == (0, 1)
    assert shard(list("abcde")) == list("abcde")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_rank() == (1, 2)
    assert shard(list("abcde")) == ["b", "d"]
    assert shard(list("abcde"), 0, 3) == ["a", "d"]  # explicit arguments win over the environment


def test_bad_environment_and_ranks_are_reported(monkeypatch):
    monkeypatch.setenv("RANK", "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"environment variable RANK='one' is not an integer \(torchrun sets it\)"):
        process_rank()
    with pytest.raises(ValueError, match=r"rank 2 is outside 0\.\.1"):
        shard([1, 2, 3], 2, 2)


def test_the_rank_helpers_import_no_torch():
    code = "import sys, medsegkit._ranks as r; r.shard([1, 2], 0, 1); r.process_rank(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "False"


def test_training_reexports_the_same_shard():
    from medsegkit.train import distributed

    assert distributed.shard is shard
