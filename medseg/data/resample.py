"""Resampling between grids that share their extent (original spacing <-> target spacing).

Convention ("align_corners=False", as in ``scipy.ndimage.zoom(grid_mode=True)`` and
``torch.nn.functional.interpolate(align_corners=False)``): a grid of ``n`` voxels is resampled to
``m`` voxels covering the same physical extent, so new voxel ``j`` samples old continuous
index ``(j + 0.5) * s - 0.5`` with ``s = n / m``. The new affine is therefore
``A_new = A_old @ [[diag(s), 0.5 * s - 0.5], [0, 1]]`` and the effective spacing is
``old_spacing * s`` (within half a voxel of the requested spacing).

Images use a separable cubic convolution kernel (Keys 1981, ``a = -0.75``, torch's
``bicubic``) applied as two 2-D passes (in-plane, then through-plane), which is exact
tensor-product tricubic and ~50x faster than ``scipy.ndimage.zoom(order=3)`` on a
512x512x133 CT. Labels are resampled like nnU-Net's ``resize_segmentation`` (Isensee et al.,
Nature Methods 2021): linear interpolation of each class's one-hot mask, arg-max over classes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "apply_ornt",
    "interpolate",
    "resample_affine",
    "resample_image",
    "resample_label",
    "resampled_shape",
]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """Voxel count per axis after resampling ``shape`` at ``spacing`` to ``target`` mm (>= 1)."""
    sh = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64) / np.asarray(target, dtype=np.float64)
    return tuple(int(max(1, round(v))) for v in sh)  # type: ignore[return-value]


def resample_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of the grid of ``new_shape`` voxels covering the extent of ``old_shape`` (align_corners=False)."""
    s = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(s)
    m[:3, 3] = 0.5 * s - 0.5
    return np.asarray(affine, dtype=np.float64) @ m


def resample_image(array: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Cubic resampling of a channel-first image.

    Args:
        array: ``(C, X, Y, Z)`` numeric array.
        new_shape: ``(X', Y', Z')``.

    Returns:
        ``(C, X', Y', Z')`` float32.
    """
    new_shape = tuple(int(v) for v in new_shape)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    c, nx, ny, nz = x.shape
    if (nx, ny, nz) == new_shape:
        return x.numpy().copy()
    # pass 1: in-plane (X, Y) with the z slices as the batch: (Z*C, 1, X, Y)
    if (nx, ny) != new_shape[:2]:
        t = x.permute(3, 0, 1, 2).reshape(nz * c, 1, nx, ny)
        t = _cubic2d(t, new_shape[:2])
        x = t.reshape(nz, c, *new_shape[:2]).permute(1, 2, 3, 0)
    # pass 2: through-plane (Z) with (C*X', 1, Y', Z); Y' is unchanged (exact identity)
    if nz != new_shape[2]:
        t = x.reshape(c * new_shape[0], 1, new_shape[1], nz)
        t = _cubic2d(t, (new_shape[1], new_shape[2]))
        x = t.reshape(c, *new_shape)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def _cubic2d(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubic 2-D interpolation in chunks (bounded temporary memory)."""
    out = []
    step = max(1, int(2**26 // max(1, t[0].numel() + int(np.prod(size)))))
    for i in range(0, t.shape[0], step):
        out.append(F.interpolate(t[i : i + step], size=tuple(size), mode="bicubic", align_corners=False))
    return torch.cat(out) if len(out) > 1 else out[0]


def resample_label(label: np.ndarray, new_shape: Sequence[int], values: Sequence[int] | None = None) -> np.ndarray:
    """Resample an integer label map by linear interpolation of one-hot masks + arg-max.

    Args:
        label: ``(X, Y, Z)`` integer array.
        new_shape: ``(X', Y', Z')``.
        values: label values to consider (default: those present).

    Returns:
        ``(X', Y', Z')`` uint8.
    """
    new_shape = tuple(int(v) for v in new_shape)
    if tuple(label.shape) == new_shape:
        return label.astype(np.uint8)
    values = sorted(int(v) for v in (np.unique(label) if values is None else values))
    if len(values) <= 1:
        return np.full(new_shape, values[0] if values else 0, dtype=np.uint8)
    best = torch.full(new_shape, -1.0)
    out = torch.zeros(new_shape, dtype=torch.uint8)
    lab = torch.from_numpy(np.ascontiguousarray(label))
    for v in values:
        p = interpolate((lab == v)[None].float(), new_shape, mode="linear")[0]
        better = p > best
        torch.maximum(p, best, out=best)
        out.masked_fill_(better, v)
    return out.numpy()


def interpolate(data: torch.Tensor, size: Sequence[int], *, mode: str = "linear") -> torch.Tensor:
    """Resample a channel-first ``(C, X, Y, Z)`` tensor to ``(C, *size)``, align_corners=False.

    ``mode="linear"`` is trilinear (computed in the tensor's float dtype; integer input is
    computed in float32), ``"nearest"`` picks the voxel whose centre is nearest
    (``nearest-exact``) and keeps the dtype. Stays on the tensor's device.
    """
    size = tuple(int(v) for v in size)
    if tuple(data.shape[1:]) == size:
        return data
    if mode == "nearest":
        return F.interpolate(data[None], size=size, mode="nearest-exact")[0]
    if mode != "linear":
        raise ValueError(f"interpolation mode '{mode}' is not one of linear, nearest")
    x = data if data.is_floating_point() else data.float()
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        # CPU half kernels are slow; the result is cast back to the input dtype
        return F.interpolate(x[None].float(), size=size, mode="trilinear", align_corners=False)[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]


def apply_ornt(data: torch.Tensor | np.ndarray, ornt: np.ndarray):
    """nibabel's ``apply_orientation`` on the last three axes of a numpy array or torch tensor.

    Flips the axes whose ``ornt[i, 1] == -1``, then moves input axis ``i`` to ``ornt[i, 0]``.
    """
    ornt = np.asarray(ornt, dtype=float)
    lead = data.ndim - 3
    flips = [lead + i for i, f in enumerate(ornt[:, 1]) if f == -1]
    perm = list(range(lead)) + [lead + int(i) for i in np.argsort(ornt[:, 0])]
    if isinstance(data, torch.Tensor):
        if flips:
            data = torch.flip(data, dims=flips)
        return data.permute(*perm).contiguous()
    if flips:
        data = np.flip(data, axis=flips)
    return np.ascontiguousarray(data.transpose(perm))
