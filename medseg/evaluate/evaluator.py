"""Folders of predicted and reference label maps -> nnU-Net-style ``summary.json`` dict.

Layout (nnU-Net v2 ``evaluation/evaluate_predictions.py``, so its tooling reads it)::

    {"metric_per_case": [{"prediction_file": .., "reference_file": .., "case": ..,
                          "metrics": {"1": {"Dice": .., "IoU": .., "HD95": .., "ASSD": .., "NSD": ..,
                                            "TP": .., "FP": .., "FN": .., "TN": .., "n_pred": .., "n_ref": ..}}}],
     "mean": {"1": {...}},           # per class, over the cases that score it, NaN left out
     "foreground_mean": {...},       # mean of the per-class means, NaN left out
     "missing": ["case", ..],        # references without a prediction (never silently skipped)
     "unmatched_predictions": [..], "label_names": {"1": "liver"}, "metrics": [..],
     "nsd_tolerance_mm": 2.0, "dataset_json": path | null}

nnU-Net v2's ignore label (a ``"ignore"`` entry in dataset.json ``labels``): reference voxels
holding it are left out of every metric of every class (whatever the prediction holds there),
and it is never scored as a class; ``summary["ignore_label"]`` records it.

Conventions: a class absent from both prediction and reference has Dice NaN (and every other
metric NaN) and is left out of the means; HD95/ASSD are ``inf`` when exactly one of the two is
empty (see :mod:`medseg.evaluate.metrics`). Missing cases are listed, not scored as 0, and do not
enter the means. Prediction and reference must share a voxel grid up to an axis permutation /
flip (e.g. LPS vs LAS of the same scan), which is undone without interpolation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medseg.data.parallel import run_parallel
from medseg.errors import GeometryError, InputError
from medseg.evaluate.cases import DatasetInfo, find_dataset_json, load_dataset_json, match_cases, parse_label_list, scored_labels
from medseg.evaluate.metrics import ALL_METRICS, compute_metrics
from medseg.io import Volume, orientation_code, read_volume, reorient, same_space

__all__ = ["align_to_reference", "evaluate_case", "evaluate_folders", "summarize"]

log = logging.getLogger(__name__)


def _label_array(vol: Volume) -> np.ndarray:
    arr = vol.array
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    rounded = np.rint(arr)
    if not np.array_equal(rounded, arr):
        raise InputError(f"{vol.path}: is not a label map (holds non-integer values)")
    return rounded.astype(np.int64)


def _grid(vol: Volume) -> str:
    sp = ", ".join(f"{s:.4g}" for s in vol.spacing)
    origin = ", ".join(f"{o:.4g}" for o in vol.affine[:3, 3])
    return f"shape {vol.shape}, spacing ({sp}) mm, {vol.orientation}, origin ({origin})"


def align_to_reference(pred: Volume, ref: Volume) -> np.ndarray:
    """``pred``'s array on ``ref``'s voxel grid, undoing an axis permutation / flip (no interpolation).

    Raises:
        GeometryError: the two grids do not describe the same voxels in physical space
            (the message names both files and both grids).
    """
    if same_space(pred, ref):
        return pred.array
    from nibabel.orientations import io_orientation, ornt_transform

    ornt = ornt_transform(io_orientation(pred.affine), io_orientation(ref.affine))
    moved, _ = reorient(pred, ornt)
    if same_space(moved, ref):
        return moved.array
    raise GeometryError(
        f"{pred.path} and {ref.path}: prediction and reference are on different voxel grids "
        f"(prediction: {_grid(pred)}; reference: {_grid(ref)}); resample the prediction onto the reference grid"
    )


def _present(arr: np.ndarray) -> set[int]:
    if arr.dtype in (np.uint8, np.uint16):
        return {int(v) for v in np.flatnonzero(np.bincount(arr.ravel()))} - {0}
    return {int(v) for v in np.unique(arr)} - {0}


def evaluate_case(
    pred_path: str | Path,
    ref_path: str | Path,
    *,
    labels: Sequence[int] | None = None,
    metrics: Iterable[str] = ("dice", "iou"),
    nsd_tolerance_mm: float = 2.0,
    ignore_label: int | None = None,
) -> dict:
    """Score one case.

    Args:
        pred_path, ref_path: label maps ``(I, J, K)`` on the same grid (up to permutation / flip).
        labels: classes to score; ``None`` = every non-zero value found in either file.
        metrics, nsd_tolerance_mm: see :func:`medseg.evaluate.metrics.compute_metrics`.
        ignore_label: reference value whose voxels are left out of every metric (never a class).

    Returns:
        ``{"metrics": {label: {...}}, "ref_labels": [labels present in the reference], "n_voxels": int}``
        (``n_voxels`` counts the voxels scored, ignored ones left out).
    """
    ref = read_volume(ref_path)
    pred = read_volume(pred_path)
    ref_arr = _label_array(ref)
    pred_arr = _label_array(Volume(align_to_reference(pred, ref), ref.affine, pred.path))
    ignore = (ref_arr == ignore_label) if ignore_label is not None else None
    ref_labels = _present(ref_arr) - {ignore_label}
    wanted = sorted((ref_labels | _present(pred_arr)) - {ignore_label}) if labels is None else sorted(labels)
    spacing = ref.spacing
    out = {lab: compute_metrics(pred_arr == lab, ref_arr == lab, spacing, metrics=metrics, nsd_tolerance_mm=nsd_tolerance_mm,
                                ignore=ignore) for lab in wanted}
    n_voxels = int(ref_arr.size) - (int(np.count_nonzero(ignore)) if ignore is not None else 0)
    return {"metrics": out, "ref_labels": sorted(ref_labels), "n_voxels": n_voxels}


def _evaluate_job(pred_path: Path, ref_path: Path, labels: list[int] | None, kw: dict) -> dict:
    """:func:`evaluate_case` with its keywords packed (what :func:`run_parallel` pickles to a worker)."""
    return evaluate_case(pred_path, ref_path, labels=labels, **kw)


def _empty_result(metrics: Iterable[str], n_voxels: int) -> dict:
    """The metrics of a class absent from both prediction and reference (no file read needed)."""
    return compute_metrics(np.zeros(1, bool), np.zeros(1, bool), 1.0, metrics=metrics) | {"TN": n_voxels}


def _mean(values: list[float]) -> float:
    vals = [float(v) for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(per_case: list[dict]) -> tuple[dict, dict]:
    """``(mean, foreground_mean)`` from ``metric_per_case`` entries (NaN left out, inf kept)."""
    by_label: dict[str, list[dict]] = {}
    for case in per_case:
        for lab, m in case["metrics"].items():
            by_label.setdefault(lab, []).append(m)
    mean = {lab: {k: _mean([m[k] for m in ms]) for k in ms[0]} for lab, ms in sorted(by_label.items(), key=lambda kv: int(kv[0]))}
    keys = next(iter(mean.values())).keys() if mean else []
    foreground = {k: _mean([m[k] for m in mean.values()]) for k in keys}
    return mean, foreground


def _resolve_dataset(dataset_json: str | Path | None, ref_dir: Path) -> DatasetInfo | None:
    """The dataset.json to use (``None``: none asked for or found)."""
    if dataset_json is None or str(dataset_json).lower() == "none":
        return None
    path = find_dataset_json(ref_dir) if str(dataset_json) == "auto" else Path(dataset_json)
    if path is None:
        return None
    if not path.is_file():
        raise InputError(f"{path}: dataset.json not found")
    return load_dataset_json(path)


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    *,
    labels: Sequence[int | str] | None = None,
    metrics: Iterable[str] = ("dice", "iou"),
    nsd_tolerance_mm: float = 2.0,
    dataset_json: str | Path | None = "auto",
    workers: int = 1,
    progress: bool | None = None,
    gates_dir: str | Path | None = None,
    gate_margin_mm: float | None = None,
) -> dict:
    """Score every reference case in ``ref_dir`` against its prediction in ``pred_dir``.

    Args:
        pred_dir, ref_dir: folders of label maps, matched by case key (see :mod:`.cases`).
        labels: classes to score (values, or class names from ``dataset.json``); default: the
            non-background ``labels`` of ``dataset.json``, else every label found in the references.
        metrics: names out of ``dice, iou, hd95, assd, nsd``; surface metrics are in mm.
        nsd_tolerance_mm: NSD tolerance in mm.
        dataset_json: ``"auto"`` (look in ``ref_dir`` and its parent), a path, or ``None``; gives
            class names (nnU-Net v2 or Decathlon ``labels``), the ignore label and per-case
            ``scored_labels``.
        workers: processes (1 = in this process).
        progress: tqdm bar over cases (``None``: only on a terminal).
        gates_dir: a folder of ``<case>_gates/`` folders (``medseg infer --save-gates``): their maps
            are scored against the references into ``summary["gate_localisation"]``
            (:func:`medseg.evaluate.gates.gate_localisation_folders`); ``None``: not done.
        gate_margin_mm: dilation of the reference classes for the gate localisation, mm
            (``None``: :data:`medseg.evaluate.gates.DEFAULT_MARGIN_MM`).

    Returns:
        the summary dict described in the module docstring. References without a prediction are
        listed in ``summary["missing"]`` and logged as a warning; the caller decides whether that fails.

    Raises:
        InputError: unreadable files, non-label data, or grids that differ; every case is tried
            first (in ``workers`` processes, :func:`medseg.data.parallel.run_parallel`) and the
            message lists each failed case with its reason.
        RuntimeError: an unexpected error (a bug) in some case, listed the same way.
    """
    metrics = [m.lower() for m in metrics]
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        raise InputError(f"--metrics: unknown metric(s) {', '.join(bad)} (choose from {', '.join(ALL_METRICS)})")
    ref_dir = Path(ref_dir)
    info = _resolve_dataset(dataset_json, ref_dir)
    names = info.label_names if info else {}
    ignore_label = info.ignore_label if info else None
    scored_by_case = scored_labels(info) if info else {}
    match = match_cases(pred_dir, ref_dir)
    for case, ref in match.missing:
        log.warning("no prediction for reference case '%s' (%s) in %s", case, ref, pred_dir)
    for p in match.unmatched:
        log.warning("prediction %s has no reference in %s; not scored", p, ref_dir)
    if labels:
        label_set: list[int] | None = parse_label_list(list(labels), names, "--labels")
        if ignore_label in label_set:
            raise InputError(f"--labels: {ignore_label} is the ignore label of {info.json_path}; it is not scored")
    else:
        label_set = sorted(names) or None

    def wanted(case: str) -> list[int] | None:
        scored = scored_by_case.get(case)
        if scored is None:
            return label_set
        return scored if label_set is None else [lab for lab in label_set if lab in scored]

    kw = {"metrics": metrics, "nsd_tolerance_mm": nsd_tolerance_mm, "ignore_label": ignore_label}
    jobs = [(case, (pred, ref, wanted(case), kw)) for case, pred, ref in match.pairs]
    outcomes = sorted(run_parallel(_evaluate_job, jobs, workers=workers, desc="evaluate", progress=progress),
                      key=lambda o: o.key)
    failed = [o for o in outcomes if not o.ok]
    if failed:  # a user's data problem is an InputError; anything else is a bug and stays one
        error = RuntimeError if any(o.unexpected for o in failed) else InputError
        raise error(f"{len(failed)} case(s) could not be scored:\n" + "\n".join(f"  {o.key}: {o.error}" for o in failed))
    results = {o.key: o.value for o in outcomes}

    final = label_set if label_set is not None else sorted({lab for r in results.values() for lab in r["ref_labels"]})
    per_case = []
    for case, pred, ref in match.pairs:
        res = results[case]
        scored = [lab for lab in final if case not in scored_by_case or lab in scored_by_case[case]]
        per_label = {str(lab): res["metrics"].get(lab) or _empty_result(metrics, res["n_voxels"]) for lab in scored}
        per_case.append({"case": case, "prediction_file": str(pred), "reference_file": str(ref), "metrics": per_label})
    mean, foreground = summarize(per_case)
    extra = {}
    if gates_dir is not None:
        from medseg.evaluate.gates import DEFAULT_MARGIN_MM, gate_localisation_folders

        extra["gate_localisation"] = gate_localisation_folders(
            gates_dir, [(case, ref) for case, _, ref in match.pairs], ignore_label=ignore_label,
            margin_mm=DEFAULT_MARGIN_MM if gate_margin_mm is None else gate_margin_mm)
    return {
        "metric_per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground,
        "missing": [case for case, _ in match.missing],
        "unmatched_predictions": [str(p) for p in match.unmatched],
        "label_names": {str(lab): names.get(lab, f"label_{lab}") for lab in final},
        "ignore_label": ignore_label,
        "metrics": metrics,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "dataset_json": str(info.json_path) if info else None,
    } | extra
