"""``medsegkit bundle init|run|verify``: MONAI bundles for registry models."""

from __future__ import annotations

import argparse
import json


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (VALUE in JSON, e.g. channels=[8,16]), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(subparsers) -> None:
    bundle = subparsers.add_parser("bundle", help="write, check and run MONAI bundles")
    sub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    p = sub.add_parser("init", help="write a MONAI bundle for a registry model")
    p.add_argument("model", help="registry name, e.g. UNet3d")
    p.add_argument("directory")
    p.add_argument("--in-channels", type=int)
    p.add_argument("--out-channels", type=int, help="output classes (default 4: the sample tissue task)")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="constructor override, VALUE in JSON (repeatable)")
    p.add_argument("--checkpoint", help="weights to place in models/model.pt; a medsegkit checkpoint also gives "
                                        "the defaults of its constructor arguments, preprocessing recipe, window "
                                        "and class names")
    p.add_argument("--roi", type=int, nargs="+", help="sliding-window / crop size (default: the checkpoint's)")
    p.add_argument("--spacing", type=float, nargs="+", help="target spacing in mm (default: the checkpoint's)")
    p.add_argument("--preprocessing", choices=["mr", "mr_robust", "ct"],
                   help="intensity preset (default: the checkpoint's recorded recipe, else mr)")
    p.add_argument("--task", choices=["semantic", "instance", "panoptic"],
                   help="universal models: label-map bundles for instance / panoptic output")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_init)

    p = sub.add_parser("verify", help="check metadata, verify_net_in_out and a dry run of every config")
    p.add_argument("directory")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("run", help="run the bundle's inference config on images")
    p.add_argument("directory")
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_run)


def run_init(args: argparse.Namespace) -> int:
    from medsegkit.bundle import init_bundle
    from medsegkit.cli import CommandError
    from medsegkit.registry import get_model_spec

    roi = None
    if args.roi is not None:
        if any(r <= 0 for r in args.roi):
            raise CommandError(f"--roi sizes must be positive, got {args.roi}")
        dims = int(dict(args.set).get("spatial_dims", get_model_spec(args.model).spatial_dims))
        if len(args.roi) not in (1, dims):
            raise CommandError(f"--roi takes 1 or {dims} sizes for this {dims}D model, got {len(args.roi)}")
        roi = list(args.roi) * (dims if len(args.roi) == 1 else 1)
    path = init_bundle(
        args.model, args.directory, in_channels=args.in_channels, out_channels=args.out_channels,
        overrides=dict(args.set), checkpoint=args.checkpoint, roi_size=roi, spacing=args.spacing,
        preprocessing=args.preprocessing, overwrite=args.overwrite, task=args.task,
    )
    print(f"wrote MONAI bundle for {args.model} to {path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from medsegkit.bundle import verify_bundle

    report = verify_bundle(args.directory)
    print(f"bundle {report['bundle']}: metadata ok, verify_net_in_out ok, dry run ok ({', '.join(report['configs'])})")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from medsegkit.bundle import run_bundle

    for path in run_bundle(args.directory, args.images, args.output_dir, overwrite=args.overwrite):
        print(path)
    return 0
