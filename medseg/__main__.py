"""``python -m medseg`` (also the entry point for ``torchrun -m medseg train ...``)."""

import sys

from medseg.cli import main

sys.exit(main())
