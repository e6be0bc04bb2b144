"""Step script: same as `medseg evaluate ...` (see `python pipelines/evaluate.py --help`)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
