"""BAM: bottleneck attention module (Park, Woo, Lee, Kweon, BMVC 2018).

A channel branch and a dilated-conv spatial branch run in parallel on ``F`` and are summed
before one sigmoid::

    Mc(F) = MLP(AvgPool(F))                                   (B, C, 1, ...)
    Ms(F) = conv1x1(dconv3(dconv3(conv1x1(F))))               (B, 1, *S), C -> C/r -> ... -> 1
    F'    = F + F * sigmoid(Mc(F) + Ms(F))

The paper puts batch norm in both branches; here the spatial branch uses a configurable norm
(instance by default, robust at batch size 1-2) and the channel MLP has none (a norm over a
pooled ``(B, C)`` vector is ill-defined at batch size 1). Shapes: ``(B, C, *S) -> (B, C, *S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.channel import reduced_channels
from medseg.nn.layers import check_positive_int, check_spatial_dims, conv_nd, make_norm, spatial_mean
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["BAM"]


@BLOCK_ATTENTION.register("bam")
class BAM(nn.Module):
    """Bottleneck attention module (Park et al. 2018): ``F + F * sigmoid(Mc + Ms)``.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        reduction: r for both branches (16 in the paper; hidden width >= min(8, C)).
        dilation: dilation of the two 3x3(x3) convs of the spatial branch (4 in the paper).
        norm: instance | batch | group, used in the spatial branch.

    Shapes: ``(B, C, *S) -> (B, C, *S)``; ``forward(x, return_map=True)`` also returns the spatial
    branch's map ``sigmoid(Ms): (B, 1, *S)`` in [0, 1].

    Raises:
        ValueError: non-positive ``channels`` / ``reduction`` / ``dilation``, bad ``norm`` / ``spatial_dims``.
    """

    returns_map = True
    map_prefix = "bam"

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 16, dilation: int = 4, norm: str = "instance"):
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("dilation", dilation)
        sd = check_spatial_dims(spatial_dims)
        hidden = reduced_channels(channels, reduction)
        self.fc1 = conv_nd(sd, channels, hidden, 1)
        self.fc2 = conv_nd(sd, hidden, channels, 1)
        layers: list[nn.Module] = [conv_nd(sd, channels, hidden, 1), make_norm(norm, hidden, sd), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [conv_nd(sd, hidden, hidden, 3, dilation=dilation), make_norm(norm, hidden, sd), nn.ReLU(inplace=True)]
        layers.append(conv_nd(sd, hidden, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        mc = self.fc2(F.relu(self.fc1(spatial_mean(x))))  # (B, C, 1, ...)
        ms = self.spatial(x)  # (B, 1, *S)
        y = x + x * torch.sigmoid(mc + ms)
        return (y, torch.sigmoid(ms)) if return_map else y
