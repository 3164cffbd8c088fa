"""Folder inference: segment every image of a folder, sharded across ``torchrun`` ranks.

::

    torchrun --nproc_per_node 4 -m medsegkit predict MODEL INPUT_DIR -o OUTPUT_DIR

Each rank takes images ``rank, rank + world_size, ...`` of the sorted listing, skips results that
already exist (so an interrupted run continues where it stopped) and writes every result atomically
(temporary file + rename, by :func:`medsegkit.io.write_image`), so no partial file is ever left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from medsegkit.inference.segment import resolve_model, segment

__all__ = ["inputs_and_results", "list_images", "output_path_for", "predict_folder"]


def list_images(input_dir: str | os.PathLike) -> list[Path]:
    """Files in ``input_dir`` (not recursive) whose names end in a readable suffix
    (:data:`medsegkit.io.READ_SUFFIXES` without ``.dcm``: a DICOM series is a folder, not one file),
    sorted by name. Hidden files (``.name``) are ignored."""
    from medsegkit.io import READ_SUFFIXES

    folder = Path(input_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; give a folder of images")
    suffixes = tuple(s for s in READ_SUFFIXES if s != ".dcm")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(suffixes))


def output_path_for(image_path: str | os.PathLike, output_dir: str | os.PathLike, suffix: str = "_seg") -> Path:
    """``INPUT_DIR/case1.nii.gz`` → ``OUTPUT_DIR/case1_seg.nii.gz``: same format, ``suffix`` before
    the extension. Inputs in read-only formats (``.nhdr``, ``.mhd``) are written as ``.nrrd`` /
    ``.mha``."""
    from medsegkit.io import READ_SUFFIXES

    name = Path(image_path).name
    ext = next(s for s in READ_SUFFIXES if name.lower().endswith(s))
    stem = name[: len(name) - len(ext)]
    ext = {".nhdr": ".nrrd", ".mhd": ".mha"}.get(ext, name[len(stem):])
    return Path(output_dir).expanduser() / f"{stem}{suffix}{ext}"


def inputs_and_results(images: Sequence[Path], output_dir: str | os.PathLike, suffix: str) -> list[Path]:
    """The inputs among ``images`` once results go to ``output_dir`` (named by :func:`output_path_for`).

    A file that is another input's result (``case_seg.nii.gz`` next to ``case.nii.gz``, when the results go
    to the input folder) is not an input: a rerun would segment a label map into ``case_seg_seg.nii.gz``.

    Raises:
        ValueError: an input's result would be the input itself (the output folder is the input folder and
            ``suffix`` is empty): the result would replace the scan; or two inputs would write the same result
            (``case.nhdr`` and ``case.nrrd`` both give ``case_seg.nrrd``).
    """
    results: dict[Path, Path] = {}
    for p in images:
        result = output_path_for(p, output_dir, suffix).resolve()
        if result in results:
            raise ValueError(f"{results[result].name} and {p.name} would both write {result.name} (read-only formats "
                             "are written as .nrrd / .mha); move one of them to another folder")
        results[result] = p
    replaced = [p for p in images if results.get(p.resolve()) == p]
    if replaced:
        raise ValueError(f"the result of {replaced[0]} would replace it (the output folder is the input folder and "
                         "the suffix is empty); give another output folder or a suffix")
    return [p for p in images if p.resolve() not in results]


def predict_folder(
    model_or_checkpoint: nn.Module | str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    suffix: str = "_seg",
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    log: Callable[[str], None] | None = None,
    **segment_kwargs: Any,
) -> list[Path]:
    """Segment every image in ``input_dir`` into ``output_dir`` (this rank's share).

    Args:
        model_or_checkpoint: a model, checkpoint path / URL or registry name with weights (loaded once).
        input_dir: folder of images (NIfTI, NRRD, MetaImage; see :func:`list_images`), each ``(i, j, k)``
            or ``(C, i, j, k)``.
        output_dir: where results go, named by :func:`output_path_for` (``case_seg.nii.gz``); created if needed.
            It may be ``input_dir``: a file there that is another input's result name is not an input.
        suffix: appended to each input's name before its extension.
        overwrite: recompute results that already exist (default: skip them).
        rank, world_size: this process's share, ``images[rank::world_size]``; default: from the
            torch.distributed process group, else torchrun's ``RANK`` / ``WORLD_SIZE``, else all images.
        log: called with one line per image written or skipped (default: silent).
        **segment_kwargs: passed to :func:`medsegkit.inference.segment` (``output``, ``roi_size``,
            ``device``, ``largest_component``, ...).

    Returns:
        The paths written by this rank (skipped ones not included), in input order.

    Raises:
        FileNotFoundError / NotADirectoryError: ``input_dir`` is missing or not a folder.
        ValueError: ``output_dir`` is ``input_dir`` with an empty ``suffix`` (results would replace inputs;
            :func:`inputs_and_results`).
    """
    from medsegkit._ranks import shard
    from medsegkit.io import write_image

    out_dir = Path(output_dir).expanduser()
    images = inputs_and_results(list_images(input_dir), out_dir, suffix)
    todo: list[tuple[Path, Path]] = []
    for image_path in shard(images, rank, world_size):
        out = output_path_for(image_path, out_dir, suffix)
        if out.exists() and not overwrite:
            if log:
                log(f"skipped {out} (exists)")
            continue
        todo.append((image_path, out))
    written: list[Path] = []
    if not todo:
        return written  # nothing left to do: the model is not even loaded
    out_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(model_or_checkpoint)
    for image_path, out in todo:
        result = segment(model, image_path, **segment_kwargs)
        written.append(write_image(result, out, overwrite=overwrite))  # temp file + rename: never partial
        if log:
            log(f"wrote {out}")
    return written
