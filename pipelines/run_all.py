"""Step script: the whole job, preprocess -> train -> infer -> evaluate.

With ``--data DATASET`` it is ``medseg run --data DATASET ...`` (your own dataset; see
``python pipelines/run_all.py --data X --help``); without, ``medseg demo ...`` (generated CT
phantoms). The library functions are :func:`medseg.pipelines.job.run_job` and
:func:`medseg.pipelines.demo.run_demo`.
"""

import sys

from medseg.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    command = "run" if any(a == "--data" or a.startswith("--data=") for a in args) else "demo"
    sys.exit(main([command, *args]))
