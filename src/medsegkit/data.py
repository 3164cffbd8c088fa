"""The sample volumes shipped with medsegkit (``sample_data/`` in the source tree and the wheel).

They come from files that ship inside installable packages (see ``sample_data/README.md`` for the
derivation and licences; ``scripts/make_sample_data.py`` rebuilds them):

========================  ===============================  =========  ==============  =====
name                      content                          shape      spacing (mm)    axes
========================  ===============================  =========  ==============  =====
``mni152_t1``             MNI ICBM152 2009a T1, uint8      99×117×95  2 × 2 × 2       RAS
``mni152_tissue``         0 background, 1 CSF, 2 GM, 3 WM  99×117×95  2 × 2 × 2       RAS
``itk_head_t1``           ITK example head T1, int16       128×128×62 2 × 2 × 3       LSA
``itk_head_brain_mask``   0 / 1 brain mask                 128×128×62 2 × 2 × 3       LSA
========================  ===============================  =========  ==============  =====

The tissue task's held-out evaluation uses the axial slab ``k >= MNI_HELD_OUT_START`` of the 2 mm
grid (the template is left/right symmetric, so a left/right split would leak).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = [
    "MNI_CLASS_NAMES",
    "MNI_HELD_OUT_START",
    "MNI_LABEL_COLORS",
    "SAMPLE_FILES",
    "DEMO_CHECKPOINT",
    "sample_path",
    "demo_checkpoint_path",
]

SAMPLE_FILES = {
    "mni152_t1": "mni152_t1_2mm.nii.gz",
    "mni152_tissue": "mni152_tissue_2mm.nii.gz",
    "itk_head_t1": "itk_head_t1.nii.gz",
    "itk_head_brain_mask": "itk_head_brain_mask.nii.gz",
}
DEMO_CHECKPOINT = "models/unet3d_mni152_tissue.safetensors"

MNI_CLASS_NAMES = ("background", "CSF", "GM", "WM")
# RGB 0-255 per label; background transparent in overlays.
MNI_LABEL_COLORS = ((0, 0, 0), (60, 140, 255), (255, 170, 40), (70, 210, 110))
# First axial index (k, 2 mm grid) of the held-out slab; training uses k < 55.
MNI_HELD_OUT_START = 55


def _sample_dir() -> Path:
    root = resources.files("medsegkit") / "sample_data"
    path = Path(str(root))
    if not path.is_dir():
        raise FileNotFoundError(
            f"medsegkit's sample_data folder is missing ({path}); reinstall medsegkit or run "
            "scripts/make_sample_data.py in a source checkout"
        )
    return path


def sample_path(name: str) -> Path:
    """Path of a shipped sample volume by name (see the module table), e.g. ``sample_path("mni152_t1")``."""
    if name not in SAMPLE_FILES:
        raise KeyError(f"unknown sample {name!r}; available: {', '.join(SAMPLE_FILES)}")
    path = _sample_dir() / SAMPLE_FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"sample file {path} is missing; run scripts/make_sample_data.py")
    return path


def demo_checkpoint_path() -> Path:
    """Path of the shipped tissue-segmentation ``UNet3d`` checkpoint (used by ``medsegkit demo``)."""
    path = _sample_dir() / DEMO_CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"the demo checkpoint {path} is missing from this installation")
    return path
