"""Attention branch, after the attention branch network (Fukui, Hirakawa, Yamashita, Fujiyoshi,
"Attention Branch Network: Learning of Attention Mechanism for Visual Explanation", CVPR 2019),
adapted to segmentation (placed on the bottleneck by ``model.block_attention.bottleneck: abn``, or
after any stage as a block attention).

The paper's attention branch turns the features into a ``K x h x w`` map that global average
pooling makes into class scores (trained by cross-entropy), and turns that same map into the
attention map ``M`` by a 1x1 convolution to one channel, batch norm and a sigmoid. The perception
branch sees ``g'(x) = (1 + M(x)) * g(x)`` (the "residual" mechanism: ``M = 0`` leaves a feature
unchanged instead of erasing it). The paper sums the two losses. Here::

    P = head(F)                              conv 3x3(x3) C -> h, norm, leaky ReLU, conv 1x1 h -> K
    M = sigmoid(norm(conv1x1(P)))            K -> 1, no bias; the configured norm (the paper: BN)
    F' = F * (1 + M)    (residual=True, the paper)   or   F' = F * M   (residual=False)

``P`` is supervised voxel by voxel instead of through GAP, by a target that keeps every structure:
the fraction of each class in each coarse cell (:func:`class_fractions`, the average pooling of the
one-hot label), with soft cross-entropy and soft Dice (:meth:`AttentionBranch.auxiliary_loss`; the
trainer adds it with ``train.aux_loss_weight``, 1.0 = the paper's plain sum). A nearest-neighbour
downsampling of the label to the bottleneck grid (1/16) erases spheres of 925 and 4,169 voxels in a
64^3 patch, training the branch to call lesions background.

**The returned map is M**, ``(B, 1, *S)`` in [0, 1]: with ``residual=True`` the factor applied to the
features is ``1 + M`` (0: factor 1, features unchanged, no emphasis; 1: factor 2, doubled; the
branch never suppresses); with ``residual=False`` the factor is ``M`` itself (0 suppresses, 1 passes).

Shapes: ``(B, C, *S) -> (B, C, *S)``; ``M: (B, 1, *S)``; ``P: (B, K, *S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from medseg.nn.layers import check_positive_int, check_spatial_dims, conv_nd, make_norm
from medseg.nn.registries import BLOCK_ATTENTION

__all__ = ["AUX_LOSSES", "AttentionBranch", "class_fractions"]

AUX_LOSSES = ("dice_ce", "ce", "dice")


def class_fractions(label: torch.Tensor, num_classes: int, size) -> torch.Tensor:
    """Fraction of each class in each cell of a coarse grid: adaptive average pooling of the one-hot label.

    Area-preserving: ``fractions[:, k].sum() * cell_volume`` is the number of voxels of class ``k``
    when the grid divides ``S``. Voxels labelled outside ``[0, K)`` (an ignore label) count in no
    class, so a cell's fractions sum to the share of its voxels that are not ignored.

    Args:
        label: ``(B, 1, *S)`` integer label.
        num_classes: K (background included).
        size: the coarse grid ``S'`` (2 or 3 ints).

    Returns:
        ``(B, K, *S')`` float32 in [0, 1].
    """
    pool = F.adaptive_avg_pool2d if label.ndim == 4 else F.adaptive_avg_pool3d
    lab = label.long()
    return torch.cat([pool((lab == k).float(), tuple(int(s) for s in size)) for k in range(num_classes)], dim=1)


@BLOCK_ATTENTION.register("abn")
class AttentionBranch(nn.Module):
    """Attention branch (Fukui et al. 2019): a supervised per-class map and a learned attention map from it.

    Args:
        channels: C.
        spatial_dims: 2 or 3.
        num_classes: K, classes of the branch's map, background included (the U-Net passes its own).
        hidden: width of the head's 3x3(x3) conv (default C // 2, at least 1).
        norm: instance | batch | group, in the head and on the attention map (the paper: batch).
        residual: ``F * (1 + M)`` as in the paper (default), or ``F * M``.
        loss: the auxiliary loss on the class fractions: dice_ce (soft CE + soft Dice over the
            foreground classes, batch Dice) | ce | dice.

    Shapes: ``(B, C, *S) -> (B, C, *S)``; ``forward(x, return_map=True)`` also returns
    ``M: (B, 1, *S)`` in [0, 1] (applied factor ``1 + M`` with ``residual``, else ``M``). The
    branch's logits of the last forward are kept in ``self.last_logits`` for :meth:`auxiliary_loss`.

    Raises:
        ValueError: non-positive ``channels`` / ``hidden``, ``num_classes < 2``, bad ``spatial_dims`` /
            ``norm`` / ``loss``.
    """

    returns_map = True
    map_prefix = "abn"

    def __init__(self, channels: int, *, spatial_dims: int = 3, num_classes: int = 2, hidden: int | None = None,
                 norm: str = "instance", residual: bool = True, loss: str = "dice_ce"):
        super().__init__()
        check_positive_int("channels", channels)
        sd = check_spatial_dims(spatial_dims)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        if loss not in AUX_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(AUX_LOSSES)}, got {loss!r}")
        h = max(channels // 2, 1) if hidden is None else check_positive_int("hidden", hidden)
        self.head = nn.Sequential(
            conv_nd(sd, channels, h, 3), make_norm(norm, h, sd), nn.LeakyReLU(0.01, inplace=True), conv_nd(sd, h, num_classes, 1)
        )
        self.map_conv = conv_nd(sd, num_classes, 1, 1, bias=False)
        self.map_norm = make_norm(norm, 1, sd)
        self.num_classes = num_classes
        self.residual = bool(residual)
        self.loss = loss
        self.dice = DiceLoss(include_background=False, batch=True)
        self.last_logits: torch.Tensor | None = None

    def attention_map(self, logits: torch.Tensor) -> torch.Tensor:
        """``M = sigmoid(norm(conv1x1(P)))``: ``(B, K, *S) -> (B, 1, *S)`` in [0, 1]."""
        return torch.sigmoid(self.map_norm(self.map_conv(logits)))

    def forward(self, x: torch.Tensor, return_map: bool = False):
        logits = self.head(x)
        self.last_logits = logits
        m = self.attention_map(logits)
        y = x * (1.0 + m) if self.residual else x * m
        return (y, m) if return_map else y

    def auxiliary_loss(self, label: torch.Tensor) -> torch.Tensor:
        """Soft CE and/or soft Dice of the last forward's logits vs :func:`class_fractions` of ``label``.

        ``label``: ``(B, 1, *S_full)`` int. CE: ``-sum_k t_k log softmax(P)_k`` summed over cells,
        divided by the cells' non-ignored share (the mean over cells when nothing is ignored). Dice:
        MONAI's ``DiceLoss`` (foreground classes, batch) of ``softmax(P) * w`` vs ``t``, where ``w``
        is each cell's non-ignored share. Returns a float32 scalar.

        Raises:
            RuntimeError: no forward has run yet.
        """
        if self.last_logits is None:
            raise RuntimeError("auxiliary_loss called before any forward pass")
        logits = self.last_logits.float()
        target = class_fractions(label.to(logits.device), self.num_classes, logits.shape[2:])
        weight = target.sum(dim=1, keepdim=True)
        loss = logits.new_zeros(())
        if self.loss in ("dice_ce", "ce"):
            loss = loss - (target * torch.log_softmax(logits, dim=1)).sum() / weight.sum().clamp_min(1e-6)
        if self.loss in ("dice_ce", "dice"):
            loss = loss + self.dice(torch.softmax(logits, dim=1) * weight, target)
        return loss
