"""BAM: bottleneck attention module (Park, Woo, Lee, Kweon, BMVC 2018).

A channel branch and a dilated-conv spatial branch run in parallel on ``F``, each ending in a
batch norm, and are summed before one sigmoid (the paper's eqs. 1-4)::

    Mc(F) = BN(MLP(AvgPool(F)))                               (B, C, 1, ...)
    Ms(F) = BN(conv1x1(dconv3(dconv3(conv1x1(F)))))           (B, 1, *S), C -> C/r -> ... -> 1
    F'    = F + F * sigmoid(Mc(F) + Ms(F))

Norms: the spatial branch (its hidden layers and its output) uses ``norm`` (instance by default,
the project's choice, robust at batch size 1-2; ``batch`` is the paper's). The channel branch's
output norm is ``channel_norm``: ``batch`` (the paper's; a norm over the pooled ``(B, C)`` vector
needs the batch: instance norm of one value per channel is degenerate) or ``none``. In training,
batch statistics of B = 2 samples normalise each channel logit to about +-1, and B = 1 has none
(:class:`BAM` refuses it): at 3D batch sizes ``channel_norm: none`` may be the better choice.

The reference code (github.com/Jongchan/attention-module, ``MODELS/bam.py``) differs from the
paper: BN on the hidden layer of the channel MLP instead of its output, no BN after the spatial
branch's last conv, and ``1 + sigmoid(Mc * Ms)`` (a product). We follow the paper's equations.
Shapes: ``(B, C, *S) -> (B, C, *S)``.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.nn.channel import MIN_HIDDEN, ChannelMLP
from medseg.nn.layers import channel_mean, check_positive_int, conv_nd, make_norm, spatial_mean
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["BAM", "CHANNEL_NORMS"]

CHANNEL_NORMS = ("batch", "none")


@BLOCK_ATTENTION.register("bam")
class BAM(ChannelMLP):
    """Bottleneck attention module (Park et al. 2018): ``F + F * sigmoid(Mc + Ms)``.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        reduction: r for both branches (16 in the paper).
        min_hidden: floor of both branches' hidden width, ``max(C // r, min(min_hidden, C))``; 8 by
            default, 1 for the paper's exact ratio (:func:`~medseg.nn.channel.reduced_channels`).
        dilation: dilation of the two 3x3(x3) convs of the spatial branch (4 in the paper).
        norm: instance | batch | group, the spatial branch's norms (hidden layers and output).
        channel_norm: batch | none (``None`` too), the norm on the channel branch's output ``Mc``.

    Shapes: ``(B, C, *S) -> (B, C, *S)``. ``forward(x, return_map=True)`` also returns
    ``m = mean_c sigmoid(Mc + Ms): (B, 1, *S)`` in [0, 1]: the features are multiplied by
    ``1 + sigmoid(Mc + Ms)``, whose channel mean is ``1 + m``. ``m = 0``: the voxel passes
    unchanged (factor 1); ``m = 1``: it is doubled (factor 2). BAM never suppresses.

    Raises:
        ValueError: non-positive ``channels`` / ``reduction`` / ``min_hidden`` / ``dilation``, bad
            ``norm`` / ``channel_norm`` / ``spatial_dims``; in training, a batch of one sample with
            ``channel_norm="batch"``.
    """

    returns_map = True
    map_prefix = "bam"

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 16, min_hidden: int = MIN_HIDDEN,
                 dilation: int = 4, norm: str = "instance", channel_norm: str | None = "batch"):
        super().__init__(channels, spatial_dims=spatial_dims, reduction=reduction, min_hidden=min_hidden)  # fc1, fc2
        check_positive_int("dilation", dilation)
        channel_norm = "none" if channel_norm is None else channel_norm  # YAML `channel_norm: null`
        if channel_norm not in CHANNEL_NORMS:
            raise ValueError(f"channel_norm must be one of {', '.join(CHANNEL_NORMS)}, got {channel_norm!r}")
        sd, hidden = int(spatial_dims), self.fc1.out_channels
        self.channel_bn = make_norm("batch", channels, sd) if channel_norm == "batch" else nn.Identity()
        layers: list[nn.Module] = [conv_nd(sd, channels, hidden, 1), make_norm(norm, hidden, sd), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [conv_nd(sd, hidden, hidden, 3, dilation=dilation), make_norm(norm, hidden, sd), nn.ReLU(inplace=True)]
        layers += [conv_nd(sd, hidden, 1, 1), make_norm(norm, 1, sd)]
        self.spatial = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, return_map: bool = False):
        v = self.mlp(spatial_mean(x))  # (B, C, 1, ...)
        if self.training and x.shape[0] < 2 and not isinstance(self.channel_bn, nn.Identity):
            raise ValueError("BAM channel_norm='batch' needs at least 2 samples per batch in training (batch "
                             "statistics of the pooled channel vector); got 1: set block_attention.kwargs.channel_norm: none "
                             "or train.batch_size >= 2")
        mc = self.channel_bn(v)
        ms = self.spatial(x)  # (B, 1, *S)
        a = torch.sigmoid(mc + ms)  # (B, C, *S)
        y = x + x * a
        return (y, channel_mean(a)) if return_map else y
