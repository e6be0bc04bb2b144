"""Synthetic CT phantoms: deterministic, CT-like numbers, anatomy fixed in world space across orientations."""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage

from medseg.data.datasets import discover_cases
from medseg.data.phantoms import LABELS, make_phantom_case, make_phantom_dataset
from medseg.io import read_volume, reorient


def _world_centroid(vol, mask):
    return vol.affine[:3, :3] @ np.argwhere(mask).mean(0) + vol.affine[:3, 3]


def test_deterministic_by_seed():
    a_img, a_lab = make_phantom_case([3, 1])
    b_img, b_lab = make_phantom_case([3, 1])
    c_img, _ = make_phantom_case([3, 2])
    assert np.array_equal(a_img.array, b_img.array) and np.array_equal(a_lab.array, b_lab.array)
    assert np.array_equal(a_img.affine, b_img.affine)
    assert a_img.shape != c_img.shape or not np.array_equal(a_img.array, c_img.array)


def test_ct_numbers_and_contrast():
    img, lab = make_phantom_case(11, noise_hu=15.0)
    hu, lb = img.array.astype(np.float64), lab.array
    core = {v: ndimage.binary_erosion(lb == v) for v in LABELS.values()}  # away from partial-volume edges
    med = {name: float(np.median(hu[core[v]])) for name, v in LABELS.items() if v and core[v].sum() > 10}
    assert abs(med["liver"] - 60) < 8 and abs(med["spleen"] - 45) < 8 and abs(med["kidney"] - 30) < 10
    assert 8 <= med["liver"] - med["spleen"] <= 25  # liver and spleen differ by ~10-20 HU
    if "lesion" in med:
        assert med["liver"] - med["lesion"] > 20  # hypodense lesions
    assert np.median(hu[(lb == 0) & (hu < -500)]) < -950  # air outside
    assert (hu > 500).sum() > 50  # bone (spine, ribs)
    assert -150 < np.percentile(hu[(hu > -500) & (lb == 0)], 20) < 0  # fat present in the body
    # noise: liver voxels scatter by about the requested sigma (texture adds a little)
    assert 12 < float(np.std(hu[lb == 1])) < 25
    assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8


def test_anatomy_stays_in_world_space_whatever_the_orientation():
    ref_img, ref_lab = make_phantom_case(5, orientation="RAS", noise_hu=0.0)
    r_img, _ = reorient(ref_img)
    r_lab, _ = reorient(ref_lab)
    for code in ("LPS", "PLS", "LPI"):
        img, lab = make_phantom_case(5, orientation=code, noise_hu=0.0)
        assert img.orientation == code
        assert not np.array_equal(lab.array.shape, ref_lab.array.shape) or not np.array_equal(lab.array, ref_lab.array)
        ro_img, _ = reorient(img)
        ro_lab, _ = reorient(lab)
        assert np.abs(ro_img.affine - r_img.affine).max() < 1e-6
        assert np.array_equal(ro_lab.array, r_lab.array) and np.array_equal(ro_img.array, r_img.array)
    # liver on the patient's right (+x in RAS), spleen left; kidneys below the liver
    liver, spleen = _world_centroid(ref_lab, ref_lab.array == 1), _world_centroid(ref_lab, ref_lab.array == 2)
    kidney = _world_centroid(ref_lab, ref_lab.array == 3)
    assert liver[0] > spleen[0] + 10 and kidney[2] < liver[2]


def test_spacing_ranges_and_oblique():
    sp = np.array([make_phantom_case([0, i])[0].spacing for i in range(6)])
    phys = np.sort(sp, axis=1)  # in-plane pair first, slices last
    assert np.all((phys[:, :2] >= 0.8) & (phys[:, :2] <= 1.2)) and np.all((phys[:, 2] >= 1.5) & (phys[:, 2] <= 3.0))
    img, _ = make_phantom_case(1, oblique_deg=20.0, orientation="LPS")
    r = img.affine[:3, :3] / img.spacing
    assert abs(abs(r[0, 0]) - np.cos(np.deg2rad(20))) < 1e-6


def test_dataset_folder(tmp_path):
    root = make_phantom_dataset(tmp_path / "ph", n_train=4, n_test=2, seed=1, shape=(32, 32, 16))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == LABELS and meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 4
    info = discover_cases(root)
    assert [c.name for c in info.cases] == [f"phantom_{i:03d}" for i in range(4)]
    assert [c.name for c in info.test_cases] == ["phantom_004", "phantom_005"]
    assert all(c.label is not None for c in info.cases + info.test_cases)
    codes = {read_volume(c.images[0]).orientation for c in info.cases}
    assert len(codes) == 4  # mixed orientations
    img, lab = read_volume(info.cases[1].images[0]), read_volume(info.cases[1].label)
    assert np.array_equal(img.affine, lab.affine) and img.shape == lab.shape
