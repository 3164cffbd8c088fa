"""Tables for the docs, generated from the registry so they cannot drift from the code."""

from __future__ import annotations


def model_table_markdown(pattern: str | None = None) -> str:
    """A markdown table with one row per registered name: dims, task, parameters, input shape,
    class path (the MONAI bundle ``_target_``), weights and reference."""
    from medsegkit.registry import list_models, model_info

    lines = [
        "| Name | Dims | Task | Parameters | Input shape | Class (`_target_`) | Weights | Reference |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for name in list_models(pattern):
        info = model_info(name)
        shape = "(" + ", ".join(str(s) for s in info.input_shape) + ")"
        lines.append(
            f"| `{name}` | {info.spatial_dims}D | {info.task} | {info.num_params:,} | {shape} | "
            f"`{info.dotted_path}` | {'yes' if info.has_weights else ''} | {info.reference} |"
        )
    return "\n".join(lines)
