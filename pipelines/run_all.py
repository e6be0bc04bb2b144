"""Step script: the whole job on synthetic CT phantoms (phantoms -> preprocess -> train -> infer -> evaluate).

Same as `medseg demo ...` (see `python pipelines/run_all.py --help`); the library function is
`medseg.pipelines.demo.run_demo`. For a dataset of your own, run the four steps (README: Bring your own dataset).
"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
