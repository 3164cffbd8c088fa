"""Real images for the I/O and transform tests (installed by apt / pip, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
ITK_HEAD = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"


@pytest.fixture(scope="session")
def itk_head() -> Path:
    """Real full-head T1, 128x128x62, 2x2x3 mm, LSA (Debian insighttoolkit5-examples, Apache-2.0)."""
    if not ITK_HEAD.exists():
        pytest.skip(f"{ITK_HEAD} missing: apt-get install -y insighttoolkit5-examples")
    return ITK_HEAD


@pytest.fixture(scope="session")
def itk_data() -> Path:
    if not ITK_DATA.exists():
        pytest.skip(f"{ITK_DATA} missing: apt-get install -y insighttoolkit5-examples")
    return ITK_DATA
