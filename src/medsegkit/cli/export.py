"""``medsegkit export MODEL_OR_CHECKPOINT --format FORMAT -o OUT``: export the whole pipeline.

Writes the folder ``OUT`` (network, ``medsegkit.json`` sidecar, test input and expected output; for
``bioimageio`` also ``rdf.yaml``, or a zip) with
:func:`medsegkit.export`, runs the exported network on the test input, compares it with PyTorch and
prints the figures. ``medsegkit predict OUT ...`` (or the network file inside) segments with it.
"""

from __future__ import annotations

import argparse

# medsegkit.exporter.FORMATS, restated: building the parser must not import torch (tests/test_export.py
# checks that the two agree)
FORMATS = ("onnx", "openvino", "exported-program", "torchscript", "bioimageio")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model with its preprocessing and window settings (onnx, openvino, ...)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="checkpoint file, or registry name with weights")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="what to write")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="export folder to create (bioimageio: a folder, or OUT.zip for a zipped package)")
    p.add_argument("--quantize", choices=["int8"], help="int8: NNCF post-training quantization (--format openvino)")
    p.add_argument("--calibration", nargs="+", metavar="IMAGE",
                   help="int8 calibration volumes (default: the checkpoint's own sample / validation volumes)")
    p.add_argument("--roi", type=int, nargs="+", metavar="N", help="window size the network takes (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per network call (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from medsegkit.cli import CommandError
    from medsegkit.exporter import export
    from medsegkit.inference.segment import resolve_model
    from medsegkit.inference.windows import model_spatial_dims

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.calibration and args.quantize is None:
        raise CommandError("--calibration is for --quantize int8")
    roi = None
    if args.roi is not None:
        if any(r <= 0 for r in args.roi):
            raise CommandError(f"--roi sizes must be positive, got {args.roi}")
        model = resolve_model(args.model)
        dims = model_spatial_dims(model)
        if len(args.roi) not in (1, dims):
            raise CommandError(f"--roi takes 1 or {dims} sizes for this {dims}D model, got {len(args.roi)}")
        roi = tuple(args.roi) * (dims if len(args.roi) == 1 else 1)
    else:
        model = args.model
    print(export(model, args.output, format=args.format, quantize=args.quantize, calibration=args.calibration,
                 overwrite=args.overwrite, roi_size=roi, batch_size=args.batch_size))
    return 0
