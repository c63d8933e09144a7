"""`python -m segjax.inference.sam ...`: the SAM command line (see `cli.py`)."""

import sys

from segjax.inference.sam.cli import main

sys.exit(main())
