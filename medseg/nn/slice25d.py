"""2.5D slice stacking: a 2-D U-Net on k adjacent axial slices, wrapped to take 3-D patches.

As in "Volumetric Attention for 3D Medical Image Segmentation and Detection" (Wang et al., MICCAI
2019) and the 2.5D inputs before it: the k slices ``z + o * d`` (``o = -(k-1)/2 .. (k-1)/2``, ``d``
the slice step) are stacked as channels and the 2-D network predicts the centre slice ``z``.
Axial is the LAST spatial axis of ``(B, C, X, Y, Z)`` (RAS arrays).

:class:`SliceStack25D` replicate-pads a ``(k-1)/2 * d`` halo along z, unfolds the patch into
``B * Z`` 2-D samples ``(B*Z, C*k, X, Y)``, runs the 2-D net and folds the results back, so it takes
and returns the same 3-D patches as the 3-D models (training, sliding-window inference, gate maps).

**Real neighbours, not invented ones (the z halo).** The output at slice ``z`` depends on the input
slices ``z - H .. z + H`` only, ``H = model.z_halo = (k-1)/2 * d`` plus the bag radius of every
Volumetric Attention block (:mod:`medseg.nn.va`). The replicate padding makes the ``H`` slices at
each z end of the INPUT see copies instead of their real neighbours, so the callers hand the net
``H`` more real slices than they need at each end and keep only the centre:

* training (:class:`medseg.train.data.PatchDataset`, :class:`medseg.train.losses.SegmentationLoss`):
  patches are cut with ``patch_z + 2H`` slices (augmented as one block) and the loss sees the
  central ``patch_z`` slices of the outputs and of the label (:func:`crop_z_halo`);
* sliding-window inference (:func:`medseg.infer.sliding.sliding_window_predict`): the ``H`` slices at
  each window's z ends get zero blending weight, the volume itself is replicate-padded by ``H`` at
  its own two ends, and the z overlap is raised so that every slice is interior to some window.

Only at the volume's own ends is a neighbour a copy (replicate padding, the documented behaviour).
3-D models have no ``z_halo`` (read as 0): nothing changes for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.layers import check_positive_int

__all__ = ["SliceStack25D", "SliceStack25DWithAuxiliaryLoss", "crop_z_halo", "slice_step", "z_halo"]


def slice_step(offset_mm: float | None, z_spacing: float | None) -> int:
    """Slice step ``d``: 1, or ``round(offset_mm / z_spacing)`` (at least 1) when an offset in mm is given.

    Raises:
        ValueError: ``offset_mm`` given without a positive ``z_spacing``, or not positive.
    """
    if offset_mm is None:
        return 1
    if offset_mm <= 0:
        raise ValueError(f"slice_offset_mm must be positive, got {offset_mm!r}")
    if z_spacing is None or z_spacing <= 0:
        raise ValueError(f"slice_offset_mm={offset_mm} needs the z spacing (build_model(..., spacing=...)), got {z_spacing!r}")
    return max(1, int(round(offset_mm / z_spacing)))


def z_halo(model: nn.Module) -> int:
    """Input slices the output of ``model`` depends on beyond each side of a slice: ``model.z_halo``
    for a 2.5D net, 0 for models that do not declare one (3-D nets: their windows are blended as before)."""
    return int(getattr(model, "z_halo", 0))


def crop_z_halo(t, halo: int):
    """The central slices of a tensor ``(..., Z + 2*halo)`` or of a list of them: ``(..., Z)``."""
    if not halo:
        return t
    if isinstance(t, (list, tuple)):
        return [crop_z_halo(v, halo) for v in t]
    if t.shape[-1] <= 2 * halo:
        raise ValueError(f"a z halo of {halo} slices at each end leaves nothing of {t.shape[-1]} slices")
    return t[..., halo: t.shape[-1] - halo]


class SliceStack25D(nn.Module):
    """Run a 2-D network ``net2d`` (in_channels ``C * k``) slice by slice over a 3-D patch.

    Args:
        net2d: a 2-D model with the medseg call signature (``forward(x, return_attention)``,
            ``patch_divisor`` of 2 ints).
        slices: k, odd, >= 1.
        step: d, distance in slices between neighbouring stacked slices.

    Shapes: ``(B, C, X, Y, Z) -> (B, K, X, Y, Z)``; deep-supervision outputs ``(B, K, X_i, Y_i, Z)``
    (only x, y are downsampled); gate maps ``(B, 1, x_i, y_i, Z)``. ``patch_divisor = (px, py, 1)``.
    ``z_halo``: how many input slices beyond each side the output of a slice depends on (module
    docstring); the outputs of the ``z_halo`` slices at each z end of the input see replicate padding.

    Raises:
        ValueError: even or non-positive ``slices``, non-positive ``step``.
    """

    def __init__(self, net2d: nn.Module, *, slices: int, step: int = 1):
        super().__init__()
        check_positive_int("slices", slices)
        check_positive_int("slice step", step)
        if slices % 2 == 0:
            raise ValueError(f"slices must be odd (the centre slice is predicted), got {slices}")
        self.net = net2d
        self.slices, self.step = slices, step
        self.patch_divisor = (*tuple(net2d.patch_divisor)[:2], 1)
        # blocks that mix the features of neighbouring slices (Volumetric Attention) need Z
        self._z_blocks = [m for m in net2d.modules() if hasattr(m, "z_radius")]
        self.z_halo = (slices - 1) // 2 * step + sum(int(m.z_radius) for m in self._z_blocks)

    @property
    def deep_supervision(self) -> bool:
        return bool(getattr(self.net, "deep_supervision", False))

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.net.deep_supervision = bool(value)

    def to_slices(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z) -> (B*Z, C*k, X, Y)``: the k-slice stacks centred on every z."""
        b, c, nx, ny, nz = x.shape
        h = (self.slices - 1) // 2 * self.step
        if h:
            x = F.pad(x, (h, h, 0, 0, 0, 0), mode="replicate")
        win = x.unfold(-1, 2 * h + 1, 1)[..., :: self.step]  # (B, C, X, Y, Z, k)
        return win.permute(0, 4, 1, 5, 2, 3).reshape(b * nz, c * self.slices, nx, ny)

    @staticmethod
    def from_slices(t: torch.Tensor, b: int) -> torch.Tensor:
        """``(B*Z, K, x, y) -> (B, K, x, y, Z)``."""
        bz, k, nx, ny = t.shape
        return t.reshape(b, bz // b, k, nx, ny).permute(0, 2, 3, 4, 1).contiguous()

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if x.ndim != 5:
            raise ValueError(f"2.5D model expects (B, C, X, Y, Z) input, got shape {tuple(x.shape)}")
        b = x.shape[0]
        for m in self._z_blocks:
            m.z_len = x.shape[-1]
        try:
            out = self.net(self.to_slices(x), return_attention=return_attention)
        finally:
            for m in self._z_blocks:
                m.z_len = None
        if return_attention:
            out, maps = out
        out = [self.from_slices(o, b) for o in out] if isinstance(out, (list, tuple)) else self.from_slices(out, b)
        if return_attention:
            return out, {k: self.from_slices(v, b) for k, v in maps.items()}
        return out


class SliceStack25DWithAuxiliaryLoss(SliceStack25D):
    """:class:`SliceStack25D` around a net with ``auxiliary_loss`` (e.g. an attention branch)."""

    def auxiliary_loss(self, label: torch.Tensor) -> torch.Tensor:
        """``label (B, 1, X, Y, Z)`` int -> the 2-D net's auxiliary loss on the matching ``(B*Z, 1, X, Y)``."""
        b, c, nx, ny, nz = label.shape
        return self.net.auxiliary_loss(label.permute(0, 4, 1, 2, 3).reshape(b * nz, c, nx, ny))
