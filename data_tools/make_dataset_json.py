#!/usr/bin/env python
"""Write an nnU-Net v2 ``dataset.json`` for a folder of images and labels.

The folder holds ``imagesTr/`` + ``labelsTr/`` (or ``images/`` + ``labels/``), optionally
``imagesTs/`` + ``labelsTs/``; image names may carry the ``_0000`` channel suffix or not, any
format medseg reads works. The JSON lists every case explicitly.

Example::

    python data_tools/make_dataset_json.py data/MyCT --labels background=0 liver=1 spleen=2 --name MyCT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_labels(items: list[str]) -> dict[str, int]:
    """``["background=0", "liver=1"]`` -> ``{"background": 0, "liver": 1}``."""
    from medseg.errors import InputError

    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.strip().isdigit():
            raise InputError(f"--labels: '{item}' is not NAME=INT")
        out[name] = int(value)
    if 0 not in out.values():
        raise InputError("--labels: background must be 0 (e.g. background=0)")
    return out


def main(argv: list[str] | None = None) -> int:
    from medseg.data.datasets import build_dataset_json, discover_cases
    from medseg.errors import InputError, MedsegError
    from medseg.io import atomic_write_text

    parser = argparse.ArgumentParser(description="Write dataset.json (nnU-Net v2 layout with explicit training/test "
                                     "lists) for a folder of images and labels.")
    parser.add_argument("folder", type=Path, help="dataset folder with imagesTr/ + labelsTr/ (or images/ + labels/)")
    parser.add_argument("--labels", nargs="+", metavar="NAME=INT",
                        help="class names and values, e.g. background=0 liver=1 (default: label_<v> for every value found)")
    parser.add_argument("--channels", nargs="+", metavar="NAME", help="channel names in order (default: CT per channel)")
    parser.add_argument("--name", help="dataset name (default: the folder name)")
    parser.add_argument("--description", default="", help="free text stored in dataset.json")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset.json")
    args = parser.parse_args(argv)
    path = args.folder / "dataset.json"
    try:
        if path.exists() and not args.force:
            raise InputError(f"{path}: already exists (pass --force to replace it)")
        info = discover_cases(args.folder, ignore_dataset_json=True)
        if args.labels:
            info.labels = parse_labels(args.labels)
        if args.channels:
            if len(args.channels) != len(info.cases[0].images):
                raise InputError(f"--channels: {len(args.channels)} names for {len(info.cases[0].images)} channel(s)")
            info.channel_names = {str(i): n for i, n in enumerate(args.channels)}
        if args.name:
            info.name = args.name
        meta = build_dataset_json(info, description=args.description)
        atomic_write_text(path, json.dumps(meta, indent=1))
        discover_cases(args.folder)  # the new file must describe the folder
    except MedsegError as err:
        print(f"make_dataset_json.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {len(info.cases)} training, {len(info.test_cases)} test cases, labels {info.labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
