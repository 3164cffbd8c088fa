"""`import medsegkit` must stay cheap: the napari process imports it and must not pull torch-side code."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lazy():
    code = (
        "import sys, medsegkit; "
        "heavy = [m for m in ('torch', 'monai', 'torchvision', 'triton', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import medsegkit imported {out}"


def test_public_names_resolve():
    import medsegkit

    for name in ("create_model", "list_models", "model_info", "register_model", "Cancelled", "save_checkpoint",
                 "load_checkpoint", "load_model", "convert"):
        assert getattr(medsegkit, name) is not None


HEAVY = ("torch", "monai", "triton", "torchvision", "transformers", "itk", "SimpleITK", "matplotlib", "pandas")


def _imported_after(code: str) -> list[str]:
    """The heavy top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_cli_start_imports_no_torch_side_package():
    # `medsegkit --help` and argument errors (a bad output suffix) answer before torch or MONAI is imported
    assert _imported_after("from medsegkit.cli import build_parser; build_parser().format_help()") == []


def test_napari_side_modules_import_no_torch_side_package():
    # napari's process: once it has a GL context on Mesa, importing triton (torch._dynamo, monai) segfaults it
    code = ("import medsegkit.napari._worker_client, medsegkit.napari._catalog, medsegkit.napari._reader, "
            "medsegkit.napari._writer, medsegkit.napari._sample_data")
    assert _imported_after(code) == []


def test_worker_child_imports_nothing_heavy_before_its_first_job():
    # the spawned worker imports only its serve loop before a job arrives: its idle RSS stays small
    assert _imported_after("import medsegkit.worker") == []


def test_reading_a_nifti_file_imports_no_torch_side_package():
    from medsegkit.data import sample_path

    code = f"from medsegkit.io import read_image; read_image({str(sample_path('mni152_t1'))!r})"
    assert _imported_after(code) == []
