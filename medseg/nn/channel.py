"""Channel attention blocks: squeeze-and-excitation and efficient channel attention.

Both re-weight channels with a gate computed from globally pooled features, so the gate is
constant over space. Shapes: ``(B, C, *S) -> (B, C, *S)`` for ``S`` 2-D or 3-D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.layers import check_positive_int, check_spatial_dims, conv_nd, spatial_mean
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["MIN_HIDDEN", "ChannelMLP", "EfficientChannelAttention", "SqueezeExcitation", "eca_kernel_size", "reduced_channels"]


MIN_HIDDEN = 8  # the hidden-width floor of every channel MLP unless a config sets ``min_hidden``


def reduced_channels(channels: int, reduction: int, min_hidden: int = MIN_HIDDEN) -> int:
    """Hidden width of a channel MLP (SE, CBAM, BAM, MS-CAM): ``max(C // r, min(min_hidden, C))``.

    The papers use ``C // r``. The floor keeps narrow stages from a 1-2 unit bottleneck, but it
    changes the ratio: with ``reduction=16`` and the default floor of 8, C = 16, 32, 64, 128, 256
    get hidden widths 8, 8, 8, 8, 16, i.e. effective ratios 2, 4, 8, 16, 16. ``min_hidden=1``
    gives the paper's exact ratio (1, 2, 4, 8, 16; never below one unit).

    Args:
        channels: C.
        reduction: r.
        min_hidden: the floor (``block_attention.kwargs.min_hidden`` /
            ``skip_fusion.kwargs.min_hidden`` in a config); 1 = no floor.

    Returns:
        The hidden width, in ``[1, C]`` for ``r >= 1``.

    Raises:
        ValueError: non-positive ``reduction`` or ``min_hidden``.
    """
    check_positive_int("reduction", reduction)
    check_positive_int("min_hidden", min_hidden)
    return max(channels // reduction, min(min_hidden, channels))


class ChannelMLP(nn.Module):
    """The bottleneck MLP of SE, CBAM and BAM: ``mlp(v) = W2 relu(W1 v)`` with ``W1: C -> hidden``,
    ``W2: hidden -> C`` as 1x1 convolutions (with bias), ``hidden = reduced_channels(C, r, min_hidden)``.

    The one implementation of that MLP: :class:`SqueezeExcitation`, CBAM's channel gate and
    :class:`~medseg.nn.bam.BAM` subclass it (rather than hold it) so that their state-dict keys
    stay ``fc1.*`` / ``fc2.*``.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        reduction: r.
        min_hidden: floor of the hidden width (see :func:`reduced_channels`).

    Shapes: :meth:`mlp`: ``(N, C, *S) -> (N, C, *S)`` (1x1 convs; ``S`` is all ones on pooled input).

    Raises:
        ValueError: non-positive ``channels`` / ``reduction`` / ``min_hidden`` or ``spatial_dims`` not 2/3.
    """

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 16, min_hidden: int = MIN_HIDDEN):
        super().__init__()
        check_positive_int("channels", channels)
        sd = check_spatial_dims(spatial_dims)
        hidden = reduced_channels(channels, reduction, min_hidden)
        self.fc1 = conv_nd(sd, channels, hidden, 1)
        self.fc2 = conv_nd(sd, hidden, channels, 1)

    def mlp(self, v: torch.Tensor) -> torch.Tensor:
        """``W2 relu(W1 v)``, without a final non-linearity."""
        return self.fc2(F.relu(self.fc1(v)))


@BLOCK_ATTENTION.register("se")
class SqueezeExcitation(ChannelMLP):
    """Squeeze-and-excitation (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018).

    ``y = x * sigmoid(W2 relu(W1 avgpool(x)))`` with ``W1: C -> C/r``, ``W2: C/r -> C`` (1x1 convs).

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        reduction: r, the reduction ratio (16 in the paper).
        min_hidden: floor of the hidden width, ``max(C // r, min(min_hidden, C))`` (see
            :func:`reduced_channels`); 8 by default, 1 for the paper's exact ratio.

    Shapes: ``(B, C, *S) -> (B, C, *S)``.

    Raises:
        ValueError: non-positive ``channels`` / ``reduction`` / ``min_hidden`` or ``spatial_dims`` not 2/3.
    """

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel gate ``(B, C, 1, ...)`` in [0, 1]."""
        return torch.sigmoid(self.mlp(spatial_mean(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel size ``k = |log2(C)/gamma + b/gamma|_odd`` (nearest odd, >= 1)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@BLOCK_ATTENTION.register("eca")
class EfficientChannelAttention(nn.Module):
    """Efficient channel attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
    Convolutional Neural Networks", CVPR 2020).

    ``y = x * sigmoid(conv1d_k(avgpool(x)))``: a 1-D convolution across the channel axis of the
    pooled descriptor (local cross-channel interaction, no dimensionality reduction) with the
    paper's adaptive kernel size :func:`eca_kernel_size` unless ``kernel_size`` is given.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        kernel_size: odd size of the 1-D conv; ``None`` = adaptive (gamma=2, b=1).
        gamma, b: constants of the adaptive rule.

    Shapes: ``(B, C, *S) -> (B, C, *S)``.

    Raises:
        ValueError: non-positive ``channels``, even / non-positive ``kernel_size``, bad ``spatial_dims``.
    """

    def __init__(self, channels: int, *, spatial_dims: int = 3, kernel_size: int | None = None, gamma: int = 2, b: int = 1):
        super().__init__()
        check_positive_int("channels", channels)
        check_spatial_dims(spatial_dims)
        k = eca_kernel_size(channels, gamma, b) if kernel_size is None else check_positive_int("kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {k}")
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel gate ``(B, C, 1, ...)`` in [0, 1]."""
        pooled = spatial_mean(x)  # (B, C, 1, ...)
        y = self.conv(pooled.flatten(1).unsqueeze(1))  # (B, 1, C)
        return torch.sigmoid(y.reshape(pooled.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)
