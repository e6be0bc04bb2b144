"""NaN / inf voxels are refused by name and count: preprocessing (CLI) and inference."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import InputError
from medseg.io import Volume, read_volume, write_volume


def _poison(path, n_nan=0, n_inf=0):
    """Rewrite an image as float32 with ``n_nan`` NaN and ``n_inf`` +inf voxels."""
    vol = read_volume(path)
    arr = vol.array.astype(np.float32).ravel()
    arr[:n_nan] = np.nan
    arr[n_nan:n_nan + n_inf] = np.inf
    write_volume(vol.with_array(arr.reshape(vol.shape)), path)
    return path


def test_check_finite_counts_nan_and_inf():
    from medseg.data.checks import check_finite

    check_finite(np.zeros((4, 4, 4), np.int16), "x.nii.gz")  # integers are always finite
    check_finite(np.zeros((4, 4, 4), np.float32), "x.nii.gz")
    arr = np.zeros((10, 10, 10), np.float32)
    arr.ravel()[:7] = np.nan
    arr.ravel()[7:10] = -np.inf
    with pytest.raises(InputError, match=r"x.nii.gz: 7 NaN and 3 infinite voxel\(s\) of 1000"):
        check_finite(arr, "x.nii.gz")


def test_preprocess_refuses_a_nan_image_by_name_and_count(tmp_path, capsys):
    from medseg.cli import main
    from medseg.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "raw", n_train=3, n_test=0, seed=3, shape=(32, 32, 16))
    bad = _poison(data / "imagesTr" / "phantom_001_0000.nii.gz", n_nan=1000)
    _poison(data / "imagesTr" / "phantom_002_0000.nii.gz", n_inf=5)
    out = tmp_path / "pre"
    code = main(["preprocess", "--data", str(data), "--out", str(out), "--no-progress"])
    text = "".join(capsys.readouterr())
    assert code == 2, text
    assert f"{bad}: 1000 NaN and 0 infinite voxel(s)" in text
    assert "phantom_002_0000.nii.gz: 0 NaN and 5 infinite voxel(s)" in text
    assert "preprocessed 1 of 3 cases" in text
    # the refused cases leave no file; the good one is complete and finite
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["phantom_000.json", "phantom_000_image.npy",
                                                                  "phantom_000_label.npy"]
    assert np.isfinite(np.load(out / "cases" / "phantom_000_image.npy")).all()


def test_preprocess_volume_refuses_nan_whatever_the_plan(tmp_path):
    from medseg.data.phantoms import make_phantom_case
    from medseg.data.preprocess import preprocess_volume

    image, label = make_phantom_case(0, shape=(24, 24, 12))
    arr = image.array.astype(np.float32)
    arr[3, 3, 3] = np.nan
    plans = {"labels": {"background": 0}, "target_spacing": None, "normalization": {"scheme": "none"}, "ct_check": False}
    with pytest.raises(InputError, match=r"img.nii.gz: 1 NaN and 0 infinite"):
        preprocess_volume(Volume(arr, image.affine, "img.nii.gz"), plans)


def test_inference_refuses_a_nan_image(tmp_path):
    from medseg.data.phantoms import make_phantom_case
    from medseg.infer.predictor import Predictor

    image, _ = make_phantom_case(0, shape=(24, 24, 12))
    path = tmp_path / "ct_0000.nii.gz"
    arr = image.array.astype(np.float32)
    arr[:2] = np.nan
    n_nan = arr[:2].size
    write_volume(image.with_array(arr), path)
    plans = {"labels": {"background": 0, "organ": 1}, "num_classes": 2, "channel_names": {"0": "CT"},
             "target_spacing": [2.0, 2.0, 2.0], "patch_size": [16, 16, 16],
             "normalization": {"scheme": "ct", "clip": [-1000.0, 300.0], "mean": 40.0, "std": 100.0}}
    predictor = Predictor(None, plans, device="cpu", precision="fp32")  # no model: refused before it is needed
    with pytest.raises(InputError, match=rf"ct_0000.nii.gz: {n_nan} NaN and 0 infinite"):
        predictor.predict(path)
