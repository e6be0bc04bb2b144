"""What trained organ runs call each structure on a CT that has no organ reference.

The organ test CT of ``../shared/data/real_ct`` is an upper abdomen with contrast: it cannot show how a
net treats a *native* (non-contrast) heart, whose blood sits at ~40 HU, in the liver's range, while the
one heart the nets train on (``lidc0001_chest``) is enhanced (~330 HU). The lung-lesion test CT
(``lung_lesion/imagesTs/pyradiomics_lung1.nrrd``, a native chest CT, 48 slices of 5 mm) has the heart in
view but no organ reference. This script segments such a CT with each run of ``--runs``
(``Predictor.from_run(run, checkpoint="final")``, the run's own post-processing, as
``real_ct_study.py`` scores) and reports, per run, the volume in cm^3 of each class it predicts, read in
the output's own grid (SimpleITK spacing, any orientation). With no reference this is a look, not a
score: a heart of a few hundred cm^3 called "liver" is the failure to watch.

``--overlay PNG`` also draws axial slices (``--slices``, default 4 spread over the lower half of the
volume, where the heart sits in a chest CT) of the CT with each run's labels, one row per run
(liver red, spleen green, kidney blue, heart yellow; lung left out so the rest stays visible).

Writes ``<--results>/<--name>.{md,json}`` (default a temp folder); the last stdout line is the JSON.

Example::

    python benchmarks/unlabelled_ct_volumes.py --runs $TMPDIR/s28/worg/organs/run_* \\
        --overlay $TMPDIR/s28/overlay.png --results benchmarks/results/screens --name native_heart_2bee9c9
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_IMAGE = C.REAL_CT / "lung_lesion" / "imagesTs" / "pyradiomics_lung1.nrrd"
DEFAULT_LABELS = C.REAL_CT / "organs" / "dataset.json"
COLOURS = {"liver": (255, 0, 0), "spleen": (0, 255, 0), "kidney": (0, 0, 255), "heart": (255, 255, 0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="training run directories (medseg train --out)")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                   help="the CT to segment (default: ../shared/data/real_ct/lung_lesion/imagesTs/pyradiomics_lung1.nrrd)")
    p.add_argument("--dataset-json", type=Path, default=DEFAULT_LABELS,
                   help="dataset.json naming the runs' classes (default: the organ dataset's)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where predictions go, one folder per run (default: a temp folder); an existing "
                        "prediction is reused")
    p.add_argument("--overlay", type=Path, default=None, help="also write a PNG of axial slices with each run's labels")
    p.add_argument("--slices", type=int, nargs="+", default=None,
                   help="slice indices (the file's third voxel axis) of the --overlay PNG (needs --overlay; default: 4 spread over the lower half)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--results", type=Path, default=None, help="folder for <name>.md/.json (default: a temp folder)")
    p.add_argument("--name", default="unlabelled_ct_volumes", help="result file name (default unlabelled_ct_volumes)")
    args = p.parse_args(argv)
    if args.slices and args.overlay is None:
        p.error("--slices chooses the slices of the --overlay PNG: give --overlay too")
    return args


def label_names(dataset_json: Path) -> dict[int, str]:
    """Foreground classes ``{value: name}`` of a ``dataset.json`` (:func:`medseg.data.datasets.load_dataset_json`)."""
    from medseg.data.datasets import load_dataset_json

    return load_dataset_json(dataset_json).label_names


def class_volumes(label_path: Path, names: dict[int, str]) -> dict[str, float]:
    """Volume in cm^3 of each class of ``names`` in a label image (voxel count x the voxel volume of its affine)."""
    from medseg.io import read_volume

    vol = read_volume(label_path)
    voxel_cm3 = abs(float(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
    counts = np.bincount(vol.array.astype(np.int64, copy=False).ravel(), minlength=max(names) + 1)
    return {name: float(counts[k]) * voxel_cm3 for k, name in names.items()}


def default_slices(depth: int, n: int = 4) -> list[int]:
    """``n`` axial indices spread over the lower half ``[0, depth / 2)`` of a volume of ``depth`` slices."""
    return sorted({int(round(v)) for v in np.linspace(depth * 0.05, depth * 0.45, n)})


def overlay(image_path: Path, labels: dict[str, Path], names: dict[int, str], slices: list[int] | None,
            out_png: Path) -> list[int]:
    """A PNG with one row per run (``labels``: run name -> mask file, all on ``image_path``'s grid) and
    one column per slice: the CT at a soft-tissue window with each class of :data:`COLOURS` blended in.
    Returns the slices drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medseg.io import read_volume

    ct = read_volume(image_path, dtype=np.float32).array  # (I, J, K): file voxel order, K the slice axis
    grey = np.clip((ct + 160.0) / 400.0, 0.0, 1.0)  # window 40 HU +- 200
    slices = slices or default_slices(ct.shape[2])
    bad = [z for z in slices if not 0 <= z < ct.shape[2]]
    if bad:
        raise ValueError(f"{image_path}: overlay slices {bad} outside 0..{ct.shape[2] - 1} (the file's third voxel axis)")
    rows = []
    for mask_path in labels.values():
        lab = read_volume(mask_path).array
        if lab.shape != ct.shape:
            raise ValueError(f"{mask_path}: mask shape {lab.shape} is not the CT's {ct.shape}")
        tiles = []
        for z in slices:
            rgb = np.repeat(grey[..., z].T[..., None], 3, axis=-1)  # rows J, columns I
            for k, name in names.items():
                if name in COLOURS:
                    m = lab[..., z].T == k
                    rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(COLOURS[name], dtype=np.float32) / 255.0
            tiles.append(rgb)
        rows.append(np.concatenate(tiles, axis=1))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(out_png, np.concatenate(rows, axis=0))
    return slices


def predict(run_dir: Path, image: Path, out_dir: Path) -> Path:
    """The run's mask of ``image`` in ``out_dir`` (segmented unless that mask is there already: the
    path is ``medseg infer``'s own, :func:`medseg.infer.runner.plan_jobs`; writes are atomic)."""
    from medseg.infer.predictor import Predictor
    from medseg.infer.runner import plan_jobs, run_inference

    (job,) = plan_jobs([image], out_dir, image)
    if not job.mask.is_file():
        run_inference(Predictor.from_run(run_dir, checkpoint="final"), image, out_dir)
    return job.mask


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    C.set_threads(args.threads)
    if not args.image.is_file():
        raise SystemExit(f"{args.image}: no such CT (the shared real-CT data is not beside the repository?)")
    meta = C.meta_now(args.threads)
    names = label_names(args.dataset_json)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="unlabelled_ct_"))
    masks: dict[str, Path] = {}
    volumes: dict[str, dict[str, float]] = {}
    for run in args.runs:
        masks[run.name] = predict(run, args.image, work / run.name)
        volumes[run.name] = class_volumes(masks[run.name], names)
        print(run.name, {k: round(v, 1) for k, v in volumes[run.name].items()}, flush=True)
    slices = overlay(args.image, masks, names, args.slices, args.overlay) if args.overlay else None
    header = ["run", *[f"{n} cm^3" for n in names.values()]]
    rows = [[r, *[round(v[n], 1) for n in names.values()]] for r, v in volumes.items()]
    body = (f"CT `{C.repo_relative(args.image)}` (no organ reference: a look, not a score), segmented with each "
            f"run's final weights and post-processing; per class the predicted volume.\n\n" + C.md_table(header, rows))
    data = {"image": C.repo_relative(args.image), "volumes_cm3": volumes, "overlay_slices": slices}
    C.write_results(args.name, "Organ runs on a CT without organ reference: predicted volumes", body, data, meta,
                    command="python benchmarks/unlabelled_ct_volumes.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    out_dir=args.results or work)
    print(json.dumps(data))
    return data


if __name__ == "__main__":
    main()
