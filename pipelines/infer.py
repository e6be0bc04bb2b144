"""Step script: same as `medseg infer ...` (see `python pipelines/infer.py --help`)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
