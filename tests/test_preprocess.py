"""preprocess_volume / restore_to_original: geometry, normalization, round trips (numbers asserted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.data.preprocess import (
    check_ct_intensities,
    normalize,
    preprocess_volume,
    restore_to_original,
)
from medseg.errors import GeometryError, InputError
from medseg.io import Volume, read_volume, spacing_from_affine


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def rot(axis: int, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(code: str, spacing, shape, *, oblique_deg: float = 0.0) -> np.ndarray:
    """Affine with axis directions ``code`` (e.g. 'LPS'), centred on the world origin."""
    dirs = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    m = np.zeros((3, 3))
    for col, ch in enumerate(code):
        ax, sign = dirs[ch]
        m[ax, col] = sign * spacing[col]
    m = rot(2, oblique_deg) @ rot(0, oblique_deg / 2) @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = -m @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def world_grid(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def synthetic_case(code="RAS", spacing=(1.0, 1.0, 1.0), shape=(48, 44, 36), oblique_deg=0.0, seed=0):
    """CT-like body (ellipsoid, 40 HU, air -1000) with an off-centre 'organ' (label 1) defined in world mm."""
    aff = make_affine(code, spacing, shape, oblique_deg=oblique_deg)
    w = world_grid(aff, shape)
    body = (w[..., 0] / 21) ** 2 + (w[..., 1] / 18) ** 2 + (w[..., 2] / 60) ** 2 < 1
    organ = ((w[..., 0] - 4) / 13) ** 2 + ((w[..., 1] + 2) / 10) ** 2 + ((w[..., 2] - 1) / 12) ** 2 < 1
    rng = np.random.default_rng(seed)
    img = np.where(body, 40.0, -1000.0) + np.where(organ, 30.0, 0.0) + rng.normal(0, 10, shape)
    return Volume(img.astype(np.float32), aff, f"{code}.nii.gz"), Volume(organ.astype(np.uint8), aff, f"{code}_seg.nii.gz")


def plans_for(spacing=(1.2, 1.2, 1.6), norm=None):
    return {
        "target_spacing": list(spacing),
        "labels": {"background": 0, "organ": 1},
        "normalization": norm or {"scheme": "ct", "clip": [-1000.0, 200.0], "mean": 50.0, "std": 20.0},
    }


@pytest.mark.parametrize(
    "code,spacing,oblique",
    [("RAS", (1.0, 1.0, 1.0), 0.0), ("LPS", (0.8, 0.9, 2.5), 0.0), ("LAS", (1.2, 0.7, 1.5), 0.0),
     ("PIR", (1.0, 2.0, 0.9), 0.0), ("LPS", (0.9, 0.9, 2.0), 20.0)],
)
def test_geometry_and_label_round_trip(code, spacing, oblique):
    img, lab = synthetic_case(code, spacing, oblique_deg=oblique)
    plans = plans_for()
    x, y, props = preprocess_volume(img, plans, lab)
    assert x.dtype == np.float32 and x.ndim == 4 and x.shape[0] == 1
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert props["shape"] == list(x.shape[1:])
    # output spacing equals the plan (up to the rounding of the voxel count), axes point to +RAS
    aff = np.asarray(props["affine"])
    assert np.allclose(spacing_from_affine(aff), plans["target_spacing"], rtol=0.05)
    assert np.allclose(props["spacing"], spacing_from_affine(aff))
    if oblique == 0:
        assert np.all(np.diag(aff[:3, :3]) > 0) and np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3])), atol=1e-6)
    # the label sits at the same world position (centroid within half a target voxel)
    c_orig = lab.affine[:3, :3] @ np.argwhere(lab.array).mean(0) + lab.affine[:3, 3]
    c_pre = aff[:3, :3] @ np.argwhere(y[0]).mean(0) + aff[:3, 3]
    assert np.linalg.norm(c_orig - c_pre) < 0.75
    # back on the original grid: nearest and linear-on-one-hot keep Dice > 0.96 / 0.975 (a ~25 mm organ)
    back = restore_to_original(y, props, mode="nearest")
    assert back.shape == (1, *lab.shape) and back.dtype == np.uint8
    onehot = np.stack([y[0] == 0, y[0] == 1]).astype(np.float32)
    soft = restore_to_original(onehot, props, mode="linear", fill=[1.0, 0.0])
    assert soft.shape == (2, *lab.shape)
    assert dice(back[0], lab.array) > 0.96
    assert dice(soft.argmax(0), lab.array) > 0.975
    # an image pushed back lands where it came from (body region, in HU after undoing the z-score)
    raw = restore_to_original(x, props, fill=[(-1000 - 50) / 20.0])[0] * 20 + 50
    body = img.array > -500
    assert abs(float(np.median(raw[body])) - float(np.median(np.clip(img.array[body], -1000, 200)))) < 8


def test_restore_keeps_tensor_device_and_dtype():
    img, lab = synthetic_case("LPS", (0.9, 0.9, 2.0))
    x, y, props = preprocess_volume(img, plans_for(), lab)
    t = torch.from_numpy(x).to(torch.float16)
    out = restore_to_original(t, props, fill=0.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float16 and out.shape == (1, *img.shape)
    out_n = restore_to_original(torch.from_numpy(y), props, mode="nearest")
    assert out_n.dtype == torch.uint8
    assert dice(out_n[0].numpy(), lab.array) > 0.93


def test_ct_normalization_foreground_is_standardized():
    img, lab = synthetic_case("RAS", (1.0, 1.0, 1.0))
    body = img.array > -500
    fg = img.array[body]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    plans = plans_for((1.0, 1.0, 1.0), {"scheme": "ct", "clip": [float(lo), float(hi)],
                                         "mean": float(fg.mean()), "std": float(fg.std())})
    x, _, props = preprocess_volume(img, plans)
    # at the original spacing a RAS grid is only cropped: the foreground is the body in the box
    box = tuple(slice(lo, hi) for lo, hi in props["bbox"])
    assert props["resampled_shape"] == list(img.shape) and x.shape[1:] == img.array[box].shape
    xb = x[0][body[box]]
    assert abs(float(xb.mean())) < 0.05 and abs(float(xb.std()) - 1.0) < 0.05


def test_window_normalization_range():
    a = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=np.float32)
    out = normalize(a.copy(), {"scheme": "window", "window": [-1000.0, 1000.0]})
    assert np.allclose(out, [-1, -1, 0, 1, 1])


def test_crop_contains_body_and_not_much_more():
    img, lab = synthetic_case("RAS", (1.0, 1.0, 1.0), shape=(60, 60, 30))
    x, y, props = preprocess_volume(img, plans_for((1.0, 1.0, 1.0)), lab)
    # body: |x| < 21 mm, |y| < 18 mm -> ~43 x 37 voxels plus a 3-voxel margin each side
    assert 42 <= props["shape"][0] <= 50 and 36 <= props["shape"][1] <= 44
    assert int(y.sum()) == int(lab.array.sum())
    locs = props["class_locations"]["1"]
    assert len(locs) == int(y.sum()) and all(y[0][tuple(p)] == 1 for p in locs[:50])


def test_bad_inputs_raise_input_errors():
    img, lab = synthetic_case("RAS")
    with pytest.raises(GeometryError, match="does not share physical space"):
        moved = Volume(lab.array, lab.affine @ np.diag([1, 1, 1.2, 1]), "moved_seg.nii.gz")
        preprocess_volume(img, plans_for(), moved)
    bad = lab.with_array(np.where(lab.array > 0, 7, 0).astype(np.uint8))
    with pytest.raises(InputError, match=r"label values \[7\] are not declared"):
        preprocess_volume(img, plans_for(), bad)
    mr = img.with_array(np.abs(img.array + 1000) * 0.5)
    with pytest.raises(InputError, match="intensities do not look like CT"):
        preprocess_volume(mr, plans_for())


def test_real_mr_is_flagged(real_ct):
    path = real_ct / "mr_example" / "example_mr_sm.nii.gz"
    with pytest.raises(InputError, match=r"example_mr_sm.nii.gz: intensities do not look like CT \(min -47"):
        check_ct_intensities(read_volume(path).array, str(path))
