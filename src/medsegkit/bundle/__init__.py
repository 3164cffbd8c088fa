"""MONAI bundles for medsegkit models: write (``init_bundle``), check (``verify_bundle``), run (``run_bundle``)."""

from medsegkit.bundle.runner import bundle_network, check_metadata, run_bundle, verify_bundle
from medsegkit.bundle.writer import init_bundle, network_definition, sample_data_dir

__all__ = ["bundle_network", "check_metadata", "init_bundle", "network_definition", "run_bundle", "sample_data_dir",
           "verify_bundle"]
