"""The npe2 manifest: valid, shipped inside the package, and every command resolves to a callable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import npe2

ROOT = Path(__file__).resolve().parents[2]


def test_manifest_validates():
    done = subprocess.run([sys.executable, "-m", "npe2", "validate", "medsegkit"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


def test_package_manifest_is_the_top_level_file():
    import medsegkit

    packaged = Path(medsegkit.__file__).parent / "napari.yaml"
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()


def test_every_command_resolves_and_contributions_are_registered():
    manifest = npe2.PluginManifest.from_distribution("medsegkit")
    ids = {c.id for c in manifest.contributions.commands}
    assert ids == {"medsegkit.segment_widget", "medsegkit.get_reader", "medsegkit.write_labels",
                   "medsegkit.sample_mni152"}
    for command in manifest.contributions.commands:
        assert callable(_resolve(command.python_name))
    assert [w.display_name for w in manifest.contributions.widgets] == ["Segment"]
    assert manifest.contributions.readers[0].accepts_directories
    assert set(manifest.contributions.writers[0].filename_extensions) == {".nii.gz", ".nii", ".nrrd", ".mha"}
    assert [s.key for s in manifest.contributions.sample_data] == ["mni152"]
    pm = npe2.PluginManager.instance()
    pm.discover()
    for command_id in ids:
        assert callable(pm.commands.get(command_id))  # imports python_name


def _resolve(python_name: str):
    import importlib

    module, _, attr = python_name.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_napari_finds_reader_and_writer_for_medical_files():
    pm = npe2.PluginManager.instance()
    pm.discover()
    for name in ("a.nii", "a.nii.gz", "a.nrrd", "a.mha", "a.mhd"):
        assert "medsegkit.get_reader" in [r.command for r in pm.iter_compatible_readers([name])], name
    writers = [w.command for w in pm.iter_compatible_writers(["labels"])]
    assert "medsegkit.write_labels" in writers


def test_plugin_import_pulls_no_torch():
    code = (
        "import sys; import medsegkit.napari._widget, medsegkit.napari._reader, medsegkit.napari._writer, "
        "medsegkit.napari._sample_data; "
        "print(','.join(m for m in ('torch', 'monai', 'torchvision', 'triton') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
