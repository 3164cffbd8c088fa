"""``medsegkit stats LABELS [--image IMAGE] [--csv OUT]``: per-structure volume, shape and intensity."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsegkit.cli import CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats",
        help="per-structure statistics of a label map (volume in mL, components, bounding box, intensity)",
        description="One row per class present: voxels, volume in mL from the affine, connected components, "
                    "the largest component's share, border voxels, bounding box in world mm and, with --image, "
                    "mean / median / std intensity inside.",
    )
    p.add_argument("labels", type=Path, help="label map (NIfTI, NRRD, MHA...); a sidecar JSON next to it "
                   "(written by segment_many) gives the class names")
    p.add_argument("--image", type=Path, help="intensity image on the same grid")
    p.add_argument("--class-names", nargs="+", metavar="NAME", help="names for labels 0, 1, 2, ...")
    p.add_argument("--csv", type=Path, metavar="OUT", help="also write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    p.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    import pandas as pd

    from medsegkit.files import atomic_write
    from medsegkit.measurements import stats

    if args.csv is not None:
        if args.csv.is_dir():
            raise IsADirectoryError(f"--csv {args.csv} is a folder; give a file name such as {args.csv / 'stats.csv'}")
        if args.csv.exists() and not args.overwrite:
            raise FileExistsError(f"--csv {args.csv} exists; pass --overwrite to replace it")
        if not args.csv.parent.exists():
            raise FileNotFoundError(f"output folder {args.csv.parent} does not exist")
        if args.csv.suffix.lower() != ".csv":
            raise CommandError(f"--csv must name a .csv file, got {args.csv.name!r}")
    for path in (args.labels, args.image):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    table = stats(args.labels, args.image, class_names=args.class_names)
    if args.class_names and not table.empty and table["label"].max() >= len(args.class_names):
        raise CommandError(f"--class-names gives {len(args.class_names)} names (labels 0..{len(args.class_names) - 1}) "
                           f"but the label map holds label {table['label'].max()}; give one name per label, "
                           "background first")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False) if not table.empty else "no foreground class in the label map")
    if args.csv is not None:
        atomic_write(args.csv, lambda tmp: table.to_csv(tmp, index=False))
        print(f"wrote {args.csv}")
    return 0
