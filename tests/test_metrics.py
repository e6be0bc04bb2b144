"""Metric functions: closed-form answers on offset cubes, empty-mask conventions, MONAI agreement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.evaluate.metrics import ALL_METRICS, assd, compute_metrics, confusion, dice, hd95, iou, nsd, surface_distances

SPACING = (2.0, 0.7, 1.3)  # anisotropic, mm


def _cubes(n: int, k: int, axis: int, shape=(18, 18, 18)):
    """Two cubes of side ``n`` voxels, the second shifted by ``k`` voxels along ``axis``."""
    ref, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    lo = [2, 2, 2]
    ref[tuple(slice(l, l + n) for l in lo)] = True
    lo[axis] += k
    pred[tuple(slice(l, l + n) for l in lo)] = True
    return pred, ref


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_offset_cubes_closed_form(axis):
    n, k = 10, 3
    pred, ref = _cubes(n, k, axis)
    shift_mm = k * SPACING[axis]
    assert dice(pred, ref) == pytest.approx((n - k) / n, abs=1e-12)
    assert iou(pred, ref) == pytest.approx((n - k) / (n + k), abs=1e-12)
    # the far face (n^2 of the n^3-(n-2)^3 surface voxels, > 5%) sits exactly shift_mm from the other
    # surface and nothing is farther, so the linearly interpolated 95th percentile is exact
    assert hd95(pred, ref, SPACING) == pytest.approx(shift_mm, abs=1e-9)
    d_pr, d_rp = surface_distances(pred, ref, SPACING)
    assert d_pr.max() == pytest.approx(shift_mm) and d_rp.max() == pytest.approx(shift_mm)
    assert 0 < assd(pred, ref, SPACING) < shift_mm
    # below the smallest voxel step only the shared side walls count: (n-k) rings of 4n-4 voxels
    # out of the n^3-(n-2)^3 surface voxels of each cube
    shared = (n - k) * (4 * n - 4) / (n**3 - (n - 2) ** 3)
    assert nsd(pred, ref, SPACING, tolerance_mm=0.5 * min(SPACING)) == pytest.approx(shared, abs=1e-12)
    assert nsd(pred, ref, SPACING, tolerance_mm=shift_mm) == 1.0  # "<=" tolerance
    assert nsd(pred, ref, SPACING, tolerance_mm=shift_mm - 1e-6) < 1.0


def test_spacing_is_per_axis():
    pred, ref = _cubes(8, 2, axis=1)
    assert hd95(pred, ref, (1.0, 3.0, 1.0)) == pytest.approx(6.0)
    assert hd95(pred, ref, (3.0, 1.0, 3.0)) == pytest.approx(2.0)
    assert hd95(pred, ref) == pytest.approx(2.0)  # default spacing 1 mm


def test_identical_and_symmetric():
    pred, ref = _cubes(6, 2, axis=0)
    m = compute_metrics(ref, ref, SPACING, metrics=ALL_METRICS)
    assert (m["Dice"], m["IoU"], m["HD95"], m["ASSD"], m["NSD"]) == (1.0, 1.0, 0.0, 0.0, 1.0)
    a = compute_metrics(pred, ref, SPACING, metrics=ALL_METRICS)
    b = compute_metrics(ref, pred, SPACING, metrics=ALL_METRICS)
    for key in ("Dice", "IoU", "HD95", "ASSD", "NSD"):
        assert a[key] == pytest.approx(b[key])
    assert (a["FP"], a["FN"]) == (b["FN"], b["FP"])


def test_confusion_counts():
    pred, ref = _cubes(4, 1, axis=2, shape=(8, 8, 8))
    c = confusion(pred, ref)
    assert c == {"TP": 48, "FP": 16, "FN": 16, "TN": 512 - 80, "n_pred": 64, "n_ref": 64}


def test_empty_conventions():
    empty = np.zeros((8, 9, 10), bool)
    blob = empty.copy()
    blob[2:5, 3:6, 4:8] = True
    both = compute_metrics(empty, empty, SPACING, metrics=ALL_METRICS)
    for key in ("Dice", "IoU", "HD95", "ASSD", "NSD"):
        assert math.isnan(both[key]), key
    assert both["TN"] == empty.size and both["n_pred"] == both["n_ref"] == 0
    for pred, ref in ((empty, blob), (blob, empty)):
        one = compute_metrics(pred, ref, SPACING, metrics=ALL_METRICS)
        assert (one["Dice"], one["IoU"], one["NSD"]) == (0.0, 0.0, 0.0)
        assert one["HD95"] == math.inf and one["ASSD"] == math.inf
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty, SPACING))


def test_zero_padding_and_border_masks_do_not_change_values():
    """Masks touching the array border: their border voxels are surface (outside = background),
    so padding with background must not change anything (guards the bounding-box crop)."""
    rng = np.random.default_rng(1)
    pred, ref = _blob(rng, (14, 12, 10), sigma=2, frac=0.6), _blob(rng, (14, 12, 10), sigma=2, frac=0.5)
    assert pred[0].any() and ref[:, :, -1].any()
    a = compute_metrics(pred, ref, SPACING, metrics=ALL_METRICS)
    pad = ((3, 1), (0, 5), (2, 2))
    b = compute_metrics(np.pad(pred, pad), np.pad(ref, pad), SPACING, metrics=ALL_METRICS)
    for key in ("Dice", "IoU", "HD95", "ASSD", "NSD"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_bad_arguments():
    m = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(m, m, metrics=["dice", "hd100"])
    with pytest.raises(ValueError, match="tolerance"):
        nsd(m, m, SPACING, tolerance_mm=-1)
    with pytest.raises(ValueError, match="shape"):
        dice(m, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, (1.0, 0.0, 1.0))


def _blob(rng, shape, sigma=2.5, frac=0.75):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, frac)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_monai(seed):
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric

    rng = np.random.default_rng(seed)
    shape, spacing, tol = (30, 26, 20), (0.8, 1.1, 2.5), 2.0
    pred, ref = _blob(rng, shape), _blob(rng, shape)
    ours = compute_metrics(pred, ref, spacing, metrics=ALL_METRICS, nsd_tolerance_mm=tol)
    assert 0.05 < ours["Dice"] < 0.95  # a non-trivial pair

    def onehot(m):
        return torch.from_numpy(m)[None, None].float()

    monai = {
        "Dice": DiceMetric(include_background=True),
        "HD95": HausdorffDistanceMetric(include_background=True, percentile=95),
        "ASSD": SurfaceDistanceMetric(include_background=True, symmetric=True),
        "NSD": SurfaceDiceMetric([tol], include_background=True),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, metric in monai.items():
            kwargs = {} if key == "Dice" else {"spacing": spacing}
            metric(onehot(pred), onehot(ref), **kwargs)
            assert ours[key] == pytest.approx(metric.aggregate().item(), rel=1e-5), key


def test_ignored_voxels_count_nowhere():
    ref = np.zeros((12, 12, 12), bool)
    ref[2:6, 2:6, 2:6] = True
    ignore = np.zeros_like(ref)
    ignore[8:11, 8:11, 8:11] = True
    pred = ref | ignore  # the prediction paints the ignored region too
    m = compute_metrics(pred, ref, 1.0, metrics=ALL_METRICS, ignore=ignore)
    assert m["Dice"] == 1.0 and m["IoU"] == 1.0 and m["HD95"] == 0.0 and m["ASSD"] == 0.0 and m["NSD"] == 1.0
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (64, 0, 0, 12**3 - 64 - 27)
    assert confusion(pred, ref, ignore)["FP"] == 0
    unmasked = compute_metrics(pred, ref, 1.0, metrics=("dice",))
    assert unmasked["FP"] == 27 and unmasked["Dice"] < 1.0
