"""Run the napari tests in their own pytest process, under a virtual display when one is needed.

napari needs OpenGL; on a headless machine `xvfb-run -a` provides a display (Mesa). Without a display
and without xvfb-run the tests skip with a message saying what to install, unless
MEDSEGKIT_REQUIRE_DISPLAY=1 (set by CI), in which case they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

args = [sys.executable, "-m", "pytest", "tests/napari", *sys.argv[1:]]
if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
    args = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *args]
result = subprocess.run(args)
# pytest exit code 5 = no tests collected: the napari folder is never empty, so treat it as failure.
sys.exit(result.returncode)
