#!/usr/bin/env python
"""Derive medsegkit's shipped sample volumes from files that ship inside installable packages.

Writes into ``sample_data/`` (or ``--out DIR``):

* ``mni152_t1_2mm.nii.gz`` and ``mni152_tissue_2mm.nii.gz``: the MNI ICBM152 2009a symmetric T1
  (from the PyPI ``nilearn`` wheel, ``nilearn/datasets/data/``) at 2 mm, and its four-class tissue
  map (0 background, 1 CSF, 2 grey matter, 3 white matter), 99 x 117 x 95 voxels, RAS.
* ``itk_head_t1.nii.gz`` and ``itk_head_brain_mask.nii.gz``: the ITK example head
  (Debian ``insighttoolkit5-examples``) in its original LSA 2 x 2 x 3 mm grid, and its brain mask
  (skull-stripped volume > 0).

Recipe for the 2 mm MNI volumes (the order matters):

1. zero-pad the 1 mm grids (197, 233, 189) to even sizes (198, 234, 190);
2. at 1 mm: brain = T1 > 0, G = gm / 255, W = wm / 255 (zero outside the brain),
   C = clip(1 - G - W, 0, 1) inside the brain; class probabilities [1 - brain, C, G, W];
3. 2 x 2 x 2 block mean of each probability and of T1;
4. labels = argmax over the four block-mean probabilities; T1 = block mean rounded to uint8;
5. affine: spacing 2 mm, origin moved +0.5 mm along each voxel axis (the block centre).

The script is deterministic (float64 arithmetic, numpy's round-half-to-even, first index wins argmax
ties); ``tests/test_sample_data.py`` checks that it reproduces the shipped files value for value.

Usage::

    pip install nilearn            # only this script needs it; nilearn itself is never imported
    apt-get install insighttoolkit5-examples
    python scripts/make_sample_data.py [--out sample_data]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

MNI_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
ITK_T1 = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
ITK_SKULL_STRIP = ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"

OUTPUT_NAMES = {
    "mni_t1": "mni152_t1_2mm.nii.gz",
    "mni_labels": "mni152_tissue_2mm.nii.gz",
    "itk_t1": "itk_head_t1.nii.gz",
    "itk_mask": "itk_head_brain_mask.nii.gz",
}


def mni_source_paths() -> dict[str, Path]:
    """Paths of the three MNI files inside the installed ``nilearn`` distribution (not imported)."""
    try:
        dist = importlib.metadata.distribution("nilearn")
    except importlib.metadata.PackageNotFoundError as err:
        raise SystemExit("nilearn is not installed: `pip install nilearn` (only its data files are used)") from err
    paths = {key: Path(dist.locate_file(rel)) for key, rel in MNI_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"nilearn {dist.version} lacks the MNI152 2009a files: {missing}")
    return paths


def _pad_even(array: np.ndarray) -> np.ndarray:
    return np.pad(array, [(0, size % 2) for size in array.shape])


def _block_mean(array: np.ndarray) -> np.ndarray:
    """2 x 2 x 2 block mean of an even-sized ``(X, Y, Z)`` array -> ``(X/2, Y/2, Z/2)``."""
    x, y, z = array.shape
    return array.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def _nifti(array: np.ndarray, affine: np.ndarray, code: int) -> nib.Nifti1Image:
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=code)
    image.header.set_sform(affine, code=code)
    image.header.set_xyzt_units("mm")
    return image


def derive_mni(paths: dict[str, Path]) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The 2 mm T1 (uint8) and tissue labels (uint8, 0..3) following the recipe in the module docstring."""
    images = {key: nib.load(path) for key, path in paths.items()}
    affine = images["t1"].affine
    for key, image in images.items():
        if image.shape != images["t1"].shape or not np.allclose(image.affine, affine):
            raise SystemExit(f"MNI {key} file is not on the T1 grid: {image.shape} vs {images['t1'].shape}")
    t1 = _pad_even(np.asarray(images["t1"].dataobj, dtype=np.float64))
    brain = (t1 > 0).astype(np.float64)
    grey = _pad_even(np.asarray(images["gm"].dataobj, dtype=np.float64)) / 255.0 * brain
    white = _pad_even(np.asarray(images["wm"].dataobj, dtype=np.float64)) / 255.0 * brain
    csf = np.clip(1.0 - grey - white, 0.0, 1.0) * brain
    probabilities = np.stack([_block_mean(p) for p in (1.0 - brain, csf, grey, white)])
    labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    t1_2mm = np.clip(np.round(_block_mean(t1)), 0, 255).astype(np.uint8)
    to_block_centre = np.diag([2.0, 2.0, 2.0, 1.0])
    to_block_centre[:3, 3] = 0.5
    affine_2mm = affine @ to_block_centre
    code = int(images["t1"].header["sform_code"]) or 2
    return _nifti(t1_2mm, affine_2mm, code), _nifti(labels, affine_2mm, code)


def derive_itk_head() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The ITK example head T1 as shipped by ITK, and its brain mask (uint8 0/1), same LSA grid."""
    for path in (ITK_T1, ITK_SKULL_STRIP):
        if not path.exists():
            raise SystemExit(f"{path} is missing: `apt-get install insighttoolkit5-examples`")
    t1 = nib.load(ITK_T1)
    stripped = nib.load(ITK_SKULL_STRIP)
    if stripped.shape != t1.shape or not np.allclose(stripped.affine, t1.affine):
        raise SystemExit("ITK skull-stripped volume is not on the T1 grid")
    head = nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine, header=t1.header)
    mask_array = (np.asarray(stripped.dataobj) > 0).astype(np.uint8)
    mask = nib.Nifti1Image(mask_array, t1.affine, header=t1.header)
    mask.set_data_dtype(np.uint8)
    return head, mask


def derive_all() -> dict[str, nib.Nifti1Image]:
    """All four sample images keyed like ``OUTPUT_NAMES``."""
    mni_t1, mni_labels = derive_mni(mni_source_paths())
    itk_t1, itk_mask = derive_itk_head()
    return {"mni_t1": mni_t1, "mni_labels": mni_labels, "itk_t1": itk_t1, "itk_mask": itk_mask}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for key, image in derive_all().items():
        path = args.out / OUTPUT_NAMES[key]
        tmp = path.with_name(f".{path.name}.part.nii.gz")
        nib.save(image, tmp)
        tmp.replace(path)
        array = np.asarray(image.dataobj)
        print(f"{path}: {image.shape} {array.dtype} {''.join(nib.aff2axcodes(image.affine))} "
              f"spacing {tuple(float(z) for z in image.header.get_zooms())} {path.stat().st_size // 1024} KB")
        if key == "mni_labels":
            fractions = np.bincount(array.ravel(), minlength=4) / array.size * 100
            print("  class fractions % (background, CSF, GM, WM):", " / ".join(f"{f:.1f}" for f in fractions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
