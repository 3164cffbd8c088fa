"""``medsegkit evaluate PRED REF``: Dice, HD95 and volume difference per class."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from medsegkit.cli import CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="compare a predicted label map with a reference (Dice, HD95, volume difference)",
        description="Score a predicted label map against a reference on the same grid, per class (MONAI metrics).",
    )
    p.add_argument("prediction", type=Path, help="predicted label map (NIfTI, NRRD, MHA...)")
    p.add_argument("reference", type=Path, help="reference label map on the same grid")
    p.add_argument("--labels", type=int, nargs="+", help="classes to score (default: every non-zero label present)")
    p.add_argument("--class-names", nargs="+", metavar="NAME", help="names for labels 0, 1, 2, ... in the table")
    p.add_argument("--no-hd95", action="store_true", help="skip the (slower) Hausdorff distance")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from medsegkit.io import read_image
    from medsegkit.metrics import evaluate, format_table

    prediction = read_image(args.prediction)
    reference = read_image(args.reference)
    for path, image in ((args.prediction, prediction), (args.reference, reference)):
        if image.channel_axis is not None:
            raise ValueError(f"{path} has {image.num_channels} channels; a label map has one")
    result = evaluate(prediction, reference, labels=args.labels, hd95=not args.no_hd95)
    if args.class_names and result["labels"] and max(result["labels"]) >= len(args.class_names):
        raise CommandError(f"--class-names gives {len(args.class_names)} names (labels 0..{len(args.class_names) - 1}) "
                         f"but label {max(result['labels'])} is scored; give one name per label, background first")
    if args.json:
        # strict JSON: a value that does not exist (HD95 of a class absent from one map, the relative volume
        # difference of a class absent from the reference) is null, not Python's NaN
        print(json.dumps({k: ({str(label): _finite_or_none(v) for label, v in val.items()} if isinstance(val, dict)
                              else _finite_or_none(val)) for k, val in result.items()}, indent=2, allow_nan=False))
    else:
        print(format_table(result, args.class_names))
    return 0


def _finite_or_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value
