"""Predictor geometry with an oracle: masks come back on the input's exact grid for any orientation.

The oracle returns the preprocessed reference label as one-hot logits, so every error left is
the predictor's own (crop restore, resampling, reorientation). Dice against the original label
in the original grid must stay >= 0.98 for RAS, LPS, LAS, oblique and anisotropic phantoms and
for a real DICOM series whose label lives on a y-flipped grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.data.preprocess import preprocess_volume
from medseg.errors import InputError
from medseg.infer.predictor import Predictor, check_not_label
from medseg.io import (
    Volume,
    read_volume,
    reorient,
    same_space,
    undo_reorient,
    write_volume,
)

PLANS = {
    "dataset_name": "phantom",
    "labels": {"background": 0, "sphere": 1},
    "num_classes": 2,
    "channel_names": {"0": "CT"},
    "target_spacing": [1.5, 1.5, 1.5],
    "normalization": {"scheme": "ct", "clip": [-1000.0, 300.0], "mean": 40.0, "std": 100.0},
    "patch_size": [32, 32, 32],
    "axis_order": "RAS",
}


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def phantom(direction: np.ndarray, spacing, extent_mm: float = 96.0) -> tuple[Volume, Volume]:
    """A CT-like body (-1000 HU air, 40 HU tissue ellipsoid) with a labelled 60 HU sphere, off-centre.

    The object is defined in world coordinates around the origin, so every grid samples the
    same physical phantom; the sphere sits off-centre so that a flip would move it.
    """
    spacing = np.asarray(spacing, dtype=float)
    shape = np.maximum(2, np.round(extent_mm / spacing).astype(int))
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((shape - 1) / 2.0)  # voxel centre of the grid at the world origin
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    body = ((xyz / np.array([40.0, 32.0, 44.0], dtype=np.float32)) ** 2).sum(-1) <= 1.0
    sphere = ((xyz - np.array([12.0, -8.0, 6.0], dtype=np.float32)) ** 2).sum(-1) <= 18.0**2
    image = np.where(body, 40, -1000).astype(np.int16)
    image[sphere] = 60
    rng = np.random.default_rng(0)
    image = (image + rng.normal(0, 5, image.shape)).astype(np.int16)
    return Volume(image, affine), Volume(sphere.astype(np.uint8), affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


class Oracle(Predictor):
    """Returns the preprocessed reference label as one-hot logits (and its foreground as a gate map)."""

    def __init__(self, plans: dict, label: Volume, **kw):
        super().__init__(None, plans, device="cpu", precision="fp32", **kw)
        self.label = label

    def predict_volume(self, vol, **kw):
        self._image = vol
        return super().predict_volume(vol, **kw)

    def predict_preprocessed(self, image, properties, gates=False):
        _, lab, props = preprocess_volume(self._image, self.plans, label=self.label)
        # the label can widen the crop box: cut the predictor's box out of the label's
        assert props["resampled_shape"] == properties["resampled_shape"]
        cut = tuple(slice(b[0] - a[0], b[1] - a[0]) for a, b in zip(props["bbox"], properties["bbox"]))
        lab = lab[0][cut]
        assert lab.shape == image.shape[1:]
        onehot = F.one_hot(torch.from_numpy(np.ascontiguousarray(lab)).long(), self.num_classes).permute(3, 0, 1, 2).float()
        maps = {"gate/oracle": onehot[1:2].clone()} if gates else {}
        return (onehot * 20.0 - 10.0).to(torch.float16), maps


CASES = {
    "RAS": (np.eye(3), (1.25, 1.25, 1.25)),
    "LPS": (np.diag([-1.0, -1.0, 1.0]), (1.25, 1.25, 1.25)),
    "LAS": (np.diag([-1.0, 1.0, 1.0]), (1.25, 1.25, 1.25)),
    "oblique": (rotation(20.0, 10.0), (1.25, 1.25, 1.25)),
    "anisotropic": (np.diag([-1.0, -1.0, 1.0]), (0.8, 1.1, 3.0)),
    "permuted": (np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (1.2, 2.5, 1.5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_oracle_mask_lands_on_the_input_grid(tmp_path, name):
    direction, spacing = CASES[name]
    image, label = phantom(direction, spacing)
    path = write_volume(image, tmp_path / f"{name}_0000.nii.gz")
    image = read_volume(path)  # the file's affine (float32 in NIfTI) is the reference
    oracle = Oracle(PLANS, label)
    res = oracle.predict(path, probabilities=True, gates=True)
    assert res.case == name
    assert res.mask.shape == image.shape and np.array_equal(res.mask.affine, image.affine)
    assert res.mask.array.dtype == np.uint8
    assert dice(res.mask.array, label.array) >= 0.98, dice(res.mask.array, label.array)
    # probabilities: on the input grid, a distribution per voxel, arg-max = mask
    p = res.probabilities.astype(np.float32)
    assert p.shape == (2, *image.shape) and p.min() >= 0.0
    assert np.abs(p.sum(0) - 1.0).max() < 2e-3
    off = p.argmax(0) != res.mask.array  # only float16 near-ties may disagree with the fp32 arg-max
    assert off.mean() < 1e-3 and np.all(np.abs(p[1] - p[0])[off] < 2e-3)
    # the gate map follows the same geometry
    g = res.gates["gate/oracle"]
    assert g.shape == image.shape and np.array_equal(g.affine, image.affine)
    assert 0.0 <= g.array.min() and g.array.max() <= 1.0
    assert dice(g.array > 0.5, label.array) >= 0.97


def test_predict_array_matches_predict(tmp_path):
    image, label = phantom(np.diag([-1.0, -1.0, 1.0]), (1.5, 1.5, 1.5))
    oracle = Oracle(PLANS, label)
    res = oracle.predict_array(image.array, image.affine)
    assert res.mask.shape == image.shape and np.allclose(res.mask.affine, image.affine)
    assert dice(res.mask.array, label.array) >= 0.98
    assert res.probabilities is None and res.gates == {}


def test_crop_outside_is_background_and_postprocess_keeps_largest(tmp_path):
    """Voxels outside the body crop come back as background; largest-component drops a stray island."""
    image, label = phantom(np.eye(3), (2.0, 2.0, 2.0))
    fake = label.array.copy()
    fake[2:4, 2:4, 2:4] = 1  # an island in the air, outside the body crop
    oracle = Oracle(PLANS, Volume(fake, label.affine))
    res = oracle.predict_volume(image)
    assert res.mask.array[2:4, 2:4, 2:4].sum() == 0  # the crop box restores background outside
    inside = np.zeros_like(fake)
    inside[label.array > 0] = 1
    body = image.array > -500
    idx = np.argwhere(body & (label.array == 0))[0]
    inside[tuple(idx)] = 1  # a one-voxel island inside the body
    res2 = Oracle(PLANS, Volume(inside, label.affine), postprocess="largest-component").predict_volume(image)
    assert dice(res2.mask.array, label.array) >= 0.98
    from scipy import ndimage

    assert ndimage.label(res2.mask.array, structure=np.ones((3, 3, 3)))[1] == 1


def test_real_dicom_series_in_physical_space(real_ct):
    """The DICOM series (LPS) against its label on a y-flipped grid, compared in canonical space."""
    dicom = real_ct / "organs" / "dicom" / "ts_upperabd_dicom20"
    lab_path = real_ct / "organs" / "dicom" / "ts_upperabd_dicom20_label_own_grid.nii.gz"
    if not dicom.is_dir() or not lab_path.is_file():
        pytest.skip("ts_upperabd_dicom20 is not present")
    image = read_volume(dicom)
    label = read_volume(lab_path)
    img_can, ornt = reorient(image)
    lab_can, _ = reorient(label)
    assert same_space(img_can, lab_can)
    lab_on_image = Volume(undo_reorient(lab_can.array, ornt), image.affine)
    plans = dict(PLANS, labels={"background": 0, "liver": 1, "spleen": 2}, num_classes=3,
                 target_spacing=[1.5, 1.5, 2.0], patch_size=[64, 64, 16])
    res = Oracle(plans, lab_on_image).predict(dicom)
    assert res.case == "ts_upperabd_dicom20"
    assert res.mask.shape == image.shape and np.array_equal(res.mask.affine, image.affine)
    pred_can, _ = reorient(res.mask)
    for c in (1, 2):
        d = dice(pred_can.array == c, lab_can.array == c)
        assert d >= 0.98, (c, d)


def test_label_passed_as_image_is_refused(tmp_path):
    image, label = phantom(np.eye(3), (2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="looks like a label map"):
        check_not_label(Volume(label.array, label.affine, "lab.nii.gz"), 2)
    check_not_label(image, 2)  # a CT passes
    write_volume(label, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="lab.nii.gz: looks like a label map"):
        Oracle(PLANS, label).predict(tmp_path / "lab.nii.gz")


def test_channels_last_auto_is_on_for_3d_nets_on_cpu_only():
    from medseg.errors import ConfigError
    from medseg.runtime import resolve_channels_last

    net3d = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3))
    net2d = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))  # a 2.5D net: 2D convolutions, no 3D layout
    cpu = torch.device("cpu")
    assert resolve_channels_last("auto", cpu, net3d) is True
    assert resolve_channels_last(None, cpu, net2d) is False
    assert resolve_channels_last("auto", torch.device("cuda"), net3d) is False
    assert resolve_channels_last(False, cpu, net3d) is False
    with pytest.raises(ConfigError, match="channels_last"):
        resolve_channels_last("sometimes", cpu, net3d)


def test_cpu_window_batch_caps_large_windows_on_the_cpu_only():
    from medseg.infer.predictor import cpu_window_batch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big = [176, 128, 160]  # 3.6 M voxels: the chest CT's planned window
    assert cpu_window_batch(2, big, cpu, None) == 1  # fp32: one window per forward (peak RSS 3.9 -> 2.4 GB)
    assert cpu_window_batch(2, big, cpu, torch.bfloat16) == 2  # half precision: twice the budget
    assert cpu_window_batch(4, big, cpu, torch.bfloat16) == 2
    assert cpu_window_batch(2, big, cpu, None, max_voxels=0) == 2  # no cap
    assert cpu_window_batch(2, big, cuda, None) == 2  # GPUs keep their batch
    assert cpu_window_batch(4, [96, 96, 96], cpu, None) == 4  # 0.9 M voxels: 4 fit
    assert cpu_window_batch(8, [96, 96, 96], cpu, None) == 4
    assert cpu_window_batch(3, [300, 300, 300], cpu, None) == 1  # never below 1


def test_predictor_applies_the_cpu_window_cap_from_the_run_config():
    from medseg.infer.predictor import Predictor

    plans = {"num_classes": 2, "patch_size": [176, 128, 160], "target_spacing": [1, 1, 1]}
    assert Predictor(None, plans, device="cpu", precision="fp32", sw_batch_size=2).sw_batch_size == 1
    assert Predictor(None, plans, device="cpu", precision="fp32", sw_batch_size=2, cpu_window_voxels=0).sw_batch_size == 2
