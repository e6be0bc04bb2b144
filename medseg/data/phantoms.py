"""Synthetic abdominal CT phantoms, written as a ready nnU-Net v2 dataset folder.

Each case is a miniature torso rendered in **world (RAS) millimetres**, then sampled on a grid
with a random spacing (in-plane 0.8-1.2 mm, slices 1.5-3 mm) and a random axis orientation
(RAS, LPS, LAS, ...): the anatomy stays in the same physical place whatever the voxel order,
so a pipeline that ignores the affine fails on them. Contents (typical CT numbers):

- air -1000 HU outside an elliptic body; subcutaneous fat -100, a muscle wall 50, ribs and a
  spine ~700 (cortical ring) / 250 (marrow), visceral soft tissue ~10 with smooth texture;
- liver 60 (label 1, patient's right), spleen 45 (label 2, left posterior), kidneys 30 in
  perirenal fat (label 3, both sides, lower), 0-3 hypodense lesions 25 inside the liver (label 4).

Shapes are ellipsoids deformed by a few smooth random sinusoids, the whole anatomy gets a
random scale, shift and small rotation, then partial-volume blur and Gaussian noise
(sigma 10-20 HU). Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.io import Volume, atomic_write_text, write_volume

__all__ = ["LABELS", "ORIENTATIONS", "make_phantom_case", "make_phantom_dataset", "orientation_affine"]

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lesion": 4}
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPS", "LPI", "PLS")
NOMINAL_SPACING = (1.0, 1.0, 2.5)
_DIRS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass
class _Blob:
    """A deformed ellipsoid: ``|((x - c) R) / r|^2 + sum a sin(w.x + p) < 1`` in anatomy mm."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    waves: np.ndarray  # (n, 3) spatial frequencies (rad / mm)
    amps: np.ndarray  # (n,)
    phases: np.ndarray  # (n,)

    def field(self, pts: np.ndarray) -> np.ndarray:
        d = [pts[..., i] - self.center[i] for i in range(3)]
        m = self.rot / self.radii[None, :]
        f = sum((d[0] * m[0, j] + d[1] * m[1, j] + d[2] * m[2, j]) ** 2 for j in range(3))
        for w, a, p in zip(self.waves, self.amps, self.phases):  # element-wise: no BLAS threads on tiny matrices
            f += a * np.sin(pts[..., 0] * w[0] + pts[..., 1] * w[1] + pts[..., 2] * w[2] + p)
        return f

    def mask(self, pts: np.ndarray, level: float = 1.0) -> np.ndarray:
        """``field < level``, evaluated only inside the blob's bounding box (the rest is False)."""
        reach = np.sqrt(level + self.amps.sum()) * self.radii.max()
        lo, hi = self.center - reach, self.center + reach
        box = np.ones(pts.shape[:-1], bool)
        for i in range(3):
            box &= (pts[..., i] > lo[i]) & (pts[..., i] < hi[i])
        out = np.zeros(pts.shape[:-1], bool)
        out[box] = self.field(pts[box]) < level
        return out


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _blob(rng: np.random.Generator, center, radii, *, wobble: float = 0.15, tilt: float = 15.0) -> _Blob:
    radii = np.asarray(radii, float) * rng.uniform(0.9, 1.1, 3)
    n = 4
    wave_len = rng.uniform(1.0, 2.0, n) * float(np.mean(radii))
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return _Blob(np.asarray(center, float), radii, _rot_z(rng.uniform(-tilt, tilt)),
                 dirs * (2 * np.pi / wave_len[:, None]), rng.uniform(0, wobble, n), rng.uniform(0, 2 * np.pi, n))


def orientation_affine(code: str, spacing: Sequence[float], shape: Sequence[int], centre_mm=(0.0, 0.0, 0.0),
                       oblique_deg: float = 0.0) -> np.ndarray:
    """Affine whose array axes point along ``code`` (e.g. ``'LPS'``), centred on ``centre_mm``.

    ``oblique_deg`` tilts the grid about the S axis (a residual rotation that reorientation keeps).
    """
    m = np.zeros((3, 3))
    for col, ch in enumerate(code.upper()):
        ax, sign = _DIRS[ch]
        m[ax, col] = sign * float(spacing[col])
    m = _rot_z(oblique_deg) @ m
    aff = np.eye(4)
    aff[:3, :3] = m
    aff[:3, 3] = np.asarray(centre_mm, float) - m @ ((np.asarray(shape, float) - 1) / 2.0)
    return aff


@dataclass
class _Anatomy:
    """Random parameters of one torso (drawn once, then evaluated slab by slab)."""

    fov: np.ndarray
    a: float  # body semi-axes (mm), left-right and antero-posterior
    b: float
    texture: list  # (amplitude, wave vector, phase) of the visceral texture
    organs: list  # (label value, HU, blob, perirenal-fat blob or None)
    lesions: list  # blobs inside the liver


def _draw_anatomy(rng: np.random.Generator, fov: np.ndarray) -> _Anatomy:
    a, b = 0.44 * fov[0] * rng.uniform(0.92, 1.05), 0.34 * fov[1] * rng.uniform(0.92, 1.05)
    texture = [(rng.uniform(5, 12), rng.normal(size=3) * 0.35, rng.uniform(0, 6.3)) for _ in range(3)]
    fz = fov[2]
    liver = _blob(rng, (0.38 * a, 0.05 * b, 0.12 * fz), (0.34 * a, 0.48 * b, 0.24 * fz))
    organs = [(1, 60.0, liver, None),
              (2, 45.0, _blob(rng, (-0.45 * a, -0.28 * b, 0.16 * fz), (0.15 * a, 0.24 * b, 0.14 * fz)), None)]
    for side in (1, -1):
        kid = _blob(rng, (side * 0.42 * a, -0.4 * b, -0.16 * fz), (0.17 * a, 0.2 * b, 0.15 * fz), wobble=0.08)
        organs.append((3, 30.0, kid, kid))
    lesions = []
    for _ in range(rng.choice([0, 1, 2, 3], p=[0.15, 0.4, 0.3, 0.15])):
        u = rng.normal(size=3)  # a point at 0-60 % of the liver's radii, in world terms (orientation-free)
        c = liver.center + liver.rot @ (liver.radii * u / np.linalg.norm(u) * rng.uniform(0, 0.6))
        lesions.append(_blob(rng, c, rng.uniform(0.08, 0.15) * a * np.array([1.0, 1.0, 1.2]), wobble=0.1))
    return _Anatomy(np.asarray(fov, float), a, b, texture, organs, lesions)


def _render(pts: np.ndarray, an: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """HU (before blur / noise, float32) and labels at anatomy-frame points ``pts (..., 3)`` mm."""
    a, b, fov = an.a, an.b, an.fov
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    r_body = (x / a) ** 2 + (y / b) ** 2
    hu = np.full(x.shape, -1000.0, np.float32)
    lab = np.zeros(x.shape, np.uint8)
    tex = sum(amp * np.sin(x * w[0] + y * w[1] + z * w[2] + ph) for amp, w, ph in an.texture)
    hu[r_body < 1] = -100.0  # subcutaneous fat
    hu[(r_body < 0.86**2) & (r_body >= 0.78**2)] = 50.0  # muscle wall
    inside = r_body < 0.78**2
    hu[inside] = (10.0 + tex)[inside]
    angle = np.arctan2(y / b, x / a)
    ribs = (r_body < 0.84**2) & (r_body >= 0.80**2) & (np.cos(6 * angle + 0.4 * z) > 0.2) & (y > -0.5 * b) & (z > -0.2 * fov[2])
    hu[ribs] = 700.0
    spine = (x / (0.16 * a)) ** 2 + ((y + 0.62 * b) / (0.2 * b)) ** 2
    hu[spine < 1] = 700.0  # cortical ring
    hu[spine < 0.55] = 250.0  # marrow
    soft = inside & (spine >= 1)
    for _, _, _, fat_of in an.organs:
        if fat_of is not None:
            hu[fat_of.mask(pts, 1.6) & soft] = -80.0  # perirenal fat
    for value, level, blob, _ in an.organs:
        m = blob.mask(pts) & soft
        hu[m] = level + 0.3 * tex[m]
        lab[m] = value
    liver = lab == 1
    for les in an.lesions:
        m = les.mask(pts) & liver
        hu[m] = 25.0
        lab[m] = 4
    return hu, lab


def make_phantom_case(seed: int | Sequence[int], *, shape: Sequence[int] = (64, 64, 40), orientation: str | None = None,
                      spacing: Sequence[float] | None = None, oblique_deg: float = 0.0,
                      noise_hu: float | None = None) -> tuple[Volume, Volume]:
    """One phantom case in memory: ``(image Volume int16 HU, label Volume uint8)``.

    Args:
        seed: RNG seed (int or sequence, e.g. ``[dataset_seed, index]``).
        shape: voxel count at the nominal spacing (1, 1, 2.5) mm; the physical field of view
            ``shape * nominal spacing`` is fixed, so the voxel count varies with the drawn spacing.
        orientation: axis code (default: drawn from :data:`ORIENTATIONS`).
        spacing: ``(x, y, z)`` mm of the array axes (default: drawn, 0.8-1.2 in-plane, 1.5-3 slices).
        oblique_deg: tilt of the grid about the S axis.
        noise_hu: Gaussian noise sigma (default: drawn in 10-20 HU).
    """
    rng = np.random.default_rng(seed)
    fov = np.asarray(shape, float) * np.asarray(NOMINAL_SPACING)
    # draw everything even when given, so that a seed gives the same anatomy in any orientation
    drawn_code, inplane, thick = str(rng.choice(ORIENTATIONS)), rng.uniform(0.8, 1.2), rng.uniform(1.5, 3.0)
    code = orientation or drawn_code
    spacing = spacing if spacing is not None else (inplane, inplane, thick)
    # spacing is given per physical direction (R/L, A/P, S/I); map it to the array axes of `code`
    phys_sp = np.asarray(spacing, float)
    axis_sp = np.array([phys_sp[_DIRS[ch][0]] for ch in code.upper()])
    axis_fov = np.array([fov[_DIRS[ch][0]] for ch in code.upper()])
    grid = np.maximum(2, np.round(axis_fov / axis_sp)).astype(int)
    centre = rng.uniform(-30, 30, 3) + np.array([0.0, 0.0, rng.uniform(-200, 200)])  # scanner coordinates
    affine = orientation_affine(code, axis_sp, grid, centre, oblique_deg)
    # pose: the anatomy is scaled, rotated about S and shifted relative to the scanner centre
    pose = _rot_z(rng.uniform(-8, 8)) * rng.uniform(0.92, 1.08)
    shift = centre + rng.uniform(-0.06, 0.06, 3) * fov
    to_anat = np.linalg.inv(pose) @ affine[:3, :3]  # voxel index -> anatomy mm (element-wise below)
    off = np.linalg.inv(pose) @ (affine[:3, 3] - shift)
    anatomy = _draw_anatomy(rng, fov)
    hu = np.empty(tuple(grid), np.float32)
    lab = np.empty(tuple(grid), np.uint8)
    step = max(1, int(2**21 // (grid[0] * grid[1])))  # slabs of ~2M voxels bound the memory
    for k0 in range(0, grid[2], step):
        ijk = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64),
                          np.arange(k0, min(grid[2], k0 + step), dtype=np.float64), indexing="ij")
        pts = np.stack([ijk[0] * to_anat[r, 0] + ijk[1] * to_anat[r, 1] + ijk[2] * to_anat[r, 2] + off[r]
                        for r in range(3)], -1)
        hu[..., k0:k0 + step], lab[..., k0:k0 + step] = _render(pts, anatomy)
    hu = ndimage.gaussian_filter(hu, sigma=0.6, mode="nearest")  # partial volume
    sigma = noise_hu if noise_hu is not None else rng.uniform(10, 20)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma)
    img = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    return Volume(img, affine, f"phantom{code}"), Volume(lab, affine.copy(), f"phantom{code}_seg")


def make_phantom_dataset(out_dir: str | Path, n_train: int = 8, n_test: int = 2, seed: int = 0, *,
                         shape: Sequence[int] = (64, 64, 40), name: str = "Phantoms",
                         orientations: Sequence[str] | None = None, spacing: Sequence[float] | None = None,
                         noise_hu: float | None = None) -> Path:
    """Write an nnU-Net v2 dataset of phantoms: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
    ``labelsTr/<case>.nii.gz``, ``imagesTs/``, ``labelsTs/``. Returns ``out_dir``.

    Orientations cycle through ``orientations`` (default :data:`ORIENTATIONS`) so that every
    dataset mixes them; spacing, shape, pose and noise are drawn per case from ``seed``, except
    ``spacing`` (mm per physical direction) and ``noise_hu`` when given (see :func:`make_phantom_case`).
    """
    out = Path(out_dir)
    codes = list(orientations or ORIENTATIONS)
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"phantom_{i:03d}"
        img, lab = make_phantom_case([seed, i], shape=shape, orientation=codes[i % len(codes)], spacing=spacing,
                                     noise_hu=noise_hu)
        write_volume(img, out / f"images{split}" / f"{case}_0000.nii.gz")
        write_volume(lab, out / f"labels{split}" / f"{case}.nii.gz")
    meta = {
        "name": name,
        "description": f"synthetic abdominal CT phantoms (medseg.data.phantoms, seed {seed}, shape {list(shape)})",
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1))
    return out
