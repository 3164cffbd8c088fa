"""The layering contracts (pyproject.toml ``[tool.importlinter]``, docs/architecture.md) hold, and bite.

import-linter reads every import statement of the installed package, including imports inside
functions. ``tox -e lint`` runs the same contracts with ``lint-imports``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

from importlinter.api import read_configuration  # noqa: E402
from importlinter.cli import lint_imports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
CONTRACTS = {
    "apps-on-top": "protected",
    "plain-model-code": "forbidden",
    "weights-below-registry": "forbidden",
    "inference-below-train": "forbidden",
    "no-cycles": "acyclic_siblings",
}


def test_the_contracts_are_configured():
    config = read_configuration(str(CONFIG))
    assert config["session_options"]["root_packages"] == ["medsegkit"]
    assert {c["id"]: c["type"] for c in config["contracts_options"]} == CONTRACTS


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_contract_is_kept(contract, capsys):
    code = lint_imports(config_filename=str(CONFIG), limit_to_contracts=(contract,), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, f"import-linter contract {contract!r} is broken:\n{report}"


def _lint_copy(tmp_path: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the contracts on a copy of the package's .py files with ``extra`` modules added."""
    import medsegkit

    source = Path(medsegkit.__file__).parent
    copy = tmp_path / "medsegkit"
    shutil.copytree(source, copy, ignore=lambda folder, names: [
        n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir() or n == "__pycache__"])
    for name, text in extra.items():
        (copy / name).write_text(text)
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(CONFIG)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "", "PYTHONSAFEPATH": ""}, timeout=120)


def test_upward_imports_break_the_contracts(tmp_path):
    result = _lint_copy(tmp_path, {"io/_bad.py": "def f():\n    from medsegkit.napari import _widget\n",
                                   "nets/_bad.py": "import medsegkit.train.engine\n",
                                   "inference/_bad.py": "from medsegkit.train import distributed\n",
                                   "weights/_bad.py": "from medsegkit.registry import create_model\n"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "medsegkit.io._bad -> medsegkit.napari._widget" in result.stdout
    assert "medsegkit.nets._bad -> medsegkit.train.engine" in result.stdout
    assert "medsegkit.inference._bad -> medsegkit.train.distributed" in result.stdout
    assert "medsegkit.weights._bad -> medsegkit.registry" in result.stdout
