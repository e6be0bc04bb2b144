"""Volumetric Attention (VA): z context for the 2.5D net (Wang, Han, Chen, Gao, Vasconcelos,
"Volumetric Attention for 3D Medical Image Segmentation and Detection", MICCAI 2019).

The 2.5D net (:class:`~medseg.nn.slice25d.SliceStack25D`) feeds every slice-stack (k adjacent
slices as channels, k = 3 in the paper) to a 2-D network on its own. VA lets the 2-D features
``F_z (C, x, y)`` of the stack centred on slice ``z`` look at the features of its neighbouring
stacks, the *feature bag* ``F_{z-r} .. F_{z+r}`` (radius ``r``), and modulates them with a channel
and a spatial attention computed from the whole bag::

    Mc(z) = sigmoid(W2 relu(W1 [avgpool F_{z-r}; ..; avgpool F_{z+r}]))        (C,)      in (0, 1)
    Ms(z) = sigmoid(conv_{s x s x (2r+1)}([mean_c F_j; max_c F_j]_{j=z-r..z+r}))  (1, x, y) in (0, 1)
    F'_z  = F_z * Mc(z) * Ms(z)

``W1: (2r+1)C -> hidden``, ``W2: hidden -> C`` (with biases; ``hidden`` from ``reduction`` and
``min_hidden`` as every channel MLP here, :func:`~medseg.nn.channel.reduced_channels`), i.e. the SE /
CBAM channel gate with the pooled descriptors of the whole bag as input; the spatial conv (no bias)
sees the channel-mean and -max maps of every stack of the bag (a 3-D conv whose z extent is the
bag), as CBAM's spatial gate on one slice. Both factors are computed from the same input and
multiplied into ``F_z`` (channel x spatial). The paper's reference code is not public; these
equations are this module's reading of its Sec. 2 (attention over the z feature bag, channel and
spatial, applied to the target stack's features).

Along z the bag is replicate-padded at the ends of the input (as the stacking itself): the net's
output at slice ``z`` then depends on the input slices within ``z_halo = (k-1)/2 * d + sum(r)``
(:mod:`medseg.nn.slice25d`), which training and sliding-window inference cover with real slices.

In a 3-D net (``model.slices: 1``) the same block reads ``(B, C, X, Y, Z)`` features with z the last
axis: each z-slice ``F_z (C, X, Y)`` is modulated from the bag of its neighbouring z-slices.

**The map** (``model(x, return_attention=True)``, key ``va/enc{i}`` / ``va/dec{i}`` /
``va/bottleneck``): ``mean_c(Mc(z)) * Ms(z)``, the channel mean of the applied factor
``Mc(z) * Ms(z)`` (exactly: the factor is separable), shape ``(B, 1, x_i, y_i, Z)`` after the
2.5D wrapper, range [0, 1]: 0 = the features of that pixel of slice ``z`` are suppressed in every
channel, 1 = passed unchanged (VA never amplifies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.channel import MIN_HIDDEN, reduced_channels
from medseg.nn.layers import channel_mean, check_positive_int, check_spatial_dims
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["VolumetricAttention"]


@BLOCK_ATTENTION.register("va")
class VolumetricAttention(nn.Module):
    """Volumetric Attention (Wang et al., MICCAI 2019): channel and spatial attention on a slice's
    2-D features computed from the feature bag of its ``2r+1`` neighbouring slice-stacks.

    A block of the 2.5D net's 2-D U-Net (``model.slices > 1``, ``model.block_attention.name: va``):
    :class:`~medseg.nn.slice25d.SliceStack25D` sets ``z_len`` (slices per volume) for the forward;
    a 2-D net used alone (``z_len`` unset) has volumes of one slice (the bag is the slice itself,
    replicated). In a 3-D net z is the last spatial axis of the features.

    Args:
        channels: C.
        spatial_dims: 2 (the 2-D net of the 2.5D model) or 3 (z = the last axis).
        radius: r, the bag holds the stacks ``z - r .. z + r`` (adjacent slices).
        reduction: r of the channel MLP (hidden width ``reduced_channels(C, reduction, min_hidden)``).
        min_hidden: floor of that hidden width (1 = the exact ratio).
        kernel_size: in-plane size ``s`` of the spatial conv (odd; its z extent is the bag).

    Shapes: 2-D ``(B*Z, C, x, y) -> (B*Z, C, x, y)`` with the ``Z = z_len`` slices of each volume
    consecutive (the layout of :meth:`SliceStack25D.to_slices`); 3-D ``(B, C, X, Y, Z) -> (B, C, X, Y, Z)``.
    ``forward(x, return_map=True)`` also returns the map ``(B*Z, 1, x, y)`` / ``(B, 1, X, Y, Z)`` in
    [0, 1] (module docstring: the channel mean of the applied factor).

    Raises:
        ValueError: ``spatial_dims`` not 2 / 3, non-positive ``channels`` / ``radius`` /
            ``reduction`` / ``min_hidden``, even ``kernel_size``; at call time, a 2-D batch that is
            not a whole number of volumes of ``z_len`` slices.
    """

    returns_map = True
    map_prefix = "va"

    def __init__(self, channels: int, *, spatial_dims: int = 2, radius: int = 1, reduction: int = 16,
                 min_hidden: int = MIN_HIDDEN, kernel_size: int = 7):
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("channels", channels)
        check_positive_int("radius", radius)
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        bag = 2 * radius + 1
        hidden = reduced_channels(channels, reduction, min_hidden)
        self.z_radius = radius
        self.z_len: int | None = None
        self.fc1 = nn.Conv1d(channels, hidden, bag)  # (hidden, C, 2r+1): weight [:, :, j] reads stack z - r + j
        self.fc2 = nn.Conv1d(hidden, channels, 1)
        self.spatial = nn.Conv3d(2, 1, (kernel_size, kernel_size, bag), padding=(kernel_size // 2, kernel_size // 2, 0),
                                 bias=False)

    def _bag(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, ..., Z)`` -> ``(B, ..., Z + 2r)``: replicate-padded along z (the last axis)."""
        shape = t.shape
        r = self.z_radius
        return F.pad(t.reshape(shape[0], -1, shape[-1]), (r, r), mode="replicate").reshape(*shape[:-1], shape[-1] + 2 * r)

    def _attend(self, pooled: torch.Tensor, desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``(B, C, Z)`` and mean / max maps ``(B, 2, X, Y, Z)`` -> ``Mc (B, C, Z)``, ``Ms (B, 1, X, Y, Z)``."""
        mc = torch.sigmoid(self.fc2(F.relu(self.fc1(self._bag(pooled)))))
        return mc, torch.sigmoid(self.spatial(self._bag(desc)))

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors, both in (0, 1): for ``x (B*Z, C, x, y)``: ``Mc (B*Z, C, 1, 1)``, ``Ms (B*Z, 1, x, y)``;
        for ``x (B, C, X, Y, Z)``: ``Mc (B, C, 1, 1, Z)``, ``Ms (B, 1, X, Y, Z)``."""
        desc = torch.cat([channel_mean(x), x.amax(dim=1, keepdim=True)], dim=1)
        if x.ndim == 5:
            mc, ms = self._attend(x.mean(dim=(2, 3)), desc)
            return mc[:, :, None, None, :], ms
        nz = self.z_len or 1
        bz, c, nx, ny = x.shape
        if bz % nz:
            raise ValueError(f"va: a batch of {bz} slices is not a whole number of volumes of {nz} slices")
        b = bz // nz
        pooled = x.mean(dim=(2, 3)).reshape(b, nz, c).transpose(1, 2)  # (B, C, Z)
        mc, ms = self._attend(pooled, desc.reshape(b, nz, 2, nx, ny).permute(0, 2, 3, 4, 1))
        return mc.transpose(1, 2).reshape(bz, c, 1, 1), ms.permute(0, 4, 1, 2, 3).reshape(bz, 1, nx, ny)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        mc, ms = self.factors(x)
        y = x * mc * ms
        if return_map:
            return y, mc.mean(dim=1, keepdim=True) * ms
        return y
