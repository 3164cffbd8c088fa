"""napari sample data: the MNI152 T1 volume (2 mm) with its reference tissue labels, from ``sample_data/``.

The image layer's metadata names the shipped demo checkpoint, and the Segment widget preselects that
model when this layer is chosen, so *File > Open Sample > medsegkit > MNI152* then **Run** works at once.
"""

from __future__ import annotations

from typing import Any

from medsegkit.napari._reader import image_to_layer_data

__all__ = ["mni152_sample"]


def mni152_sample() -> list[tuple[Any, dict[str, Any], str]]:
    """Layer data for the MNI152 T1 image and its tissue labels (0 background, 1 CSF, 2 GM, 3 WM)."""
    from medsegkit.data import MNI_CLASS_NAMES, MNI_LABEL_COLORS, sample_path
    from medsegkit.io import read_image
    from medsegkit.napari._catalog import demo_checkpoint

    t1 = image_to_layer_data(read_image(sample_path("mni152_t1")), "MNI152 T1", layer_type="image")
    demo = demo_checkpoint()
    t1[1]["metadata"]["medsegkit"].update(
        {"sample": "mni152", "demo_checkpoint": str(demo) if demo is not None else None}
    )
    tissue = image_to_layer_data(read_image(sample_path("mni152_tissue")), "MNI152 tissue (reference)",
                                 layer_type="labels")
    tissue[1]["metadata"]["medsegkit"]["class_names"] = list(MNI_CLASS_NAMES)
    tissue[1]["colormap"] = label_colormap(MNI_LABEL_COLORS)
    tissue[1]["opacity"] = 0.5
    return [t1, tissue]


def label_colormap(colors: Any) -> dict[int | None, tuple[float, float, float, float]]:
    """napari ``DirectLabelColormap`` dict from RGB 0-255 colours per label; label 0 is transparent."""
    mapping: dict[int | None, tuple[float, float, float, float]] = {None: (0.0, 0.0, 0.0, 0.0)}
    for label, (r, g, b) in enumerate(colors):
        mapping[label] = (r / 255, g / 255, b / 255, 0.0 if label == 0 else 1.0)
    return mapping
