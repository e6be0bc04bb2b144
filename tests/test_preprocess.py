"""preprocess_volume / restore_to_original: geometry, normalization, round trips (numbers asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.data.checks import check_ct_intensities
from medseg.data.preprocess import normalize, preprocess_volume, restore_to_original
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


# --------------------------------------------------------------------------- phantoms / real data round trips
def _onehot_restore(y: np.ndarray, props: dict, k: int) -> np.ndarray:
    """What inference does: one-hot (probabilities) back to the original grid, arg-max there."""
    oh = torch.nn.functional.one_hot(torch.from_numpy(y[0]).long(), k).permute(3, 0, 1, 2).float()
    return restore_to_original(oh, props, fill=[1.0] + [0.0] * (k - 1)).argmax(0).numpy()


PHANTOM_PLANS = {"target_spacing": [1.0, 1.0, 2.0], "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lesion": 4},
                 "normalization": {"scheme": "ct", "clip": [-20.0, 100.0], "mean": 50.0, "std": 20.0}}


@pytest.mark.parametrize("kw", [dict(orientation="LPS", spacing=(0.9, 0.9, 2.5)),
                                dict(orientation="LPS", oblique_deg=15.0),
                                dict(orientation="LAS", spacing=(0.8, 0.8, 3.0))], ids=["LPS", "oblique", "anisotropic"])
def test_phantom_label_survives_preprocess_and_restore(kw):
    from medseg.data.phantoms import make_phantom_case

    img, lab = make_phantom_case(2, shape=(96, 96, 48), **kw)
    x, y, props = preprocess_volume(img, PHANTOM_PLANS, lab)
    assert np.allclose(props["spacing"], PHANTOM_PLANS["target_spacing"], rtol=0.03)
    back = _onehot_restore(y, props, 5)
    assert back.shape == lab.shape
    assert dice(back, lab.array) >= 0.98  # all foreground
    assert dice(back == 1, lab.array == 1) >= 0.98  # liver
    near = restore_to_original(y, props, mode="nearest")[0]
    assert dice(near, lab.array) >= 0.97


def _real_round_trip(image_path, label_path, spacing, classes):
    img, lab = read_volume(image_path), read_volume(label_path)
    plans = {"target_spacing": spacing, "labels": {str(i): i for i in range(6)},
             "normalization": {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 300.0}}
    x, y, props = preprocess_volume(img, plans, lab)
    back = _onehot_restore(y, props, int(lab.array.max()) + 1)
    for c in classes:
        assert dice(back == c, lab.array == c) >= 0.98, c
    return props


def test_real_dicom_case_round_trip(real_ct):
    organs = real_ct / "organs"
    props = _real_round_trip(organs / "dicom" / "ts_upperabd_dicom20", organs / "labelsTs" / "ts_upperabd_dicom20.nii.gz",
                             [1.5, 1.5, 2.5], [1, 2])
    assert props["original_shape"] == [512, 512, 20]
    # the label on its own (y-flipped) grid preprocesses to the same voxels as the DICOM-grid label
    own = read_volume(organs / "dicom" / "ts_upperabd_dicom20_label_own_grid.nii.gz")
    ref = read_volume(organs / "labelsTs" / "ts_upperabd_dicom20.nii.gz")
    img = read_volume(organs / "imagesTs" / "ts_upperabd_dicom20.nii.gz")
    plans = {"target_spacing": [1.5, 1.5, 2.5], "labels": {str(i): i for i in range(6)}, "normalization": {"scheme": "none"}}
    with pytest.raises(GeometryError):
        preprocess_volume(img, plans, own)  # same physical space but another voxel grid: not accepted as is
    _, y_ref, p_ref = preprocess_volume(img, plans, ref)
    img_own = Volume(np.flip(img.array, 1).copy(), own.affine, "flipped")
    _, y_own, p_own = preprocess_volume(img_own, plans, own)
    assert np.allclose(p_ref["affine"], p_own["affine"], atol=1e-4) and np.array_equal(y_ref, y_own)


def test_real_abdomen_3mm_round_trip(real_ct):
    organs = real_ct / "organs"
    _real_round_trip(organs / "imagesTr" / "ts_abdpelvis_3mm.nii.gz", organs / "labelsTr" / "ts_abdpelvis_3mm.nii.gz",
                     [1.5, 1.5, 2.5], [1, 2, 3])


@pytest.mark.slow
def test_real_chest_512_round_trip_and_speed(real_ct):
    import time

    organs = real_ct / "organs"
    t0 = time.time()
    props = _real_round_trip(organs / "imagesTr" / "lidc0001_chest.nii.gz", organs / "labelsTr" / "lidc0001_chest.nii.gz",
                             [1.5, 1.5, 2.5], [1, 2, 3, 4, 5])
    assert props["original_shape"] == [512, 512, 133]
    assert time.time() - t0 < 60


# --------------------------------------------------------------------------- dataset pipeline and CLI
def _phantoms(root, n=5, shape=(32, 32, 16)):
    from medseg.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(root, n_train=n, n_test=0, seed=3, shape=shape)


def _cli(capsys, *argv):
    from medseg.cli import main

    code = main(["preprocess", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_end_to_end_and_rerun(tmp_path, capsys):
    import json

    from medseg.data.pipeline import load_case

    data, out = _phantoms(tmp_path / "ph"), tmp_path / "pre"
    code, text = _cli(capsys, "--data", data, "--out", out, "--workers", "2")
    assert code == 0, text
    assert "preprocessed 5 of 5 cases" in text and "5 new" in text and "target spacing" in text
    plans = json.loads((out / "plans.json").read_text())
    for key in ("dataset_name", "labels", "num_classes", "channel_names", "target_spacing", "normalization",
                "patch_size", "fingerprint", "axis_order"):
        assert key in plans
    assert plans["num_classes"] == 5 and plans["axis_order"] == "RAS"
    assert all(p % 16 == 0 for p in plans["patch_size"])
    assert json.loads((out / "dataset.json").read_text()) == json.loads((data / "dataset.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    assert splits["seed"] == 12345 and len(splits["folds"]) == 5
    norm = plans["normalization"]
    fg = []
    for name in splits["cases"]:
        image, label, props = load_case(out, name)
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape[1:] == label.shape[1:]
        assert list(image.shape[1:]) == props["shape"]
        # output spacing equals the plan (to the rounding of the voxel count)
        assert np.allclose(props["spacing"], plans["target_spacing"], rtol=0.06)
        assert np.allclose(spacing_from_affine(np.asarray(props["affine"])), props["spacing"])
        fg.append(image[0][label[0] > 0])
    fg = np.concatenate(fg)
    assert norm["scheme"] == "ct" and abs(float(fg.mean())) < 0.15 and abs(float(fg.std()) - 1.0) < 0.15
    # a re-run skips finished cases; other data settings need --overwrite
    code, text = _cli(capsys, "--data", data, "--out", out)
    assert code == 0 and "0 new, 5 already done" in text
    code, text = _cli(capsys, "--data", data, "--out", out, "data.normalization=window")
    assert code == 2 and "plans.json: was planned with other data settings (normalization: ct -> window)" in text
    code, text = _cli(capsys, "--data", data, "--out", out, "--overwrite", "data.normalization=window", "data.hu_window=[-200,300]")
    assert code == 0 and "5 new" in text
    image, _, _ = load_case(out, "phantom_000")
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_interrupted_case_is_never_half_written(tmp_path, monkeypatch):
    from medseg.data import pipeline

    data, out = _phantoms(tmp_path / "ph", n=2), tmp_path / "pre"
    real_save, calls = pipeline._save_npy, []

    def flaky(path, array):
        calls.append(path)
        if len(calls) == 2:  # the first case's label: Ctrl-C after its image was written
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(pipeline, "_save_npy", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.preprocess_dataset(data, out, progress=False)
    cases = out / "cases"
    assert not list(cases.glob("*.json")) and not list(cases.glob(".*"))  # no properties, no temp files
    monkeypatch.setattr(pipeline, "_save_npy", real_save)
    report = pipeline.preprocess_dataset(data, out, progress=False)
    assert report.ok and sorted(report.done) == ["phantom_000", "phantom_001"]


def _bad_dataset(root):
    """Two good phantoms plus one bad case per kind of problem."""
    import gzip
    import json

    import nibabel as nib

    from medseg.io import write_volume

    _phantoms(root, n=2)
    img = read_volume(root / "imagesTr" / "phantom_000_0000.nii.gz")
    lab = read_volume(root / "labelsTr" / "phantom_000.nii.gz")

    def case(name, image, label):
        if image is not None:
            write_volume(image, root / "imagesTr" / f"{name}_0000.nii.gz")
        write_volume(label, root / "labelsTr" / f"{name}.nii.gz")

    raw = gzip.decompress((root / "imagesTr" / "phantom_000_0000.nii.gz").read_bytes())
    (root / "imagesTr" / "trunc_0000.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    case("trunc", None, lab)
    case("moved", img, Volume(lab.array, lab.affine @ np.diag([1.0, 1.0, 1.1, 1.0])))
    case("mr", img.with_array((np.abs(img.array.astype(np.float32) + 1000) * 0.4).astype(np.int16)), lab)
    case("badvalues", img, lab.with_array(np.where(lab.array == 1, 9, lab.array).astype(np.uint8)))
    case("empty", img, lab.with_array(np.zeros_like(lab.array)))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), root / "imagesTr" / "fourd_0000.nii.gz")
    case("fourd", None, Volume(np.zeros((8, 8, 8), np.uint8), np.eye(4)))
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), root / "imagesTr" / "flat_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)), root / "labelsTr" / "flat.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    return root, meta


def test_cli_reports_each_bad_case_and_exits_2(tmp_path, capsys):
    data, _ = _bad_dataset(tmp_path / "bad")
    out = tmp_path / "pre"
    code, text = _cli(capsys, "--data", data, "--out", out, "--workers", "2")
    assert code == 2, text
    assert "preprocessed 3 of 9 cases" in text and "6 failed" in text
    expect = {
        "trunc": "trunc_0000.nii.gz: cannot read voxel data",
        "moved": "moved.nii.gz: label does not share physical space with image",
        "mr": "mr_0000.nii.gz: intensities do not look like CT (min",
        "badvalues": "badvalues.nii.gz: label values [9] are not declared in dataset.json labels",
        "fourd": "fourd_0000.nii.gz: is a 4-D image",
        "flat": "flat_0000.nii.gz: is a 2-D image",
    }
    for case, msg in expect.items():
        assert f"{case}: " in text and msg in text, (case, text)
    # an empty label is accepted with a warning (a negative example), documented in --help
    assert "warning: empty: " in text and "empty.nii.gz: label is empty" in text
    assert (out / "cases" / "empty.json").is_file() and not (out / "cases" / "mr.json").exists()
    assert "Traceback" not in text


def test_cli_missing_file_and_folder(tmp_path, capsys):
    data = _phantoms(tmp_path / "ph", n=2)
    (data / "labelsTr" / "phantom_001.nii.gz").unlink()
    code, text = _cli(capsys, "--data", data, "--out", tmp_path / "pre")
    assert code == 2 and "labelsTr/phantom_001.nii.gz: file not found" in text
    code, text = _cli(capsys, "--data", tmp_path / "nowhere", "--out", tmp_path / "pre")
    assert code == 2 and "nowhere: dataset folder not found" in text
    code, text = _cli(capsys, "--data", data, "--out", tmp_path / "pre", "train.epochs=3")
    assert code == 2 and "data.* and model.* overrides only" in text


def test_real_mr_fails_preprocess_with_a_named_reason(real_ct, tmp_path, capsys):
    import shutil

    from medseg.io import write_volume

    root = tmp_path / "mr"
    (root / "imagesTr").mkdir(parents=True)
    shutil.copy(real_ct / "mr_example" / "example_mr_sm.nii.gz", root / "imagesTr" / "mr_0000.nii.gz")
    mr = read_volume(root / "imagesTr" / "mr_0000.nii.gz")
    write_volume(mr.with_array((mr.array > 300).astype(np.uint8)), root / "labelsTr" / "mr.nii.gz")
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}}')
    code, text = _cli(capsys, "--data", root, "--out", tmp_path / "pre")
    assert code == 2 and "mr_0000.nii.gz: intensities do not look like CT (min -47, max 833" in text


# --------------------------------------------------------------------------- fingerprint and plan
def test_target_spacing_follows_nnunet_rule():
    from medseg.data.plan import target_spacing_nnunet

    # isotropic-ish data: per-axis median
    sp = [[0.8, 0.8, 1.0], [1.0, 1.0, 1.5], [0.7, 0.7, 1.25]]
    assert np.allclose(target_spacing_nnunet(sp, [[300, 300, 200]] * 3), [0.8, 0.8, 1.25])
    # strongly anisotropic (5 mm slices, few of them): the slice axis takes the 10th percentile
    sp = [[0.7, 0.7, 5.0], [0.8, 0.8, 5.0], [0.75, 0.75, 1.0], [0.7, 0.7, 5.0], [0.8, 0.8, 5.0]]
    shapes = [[512, 512, 40]] * 5
    t = target_spacing_nnunet(sp, shapes)
    assert np.allclose(t[:2], [0.75, 0.75]) and np.isclose(t[2], np.percentile([5, 5, 1, 5, 5], 10))
    # anisotropic spacing but as many voxels along z (no exception): plain median
    assert np.isclose(target_spacing_nnunet(sp, [[100, 100, 100]] * 5)[2], 5.0)


def test_patch_size_fits_budget_aspect_and_divisor():
    from medseg.data.plan import BYTES_PER_VOXEL, PLAN_BATCH_SIZE, suggest_patch_size

    big = suggest_patch_size([400, 300, 200], memory_budget_gb=8.0)
    assert all(p % 16 == 0 for p in big)
    assert np.prod(big) * PLAN_BATCH_SIZE * BYTES_PER_VOXEL <= 8e9
    assert big[0] > big[1] > big[2]  # follows the median shape's aspect
    assert suggest_patch_size([400, 300, 200], memory_budget_gb=2.0) < big  # smaller budget, smaller patch
    small = suggest_patch_size([50, 40, 20], memory_budget_gb=8.0)
    assert small == [64, 48, 32]  # capped by the median shape (rounded up to the divisor)
    assert all(p % 8 == 0 for p in suggest_patch_size([200, 200, 90], memory_budget_gb=1.0, divisor=8))
    assert suggest_patch_size([400, 400, 400], memory_budget_gb=0.001) == [16, 16, 16]


def test_patch_size_scales_with_the_network_width():
    from medseg.config import ModelConfig
    from medseg.data.plan import BYTES_PER_VOXEL, PLAN_BATCH_SIZE, model_plan_args, suggest_patch_size

    ref = suggest_patch_size([400, 300, 200], memory_budget_gb=8.0)  # nnU-Net's 32-feature reference
    narrow = suggest_patch_size([400, 300, 200], memory_budget_gb=8.0, features=16)
    wide = suggest_patch_size([400, 300, 200], memory_budget_gb=8.0, features=64)
    assert np.prod(wide) < np.prod(ref) < np.prod(narrow)
    assert np.prod(narrow) * PLAN_BATCH_SIZE * BYTES_PER_VOXEL * 16 / 32 <= 8e9  # still within the budget
    assert np.prod(narrow) > 1.6 * np.prod(ref)  # about twice the voxels (up to the divisor rounding)
    assert model_plan_args(None) == {"divisor": 16, "features": 32}
    args = model_plan_args(ModelConfig(channels=[24, 48, 96, 192], strides=[1, [2, 2, 1], 2, 2]))
    assert args == {"divisor": [8, 8, 4], "features": 24}
    stem = model_plan_args(ModelConfig(channels=[16, 32, 64, 128], strides=[2, 2, 2, 2]))
    assert stem == {"divisor": [16, 16, 16], "features": 2.0}  # widest map at 1/8 of the voxels
    from medseg.config import load_config

    unet25d = load_config(Path(__file__).resolve().parents[1] / "configs" / "unet25d.yaml").model
    assert model_plan_args(unet25d)["divisor"][2] == 1  # the net's own divisor: 2.5D never downsamples z


def test_fingerprint_and_plan_numbers(tmp_path):
    from medseg.config import DataConfig
    from medseg.data.datasets import discover_cases
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.data.plan import make_plan
    from medseg.errors import ConfigError
    from medseg.io import write_volume

    rng = np.random.default_rng(0)
    for i, (code, sp) in enumerate([("RAS", (1.0, 1.0, 2.0)), ("LPS", (0.8, 0.8, 3.0)), ("LAS", (1.2, 1.2, 2.5))]):
        img, lab = synthetic_case(code, sp, seed=i)
        organ = lab.array > 0
        hu = img.array.copy()
        hu[organ] = rng.normal(100.0, 10.0, organ.sum())  # foreground ~ N(100, 10)
        write_volume(img.with_array(hu), tmp_path / "imagesTr" / f"c{i}_0000.nii.gz")
        write_volume(lab, tmp_path / "labelsTr" / f"c{i}.nii.gz")
    (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}}')
    fp = compute_fingerprint(discover_cases(tmp_path), progress=False)
    st = fp["foreground_intensity_properties_per_channel"]["0"]
    assert abs(st["mean"] - 100) < 1 and abs(st["std"] - 10) < 1 and abs(st["median"] - 100) < 1
    assert abs(st["percentile_00_5"] - (100 - 2.576 * 10)) < 3 and abs(st["percentile_99_5"] - (100 + 2.576 * 10)) < 3
    assert np.allclose(fp["median_spacing"], [1.0, 1.0, 2.5]) and fp["spacings"][1] == pytest.approx([0.8, 0.8, 3.0])
    plans = make_plan(fp, DataConfig())
    assert plans["target_spacing"] == pytest.approx([1.0, 1.0, 2.5])
    assert plans["normalization"] == {"scheme": "ct", "clip": [st["percentile_00_5"], st["percentile_99_5"]],
                                      "mean": st["mean"], "std": st["std"]}
    assert plans["labels"] == {"background": 0, "organ": 1} and plans["num_classes"] == 2
    fixed = make_plan(fp, DataConfig(target_spacing=[1.5, 1.5, 1.5], normalization="window", hu_window=[-100.0, 200.0]))
    assert fixed["target_spacing"] == [1.5, 1.5, 1.5] and fixed["normalization"] == {"scheme": "window", "window": [-100.0, 200.0]}
    with pytest.raises(ConfigError, match="data.normalization: 'zscore'"):
        make_plan(fp, DataConfig(normalization="zscore"))
    with pytest.raises(ConfigError, match="data.target_spacing"):
        make_plan(fp, DataConfig(target_spacing=[1.0, -1.0, 1.0]))


@pytest.mark.parametrize("arch", ["unet", "monai_unet", "monai_attention_unet", "monai_dynunet"])
def test_planner_divisor_is_the_built_nets_without_building_one(arch, monkeypatch):
    """model_plan_args reads the divisor and stem from the config (patch_geometry), never building a
    net; it agrees with every built net of every shipped config."""
    import dataclasses

    import medseg.nn as mnn
    from medseg.config import load_config
    from medseg.configs import shipped_configs
    from medseg.data.plan import model_plan_args
    from medseg.errors import ConfigError
    from medseg.nn.factory import patch_geometry

    checked = 0
    for name, path in shipped_configs().items():
        model = load_config(path).model
        if arch != "unet":
            if model.slices > 1:
                continue  # 2.5D is built on our unet only
            model = dataclasses.replace(model, arch=arch, block_attention=type(model.block_attention)(),
                                        skip_fusion=type(model.skip_fusion)(), deep_supervision=False)
        try:
            net = mnn.build_model(model, num_classes=3, spacing=(1.0, 1.0, 2.0))
        except ConfigError:
            continue  # a baseline refusing this config (e.g. a strided stem): nothing to plan
        geo = patch_geometry(model)
        assert geo["divisor"] == tuple(net.patch_divisor), name
        stem = tuple(getattr(net, "stem_stride", (1, 1, 1)))  # 2-D nets: (x, y); MONAI baselines: none
        assert geo["stem"] == stem + (1,) * (3 - len(stem)), name
        checked += 1
    assert checked >= (10 if arch == "unet" else 5)
    monkeypatch.setattr(mnn, "build_model", lambda *a, **k: pytest.fail("the planner built a network"))
    assert model_plan_args(load_config("real_organs").model) == {"divisor": [32, 32, 32], "features": 2.0}
