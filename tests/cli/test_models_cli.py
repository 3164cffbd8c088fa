from __future__ import annotations

import json
import subprocess
import sys

from medsegkit.cli import main


def test_list_and_pattern(capsys, tiny_registered):
    assert main(["list", "test_tiny*"]) == 0
    assert capsys.readouterr().out.split() == [tiny_registered]


def test_list_long_table(capsys, tiny_registered):
    assert main(["list", "test_tiny*", "--long"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and tiny_registered in out and "semantic" in out


def test_list_no_match_is_usage_error(capsys):
    assert main(["list", "no_such_model_*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model matches" in err


def test_info_json(capsys, tiny_registered):
    assert main(["info", tiny_registered, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == tiny_registered and data["num_params"] > 0 and data["task"] == "semantic"


def test_info_unknown_model_one_line(capsys, tiny_registered):
    assert main(["info", "test_tinynet_2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsegkit info: error: unknown model name") and err.count("\n") == 1
    assert "Traceback" not in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "medsegkit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("medsegkit ")


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: medsegkit" in capsys.readouterr().err
