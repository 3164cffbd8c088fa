"""``medsegkit`` command line: one sub-module per command group, all calling the core library.

Each command module defines ``add_parser(subparsers)`` which registers its sub-command(s) with
``set_defaults(func=...)``. Errors a user can fix (bad input, unknown model, existing output) end the
program with exit code 2 and one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "medsegkit.cli.models",  # list, info
    "medsegkit.cli.predict",  # predict
    "medsegkit.cli.bench",  # bench
    "medsegkit.cli.demo",  # demo
    "medsegkit.cli.train",  # train
    "medsegkit.cli.evaluate",  # evaluate
    "medsegkit.cli.stats",  # stats
    "medsegkit.cli.bundle",  # bundle init|run|verify
    "medsegkit.cli.export",  # export
)

USAGE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class CommandError(Exception):
    """A user error found by a command itself (exit code 2, one line)."""


def check_device(text: str, option: str = "--device"):
    """``torch.device(text)``, or a :class:`CommandError` when it is not a device or is CUDA on a machine without it."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise CommandError(f"{option} {text!r} is not a torch device (cpu, cuda, cuda:0, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"{option} {text}: CUDA is not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    from medsegkit import __version__

    parser = argparse.ArgumentParser(
        prog="medsegkit",
        description="Segmentation models for medical and biological volumes.",
    )
    parser.add_argument("--version", action="version", version=f"medsegkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    from medsegkit._runtime import prefer_huge_pages

    prefer_huge_pages()  # before any command imports torch
    from medsegkit.errors import Cancelled, MedsegkitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = int(args.func(args) or 0)
    except Cancelled:
        print("medsegkit: cancelled", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        print("medsegkit: interrupted", file=sys.stderr)
        code = 130
    except (CommandError, MedsegkitError, *USAGE_ERRORS) as err:
        print(f"medsegkit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        code = 2
    if "torch.distributed" in sys.modules:
        # a torchrun worker whose process group our helpers own ends past gloo's native threads, on the error
        # path too (docs/training.md, "How a worker ends"); anywhere else this returns at once
        from medsegkit.train.distributed import end_worker_process

        end_worker_process(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
