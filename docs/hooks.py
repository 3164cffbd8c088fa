"""mkdocs hook: the model catalogue table is generated from the registry at build time."""

from __future__ import annotations

MARKER = "<!-- model-table -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs hook signature)
    if MARKER not in markdown:
        return markdown
    from medsegkit.docs_tables import model_table_markdown

    return markdown.replace(MARKER, model_table_markdown())
