"""``medsegkit demo``: segment the shipped MNI152 sample with the shipped model and show how well it did.

Prints the Dice per tissue class on the held-out axial slab (k >= 55 of the 2 mm grid, never seen in
training), then ``mean foreground Dice: 0.xxx``; writes the label map (NIfTI) and a PNG overlay of
three orthogonal slices (image, reference, prediction) into ``./medsegkit-demo/`` or ``--out DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path("medsegkit-demo")
# The only files the demo writes; earlier runs' copies are replaced, anything else in the folder is left alone.
PREDICTION_NAME = "mni152_tissue_prediction.nii.gz"
OVERLAY_NAME = "mni152_tissue_overlay.png"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="segment the shipped MNI152 sample with the shipped tissue model and report Dice",
        description=(
            "Segment the shipped MNI152 2 mm T1 into background / CSF / grey matter / white matter with the "
            "UNet3d checkpoint trained by `medsegkit train --sample`, print the Dice per class on the held-out "
            "slab, and write the label map and a PNG overlay."
        ),
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default ./%(default)s)")
    p.add_argument("--checkpoint", type=Path, help="another checkpoint to demo (default: the shipped one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_demo)


def run_segmentation(model: Any, image: Any, *, device: str = "cpu", progress: Any = None) -> Any:
    """The demo's inference: :func:`medsegkit.inference.segment` with the checkpoint's own recipe (its
    recorded preprocessing and window, as ``medsegkit predict`` and the training's validation run it)."""
    from medsegkit.inference import segment

    return segment(model, image, device=device, progress=progress)


def held_out_scores(prediction: np.ndarray, reference: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Dice per foreground class on the held-out slab ``k >= MNI_HELD_OUT_START``."""
    from medsegkit.data import MNI_HELD_OUT_START
    from medsegkit.metrics import evaluate

    result = evaluate(prediction[..., MNI_HELD_OUT_START:], reference[..., MNI_HELD_OUT_START:],
                      labels=range(1, len(class_names)), hd95=False)
    dice = {class_names[k]: float(v) for k, v in result["dice"].items()}
    return {"dice": dice, "mean_foreground_dice": float(np.mean(list(dice.values())))}


def save_overlay(path: Path, t1: np.ndarray, reference: np.ndarray, prediction: np.ndarray, *,
                 colors: list[list[int]], class_names: list[str], held_out_start: int, dice: dict[str, float]) -> None:
    """PNG: rows = axial / coronal / sagittal slices; columns = T1, reference, prediction (RAS arrays)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from medsegkit.files import atomic_write

    i_mid = int(round(t1.shape[0] * 0.36))  # off the midline: cortex and ventricles
    j_mid = t1.shape[1] // 2 + 4
    k_mid = held_out_start + 10  # inside the held-out slab
    views = [
        (f"axial k={k_mid} (held out)", lambda a: a[:, :, k_mid].T),
        (f"coronal j={j_mid}", lambda a: a[:, j_mid, :].T),
        (f"sagittal i={i_mid}", lambda a: a[i_mid, :, :].T),
    ]
    rgba = np.array([[0, 0, 0, 0]] + [[*(np.array(c) / 255.0), 0.55] for c in colors[1:]])
    cmap = ListedColormap(rgba)
    fig, axes = plt.subplots(3, 3, figsize=(9.6, 10.2), facecolor="black")
    titles = ["T1 (MNI152, 2 mm)", "reference", "prediction (UNet3d)"]
    for row, (view_name, cut) in enumerate(views):
        for col in range(3):
            ax = axes[row, col]
            ax.imshow(cut(t1), cmap="gray", origin="lower", interpolation="nearest")
            if col:
                labels = cut(reference if col == 1 else prediction)
                ax.imshow(labels, cmap=cmap, vmin=0, vmax=len(colors) - 1, origin="lower", interpolation="nearest")
            if row > 0:  # mark the held-out slab boundary (k = held_out_start) on coronal and sagittal cuts
                ax.axhline(held_out_start - 0.5, color="#ff4060", lw=0.8, ls="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], color="white", fontsize=11)
            if col == 0:
                ax.set_ylabel(view_name, color="white", fontsize=10)
    handles = [Patch(color=rgba[k][:3], label=class_names[k]) for k in range(1, len(class_names))]
    handles.append(Patch(color="#ff4060", label="held-out slab starts (above the line)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white", fontsize=9)
    text = "held-out Dice: " + "  ".join(f"{k} {v:.3f}" for k, v in dice.items())
    fig.suptitle(text, color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=80, facecolor="black")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the temporary file is private; the result is an ordinary file

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from medsegkit.cli import check_device
    from medsegkit.data import (
        MNI_CLASS_NAMES,
        MNI_HELD_OUT_START,
        MNI_LABEL_COLORS,
        demo_checkpoint_path,
        sample_path,
    )
    from medsegkit.io import read_image, write_image
    from medsegkit.weights import load_model

    started = time.perf_counter()
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; give a folder")
    check_device(args.device)
    bar = tqdm(total=4, desc="demo", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix_str("loading model and sample")
    checkpoint = args.checkpoint or demo_checkpoint_path()
    model = load_model(checkpoint)
    metadata = getattr(model, "medsegkit_metadata", {}) or {}
    class_names = list(metadata.get("class_names") or MNI_CLASS_NAMES)
    outputs = getattr(model, "out_channels", None)
    if class_names != list(MNI_CLASS_NAMES) or (outputs is not None and int(outputs) != len(MNI_CLASS_NAMES)):
        # the reference is the MNI152 tissue map: another model's classes would be scored against its labels
        found = f"classes {class_names}" if class_names != list(MNI_CLASS_NAMES) else f"{outputs} output classes"
        raise ValueError(f"--checkpoint {checkpoint} has {found}; the demo scores the MNI152 tissue classes "
                         f"{list(MNI_CLASS_NAMES)}: give a checkpoint of `medsegkit train --sample`")
    colors = [list(c) for c in (metadata.get("label_colors") or MNI_LABEL_COLORS)]
    image = read_image(sample_path("mni152_t1"))
    reference = read_image(sample_path("mni152_tissue"))
    bar.update()
    bar.set_postfix_str("segmenting")
    result = run_segmentation(model, image, device=args.device)
    prediction = np.asarray(result.array).astype(np.uint8)
    bar.update()
    bar.set_postfix_str("scoring held-out slab")
    scores = held_out_scores(prediction, np.asarray(reference.array), class_names)
    bar.update()
    bar.set_postfix_str("writing outputs")
    args.out.mkdir(parents=True, exist_ok=True)
    prediction_path = write_image(prediction, args.out / PREDICTION_NAME, like=image, overwrite=True)
    overlay_path = args.out / OVERLAY_NAME
    save_overlay(overlay_path, np.asarray(image.array), np.asarray(reference.array), prediction, colors=colors,
                 class_names=class_names, held_out_start=MNI_HELD_OUT_START, dice=scores["dice"])
    bar.update()
    bar.close()
    print(f"segmented {sample_path('mni152_t1').name} {image.spatial_shape} with {Path(checkpoint).name} "
          f"in {time.perf_counter() - started:.1f} s")
    print(f"wrote {prediction_path}")
    print(f"wrote {overlay_path}")
    baseline = metadata.get("training", {}).get("baseline_nearest_class_mean", {}).get("dice", {})
    print(f"held-out slab k >= {MNI_HELD_OUT_START} (not used in training), Dice per class:")
    for name, value in scores["dice"].items():
        extra = f"   (intensity baseline {baseline[name]:.3f})" if name in baseline else ""
        print(f"  {name:<4} {value:.3f}{extra}")
    print(f"mean foreground Dice: {scores['mean_foreground_dice']:.3f}")
    return 0
