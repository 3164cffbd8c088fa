"""``medsegkit predict MODEL_OR_CHECKPOINT IMAGE [IMAGE ...] -o OUT``: segment a file through ``segment``.

``MODEL_OR_CHECKPOINT`` is a checkpoint file written by :func:`medsegkit.save_checkpoint` (it records the
registry name and arguments, so no architecture flags are needed), an export of ``medsegkit export`` (its
folder or network file; its sidecar gives the preprocessing and windows) or a registry name: with
``--checkpoint FILE`` the file's weights are loaded into that architecture; without it the name must have
registered weights (a model with random weights is refused). Several ``IMAGE`` files on one grid are
read as the channels of one input (T1 + T2). The labels are written on the input's grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medsegkit.cli import CommandError, check_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment image file(s) with a model or checkpoint",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="checkpoint file, export (folder, .onnx, .xml, .pt2, "
                   ".ts), or registry name")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image file(s) or DICOM folder (several = channels), or one folder of images "
                   "(then -o is the output folder; under torchrun the files are shared across ranks)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--checkpoint", metavar="FILE", help="weights for the registry name MODEL")
    p.add_argument("--roi", type=int, nargs="+", metavar="N", help="window size (one value or one per axis)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1) (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--tta", action="store_true",
                   help="mirror test-time augmentation: over the left-right axis where the model's preprocessing "
                        "reorients the image (MR / CT presets, trained checkpoints), else over every spatial axis")
    p.add_argument("--fast", action="store_true", help="optimised path: BatchNorm folding, channels-last, bf16 (refused for MaskFormer / Mask2Former: "
                   "bf16 changes their labels)")
    p.add_argument("--output-kind", choices=["labels", "probabilities"], default="labels",
                   help="write labels (default) or class probabilities (C, *spatial)")
    p.add_argument("--preprocessing", default=None,
                   help="preset (mr, ct, none) instead of the checkpoint's recorded preprocessing")
    p.add_argument("--largest-component", action="store_true", help="keep the largest component per class")
    p.add_argument("--fill-holes", action="store_true", help="fill holes in each class")
    p.add_argument("--min-size", type=int, default=0, help="remove components smaller than N voxels")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino"], default=None,
                   help="what runs the windows (default: torch for a checkpoint, the format's own backend for "
                   "an export of `medsegkit export`; auto: measure one window batch on each backend and "
                   "precision, run the fastest whose labels agree >= 99.5 %% with float32, cached per machine)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)


def _check_output(path: Path, overwrite: bool, inputs: list[str]) -> None:
    """Refuse a bad output path before any work is done (nothing is written on failure)."""
    from medsegkit.files import same_file
    from medsegkit.io import WRITE_SUFFIXES

    name = path.name.lower()
    if not any(name.endswith(s) for s in WRITE_SUFFIXES):
        raise CommandError(f"cannot write {path.name!r}: the output must end in {', '.join(WRITE_SUFFIXES)}")
    if path.is_dir():
        raise CommandError(f"output {path} is a folder; give a file name such as {path / 'labels.nii.gz'}")
    for source in inputs:
        if same_file(path, Path(source)):
            raise CommandError(f"output {path} is the input image; choose another output path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")


def _load(args: argparse.Namespace):
    from medsegkit.errors import CheckpointError
    from medsegkit.inference.segment import resolve_model

    if args.checkpoint is None:
        return resolve_model(args.model)
    from medsegkit.registry import create_model, get_model_spec
    from medsegkit.weights import load_checkpoint, load_model, read_checkpoint

    spec = get_model_spec(args.model)  # KeyError listing the closest names
    checkpoint = Path(args.checkpoint).expanduser()
    _, record = read_checkpoint(checkpoint)
    recorded = (record.get("model") or {}).get("name")
    if recorded is not None:
        if recorded != spec.name:
            raise CheckpointError(
                f"checkpoint {checkpoint} was made for {recorded}, not {spec.name}; "
                f"run 'medsegkit predict {checkpoint} ...' to use the architecture it records"
            )
        return load_model(checkpoint)
    return load_checkpoint(create_model(spec.name), checkpoint).eval()


def _folder_input(images: list[str]) -> Path | None:
    """The input folder when IMAGE is one folder of image files (not a DICOM series folder)."""
    if len(images) != 1 or not Path(images[0]).expanduser().is_dir():
        return None
    from medsegkit.inference.folder import list_images

    folder = Path(images[0]).expanduser()
    return folder if list_images(folder) else None


def _check_empty_folder(images: list[str], out: Path) -> None:
    """One folder without image files and an ``-o`` that is not an image name: a folder of images was meant (or a
    DICOM series with a folder as output); say both instead of only that ``-o`` is no image name."""
    from medsegkit.io import READ_SUFFIXES, WRITE_SUFFIXES

    folder = Path(images[0]).expanduser()
    if len(images) != 1 or not folder.is_dir() or out.name.lower().endswith(tuple(WRITE_SUFFIXES)):
        return
    suffixes = ", ".join(s for s in READ_SUFFIXES if s != ".dcm")
    raise CommandError(f"folder {folder} holds no image file ({suffixes}) to segment into the folder {out}; for a "
                       f"DICOM series folder, -o names one output file ending in {', '.join(WRITE_SUFFIXES)}")


def run_predict(args: argparse.Namespace) -> int:
    out = Path(args.output).expanduser()
    input_folder = _folder_input(args.images)
    if input_folder is None:
        _check_empty_folder(args.images, out)
        _check_output(out, args.overwrite, args.images)
    elif out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; with a folder of images, -o names the output folder")
    if not 0 <= args.overlap < 1:
        raise CommandError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.sw_batch_size < 1:
        raise CommandError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if args.roi is not None and any(r <= 0 for r in args.roi):
        raise CommandError(f"--roi sizes must be positive, got {args.roi}")
    if args.min_size < 0:
        raise CommandError(f"--min-size must be >= 0 voxels, got {args.min_size}")
    if args.output_kind == "probabilities" and (args.largest_component or args.fill_holes or args.min_size):
        raise CommandError("--largest-component, --fill-holes and --min-size clean up labels; they do not apply to "
                           "--output-kind probabilities")

    from medsegkit.inference import segment
    from medsegkit.inference.windows import model_spatial_dims
    from medsegkit.io import read_image, write_image

    image = read_image(args.images if len(args.images) > 1 else args.images[0]) if input_folder is None else None
    model = _load(args)
    dims = model_spatial_dims(model)
    roi = None
    if args.roi is not None:
        if len(args.roi) not in (1, dims):
            raise CommandError(f"--roi takes 1 or {dims} sizes for this {dims}D model, got {len(args.roi)}")
        roi = tuple(args.roi) * (dims if len(args.roi) == 1 else 1)
    if args.device is not None:
        model = model.to(check_device(args.device))
    if args.fast:
        from medsegkit.inference.adapters import refuse_fast
        from medsegkit.inference.fast import describe

        if getattr(model, "medsegkit_task", None) == "universal":
            try:
                refuse_fast(model, True, "semantic")
            except ValueError as err:
                raise CommandError(f"--fast: {err}") from None
        print(f"medsegkit predict: {describe(args.device or 'cpu')}", file=sys.stderr)

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="batch", desc="windows", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    options = dict(
        preprocessing=args.preprocessing,
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
        min_size=args.min_size,
        output="labels" if args.output_kind == "labels" else "probabilities",
        roi_size=roi,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        fast=args.fast,
        tta_flips="auto" if args.tta else (),
        progress=progress,
        backend=args.backend,
    )
    import contextlib

    watch_choice = contextlib.nullcontext()
    if bar is not None and args.backend == "auto":
        from medsegkit.inference.autobackend import on_choice

        # the bar names what auto chose (tqdm's remaining time is the ETA of that backend's run)
        watch_choice = on_choice(lambda choice: bar.set_description(f"windows [{choice.name}]"))
    try:
        with watch_choice:
            if input_folder is not None:
                from medsegkit.inference.folder import predict_folder
                from medsegkit.train.distributed import is_main_process

                # under torchrun each rank takes its share of the files; existing outputs are skipped
                written = predict_folder(model, input_folder, out, overwrite=args.overwrite,
                                         log=None if args.quiet else lambda text: print(text, file=sys.stderr),
                                         **options)
                for path in written:
                    print(path)
                if is_main_process() and not args.quiet:
                    print(f"medsegkit predict: {len(written)} file(s) written to {out}", file=sys.stderr)
                return 0
            result = segment(model, image, **options)
    finally:
        if bar is not None:
            bar.close()
    written_path = write_image(result, out, like=image, overwrite=args.overwrite)
    print(written_path)
    return 0
