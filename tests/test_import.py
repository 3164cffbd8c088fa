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
