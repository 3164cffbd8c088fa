"""``medsegkit list [PATTERN]`` and ``medsegkit info NAME``."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell wildcard, e.g. 'mask2former_*'")
    p.add_argument("--task", choices=["semantic", "instance", "universal"])
    p.add_argument("--dims", type=int, choices=[2, 3], dest="spatial_dims")
    p.add_argument("--pretrained", action="store_true", help="only names with registered weights")
    p.add_argument("--long", action="store_true", help="table with family, task, dims and parameter count")
    p.set_defaults(func=run_list)

    p = subparsers.add_parser("info", help="describe one model (parameters, input shape, reference)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_info)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    from medsegkit.registry import list_models, model_info

    names = list_models(
        args.pattern, task=args.task, spatial_dims=args.spatial_dims, pretrained=True if args.pretrained else None
    )
    if not names:
        raise ValueError(f"no model matches pattern {args.pattern!r}; run 'medsegkit list' to see all names")
    if not args.long:
        print("\n".join(names))
        return 0
    rows = []
    for name in names:
        info = model_info(name)
        rows.append([name, info.family, info.task, str(info.spatial_dims), f"{info.num_params:,}",
                     "yes" if info.has_weights else ""])
    print(format_table(rows, ["name", "family", "task", "dims", "params", "weights"]))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from medsegkit.registry import model_info

    info = model_info(args.name)
    data = info.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [[k, f"{v:,}" if k == "num_params" else str(v)] for k, v in data.items()]
    print(format_table(rows, ["field", "value"]))
    return 0
