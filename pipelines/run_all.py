"""Step script: the whole job (phantoms or a dataset -> preprocess -> train -> infer -> evaluate).

Same as `medseg demo ...` (see `python pipelines/run_all.py --help`).
"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
