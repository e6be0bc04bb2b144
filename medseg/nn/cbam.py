"""CBAM: convolutional block attention module (Woo, Park, Lee, Kweon, ECCV 2018).

Channel attention then spatial attention, applied in that order (the paper's CBAM)::

    Mc(F)  = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))          (B, C, 1, ...)
    F'     = Mc(F) * F
    Ms(F') = sigmoid(conv_k([mean_c(F'); max_c(F')]))             (B, 1, *S)
    F''    = Ms(F') * F'

The MLP is shared between the two pooled descriptors (``C -> C/r -> C``, ReLU); ``conv_k`` is a
k x k (x k) convolution (k = 7 in the paper) from 2 channels to 1, without bias.

``arrangement`` selects one of the three arrangements of the paper's ablation (Sec. 4.1,
Table 3): ``channel_spatial`` (above, the paper's choice), ``spatial_channel`` (``F' = Ms(F) * F``,
``F'' = Mc(F') * F'``) and ``parallel``, where, in the paper's words, "the outputs of the two
attention modules are added and normalized with the sigmoid function": both branches see ``F``
and their pre-sigmoid outputs are summed into one 3-D map, ``F'' = F * sigmoid(mc(F) + ms(F))``
with ``mc = MLP(AvgPool(F)) + MLP(MaxPool(F))`` and ``ms = conv_k([mean_c(F); max_c(F)])``.
Shapes: ``(B, C, *S) -> (B, C, *S)``; the returned map ``(B, 1, *S)`` in [0, 1] is the spatial
factor applied (sequential arrangements) or the channel mean of the applied 3-D factor (parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.nn.channel import MIN_HIDDEN, ChannelMLP
from medseg.nn.layers import channel_mean, check_positive_int, check_spatial_dims, conv_nd, spatial_amax, spatial_mean
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["ARRANGEMENTS", "CBAM", "ChannelGateCBAM", "SpatialGateCBAM"]

ARRANGEMENTS = ("channel_spatial", "spatial_channel", "parallel")


class ChannelGateCBAM(ChannelMLP):
    """CBAM's channel attention ``Mc``: shared MLP (:class:`~medseg.nn.channel.ChannelMLP`) over
    average- and max-pooled descriptors.

    Shapes: ``(B, C, *S) -> (B, C, 1, ...)`` gate in [0, 1]; :meth:`logits` is the pre-sigmoid
    ``MLP(AvgPool(x)) + MLP(MaxPool(x))``.
    """

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([spatial_mean(x), spatial_amax(x)], dim=0)  # one MLP call for both
        avg, mx = self.mlp(pooled).chunk(2, dim=0)
        return avg + mx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class SpatialGateCBAM(nn.Module):
    """CBAM's spatial attention ``Ms``: a k-conv over the channel-wise mean and max maps.

    Shapes: ``(B, C, *S) -> (B, 1, *S)`` gate in [0, 1]; :meth:`logits` is the pre-sigmoid conv output.
    """

    def __init__(self, *, spatial_dims: int = 3, kernel_size: int = 7):
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = conv_nd(spatial_dims, 2, 1, kernel_size, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([channel_mean(x), x.amax(dim=1, keepdim=True)], dim=1)
        return self.conv(desc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


@BLOCK_ATTENTION.register("cbam")
class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al. 2018): channel and spatial attention.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        reduction: r of the shared channel MLP (16 in the paper).
        min_hidden: floor of the MLP's hidden width, ``max(C // r, min(min_hidden, C))``; 8 by
            default, 1 for the paper's exact ratio (:func:`~medseg.nn.channel.reduced_channels`).
        kernel_size: k of the spatial convolution (7 in the paper), odd.
        arrangement: ``channel_spatial`` (the paper's CBAM), ``spatial_channel`` or ``parallel``
            (the paper's ablation, Table 3; equations in the module docstring).

    Shapes: ``(B, C, *S) -> (B, C, *S)``; ``forward(x, return_map=True)`` also returns a map
    ``(B, 1, *S)`` in [0, 1]: the spatial factor ``Ms`` that multiplies the features
    (``channel_spatial``, ``spatial_channel``; 0 = voxel suppressed, 1 = passed unchanged), or,
    for ``parallel``, the channel mean of the applied 3-D factor ``sigmoid(mc + ms)``.

    Raises:
        ValueError: non-positive ``channels`` / ``reduction`` / ``min_hidden``, even
            ``kernel_size``, bad ``spatial_dims`` / ``arrangement``.
    """

    returns_map = True
    map_prefix = "cbam"

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 16, min_hidden: int = MIN_HIDDEN,
                 kernel_size: int = 7, arrangement: str = "channel_spatial"):
        super().__init__()
        check_positive_int("channels", channels)
        sd = check_spatial_dims(spatial_dims)
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"arrangement must be one of {', '.join(ARRANGEMENTS)}, got {arrangement!r}")
        self.arrangement = arrangement
        self.channel_gate = ChannelGateCBAM(channels, spatial_dims=sd, reduction=reduction, min_hidden=min_hidden)
        self.spatial_gate = SpatialGateCBAM(spatial_dims=sd, kernel_size=kernel_size)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        if self.arrangement == "channel_spatial":
            x = x * self.channel_gate(x)
            m = self.spatial_gate(x)
            y = x * m
        elif self.arrangement == "spatial_channel":
            m = self.spatial_gate(x)
            x = x * m
            y = x * self.channel_gate(x)
        else:  # parallel: one 3-D factor from the summed branch outputs
            a = torch.sigmoid(self.channel_gate.logits(x) + self.spatial_gate.logits(x))
            y = x * a
            m = channel_mean(a) if return_map else None
        return (y, m) if return_map else y
