#!/usr/bin/env python
"""Make k-fold cross-validation splits (JSON with the seed) for a dataset or a preprocessed folder.

Example::

    python data_tools/split.py data/Phantoms --folds 5 --seed 12345 --out splits.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def case_names(folder: Path) -> list[str]:
    """Case names of a preprocessed folder (``cases/*.json``) or of a raw dataset folder."""
    from medseg.data.datasets import discover_cases

    if (folder / "cases").is_dir():
        return sorted(p.stem for p in (folder / "cases").glob("*.json"))
    return [c.name for c in discover_cases(folder).cases]


def main(argv: list[str] | None = None) -> int:
    from medseg.data.splits import make_splits, write_splits
    from medseg.errors import MedsegError

    parser = argparse.ArgumentParser(description="K-fold cross-validation splits saved as JSON together with their seed "
                                     "({seed, num_folds, cases, folds: [{train, val}, ...]}).")
    parser.add_argument("folder", type=Path, help="raw dataset folder (dataset.json / imagesTr) or preprocessed folder (cases/)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5; fewer when there are fewer cases)")
    parser.add_argument("--seed", type=int, default=12345, help="shuffle seed (default 12345, as data.split_seed)")
    parser.add_argument("--out", type=Path, help="output JSON (default: FOLDER/splits.json)")
    args = parser.parse_args(argv)
    try:
        names = case_names(args.folder)
        folds = make_splits(names, args.folds, args.seed)
        out = write_splits(args.out or args.folder / "splits.json", folds, seed=args.seed, case_names=names)
    except MedsegError as err:
        print(f"split.py: error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{len(f['train'])}/{len(f['val'])}" for f in folds)
    print(f"wrote {len(folds)} folds (train/val: {sizes}) of {len(names)} cases with seed {args.seed} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
