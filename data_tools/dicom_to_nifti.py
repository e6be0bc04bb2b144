#!/usr/bin/env python
"""Convert DICOM series to NIfTI (or NRRD / MHA) with their full geometry.

``SRC`` is one series folder, or a folder searched recursively for series folders (one output
per series, named after its folder). The voxel array and the affine are exactly those of
``medseg.io.read_volume(SRC)``.

Example::

    python data_tools/dicom_to_nifti.py dicom/patient01 imagesTs/patient01_0000.nii.gz
    python data_tools/dicom_to_nifti.py dicom/ converted/ --suffix .nrrd
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def find_series_dirs(root: Path) -> list[Path]:
    """``root`` itself when it holds a DICOM series, else every sub-folder that does (sorted)."""
    from medseg.io import is_dicom_dir

    if is_dicom_dir(root):
        return [root]
    return sorted(Path(d) for d, _, _ in os.walk(root) if is_dicom_dir(d))


def main(argv: list[str] | None = None) -> int:
    from medseg.errors import InputError, MedsegError
    from medseg.io import VOLUME_SUFFIXES, read_volume, write_volume

    parser = argparse.ArgumentParser(description="Convert DICOM series folders to NIfTI / NRRD / MHA, keeping spacing, "
                                     "origin and direction (the largest series of a folder is read).")
    parser.add_argument("src", type=Path, help="a DICOM series folder, or a folder to search for series folders")
    parser.add_argument("out", type=Path, help="output file (for one series: .nii.gz, .nii, .nrrd, .mha) or output folder")
    parser.add_argument("--suffix", default=".nii.gz", help="output format when OUT is a folder (default .nii.gz)")
    args = parser.parse_args(argv)
    done, failed = 0, 0
    try:
        if not args.src.is_dir():
            raise InputError(f"{args.src}: folder not found")
        series = find_series_dirs(args.src)
        if not series:
            raise InputError(f"{args.src}: no DICOM series found (no file with the DICM marker)")
        to_file = args.out.name.lower().endswith(VOLUME_SUFFIXES)
        if to_file and len(series) > 1:
            raise InputError(f"{args.out}: {len(series)} series found under {args.src}; give an output folder")
        for s in series:
            dst = args.out if to_file else args.out / f"{s.name}{args.suffix}"
            try:
                vol = read_volume(s)
                write_volume(vol, dst)
                print(f"{s} -> {dst}  {vol.shape} {vol.orientation} spacing {[round(float(v), 4) for v in vol.spacing]}")
                done += 1
            except MedsegError as err:
                print(f"dicom_to_nifti.py: error: {err}", file=sys.stderr)
                failed += 1
    except MedsegError as err:
        print(f"dicom_to_nifti.py: error: {err}", file=sys.stderr)
        return 2
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
