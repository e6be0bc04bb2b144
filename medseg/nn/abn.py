"""Attention branch for the bottleneck, after the attention branch network (Fukui, Hirakawa,
Yamashita, Fujiyoshi, "Attention Branch Network: Learning of Attention Mechanism for Visual
Explanation", CVPR 2019), adapted to segmentation.

A small head turns the features ``F`` into a coarse per-class map ``P`` (logits, K classes). ``P`` is
supervised by the label nearest-downsampled to its grid (cross-entropy, :meth:`auxiliary_loss`,
which the trainer adds with ``train.aux_loss_weight``). Its foreground response
``A = 1 - softmax(P)[:, 0] = sum_{k>0} softmax(P)[:, k]`` in [0, 1] re-weights the features as in
the ABN paper's residual attention mechanism::

    F' = F * (1 + A)

Shapes: ``(B, C, *S) -> (B, C, *S)``; ``A: (B, 1, *S)``; ``P: (B, K, *S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.layers import check_positive_int, check_spatial_dims, conv_nd, make_norm
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["AttentionBranch", "downsample_label"]


def downsample_label(label: torch.Tensor, size) -> torch.Tensor:
    """Nearest ("nearest-exact", voxel centres) downsampling of an int label ``(B, 1, *S)`` to ``(B, *size)`` long."""
    lab = F.interpolate(label.float(), size=tuple(size), mode="nearest-exact")
    return lab[:, 0].long()


@BLOCK_ATTENTION.register("abn")
class AttentionBranch(nn.Module):
    """Attention branch (Fukui et al. 2019) with a supervised per-class coarse map.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        num_classes: K, classes of the coarse map, background included (the U-Net passes its own).
        hidden: width of the head's 3x3(x3) conv (default C // 2, at least 1).
        norm: instance | batch | group, in the head.

    Shapes: ``(B, C, *S) -> (B, C, *S)``; ``forward(x, return_map=True)`` also returns
    ``A: (B, 1, *S)`` in [0, 1]. The coarse logits of the last forward are kept in
    ``self.last_logits`` for :meth:`auxiliary_loss`.

    Raises:
        ValueError: non-positive ``channels`` / ``hidden``, ``num_classes < 2``, bad ``spatial_dims`` / ``norm``.
    """

    returns_map = True
    map_prefix = "abn"

    def __init__(self, channels: int, *, spatial_dims: int = 3, num_classes: int = 2, hidden: int | None = None, norm: str = "instance"):
        super().__init__()
        check_positive_int("channels", channels)
        sd = check_spatial_dims(spatial_dims)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        h = max(channels // 2, 1) if hidden is None else check_positive_int("hidden", hidden)
        self.head = nn.Sequential(
            conv_nd(sd, channels, h, 3), make_norm(norm, h, sd), nn.LeakyReLU(0.01, inplace=True), conv_nd(sd, h, num_classes, 1)
        )
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, return_map: bool = False):
        logits = self.head(x)
        self.last_logits = logits
        a = 1.0 - torch.softmax(logits.float(), dim=1)[:, :1].to(x.dtype)
        y = x * (1.0 + a)
        return (y, a) if return_map else y

    def auxiliary_loss(self, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the last forward's coarse logits vs ``label`` ``(B, 1, *S_full)`` int, downsampled.

        Raises:
            RuntimeError: no forward has run yet.
        """
        if self.last_logits is None:
            raise RuntimeError("auxiliary_loss called before any forward pass")
        logits = self.last_logits
        target = downsample_label(label.to(logits.device), logits.shape[2:])
        return F.cross_entropy(logits.float(), target)
