"""Step script: same as `medseg preprocess ...` (see `python pipelines/preprocess.py --help`)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
