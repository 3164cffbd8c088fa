"""``medsegkit bundle init``: the command line's own checks (the bundle writer is tested in tests/bundle)."""

from __future__ import annotations

import json

import pytest

from medsegkit.cli import main

TINY = ["--set", "channels=[4,8]", "--set", "strides=[2]", "--in-channels", "1", "--out-channels", "2"]


def test_one_roi_size_is_used_on_every_axis(tmp_path, capsys):
    """Before 2026-12-08 ``--roi 16`` was written as the 1D window ``[16]``: the bundle's inference then failed on
    every 3D image ('Inputs must have 3 dimensions for 1D roi_size', an 87-line traceback, exit 1)."""
    out = tmp_path / "bundle"
    assert main(["bundle", "init", "UNet3d", str(out), "--roi", "16", *TINY]) == 0
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["inferer"]["roi_size"] == [16, 16, 16]


@pytest.mark.parametrize(("roi", "message"), [
    (["16", "16"], "--roi takes 1 or 3 sizes for this 3D model, got 2"),
    (["0"], "--roi sizes must be positive, got [0]"),
])
def test_bad_roi_is_one_line_and_writes_nothing(tmp_path, capsys, roi, message):
    out = tmp_path / "bundle"
    assert main(["bundle", "init", "UNet3d", str(out), "--roi", *roi, *TINY]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [f"medsegkit bundle: error: {message}"]
    assert not out.exists()
