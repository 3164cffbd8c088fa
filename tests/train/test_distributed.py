"""torchrun with 2 CPU processes (gloo): both ranks finish, gradients agree, one checkpoint, and the
distributed losses equal one process on the whole batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from medsegkit.train.distributed import shard


def test_shard_covers_every_item_once():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[0] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="outside"):
        shard(items, 3, 3)


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
