"""Non-local block, embedded-Gaussian form (Wang, Girshick, Gupta, He, "Non-local Neural
Networks", CVPR 2018).

::

    theta, phi, g = 1x1 convs C -> C_i          (phi and g optionally max-pooled by 2: "subsample")
    y = softmax(theta(x)^T phi(x)) g(x)         (every position attends to every other one)
    z = W(y) + x                                W: 1x1 conv C_i -> C, zero-initialised

The attention is ``N x N`` over ``N = prod(S)`` positions (``N x N/2^d`` with subsampling), so the
block is meant for low-resolution stages (the bottleneck). The paper zero-initialises the BN after
``W`` so the block starts as the identity; here ``W`` itself is zero-initialised (no norm), same effect.
Shapes: ``(B, C, *S) -> (B, C, *S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.layers import check_positive_int, check_spatial_dims, conv_nd
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["NonLocalBlock"]


@BLOCK_ATTENTION.register("nonlocal")
class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018) with optional key/value subsampling.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        inter_channels: C_i, the embedding width (default C // 2, at least 1).
        subsample: max-pool keys and values by 2 per axis (the paper's cheaper variant).

    Shapes: ``(B, C, *S) -> (B, C, *S)``.

    Raises:
        ValueError: non-positive ``channels`` / ``inter_channels``, bad ``spatial_dims``.
    """

    def __init__(self, channels: int, *, spatial_dims: int = 3, inter_channels: int | None = None, subsample: bool = True):
        super().__init__()
        check_positive_int("channels", channels)
        sd = check_spatial_dims(spatial_dims)
        ci = max(channels // 2, 1) if inter_channels is None else check_positive_int("inter_channels", inter_channels)
        self.subsample = bool(subsample)
        self.theta = conv_nd(sd, channels, ci, 1)
        self.phi = conv_nd(sd, channels, ci, 1)
        self.g = conv_nd(sd, channels, ci, 1)
        self.out = conv_nd(sd, ci, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        if not self.subsample:
            return t
        k = tuple(min(2, s) for s in t.shape[2:])
        pool = F.max_pool2d if t.ndim == 4 else F.max_pool3d
        return pool(t, kernel_size=k, stride=k, ceil_mode=True)  # odd sizes keep their last row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *s = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, Ci)
        k = self._pool(self.phi(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, M, Ci)
        v = self._pool(self.g(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, M, Ci)
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # softmax(q k^T) v, no 1/sqrt(d)
        y = y.squeeze(1).transpose(1, 2).reshape(b, -1, *s)
        return x + self.out(y)
