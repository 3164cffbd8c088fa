"""The wheel carries the top-level napari.yaml and sample_data/, and declares the napari entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling", reason="hatchling (build backend) is needed to build the wheel")
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    # build from a copy so the test never writes into the checkout
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".tox", ".venv", "site", "*.egg-info", "__pycache__",
                                                  "medsegkit-demo"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (whl,) = out.glob("medsegkit-*.whl")
    return whl


def test_wheel_contains_manifest_and_sample_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "medsegkit/napari.yaml" in names
    shipped = [n for n in names if n.startswith("medsegkit/sample_data/")]
    expected = sorted(
        "medsegkit/sample_data/" + p.relative_to(ROOT / "sample_data").as_posix()
        for p in (ROOT / "sample_data").rglob("*") if p.is_file()
    )
    assert sorted(shipped) == expected and expected, "sample_data/ must ship in the wheel"
    manifest = zipfile.ZipFile(wheel).read("medsegkit/napari.yaml")
    assert manifest == (ROOT / "napari.yaml").read_bytes()


def test_wheel_declares_entry_points(wheel):
    archive = zipfile.ZipFile(wheel)
    (ep_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = archive.read(ep_name).decode()
    assert "[napari.manifest]" in entry_points and "medsegkit = medsegkit:napari.yaml" in entry_points
    assert "[console_scripts]" in entry_points and "medsegkit = medsegkit.cli:main" in entry_points


def test_installed_package_finds_its_data():
    from importlib.resources import files

    package = files("medsegkit")
    assert package.joinpath("napari.yaml").is_file()
    assert package.joinpath("sample_data").is_dir()
