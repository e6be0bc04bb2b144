"""Dataset fingerprint (nnU-Net's ``DatasetFingerprintExtractor``, Isensee et al., Nature Methods 2021).

Per case: spacing and shape in the closest-RAS axis order (the order of the preprocessed
arrays), the shape of the body box (``image > -500 HU``), and up to 10,000 randomly sampled
foreground intensities per channel (foreground = label > 0 and not nnU-Net v2's ``ignore``
label; the body (> -500 HU) for an unlabelled case; none for an empty label). Over the dataset: the pooled foreground intensity statistics per channel
(``mean``, ``std``, ``median``, ``min``, ``max``, ``percentile_00_5``, ``percentile_99_5``) that
the ``ct`` normalization uses, plus median spacing / shape.
"""

from __future__ import annotations

import zlib

import numpy as np

from medseg.data.checks import check_finite
from medseg.data.datasets import Case, DatasetInfo, ignore_label_of
from medseg.data.parallel import run_parallel
from medseg.data.checks import BODY_THRESHOLD_HU, check_ct_intensities, check_label
from medseg.data.preprocess import body_bbox
from medseg.errors import GeometryError, InputError
from medseg.io import read_volume, same_space, to_canonical

__all__ = ["case_fingerprint", "compute_fingerprint", "intensity_stats"]

SAMPLES_PER_CASE = 10_000


def _ras_order(values, ornt: np.ndarray) -> list:
    """Per-axis ``values`` of the file's axes, listed in the reoriented (RAS) axis order."""
    out = [None] * 3
    for i, (ax, _) in enumerate(np.asarray(ornt)):
        out[int(ax)] = values[i]
    return out


def case_fingerprint(case: Case, labels: dict[str, int] | None = None, *, ct_check: bool = True) -> dict:
    """Read one case and measure it (see the module docstring).

    Args:
        case: the case's files.
        labels: ``{name: value}`` of dataset.json (``None``: any value); an ``ignore`` label's
            voxels are not foreground.
        ct_check: refuse images whose intensities do not look like CT.

    Raises:
        InputError / GeometryError: unreadable file, NaN / inf voxels, non-CT intensities,
            channel or label not on the image grid, undeclared label values.
    """
    chans = [read_volume(p) for p in case.images]
    ref = chans[0]
    for ch in chans[1:]:
        if not same_space(ref, ch):
            raise GeometryError(f"{ch.path}: image channel does not share physical space with {ref.path}")
    for ch in chans:
        check_finite(ch.array, ch.path)
        if ct_check:
            check_ct_intensities(ch.array, str(ch.path))
    values = sorted(labels.values()) if labels else None
    label = read_volume(case.label) if case.label is not None else None
    stack = np.stack([c.array for c in chans])
    body_box = body_bbox(stack, None, threshold=BODY_THRESHOLD_HU, margin=0)
    found: list[int] = []
    if label is not None:  # an empty label contributes no sample (its body is not foreground)
        found = check_label(label, ref, values)
        fg = label.array > 0
        ignore = ignore_label_of(labels)
        if ignore is not None:
            fg &= label.array != ignore
    else:  # unlabelled case: the body stands in for the foreground
        fg = (stack > BODY_THRESHOLD_HU).any(axis=0)
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    idx = np.flatnonzero(fg)
    if len(idx) > SAMPLES_PER_CASE:
        idx = rng.choice(idx, SAMPLES_PER_CASE, replace=False)
    ornt = to_canonical(ref.affine)
    return {
        "case": case.name,
        "spacing": _ras_order([float(s) for s in ref.spacing], ornt),
        "shape": _ras_order(list(ref.shape), ornt),
        "shape_after_crop": _ras_order([hi - lo for lo, hi in body_box], ornt),
        "intensities": [c.array.reshape(-1)[idx].astype(np.float32) for c in chans],
        "label_values": found,
    }


def intensity_stats(samples: np.ndarray) -> dict[str, float]:
    """nnU-Net's foreground intensity properties of pooled samples."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size == 0:
        raise InputError("no foreground voxels in any case: cannot compute intensity statistics")
    lo, med, hi = np.percentile(s, [0.5, 50.0, 99.5])
    return {"mean": float(s.mean()), "std": float(s.std()), "median": float(med), "min": float(s.min()),
            "max": float(s.max()), "percentile_00_5": float(lo), "percentile_99_5": float(hi)}


def compute_fingerprint(info: DatasetInfo, *, workers: int = 1, ct_check: bool = True, progress: bool = True) -> dict:
    """Fingerprint every training case of ``info`` (in parallel with ``workers`` processes).

    Returns:
        ``{"cases": [...], "spacings": [[x, y, z], ...], "shapes": [...], "shapes_after_crop": [...],
        "foreground_intensity_properties_per_channel": {"0": {...}}, "median_spacing", "median_shape",
        "label_values_found", "failed": {case: reason}, "warnings": {case: [...]}}``. Failed cases are
        left out of the statistics.

    Raises:
        InputError: every case failed.
    """
    jobs = [(c.name, (c, info.labels, ct_check)) for c in info.cases]
    results, failed, warns = {}, {}, {}
    for out in run_parallel(_fingerprint_job, jobs, workers=workers, desc="fingerprint", progress=progress):
        if out.warnings:
            warns[out.key] = out.warnings
        if out.ok:
            results[out.key] = out.value
        else:
            failed[out.key] = out.error
    if not results:
        first = next(iter(failed.items()), ("", "no cases"))
        raise InputError(f"{info.root}: every case failed the fingerprint (e.g. {first[0]}: {first[1]})")
    names = sorted(results)
    rs = [results[n] for n in names]
    nch = len(rs[0]["intensities"])
    props = {str(c): intensity_stats(np.concatenate([r["intensities"][c] for r in rs])) for c in range(nch)}
    spacings = [r["spacing"] for r in rs]
    return {
        "dataset_name": info.name,
        "labels": dict(info.labels),
        "channel_names": dict(info.channel_names),
        "cases": names,
        "spacings": spacings,
        "shapes": [r["shape"] for r in rs],
        "shapes_after_crop": [r["shape_after_crop"] for r in rs],
        "median_spacing": np.median(np.asarray(spacings), axis=0).tolist(),
        "median_shape": np.median(np.asarray([r["shape"] for r in rs]), axis=0).tolist(),
        "foreground_intensity_properties_per_channel": props,
        "label_values_found": sorted({v for r in rs for v in r["label_values"]}),
        "failed": failed,
        "warnings": warns,
    }


def _fingerprint_job(case: Case, labels: dict, ct_check: bool) -> dict:
    return case_fingerprint(case, labels, ct_check=ct_check)
