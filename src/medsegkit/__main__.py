import sys

from medsegkit.cli import main

sys.exit(main())
