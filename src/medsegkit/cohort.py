"""Segment a cohort and measure it: :func:`segment_many`.

::

    table = medsegkit.segment_many("model.safetensors", "scans/*.nii.gz", "results/")
    table[table.flagged]          # the structures quality control doubts

Every image is segmented with :func:`medsegkit.segment`, written next to the others in ``out_dir``
(named by :func:`medsegkit.inference.folder.output_path_for`, with a sidecar JSON holding the model's
class names) and measured with :func:`medsegkit.stats`; the quality flags of :mod:`medsegkit.qc` are
added over the whole cohort. Existing results are not recomputed (an interrupted run continues) but are
still measured. Under ``torchrun`` each rank segments ``inputs[rank::world_size]`` (as folder
``predict`` does) and, when a process group is initialised, the rows of all ranks are gathered so every
rank returns the whole table.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from torch import nn

__all__ = ["list_inputs", "match_pairs", "segment_many"]

CASE_COLUMNS = ("case", "model", "image", "labels", "status")


def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of ``inputs``: a folder (:func:`medsegkit.inference.folder.list_images`), a glob
    pattern (``"scans/*.nii.gz"``, sorted) or a list of paths (kept in order).

    Raises:
        FileNotFoundError: a folder or listed file that does not exist, or a pattern that matches nothing.
        ValueError: an empty list, or the same file twice.
    """
    from medsegkit.inference.folder import list_images

    if isinstance(inputs, (str, os.PathLike)):
        text = os.fspath(inputs)
        if glob.has_magic(text):
            paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)))
            if not paths:
                raise FileNotFoundError(f"no file matches the pattern {text!r}")
            return paths
        if Path(text).expanduser().is_dir():
            paths = list_images(text)
            if not paths:
                raise FileNotFoundError(f"folder {text} holds no readable image (.nii.gz, .nii, .nrrd, .mha, ...)")
            return paths
        inputs = [text]
    paths = [Path(p).expanduser() for p in inputs]
    if not paths:
        raise ValueError("inputs is empty; give a folder, a glob pattern or a list of image paths")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"input image {path} does not exist")
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError("inputs lists the same file twice; each case must appear once")
    return paths


def match_pairs(
    predictions: str | os.PathLike | Sequence[str | os.PathLike],
    references: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    suffix: str = "_seg",
) -> dict[str, tuple[Path, Path]]:
    """``{case: (prediction, reference)}`` for :func:`medsegkit.metrics.evaluate_cohort` from two folders,
    patterns or lists (:func:`list_inputs`): ``case_seg.nii.gz`` is matched with ``case.nii.gz`` (the
    prediction's ``suffix`` removed; formats may differ).

    Raises:
        FileNotFoundError: a prediction without a reference (the message lists the reference cases).
    """
    by_case = {_case_name(path): path for path in list_inputs(references)}
    pairs: dict[str, tuple[Path, Path]] = {}
    for path in list_inputs(predictions):
        stem = _case_name(path)
        case = stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
        if case not in by_case:
            raise FileNotFoundError(f"no reference for prediction {path.name} (case {case!r}) among "
                                    f"{sorted(by_case)}; references are matched by the case name")
        pairs[case] = (path, by_case[case])
    return pairs


def _case_name(path: Path) -> str:
    from medsegkit.io import READ_SUFFIXES

    name = path.name
    ext = next((s for s in sorted(READ_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s)), "")
    return name[: len(name) - len(ext)] if ext else name


def _model_label(model: Any) -> str:
    """A short name for the model column: the checkpoint's file name, the registry name, or the
    module's recorded registry name / class name."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.fspath(model))
        return path.stem if path.suffix in (".safetensors", ".pt", ".pth", ".ckpt") else _case_name(path)
    config = getattr(model, "medsegkit_config", None) or {}
    return str(config.get("name", type(model).__name__))


def segment_many(
    model: nn.Module | str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    suffix: str = "_seg",
    overwrite: bool = False,
    qc: bool = True,
    disagreement: bool = True,
    reference_ranges: dict[str, tuple[float, float]] | None = None,
    thresholds: Any = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    **segment_kwargs: Any,
) -> pd.DataFrame:
    """Segment every image of ``inputs`` into ``out_dir`` and return one row per case and class.

    Args:
        model: a model, checkpoint path / URL or registry name with weights (loaded once, and only if
            something is left to compute).
        inputs: a folder, a glob pattern or a list of image paths (see :func:`list_inputs`); images
            ``(i, j, k)`` or ``(C, i, j, k)``.
        out_dir: where label files go (``case_seg.nii.gz`` + ``case_seg.json``, created if needed), with
            ``cohort.csv`` and ``qc_report.json`` for the whole table (written by rank 0).
        suffix: appended to each input's name before the extension.
        overwrite: recompute results that exist (default: skip them and measure the stored labels).
        qc: add the quality-control columns (:func:`medsegkit.qc.add_quality_flags`).
        disagreement: also run one mirrored pass per case (:func:`medsegkit.qc.mirrored_disagreement`;
            costs up to one extra pass over the foreground's box); the score is kept in the sidecar JSON
            so skipped cases do not recompute it.
        reference_ranges: ``{class_name: (low_ml, high_ml)}``; default: the checkpoint's
            ``metadata["qc"]["volume_ml"]`` if it has one.
        thresholds: a :class:`medsegkit.qc.QCThresholds` (default thresholds otherwise).
        progress: a ``tqdm.auto`` bar over the cases (a widget in Jupyter, text in a terminal).
        rank, world_size: this process's share ``inputs[rank::world_size]``; default from torchrun.
        **segment_kwargs: passed to :func:`medsegkit.segment` (``roi_size``, ``device``,
            ``largest_component``, ...; ``output`` must stay ``"labels"``).

    Returns:
        A ``pandas.DataFrame``: ``case``, ``model``, ``image``, ``labels`` (paths), ``status``
        (``"segmented"`` or ``"skipped"``), the :func:`medsegkit.stats` columns with intensities, then
        ``disagreement``, ``volume_z``, ``volume_in_range``, ``flag_volume``, ``flag_fragmented``,
        ``flag_border``, ``flag_disagreement``, ``flagged`` and ``flags``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from medsegkit._ranks import process_rank, shard
    from medsegkit.files import atomic_write
    from medsegkit.inference.folder import inputs_and_results, output_path_for
    from medsegkit.inference.segment import resolve_model, segment
    from medsegkit.io import read_image, write_image
    from medsegkit.measurements import read_label_metadata, stats, write_label_metadata
    from medsegkit.qc import (
        _checked_ranges,
        add_quality_flags,
        mirrored_disagreement,
        reference_ranges_of,
        write_qc_report,
    )

    if segment_kwargs.get("output", "labels") != "labels":
        raise ValueError("segment_many measures label maps; output must be 'labels'")
    if reference_ranges is not None:  # before segmenting anything, not when the table is flagged
        reference_ranges = _checked_ranges(reference_ranges)
    out = Path(out_dir).expanduser()
    images = inputs_and_results(list_inputs(inputs), out, suffix)
    names = [_case_name(p) for p in images]
    if len(set(names)) != len(names):
        raise ValueError(f"two inputs share a case name (their results would overwrite each other): {names}")
    share = shard(list(zip(images, names)), rank, world_size)
    out.mkdir(parents=True, exist_ok=True)
    loaded: list[Any] = []

    def the_model() -> nn.Module:
        if not loaded:
            loaded.append(resolve_model(model))
        return loaded[0]

    model_name = _model_label(model)
    rows: list[dict[str, Any]] = []
    for image_path, case in tqdm(share, desc="segment_many", unit="case", disable=not progress):
        labels_path = output_path_for(image_path, out, suffix)
        image = read_image(image_path)
        if labels_path.exists() and not overwrite:
            sidecar = read_label_metadata(labels_path)
            problem = _not_a_stored_result(labels_path, sidecar, image_path)
            if problem:
                raise ValueError(f"{labels_path} {problem}: segment_many resumes only from its own results; "
                                 "move it away, or pass overwrite=True to segment the case again")
            status, labels = "skipped", read_image(labels_path)
            changed = False
        else:
            status, labels = "segmented", segment(the_model(), image, **segment_kwargs)
            sidecar = {"image": str(image_path), "model": model_name,
                       **{k: labels.meta[k] for k in ("class_names", "label_colors") if k in labels.meta},
                       "qc": (getattr(the_model(), "medsegkit_metadata", None) or {}).get("qc") or {}}
            # the sidecar first: a label file without one is never ours (a run stopped between the two
            # writes leaves a sidecar without labels, and the next run segments the case again)
            write_label_metadata(labels_path, sidecar)
            write_image(labels, labels_path, overwrite=True)
            changed = False
        if disagreement and sidecar.get("disagreement") is None:
            found = mirrored_disagreement(the_model(), image, labels.array, **segment_kwargs)
            sidecar["disagreement"] = {str(k): v for k, v in found.items()}
            changed = True
        if changed:
            write_label_metadata(labels_path, sidecar)
        intensity = image if image.channel_axis is None else image.with_array(image.array[0])
        table = stats(labels, intensity, class_names=sidecar.get("class_names"))
        ranges = reference_ranges if reference_ranges is not None else reference_ranges_of(sidecar)
        for record in table.to_dict("records"):
            record = {"case": case, "model": sidecar.get("model", model_name), "image": str(image_path),
                      "labels": str(labels_path), "status": status, **record}
            if disagreement:
                record["disagreement"] = float(sidecar["disagreement"].get(str(record["label"]), float("nan")))
            record["reference_ranges"] = ranges or None
            rows.append(record)
    rows = _gather_rows(rows)
    cohort = pd.DataFrame(rows)
    if cohort.empty:
        return cohort
    if qc:
        from medsegkit.qc import QCThresholds

        thresholds = thresholds or QCThresholds()
        cohort = add_quality_flags(cohort, thresholds=thresholds)
    cohort = cohort.drop(columns=["reference_ranges"])
    if (rank if rank is not None else process_rank()[0]) == 0:
        atomic_write(out / "cohort.csv", lambda tmp: cohort.to_csv(tmp, index=False))
        if qc:
            write_qc_report(cohort, out / "qc_report.json", thresholds=thresholds, overwrite=True)  # this run's
    return cohort


def _not_a_stored_result(labels_path: Path, sidecar: dict[str, Any], image_path: Path) -> str | None:
    """Why the existing ``labels_path`` is not a result :func:`segment_many` wrote for ``image_path``, or None."""
    from medsegkit.measurements import metadata_path_for

    if not sidecar:
        return f"has no sidecar {metadata_path_for(labels_path).name} (segment_many writes one with every result)"
    source = sidecar.get("image")
    if not isinstance(source, str) or Path(source).name != image_path.name:
        return f"was made from the image {source!r}, not {image_path.name}"
    found = sidecar.get("disagreement")
    if found is not None and not (isinstance(found, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in found.values())):
        return f"has a sidecar whose disagreement is not {{label: score}}: {found!r}"
    return None


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows when a process group is initialised (sorted by case), else ``rows``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    merged = [row for part in gathered for row in part]
    return sorted(merged, key=lambda r: (r["case"], r["label"]))

