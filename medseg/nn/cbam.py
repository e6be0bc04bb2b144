"""CBAM: convolutional block attention module (Woo, Park, Lee, Kweon, ECCV 2018).

Channel attention then spatial attention, applied in that order::

    Mc(F)  = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))          (B, C, 1, ...)
    F'     = Mc(F) * F
    Ms(F') = sigmoid(conv_k([mean_c(F'); max_c(F')]))             (B, 1, *S)
    F''    = Ms(F') * F'

The MLP is shared between the two pooled descriptors (``C -> C/r -> C``, ReLU); ``conv_k`` is a
k x k (x k) convolution (k = 7 in the paper) from 2 channels to 1, without bias.
Shapes: ``(B, C, *S) -> (B, C, *S)``; the gate map is ``Ms: (B, 1, *S)`` in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.channel import reduced_channels
from medseg.nn.layers import channel_mean, check_positive_int, check_spatial_dims, conv_nd, spatial_amax, spatial_mean
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["CBAM", "ChannelGateCBAM", "SpatialGateCBAM"]


class ChannelGateCBAM(nn.Module):
    """CBAM's channel attention ``Mc``: shared MLP over average- and max-pooled descriptors.

    Shapes: ``(B, C, *S) -> (B, C, 1, ...)`` gate in [0, 1].
    """

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 16):
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.fc1 = conv_nd(spatial_dims, channels, hidden, 1)
        self.fc2 = conv_nd(spatial_dims, hidden, channels, 1)

    def mlp(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([spatial_mean(x), spatial_amax(x)], dim=0)  # one MLP call for both
        avg, mx = self.mlp(pooled).chunk(2, dim=0)
        return torch.sigmoid(avg + mx)


class SpatialGateCBAM(nn.Module):
    """CBAM's spatial attention ``Ms``: a k-conv over the channel-wise mean and max maps.

    Shapes: ``(B, C, *S) -> (B, 1, *S)`` gate in [0, 1].
    """

    def __init__(self, *, spatial_dims: int = 3, kernel_size: int = 7):
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = conv_nd(spatial_dims, 2, 1, kernel_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([channel_mean(x), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))


@BLOCK_ATTENTION.register("cbam")
class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al. 2018): channel, then spatial attention.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        reduction: r of the shared channel MLP (16 in the paper; hidden width >= min(8, C)).
        kernel_size: k of the spatial convolution (7 in the paper), odd.

    Shapes: ``(B, C, *S) -> (B, C, *S)``; ``forward(x, return_map=True)`` also returns the
    spatial map ``Ms: (B, 1, *S)`` in [0, 1].

    Raises:
        ValueError: non-positive ``channels`` / ``reduction``, even ``kernel_size``, bad ``spatial_dims``.
    """

    returns_map = True
    map_prefix = "cbam"

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        check_positive_int("channels", channels)
        sd = check_spatial_dims(spatial_dims)
        self.channel_gate = ChannelGateCBAM(channels, spatial_dims=sd, reduction=reduction)
        self.spatial_gate = SpatialGateCBAM(spatial_dims=sd, kernel_size=kernel_size)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        x = x * self.channel_gate(x)
        ms = self.spatial_gate(x)
        y = x * ms
        return (y, ms) if return_map else y
