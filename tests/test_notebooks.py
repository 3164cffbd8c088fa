"""The example notebooks: stored without outputs, and run by CI (tox's [testenv] runs them with nbmake)."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def test_the_three_examples_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quick_start.ipynb", "02_your_own_data.ipynb", "03_cohort.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, f"{path.name} has no code"
    for cell in code:
        assert cell["outputs"] == [], f"{path.name}: a cell keeps its outputs; strip them before committing"
        assert cell["execution_count"] is None, f"{path.name}: a cell keeps its execution count"


def test_ci_runs_the_notebooks_and_installs_nbmake():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    commands = tox["testenv"]["commands"]
    assert "--nbmake examples" in commands
    test_extra = re.search(r"^test = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M | re.S)
    assert test_extra and '"nbmake>=' in test_extra.group(1)
