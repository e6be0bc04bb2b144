"""MONAI transform chains for training patches (nnU-Net-like augmentation).

A training sample is cut in two steps (see :mod:`medseg.train.data`):

1. a region of :func:`crop_extent` voxels is cut around a chosen centre (:func:`crop_patch`,
   padded where it leaves the volume) -- larger than the patch when rotation / scaling is on,
   so that the rotated patch never samples outside the region; or rather only the part of it
   that the patch's rotation / scaling, drawn ahead (:meth:`RandRotateScaled.draw`), reads: the
   patch itself for the patches that neither rotate nor scale (for the organ recipe's 96^3
   patches the full region is ~210^3 voxels: cutting and converting it was ~12 ms of a patch's
   ~54 ms on 2 cores; copy-paste, which pastes near the patch's edge, keeps the full region);
2. :func:`build_train_transforms` turns it into a ``patch_size`` patch: a joint random
   rotation + scaling (:class:`RandRotateScaled`, one resampling, image trilinear / label
   nearest) or a centre crop, then MONAI's intensity transforms and mirroring.

The set and the default probabilities follow nnU-Net's default augmentation (Isensee et al.,
"nnU-Net", Nature Methods 2021, supplementary note 4): rotation, scaling, Gaussian noise,
Gaussian blur, multiplicative brightness, contrast, simulated low resolution, gamma, mirroring;
plus, off by default, an axial slab (:class:`RandAxialSlabd`: partial-coverage scans), a
per-structure intensity shift (:class:`RandLabelIntensityShiftd`: contrast phases) and an
object-level copy-paste of small structures (:class:`RandCopyPasted` with an :class:`ObjectBank`
of the training cases' lesions: few training lesions), which acts on the region before the
spatial transform.
Every probability and range lives in ``config.train.augment`` (:class:`medseg.config.AugmentConfig`).

Arrays are channel-first ``(C, X, Y, Z)`` (image float32, label ``(1, X, Y, Z)``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from monai.transforms import (
    Affine,
    CenterSpatialCrop,
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

from medseg.config import AugmentConfig

__all__ = ["ObjectBank", "RandAxialSlabd", "RandCopyPasted", "RandLabelIntensityShiftd", "RandRotateScaled", "RandThickSliced",
           "as_plain_tensor",
           "build_train_transforms", "crop_extent", "crop_patch", "grid_sample_split", "inside_body"]

KEYS = ("image", "label")


def crop_extent(patch_size: Sequence[int], aug: AugmentConfig) -> list[int]:
    """Size of the region to cut so that a rotated / scaled ``patch_size`` patch stays inside it.

    The patch box is rotated by up to ``rotate_deg`` about each axis in turn (bounding box of
    the rotated box, capped at the box's diagonal) and scaled by the largest scale factor.
    """
    ext = np.asarray(patch_size, dtype=float)
    if aug.p_rotate > 0 and aug.rotate_deg > 0:
        a = math.radians(min(abs(aug.rotate_deg), 90.0))
        c, s = math.cos(a), math.sin(a)
        diag = float(np.linalg.norm(ext))
        for axis in range(3):
            i, j = [k for k in range(3) if k != axis]
            ext[i], ext[j] = ext[i] * c + ext[j] * s, ext[j] * c + ext[i] * s
        ext = np.minimum(ext, diag)
    if aug.p_scale > 0:
        ext = ext * max(1.0, float(max(aug.scale_range)))
    return [int(math.ceil(e)) for e in ext]


def crop_patch(arrays: Sequence[np.ndarray], center: Sequence[int], size: Sequence[int],
               fill: Sequence[float] | None = None) -> list[np.ndarray]:
    """Cut a ``size`` box centred on ``center`` from channel-first arrays, padding outside the volume.

    Args:
        arrays: ``(C, X, Y, Z)`` arrays on the same grid (memory-mapped ones are fine: only the
            box is read).
        center: voxel ``[x, y, z]``; the box is ``[center - size // 2, center - size // 2 + size)``.
        size: box size ``[x, y, z]``.
        fill: constant per array for the padded part (default 0).

    Returns:
        new contiguous arrays ``(C, *size)`` of the input dtypes.
    """
    shape = arrays[0].shape[1:]
    lo = [int(c) - int(s) // 2 for c, s in zip(center, size)]
    src = tuple(slice(max(0, l), min(n, l + s)) for l, s, n in zip(lo, size, shape))
    dst = tuple(slice(sl.start - l, sl.stop - l) for sl, l in zip(src, lo))
    out = []
    for k, a in enumerate(arrays):
        box = np.full((a.shape[0], *size), 0 if fill is None else fill[k], dtype=a.dtype)
        if all(sl.stop > sl.start for sl in src):
            box[(slice(None),) + dst] = a[(slice(None),) + src]
        out.append(box)
    return out


def grid_sample_split(x: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``torch.nn.functional.grid_sample`` of one channel-first volume, zeros outside, ``align_corners=False``,
    spread over the intra-op threads.

    PyTorch's CPU 3-D grid sampler runs its batch items in parallel, one thread each, and nothing
    inside an item: one volume takes one core. Here the output is cut into ``torch.get_num_threads()``
    slabs along its first axis, each a batch item sampling the same input (a stride-0 view, no
    copy): the same values (each output voxel is computed as it is unsplit), ~2x faster on 2 cores.

    Shapes: ``x (C, *S_in)``, ``grid (1, *S_out, 3)`` (grid_sample's order: last axis first, normalized
    to ``[-1, 1]``) -> ``(C, *S_out)`` in ``x``'s dtype (float).
    """
    n_out = int(grid.shape[1])
    parts = max(1, min(torch.get_num_threads(), n_out))
    if x.device.type != "cpu" or parts == 1:
        return torch.nn.functional.grid_sample(x[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    rows = -(-n_out // parts)
    g = grid[0]
    if rows * parts != n_out:  # pad the last slab with copies of the last row (cut off below)
        g = torch.cat([g, g[-1:].expand(rows * parts - n_out, *g.shape[1:])])
    g = g.reshape(parts, rows, *g.shape[1:])
    out = torch.nn.functional.grid_sample(x[None].expand(parts, *x.shape), g, mode=mode, padding_mode="zeros",
                                          align_corners=False)  # (parts, C, rows, ...)
    return out.transpose(0, 1).reshape(x.shape[0], parts * rows, *out.shape[3:])[:, :n_out]


class RandRotateScaled(RandomizableTransform, MapTransform):
    """Random rotation and isotropic scaling of image and label in ONE resampling, output ``spatial_size``.

    As nnU-Net's spatial transform: rotation (probability ``p_rotate``, uniform angle in
    ``[-deg, deg]`` about each axis) and scaling (probability ``p_scale``, one factor from
    ``scale_range`` applied to the sampling grid, so > 1 zooms out) are drawn independently;
    when either fires, the centre of the region is resampled on MONAI's :class:`~monai.transforms.Affine`
    grid (about the region's centre; image trilinear, label nearest, zeros outside; the grid is built
    once for both keys and sampled by :func:`grid_sample_split`: MONAI's ``Affine`` values, on every
    core); otherwise the centre is cropped without interpolation.

    :meth:`draw` lets the caller cut less: it draws the next call's rotation / scaling ahead and
    returns the part of a full :func:`crop_extent` region that they read (the patch itself when
    neither fires); the next call, given that part, returns what it would from the full region.

    Input ``{"image": (C, *region), "label": (1, *region)}`` -> the same keys, ``(C, *spatial_size)``.
    """

    def __init__(self, spatial_size: Sequence[int], *, p_rotate: float, rotate_deg: float,
                 p_scale: float, scale_range: Sequence[float]):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, KEYS)
        self.spatial_size = [int(s) for s in spatial_size]
        self.p_rotate, self.rotate_rad = float(p_rotate), math.radians(float(rotate_deg))
        self.p_scale, self.scale_range = float(p_scale), (float(min(scale_range)), float(max(scale_range)))
        self._angles: list[float] | None = None
        self._scale: float | None = None
        self._drawn = False  # draw() already drew the next call's parameters

    def randomize(self, data=None) -> None:
        rotate = self.R.rand() < self.p_rotate
        scale = self.R.rand() < self.p_scale
        self._angles = [float(self.R.uniform(-self.rotate_rad, self.rotate_rad)) for _ in range(3)] if rotate else None
        self._scale = float(self.R.uniform(*self.scale_range)) if scale else None

    def _affine(self) -> Affine:
        s = self._scale or 1.0
        return Affine(rotate_params=self._angles, scale_params=[s, s, s], spatial_size=self.spatial_size,
                      padding_mode="zeros", image_only=True)

    def draw(self, extent: Sequence[int]) -> list[int]:
        """Draw the next call's rotation / scaling now; return the size of the box of a full region of
        ``extent`` voxels that they read. The box is centred as the region (:func:`crop_patch` it at the
        region's centre): ``extent // 2 - size // 2`` voxels in from the region's first voxel.

        No rotation or scaling: the patch itself (where the centre crop takes it). Otherwise the smallest box
        of the parity of ``extent`` (so the rotation centre stays on the same voxel) holding every sample of
        the grid and its trilinear neighbours plus one voxel: the sample of output voxel ``q`` (centred) is
        ``A q`` (centred), so it lies within ``|A| (P - 1) / 2`` of the centre along each axis. Capped at
        ``extent``.
        """
        self.randomize()
        self._drawn = True
        if self._angles is None and self._scale is None:
            return list(self.spatial_size)
        _, a = self._affine().affine_grid(spatial_size=self.spatial_size, lazy=True)
        a = np.abs(np.asarray(torch.as_tensor(a, dtype=torch.float64)[:3, :3]))
        reach = a @ ((np.asarray(self.spatial_size, dtype=float) - 1.0) / 2.0)
        size = []
        for r, e in zip(reach, (int(e) for e in extent)):
            n = int(math.ceil(2.0 * r)) + 4
            size.append(min(e, n + (n - e) % 2))
        return size

    def __call__(self, data: dict) -> dict:
        if not self._drawn:
            self.randomize()
        self._drawn = False
        d = dict(data)
        if self._angles is None and self._scale is None:
            crop = CenterSpatialCrop(self.spatial_size)
            for key in self.key_iterator(d):
                d[key] = crop(d[key])
            return d
        affine, grids = self._affine(), {}
        for key, mode in zip(KEYS, ("bilinear", "nearest")):
            if key not in d:
                continue
            x = torch.as_tensor(d[key]).float()
            shape = tuple(x.shape[1:])
            if shape not in grids:  # MONAI Resample's conversion of the grid to grid_sample's
                grid, _ = affine.affine_grid(spatial_size=self.spatial_size)
                g = torch.as_tensor(grid)[[2, 1, 0]].permute(1, 2, 3, 0).unsqueeze(0).contiguous()
                for i, dim in enumerate(reversed(shape)):
                    g[0, ..., i] *= 2.0 / max(2, dim)
                grids[shape] = g
            d[key] = grid_sample_split(x, grids[shape], mode)
        return d


class RandAxialSlabd(RandomizableTransform, MapTransform):
    """Keep a random axial slab of a patch: with probability ``prob``, the slices outside a random
    run of ``k`` consecutive z slices (``k`` uniform in ``[min_slices, Z]``) become padding
    (image ``fill``, label 0), as a scan covering only ``k`` slices looks once the sliding window
    pads it to the window size (MONAI pads with 0, the normalized intensity ``fill`` stands for).

    Scans of partial coverage (a few slices through the upper abdomen, a thorax cut at the
    diaphragm) are common in practice; full-coverage training volumes never show the network a
    structure cut by the scan's end with padding beyond it. The label outside the slab is
    background, so the net also learns that padding holds no organ. z is the preprocessed array's
    axis 2, the patient's superior-inferior axis (preprocessing reorients to the closest RAS).
    Not from a paper; nnU-Net pads patches at volume borders but never shortens a scan.

    Keys ``image`` ``(C, X, Y, Z)`` and ``label`` ``(1, X, Y, Z)``; returns the same shapes.
    """

    def __init__(self, prob: float = 0.0, min_slices: int = 8, fill: float = 0.0):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, KEYS)
        self.min_slices, self.fill = int(min_slices), float(fill)
        self._span = (0, 0)

    def randomize(self, depth: int) -> None:
        super().randomize(None)
        k = int(self.R.randint(min(self.min_slices, depth), depth + 1))
        start = int(self.R.randint(0, depth - k + 1))
        self._span = (start, start + k)

    def __call__(self, data):
        d = dict(data)
        depth = int(d["image"].shape[-1])
        self.randomize(depth)
        if not self._do_transform or self._span == (0, depth):
            return d
        keep = torch.zeros(depth, dtype=torch.bool)
        keep[self._span[0]:self._span[1]] = True
        image, label = torch.as_tensor(d["image"]).clone(), torch.as_tensor(d["label"]).clone()
        image[..., ~keep] = self.fill
        label[..., ~keep] = 0
        d["image"], d["label"] = image, label
        return d


class RandThickSliced(RandomizableTransform, MapTransform):
    """Make a patch look as if it came from a CT with thicker slices (z only; the label stays sharp).

    With probability ``prob``, a factor ``f`` is drawn uniformly from ``factor_range`` (>= 1) and the
    image is averaged over runs of ``f`` slices along z (``area`` interpolation to ``round(Z / f)``
    slices: the partial-volume average a slice ``f`` times thicker records), then linearly
    interpolated back to ``Z`` slices, as preprocessing resamples a thick-slice CT to the target
    spacing. x and y are untouched. With a 3 mm target spacing, ``f`` in ``[1, 2]`` covers scans of
    3-6 mm slices.

    Why: clinical CTs are often reconstructed at 5 mm while research sets are thin-slice; a
    structure a few slices tall (a lung nodule) then looks smeared along z at the target spacing,
    unlike anything a thin-slice training set shows. nnU-Net's low-resolution simulation (MONAI's
    ``RandSimulateLowResolutiond``, ``train.augment.p_lowres``) zooms all three axes together; this
    is the one-axis form of TorchIO's ``RandomAnisotropy`` (Perez-Garcia et al., "TorchIO", Computer
    Methods and Programs in Biomedicine 2021), written here to avoid a dependency.

    Keys ``image`` ``(C, X, Y, Z)`` (float) and ``label`` (untouched); returns the same shape and dtype.
    """

    def __init__(self, prob: float = 0.0, factor_range: Sequence[float] = (1.0, 2.0)):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ("image",))
        lo, hi = sorted(float(v) for v in factor_range)
        if lo < 1.0:
            raise ValueError(f"thick-slice factors must be >= 1 (slices thicker than the target spacing), got {factor_range}")
        self.factor_range = (lo, hi)
        self._factor = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._factor = float(self.R.uniform(*self.factor_range))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        image = torch.as_tensor(d["image"])
        depth = int(image.shape[-1])
        thick = max(1, int(round(depth / self._factor)))
        if not self._do_transform or thick >= depth:
            return d
        x = image.float().unsqueeze(0)  # (1, C, X, Y, Z)
        down = torch.nn.functional.interpolate(x, size=(*x.shape[2:4], thick), mode="area")
        up = torch.nn.functional.interpolate(down, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        d["image"] = up[0].to(image.dtype)
        return d


class RandLabelIntensityShiftd(RandomizableTransform, MapTransform):
    """Shift the intensity of each labelled structure by its own random offset (contrast phases).

    With probability ``prob`` per patch, every foreground class present in the patch gets an
    offset drawn uniformly from ``shift_range`` (normalized intensity units; with medseg's CT
    normalization one unit is the dataset's foreground standard deviation in HU, ~445 HU for the
    shared organ CTs), added to the image wherever the label holds that class. Background, the
    voxels of ``ignore_label`` (nnU-Net v2's ignore label: their content is unknown, not one
    structure) and the label are left unchanged.

    Why: in CT the contrast phase moves organs by hundreds of HU relative to each other (the
    blood pool and heart ~40 HU without contrast, 300+ HU arterial; the spleen 35 HU native,
    170 HU arterial), and a few training CTs show only the phases they were acquired in. Global
    intensity transforms (brightness, contrast, gamma) move every tissue together and cannot
    teach the net that an organ is an organ at another enhancement. A mild, CT-specific form of
    the per-label intensity sampling of SynthSeg (Billot et al., "SynthSeg", Medical Image
    Analysis 2023), which draws every label's intensity at random; not part of nnU-Net's set.
    Placed right after the spatial transform, so noise, blur and the global intensity
    transforms act on the shifted patch.

    Keys ``image`` ``(C, X, Y, Z)`` and ``label`` ``(1, X, Y, Z)`` (integer-valued class ids);
    returns the same shapes and dtypes.
    """

    def __init__(self, prob: float = 0.0, shift_range: Sequence[float] = (-0.5, 0.5), ignore_label: int | None = None):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, KEYS)
        lo, hi = sorted(float(v) for v in shift_range)
        self.shift_range = (lo, hi)
        self.ignore_label = None if ignore_label is None else int(ignore_label)

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        values = torch.as_tensor(d["label"])[0].round().long().clamp_(min=0)
        present = torch.bincount(values.flatten()).nonzero().flatten()  # ~20x faster than torch.unique on the CPU
        classes = [c for c in present.tolist() if c not in (0, self.ignore_label)]
        if not classes:
            return d
        offsets = self.R.uniform(*self.shift_range, size=len(classes))
        lut = torch.zeros(int(values.max()) + 1, dtype=torch.float32)  # every value present: the ignore label keeps 0
        lut[classes] = torch.as_tensor(offsets, dtype=torch.float32)
        shift = lut[values]
        image = torch.as_tensor(d["image"])
        d["image"] = image + shift.to(image.dtype)  # broadcasts over the channels
        return d


class ObjectBank:
    """The objects :class:`RandCopyPasted` pastes: connected components of some classes, cut from training cases.

    Each object is ``(image (C, a, b, c) float32, mask (a, b, c) bool, class, context)``: the
    component's bounding box grown by ``margin`` voxels (clipped at the volume's edge; image
    values, ``mask`` marks the component's voxels) and
    ``context``, the median intensity of channel 0 over the background voxels of a ``margin``-voxel
    shell around it (what the object sits in: lung parenchyma for a lung nodule, liver for a
    liver tumour). Components smaller than ``min_voxels`` are left out (label noise).
    26-connectivity (``scipy.ndimage.label`` with a full 3x3x3 structure).

    Args:
        cases: indexable of case dicts ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}``
            (:class:`medseg.train.data.LoadCased` items); the label is read whole, the image only
            inside each component's box (memory-mapped cases are fine).
        classes: the label values whose components are banked.
    """

    def __init__(self, cases, classes: Sequence[int], *, margin: int = 2, min_voxels: int = 8):
        from scipy import ndimage

        self.objects: list[tuple[np.ndarray, np.ndarray, int, float]] = []
        structure = np.ones((3, 3, 3), dtype=bool)
        for i in range(len(cases)):
            case = cases[i]
            label = np.asarray(case["label"][0])
            image = case["image"]
            for cls in sorted(int(c) for c in classes):
                comps, n = ndimage.label(label == cls, structure=structure)
                if n == 0:
                    continue
                for k, box in enumerate(ndimage.find_objects(comps), start=1):
                    if box is None:
                        continue
                    grown = tuple(slice(max(0, b.start - margin), min(dim, b.stop + margin))
                                  for b, dim in zip(box, label.shape))
                    mask = comps[grown] == k
                    if int(mask.sum()) < min_voxels:
                        continue
                    img = np.ascontiguousarray(np.asarray(image[(slice(None),) + grown], dtype=np.float32))
                    shell = ndimage.binary_dilation(mask, structure=structure, iterations=margin) & ~mask
                    shell &= label[grown] == 0
                    context = float(np.median(img[0][shell])) if shell.any() else float(np.median(img[0][mask]))
                    self.objects.append((img, mask, cls, context))

    def __len__(self) -> int:
        return len(self.objects)

    def add_synthetic(self, n: int, spacing: Sequence[float], diameter_mm: Sequence[float], *, seed: int = 0,
                      margin: int = 2) -> int:
        """Add ``n`` synthetic objects per banked class, made to look like that class's real objects.

        Synthetic lesions after Hu et al., "Label-Free Liver Tumor Segmentation", CVPR 2023 (an
        ellipsoid deformed by smooth noise, a texture of Gaussian-filtered noise at the lesion's
        intensity) and the lung-nodule synthesis of its follow-ups: with one training lesion the net
        learns that lesion; objects of many sizes and shapes with the same intensity statistics
        teach "a solid blob of this density in this tissue" instead. Per object: a diameter ``d``
        uniform in ``diameter_mm`` (physical: ``spacing`` is the preprocessed voxel size in mm,
        ``(x, y, z)``), semi-axes ``d / 2`` times factors uniform in [0.75, 1.25], a random 3-D
        rotation, and the ellipsoid's radial distance perturbed by Gaussian-smoothed noise (lobulated
        edges); the image inside the mask is, per channel, the mean of the real objects' interior
        (their masks eroded by one voxel) plus smoothed noise with its standard deviation, blurred
        (sigma 0.6 voxels) into the surroundings so that the rim is partial volume as in a scan;
        outside it, the class's median ``context`` (the tissue the real objects sit in), which
        :class:`RandCopyPasted` also uses to place the object. Objects
        of fewer than 2 voxels are redrawn. Deterministic for a given ``seed``.

        Returns how many objects were added (0 when the bank holds no real object to copy the
        statistics of).
        """
        from scipy import ndimage

        rng = np.random.default_rng([int(seed), 20231])
        spacing = np.asarray([float(s) for s in spacing], dtype=np.float64)
        lo_d, hi_d = sorted(float(v) for v in diameter_mm)
        added = []
        for cls in sorted({o[2] for o in self.objects}):
            real = [o for o in self.objects if o[2] == cls]
            # the interior (the mask eroded by a voxel) gives the texture; the rim is partial volume, made below
            inner = []
            for img, mask, _, _ in real:
                core = ndimage.binary_erosion(mask)
                inner.append(img[:, core if core.sum() >= 8 else mask])
            values = np.concatenate(inner, axis=1)  # (C, N)
            mean, std = values.mean(axis=1), values.std(axis=1)
            context = float(np.median([o[3] for o in real]))
            made = 0
            while made < int(n):
                d = rng.uniform(lo_d, hi_d)
                semi = 0.5 * d * rng.uniform(0.75, 1.25, size=3) / spacing  # semi-axes in voxels (x, y, z)
                half = np.ceil(1.3 * semi.max()).astype(int) + margin
                axes = [np.arange(-half, half + 1, dtype=np.float64)] * 3
                grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) * spacing  # mm
                q, r = np.linalg.qr(rng.normal(size=(3, 3)))
                rot = q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix
                local = grid @ rot / (semi * spacing)  # coordinates in units of the semi-axes
                dist = np.sqrt((local ** 2).sum(axis=-1))
                bumps = ndimage.gaussian_filter(rng.normal(size=dist.shape), sigma=max(1.0, semi.mean() / 2))
                bumps /= bumps.std() + 1e-8
                mask = dist + 0.12 * bumps <= 1.0
                if int(mask.sum()) < 2:
                    continue
                tex = ndimage.gaussian_filter(rng.normal(size=(len(mean),) + dist.shape), sigma=(0, 0.7, 0.7, 0.7))
                tex /= tex.std(axis=(1, 2, 3), keepdims=True) + 1e-8
                img = np.empty((len(mean),) + dist.shape, dtype=np.float32)
                for c in range(len(mean)):
                    img[c] = np.where(mask, mean[c] + std[c] * tex[c], context if c == 0 else mean[c])
                    # partial volume: the rim voxels mix with the surroundings, as the scanner's blur does
                    img[c] = np.where(mask, ndimage.gaussian_filter(img[c], sigma=0.6), img[c])
                added.append((img, mask, cls, context))
                made += 1
        self.objects.extend(added)
        return len(added)


def inside_body(image: np.ndarray, tol: float = 0.5) -> np.ndarray:
    """``(X, Y, Z)`` bool: False for the air around the body, True elsewhere.

    The air around the body is, in each axial (z) slice of ``image`` (``(X, Y, Z)``, one channel),
    the voxels within ``tol`` of the volume's minimum intensity that are connected (4-connectivity)
    to the slice's edge. Air inside the body -- lungs, airways, bowel gas -- is enclosed by the body
    wall in an axial slice and stays True. The classic first step of threshold lung segmentation
    (e.g. Hu, Hoffman & Reinhardt, IEEE TMI 2001). With medseg's CT normalization (clipped at the
    foreground's 0.5 percentile) lung parenchyma and outside air share the minimum, and only this
    tells them apart.
    """
    from scipy import ndimage

    low = np.asarray(image) <= float(np.min(image)) + tol
    outside = np.zeros(low.shape, dtype=bool)
    for z in range(low.shape[2]):
        comps, n = ndimage.label(low[:, :, z])
        if n == 0:
            continue
        edge = np.unique(np.concatenate([comps[0], comps[-1], comps[:, 0], comps[:, -1]]))
        edge = edge[edge > 0]
        if len(edge):
            outside[:, :, z] = np.isin(comps, edge)
    return ~outside


class RandCopyPasted(RandomizableTransform, MapTransform):
    """Paste a random banked object (a training lesion) into the region, resized and flipped, where
    the region looks like what the object was cut from.

    Object-level copy-paste after TumorCP (Yang et al., "TumorCP: A Simple but Effective
    Object-Level Data Augmentation for Tumor Segmentation", MICCAI 2021) and Ghiasi et al.,
    "Simple Copy-Paste is a Strong Data Augmentation Method for Instance Segmentation", CVPR 2021:
    with few training lesions, the net sees each one in one place, at one size, next to the same
    neighbours; pasted copies show it the lesion elsewhere in the same tissue and at other sizes.

    With probability ``prob`` per region: an object of ``bank`` is drawn, scaled by a factor from
    ``scale_range`` (isotropic in voxels; image trilinear, the mask resampled as a fraction, which
    becomes the blending weight: partial-volume edges), flipped along each axis with probability
    1/2, and placed with its centre at a random voxel of the central ``inner`` box of the region
    (the part the patch is cut from) where (a) the footprint (the resized object's voxels) is
    background in the label and (b) at least 90% of its voxels (``CONTEXT_FRACTION``) differ in
    channel 0 from the object's ``context`` by at most ``context_tol`` (normalized intensity units:
    with medseg's CT normalization one unit is the foreground's standard deviation): a lung nodule
    goes into lung, not across the chest wall or into the mediastinum. With an ``inside`` key
    (``(1, X, Y, Z)`` bool, :func:`inside_body` of the case, cut with the region; removed from the
    output) those voxels must also be inside the body: the clipped lung and the air around the
    body have the same intensity. Up to ``tries`` centres are drawn; when none qualifies nothing
    is pasted. The footprint's label becomes the object's class
    where the weight is >= 0.5; the image becomes ``w * object + (1 - w) * image``.

    Keys ``image`` ``(C, X, Y, Z)``, ``label`` ``(1, X, Y, Z)`` (the region, before the spatial
    transform) and optionally ``inside``; returns ``image`` and ``label`` in the same shapes and dtypes.
    """

    CONTEXT_FRACTION = 0.9

    def __init__(self, bank: ObjectBank, inner: Sequence[int], prob: float = 0.0,
                 scale_range: Sequence[float] = (0.5, 1.5), context_tol: float = 0.5, tries: int = 20):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, KEYS)
        self.bank, self.inner = bank, [int(v) for v in inner]
        self.scale_range = tuple(sorted(float(v) for v in scale_range))
        self.context_tol, self.tries = float(context_tol), int(tries)
        self.pasted: tuple[int, list[int]] | None = None  # (object index, footprint origin) of the last call

    def _resized(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask, _, _ = self.bank.objects[index]
        s = float(self.R.uniform(*self.scale_range))
        flips = [d + 1 for d in range(3) if self.R.rand() < 0.5]
        size = [max(1, int(round(n * s))) for n in mask.shape]
        x = torch.from_numpy(img)[None]
        w = torch.from_numpy(mask.astype(np.float32))[None, None]
        if size != list(mask.shape):
            x = torch.nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=False)
            w = torch.nn.functional.interpolate(w, size=size, mode="trilinear", align_corners=False)
        x, w = x[0], w[0, 0].clamp_(0.0, 1.0)
        if flips:
            x, w = x.flip([d for d in flips]), w.flip([d - 1 for d in flips])
        return x, w

    def __call__(self, data):
        d = dict(data)
        inside = d.pop("inside", None)
        self.pasted = None
        self.randomize(None)
        if not self._do_transform or len(self.bank) == 0:
            return d
        index = int(self.R.randint(len(self.bank)))
        obj, weight = self._resized(index)
        cls, context = self.bank.objects[index][2], self.bank.objects[index][3]
        image, label = torch.as_tensor(d["image"]), torch.as_tensor(d["label"])
        shape, size = list(image.shape[1:]), list(weight.shape)
        if any(s > n for s, n in zip(size, shape)):
            return d
        foot = weight >= 0.5
        if not bool(foot.any()):
            return d
        # centres inside the inner box such that the object's box stays inside the region
        lo_c = [max((n - i) // 2, s // 2) for n, i, s in zip(shape, self.inner, size)]
        hi_c = [min((n - i) // 2 + i - 1, n - (s - s // 2)) for n, i, s in zip(shape, self.inner, size)]
        if any(h < l for l, h in zip(lo_c, hi_c)):
            return d
        for _ in range(self.tries):
            centre = [int(self.R.randint(l, h + 1)) for l, h in zip(lo_c, hi_c)]
            origin = [c - s // 2 for c, s in zip(centre, size)]
            box = tuple(slice(o, o + s) for o, s in zip(origin, size))
            if bool((label[(0,) + box][foot] != 0).any()):
                continue
            near = (image[(0,) + box][foot] - context).abs() <= self.context_tol
            if inside is not None:
                near &= torch.as_tensor(inside)[(0,) + box][foot].bool()
            if float(near.float().mean()) < self.CONTEXT_FRACTION:
                continue
            w = weight.to(image.dtype)
            image = image.clone()
            image[(slice(None),) + box] = w * obj.to(image.dtype) + (1.0 - w) * image[(slice(None),) + box]
            label = label.clone()
            label[(0,) + box] = torch.where(foot, torch.as_tensor(cls, dtype=label.dtype), label[(0,) + box])
            d["image"], d["label"] = image, label
            self.pasted = (index, origin)
            return d
        return d


def build_train_transforms(patch_size: Sequence[int], aug: AugmentConfig, *, ignore_label: int | None = None,
                           bank: ObjectBank | None = None) -> Compose:
    """The training chain: region ``(C, *crop_extent)`` dict -> patch ``(C, *patch_size)`` dict.

    Keys ``image`` (float) and ``label`` (float labels, nearest-resampled). Intensity transforms
    touch the image only; mirroring flips both along each of ``mirror_axes`` with ``p_mirror``
    (training resolves ``"auto"`` from the data first; a chain built from an unresolved ``"auto"``
    flips all three axes). ``ignore_label``: the dataset's ignore label (kept out of the
    per-structure intensity shift), ``None`` when it has none. ``bank``: the objects of
    ``aug.copy_paste_classes`` (:class:`ObjectBank`); with ``aug.p_copy_paste > 0`` and a non-empty
    bank, :class:`RandCopyPasted` comes first (on the region, pasting inside its central
    ``patch_size`` box).
    """
    lo_b, hi_b = sorted(aug.brightness_range)
    lo_c, hi_c = sorted(aug.contrast_range)
    sig = tuple(sorted(aug.blur_sigma))
    paste = []
    if aug.p_copy_paste > 0 and bank is not None and len(bank):
        paste = [RandCopyPasted(bank, patch_size, aug.p_copy_paste, aug.copy_paste_scale, aug.copy_paste_context_tol)]
    chain = [
        *paste,
        RandRotateScaled(patch_size, p_rotate=aug.p_rotate, rotate_deg=aug.rotate_deg,
                         p_scale=aug.p_scale, scale_range=aug.scale_range),
        *([RandLabelIntensityShiftd(aug.p_label_shift, aug.label_shift_range, ignore_label)] if aug.p_label_shift > 0 else []),
        RandGaussianNoised("image", prob=aug.p_noise, std=aug.noise_std),
        RandGaussianSmoothd("image", sigma_x=sig, sigma_y=sig, sigma_z=sig, prob=aug.p_blur),
        RandScaleIntensityd("image", factors=(lo_b - 1.0, hi_b - 1.0), prob=aug.p_brightness),
        RandScaleIntensityFixedMeand("image", factors=(lo_c - 1.0, hi_c - 1.0), preserve_range=True,
                                     prob=aug.p_contrast),
        RandSimulateLowResolutiond("image", zoom_range=tuple(sorted(aug.lowres_zoom)), prob=aug.p_lowres),
        *([RandThickSliced(aug.p_thick_slices, aug.thick_slice_factor)] if aug.p_thick_slices > 0 else []),
        RandAdjustContrastd("image", gamma=tuple(sorted(aug.gamma_range)), retain_stats=True, prob=aug.p_gamma),
    ]
    chain += [RandFlipd(KEYS, prob=aug.p_mirror, spatial_axis=ax) for ax in aug.flip_axes()]
    if aug.p_slab > 0:  # after the intensity transforms: padding stays the constant MONAI's sliding window pads with
        chain.append(RandAxialSlabd(aug.p_slab, aug.slab_min_slices))
    return Compose(chain)


def as_plain_tensor(x) -> torch.Tensor:
    """A MONAI ``MetaTensor`` / numpy array as a plain, contiguous ``torch.Tensor``."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return t.contiguous()
