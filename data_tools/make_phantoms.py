#!/usr/bin/env python
"""Write a synthetic CT phantom dataset (nnU-Net v2 layout) for tests and the CPU demo.

Example::

    python data_tools/make_phantoms.py data/Phantoms --train 8 --test 2 --seed 0 --shape 64 64 40
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from medseg.data.phantoms import ORIENTATIONS, make_phantom_dataset

    parser = argparse.ArgumentParser(
        description="Synthetic abdominal CT phantoms (liver, spleen, kidneys, liver lesions) with random "
        "spacing, pose and orientation, written as an nnU-Net v2 dataset folder with dataset.json.")
    parser.add_argument("out", help="output dataset folder (created; existing case files are overwritten)")
    parser.add_argument("--train", type=int, default=8, help="number of training cases (imagesTr/labelsTr, default 8)")
    parser.add_argument("--test", type=int, default=2, help="number of test cases (imagesTs/labelsTs, default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40], metavar=("X", "Y", "Z"),
                        help="voxels at the nominal 1 x 1 x 2.5 mm spacing; sets the field of view (default 64 64 40)")
    parser.add_argument("--orientations", nargs="+", default=list(ORIENTATIONS), metavar="CODE",
                        help=f"axis codes the cases cycle through (default: {' '.join(ORIENTATIONS)})")
    parser.add_argument("--name", default="Phantoms", help="dataset name in dataset.json")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 0 or min(args.shape) < 8:
        parser.error("--train must be >= 1, --test >= 0 and every --shape value >= 8")
    out = make_phantom_dataset(args.out, args.train, args.test, args.seed, shape=args.shape, name=args.name,
                               orientations=[o.upper() for o in args.orientations])
    print(f"wrote {args.train} training and {args.test} test phantoms to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
