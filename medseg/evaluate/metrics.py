"""Segmentation metrics: pure functions on boolean masks and a voxel spacing.

Overlap metrics (Dice, IoU, confusion counts) follow nnU-Net v2 (``evaluation/evaluate_predictions.py``);
surface metrics follow MONAI's definitions (``monai.metrics.HausdorffDistanceMetric``,
``SurfaceDistanceMetric``, ``SurfaceDiceMetric``) so that the two agree to float precision:

- **surface** of a mask = ``mask XOR binary_erosion(mask)`` with scipy's default structuring element
  (6-connectivity in 3-D); voxels on the array border count as surface (outside is background).
- **surface distances** = for each surface voxel of one mask, the Euclidean distance in mm to the
  nearest surface voxel of the other (``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``),
  computed on the union bounding box + 1 voxel, which gives exactly the uncropped result.
- **HD95** = ``max(P95(d(pred->ref)), P95(d(ref->pred)))``, ``P95`` with linear interpolation
  (``np.percentile`` default, the same as MONAI's ``torch.quantile``). Note that medpy's ``hd95``
  pools both directions before the percentile instead, which can give a (slightly) different number.
- **ASSD** = mean of the pooled distances of both directions (MONAI ``symmetric=True``).
- **NSD** (normalized surface Dice, Nikolov et al. 2021, arXiv:2111.05408) = fraction of the pooled
  surface voxels whose distance is ``<= tolerance_mm``; surface size is counted in voxels
  (MONAI ``use_subvoxels=False``).

Empty-mask conventions (the same as MONAI's, tested):

===================  ======  ======  ======  ======  ======
pred / ref           Dice    IoU     HD95    ASSD    NSD
===================  ======  ======  ======  ======  ======
both empty           NaN     NaN     NaN     NaN     NaN
exactly one empty    0       0       inf     inf     0
===================  ======  ======  ======  ======  ======

NaN means "not defined" and is left out of means; ``inf`` means "a structure was missed or
hallucinated", and a mean that includes it is ``inf`` (so a missed organ cannot hide in an average).

**Ignored voxels** (nnU-Net v2's ``ignore`` label in the reference): :func:`confusion` and
:func:`compute_metrics` take an ``ignore`` mask; those voxels count in no class (not TP, FP, FN
nor TN) and are background for the surface metrics, whatever the prediction holds there.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "ALL_METRICS",
    "METRIC_KEYS",
    "assd",
    "compute_metrics",
    "confusion",
    "dice",
    "hd95",
    "iou",
    "nsd",
    "surface_distances",
]

#: metric name (CLI spelling) -> key in summary.json (nnU-Net spelling)
METRIC_KEYS: dict[str, str] = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "assd": "ASSD", "nsd": "NSD"}
ALL_METRICS: tuple[str, ...] = tuple(METRIC_KEYS)
_SURFACE = ("hd95", "assd", "nsd")


def _check(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref masks differ in shape: {pred.shape} vs {ref.shape}")
    return pred, ref


def _unmask(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int]:
    """``pred``, ``ref`` with the ``ignore`` voxels set to background, and the number of voxels left."""
    pred, ref = _check(pred, ref)
    if ignore is None:
        return pred, ref, int(pred.size)
    ignore = np.asarray(ignore, dtype=bool)
    if ignore.shape != pred.shape:
        raise ValueError(f"ignore mask and masks differ in shape: {ignore.shape} vs {pred.shape}")
    return pred & ~ignore, ref & ~ignore, int(pred.size - np.count_nonzero(ignore))


def confusion(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, int]:
    """Voxel counts ``TP, FP, FN, TN, n_pred, n_ref`` of two boolean masks of the same shape.

    ``ignore`` (same shape, optional): voxels counted nowhere (nnU-Net v2's ignore label).
    """
    pred, ref, n = _unmask(pred, ref, ignore)
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return {"TP": tp, "FP": fp, "FN": fn, "TN": n - tp - fp - fn, "n_pred": n_pred, "n_ref": n_ref}


def _dice_from(c: dict[str, int]) -> float:
    den = 2 * c["TP"] + c["FP"] + c["FN"]
    return float("nan") if den == 0 else 2 * c["TP"] / den


def _iou_from(c: dict[str, int]) -> float:
    den = c["TP"] + c["FP"] + c["FN"]
    return float("nan") if den == 0 else c["TP"] / den


def dice(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Dice = 2|P∩R| / (|P|+|R|); NaN when both masks are empty; ``ignore`` voxels count nowhere."""
    return _dice_from(confusion(pred, ref, ignore))


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """IoU (Jaccard) = |P∩R| / |P∪R|; NaN when both masks are empty."""
    return _iou_from(confusion(pred, ref))


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive and finite, got {sp.tolist()}")
    return sp


def _union_crop(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the union bounding box grown by ``margin`` voxels (clipped to the array)."""
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(np.any(union, axis=other))
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, union.shape[axis])))
    return tuple(slices)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to the surface of ``ref``, and back.

    Args:
        pred, ref: boolean masks of the same shape ``(I, J, K)`` (any ndim).
        spacing: voxel size in mm per array axis (default 1).

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred)``: 1-D float64 arrays, one entry per surface voxel of
        ``pred`` (resp. ``ref``). When exactly one mask is empty, the other's distances are all
        ``inf``; when both are empty, both arrays are empty.
    """
    pred, ref = _check(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not (has_p or has_r):
        return np.zeros(0), np.zeros(0)
    crop = _union_crop(pred, ref)
    sp_pred, sp_ref = _surface(pred[crop]), _surface(ref[crop])
    if not (has_p and has_r):
        return np.full(int(sp_pred.sum()), np.inf), np.full(int(sp_ref.sum()), np.inf)
    d_pr = ndimage.distance_transform_edt(~sp_ref, sampling=sp)[sp_pred]
    d_rp = ndimage.distance_transform_edt(~sp_pred, sampling=sp)[sp_ref]
    return d_pr, d_rp


def _hd95_from(d_pr: np.ndarray, d_rp: np.ndarray, percentile: float = 95.0) -> float:
    if d_pr.size == 0 and d_rp.size == 0:
        return float("nan")
    if d_pr.size == 0 or d_rp.size == 0 or np.isinf(d_pr).any() or np.isinf(d_rp).any():
        return float("inf")
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def _assd_from(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    pooled = np.concatenate([d_pr, d_rp])
    return float("nan") if pooled.size == 0 else float(pooled.mean())


def _nsd_from(d_pr: np.ndarray, d_rp: np.ndarray, tolerance_mm: float) -> float:
    pooled = np.concatenate([d_pr, d_rp])
    return float("nan") if pooled.size == 0 else float(np.count_nonzero(pooled <= tolerance_mm) / pooled.size)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | float | None = None, *, percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see module docstring for the definition)."""
    return _hd95_from(*surface_distances(pred, ref, spacing), percentile)


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | float | None = None) -> float:
    """Average symmetric surface distance in mm (mean over both surfaces' voxels)."""
    return _assd_from(*surface_distances(pred, ref, spacing))


def nsd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | float | None = None, tolerance_mm: float = 2.0) -> float:
    """Normalized surface Dice at ``tolerance_mm`` (Nikolov et al. 2021), in [0, 1]."""
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    return _nsd_from(*surface_distances(pred, ref, spacing), tolerance_mm)


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | float | None = None,
    *,
    metrics: Iterable[str] = ("dice", "iou"),
    nsd_tolerance_mm: float = 2.0,
    ignore: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Every requested metric of one class at once (surface distances computed only once).

    Args:
        pred, ref: boolean masks ``(I, J, K)`` on the same grid.
        spacing: voxel size in mm per axis.
        metrics: names out of :data:`ALL_METRICS`.
        nsd_tolerance_mm: NSD tolerance in mm.
        ignore: boolean mask of voxels left out of every metric (the reference's ignore label).

    Returns:
        nnU-Net-style dict: ``{"Dice": .., "IoU": .., "HD95": .., "ASSD": .., "NSD": ..}`` (the requested
        ones) plus the counts ``TP, FP, FN, TN, n_pred, n_ref``.
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_KEYS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}")
    counts = confusion(pred, ref, ignore)
    out: dict[str, float | int] = {}
    if "dice" in metrics:
        out["Dice"] = _dice_from(counts)
    if "iou" in metrics:
        out["IoU"] = _iou_from(counts)
    if any(m in metrics for m in _SURFACE):
        pred, ref, _ = _unmask(pred, ref, ignore)
        d = surface_distances(pred, ref, spacing)
        if "hd95" in metrics:
            out["HD95"] = _hd95_from(*d)
        if "assd" in metrics:
            out["ASSD"] = _assd_from(*d)
        if "nsd" in metrics:
            if not np.isfinite(nsd_tolerance_mm) or nsd_tolerance_mm < 0:
                raise ValueError(f"NSD tolerance must be a finite number >= 0 mm, got {nsd_tolerance_mm}")
            out["NSD"] = _nsd_from(*d, nsd_tolerance_mm)
    out.update(counts)
    return out
