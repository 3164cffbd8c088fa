"""medsegkit's napari plugin (npe2 manifest: ``napari.yaml``): Segment widget, reader, writer, sample data.

The plugin is a thin layer: ``_widget.py`` (the dock widget), ``_reader.py`` / ``_writer.py`` (medical
formats through :mod:`medsegkit.io`), ``_sample_data.py`` (the MNI152 sample), ``_catalog.py`` (the
model list, fetched from a worker process), ``_worker_client.py`` (the parent side of
:mod:`medsegkit.worker`) and ``_geometry.py`` (axis order and transforms).

Importing this package imports neither napari nor Qt nor torch: napari loads the modules named in the
manifest when it needs them.
"""
