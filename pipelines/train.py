"""Step script: same as `medseg train ...` (see `python pipelines/train.py --help`)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
