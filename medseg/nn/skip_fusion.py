"""Skip fusions: how a decoder level merges the encoder skip ``x`` with the gating signal ``g``.

Every fusion is called as ``fusion(x, g)`` with ``x: (B, Cs, *S)`` (the skip, fine grid) and
``g: (B, Cg, *S')`` (the output of the coarser decoder level or the bottleneck, ``S' ~ S / scale``),
upsamples ``g`` itself (transposed conv, kernel = stride = ``scale``, cropped / padded to ``S``) and
returns ``(B, fusion.out_channels, *S)``, the input of the decoder's conv stage.

* ``concat``: ``[x, up(g)]`` (plain U-Net, Ronneberger et al. 2015).
* ``gate``: additive attention gate (Oktay et al., "Attention U-Net: Learning Where to Look for the
  Pancreas", MIDL 2018; grid attention): ``[x * alpha, up(g)]``.
* ``aff`` / ``iaff``: attentional feature fusion with the multi-scale channel attention module
  (Dai et al., "Attentional Feature Fusion", WACV 2021): ``x * M + up(g) * (1 - M)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.nn.channel import MIN_HIDDEN, reduced_channels
from medseg.nn.layers import Upsample, check_positive_int, check_spatial_dims, conv_nd, make_norm, match_size, spatial_mean, to_tuple
from medseg.nn.registries import SKIP_FUSION

__all__ = ["AttentionGate", "AttentionalFeatureFusion", "ConcatFusion", "IterativeAFF", "MSCAM"]


def _check(skip_channels: int, gating_channels: int, spatial_dims: int) -> int:
    check_positive_int("skip_channels", skip_channels)
    check_positive_int("gating_channels", gating_channels)
    return check_spatial_dims(spatial_dims)


@SKIP_FUSION.register("concat")
class ConcatFusion(nn.Module):
    """Plain U-Net skip: concatenate the skip with the upsampled gating signal.

    Args:
        skip_channels: Cs. gating_channels: Cg. spatial_dims: 2 or 3.
        scale: upsampling factor from ``g``'s grid to ``x``'s (int or per axis), default 2.

    Shapes: ``x (B, Cs, *S), g (B, Cg, *S') -> (B, 2 Cs, *S)``.

    Raises:
        ValueError: non-positive channel counts / scale, bad ``spatial_dims``.
    """

    def __init__(self, skip_channels: int, gating_channels: int, *, spatial_dims: int = 3, scale: int | Sequence[int] = 2):
        super().__init__()
        sd = _check(skip_channels, gating_channels, spatial_dims)
        self.up = Upsample(sd, gating_channels, skip_channels, scale)
        self.out_channels = 2 * skip_channels

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.up(g, x.shape[2:])], dim=1)


@SKIP_FUSION.register("gate")
class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018), computed on the coarse (gating) grid.

    ::

        g~    = relu(norm(conv1x1(g)))         only with gating_transform (Cg -> Cg, no bias); else g~ = g
        q     = relu(theta(x) + phi(g~))       theta: conv k = stride = scale, Cs -> Ci, no bias
                                               phi:   1x1 conv Cg -> Ci       (both on g's grid)
        alpha = sigmoid(psi(q))                psi:   1x1 conv Ci -> 1
        a     = upsample(alpha) to S           (bi/trilinear)
        out   = [x * a, up(g)]                 with residual: [x * (1 + a), up(g)]

    Only ``theta`` touches the fine grid (one strided conv), so the gate costs a few percent of a
    decoder stage, unlike gates evaluated at full resolution. Oktay's optional output transform
    ``W`` is left out so that the gated skip is exactly ``x * a``.

    The options of Oktay et al.'s network (reference code ``unet_grid_attention_3D``), all off by
    default (the cheaper gate): ``inter_channels="skip"`` (Ci = Cs, their ``inter_size``),
    ``gating_transform=True`` (their ``UnetGridGatingSignal3``: 1x1 conv + norm + ReLU on the gating
    signal; they apply it once, to the bottleneck, here every gate has its own), and -- a setting of
    the U-Net, not of the gate -- ``model.skip_fusion.levels: [false, true, ...]``, which leaves the
    finest skip ungated as their net does.

    ``zero_init=True`` initialises ``psi`` (weights and bias) to zero, so every gate map starts at
    0.5 everywhere: the untrained gated net is a plain U-Net with its skips halved, not one whose
    skips are multiplied by a random spatial pattern, and the gates grow from there (the non-local
    block's zero-initialised output, Wang et al. 2018, applied to the gate's logit). ``theta`` and
    ``phi`` get their first gradients once ``psi`` has moved (after one step).

    Args:
        skip_channels: Cs. gating_channels: Cg. spatial_dims: 2 or 3.
        scale: the resolution ratio between ``x`` and ``g`` (int or per axis), default 2.
        inter_channels: Ci: an int, ``None`` (default, ``max(Cs // 2, 1)``) or ``"skip"`` (Cs).
        gating_transform: 1x1 conv + ``norm`` + ReLU on ``g`` before ``phi`` (default off).
        norm: instance | batch | group, of the gating transform (the U-Net passes its own).
        zero_init: ``psi`` starts at zero (every gate 0.5 at the start; default off: PyTorch's init).
        residual: skip gated as ``x * (1 + a)`` instead of ``x * a`` (default off).

    Shapes: ``x (B, Cs, *S), g (B, Cg, *S') -> (B, 2 Cs, *S)``; with ``return_map=True`` also the
    gate map ``a: (B, 1, *S)`` in [0, 1], the factor the skip is multiplied by (0: suppressed,
    1: passed unchanged; with ``residual`` the factor is ``1 + a``: 0 passes, 1 doubles).

    Raises:
        ValueError: non-positive channel counts / scale / ``inter_channels``, bad ``spatial_dims`` / ``norm``.
    """

    returns_map = True
    map_prefix = "gate"

    def __init__(
        self,
        skip_channels: int,
        gating_channels: int,
        *,
        spatial_dims: int = 3,
        scale: int | Sequence[int] = 2,
        inter_channels: int | str | None = None,
        gating_transform: bool = False,
        norm: str = "instance",
        zero_init: bool = False,
        residual: bool = False,
    ):
        super().__init__()
        sd = _check(skip_channels, gating_channels, spatial_dims)
        if inter_channels is None:
            ci = max(skip_channels // 2, 1)
        elif inter_channels == "skip":
            ci = skip_channels
        elif isinstance(inter_channels, str):
            raise ValueError(f"inter_channels must be a positive integer, null or 'skip', got {inter_channels!r}")
        else:
            ci = check_positive_int("inter_channels", inter_channels)
        for name, flag in (("gating_transform", gating_transform), ("zero_init", zero_init), ("residual", residual)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        s = to_tuple(scale, sd, "scale")
        self.gating = None
        if gating_transform:
            cg = gating_channels
            self.gating = nn.Sequential(conv_nd(sd, cg, cg, 1, bias=False), make_norm(norm, cg, sd), nn.ReLU(inplace=True))
        self.theta = conv_nd(sd, skip_channels, ci, s, stride=s, padding=0, bias=False)
        self.phi = conv_nd(sd, gating_channels, ci, 1)
        self.psi = conv_nd(sd, ci, 1, 1)
        if zero_init:
            nn.init.zeros_(self.psi.weight)
            nn.init.zeros_(self.psi.bias)
        self.up = Upsample(sd, gating_channels, skip_channels, s)
        self.out_channels = 2 * skip_channels
        self.residual = residual
        self._mode = "bilinear" if sd == 2 else "trilinear"

    def gate(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gate map ``(B, 1, *S)`` in [0, 1], computed on ``g``'s grid and upsampled to ``x``'s."""
        if self.gating is not None:
            g = self.gating(g)
        q = F.relu(match_size(self.theta(x), g.shape[2:]) + self.phi(g))
        alpha = torch.sigmoid(self.psi(q))
        return F.interpolate(alpha, size=x.shape[2:], mode=self._mode, align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor, return_map: bool = False):
        a = self.gate(x, g)
        out = torch.cat([x * (1 + a) if self.residual else x * a, self.up(g, x.shape[2:])], dim=1)
        return (out, a) if return_map else out


class MSCAM(nn.Module):
    """Multi-scale channel attention module (Dai et al. 2021): ``sigmoid(L(X) + G(X))``.

    ``L``: point-wise conv ``C -> C/r`` - norm - ReLU - point-wise conv ``C/r -> C`` - norm (local).
    ``G``: the same on the globally average-pooled ``X`` (no norm: it would see one value per channel).

    Shapes: ``(B, C, *S) -> (B, C, *S)`` weights in [0, 1].
    """

    def __init__(self, channels: int, *, spatial_dims: int = 3, reduction: int = 4, min_hidden: int = MIN_HIDDEN,
                 norm: str = "instance"):
        super().__init__()
        sd = spatial_dims
        h = reduced_channels(channels, reduction, min_hidden)
        self.local = nn.Sequential(
            conv_nd(sd, channels, h, 1), make_norm(norm, h, sd), nn.ReLU(inplace=True), conv_nd(sd, h, channels, 1), make_norm(norm, channels, sd)
        )
        self.glob = nn.Sequential(conv_nd(sd, channels, h, 1), nn.ReLU(inplace=True), conv_nd(sd, h, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.local(x) + self.glob(spatial_mean(x)))


@SKIP_FUSION.register("aff")
class AttentionalFeatureFusion(nn.Module):
    """Attentional feature fusion (Dai et al. 2021): ``Z = M(X + Y) * X + (1 - M(X + Y)) * Y``.

    ``X`` is the skip and ``Y = up(g)`` the upsampled gating signal (both ``Cs`` channels).

    Args:
        skip_channels: Cs. gating_channels: Cg. spatial_dims: 2 or 3.
        scale: resolution ratio between ``x`` and ``g``, default 2.
        reduction: r of the MS-CAM (4 in the paper). norm: instance | batch | group (local branch).
        min_hidden: floor of the MS-CAM's hidden width, ``max(C // r, min(min_hidden, C))``; 8 by
            default, 1 for the paper's exact ratio (:func:`~medseg.nn.channel.reduced_channels`).

    Shapes: ``x (B, Cs, *S), g (B, Cg, *S') -> (B, Cs, *S)``; with ``return_map=True`` also the
    channel-mean of ``M``, ``(B, 1, *S)`` in [0, 1] (the share of the skip in the fusion).

    Raises:
        ValueError: non-positive channel counts / scale / reduction / min_hidden, bad ``spatial_dims`` / ``norm``.
    """

    returns_map = True
    map_prefix = "aff"
    iterative = False

    def __init__(
        self,
        skip_channels: int,
        gating_channels: int,
        *,
        spatial_dims: int = 3,
        scale: int | Sequence[int] = 2,
        reduction: int = 4,
        min_hidden: int = MIN_HIDDEN,
        norm: str = "instance",
    ):
        super().__init__()
        sd = _check(skip_channels, gating_channels, spatial_dims)
        self.up = Upsample(sd, gating_channels, skip_channels, scale)
        self.mscam = MSCAM(skip_channels, spatial_dims=sd, reduction=reduction, min_hidden=min_hidden, norm=norm)
        if self.iterative:
            self.mscam_init = MSCAM(skip_channels, spatial_dims=sd, reduction=reduction, min_hidden=min_hidden, norm=norm)
        self.out_channels = skip_channels

    def forward(self, x: torch.Tensor, g: torch.Tensor, return_map: bool = False):
        y = self.up(g, x.shape[2:])
        init = x + y
        if self.iterative:  # iAFF: the initial integration is itself an AFF
            m0 = self.mscam_init(init)
            init = y + (x - y) * m0
        m = self.mscam(init)
        z = y + (x - y) * m  # == x * m + y * (1 - m)
        return (z, m.mean(dim=1, keepdim=True)) if return_map else z


@SKIP_FUSION.register("iaff")
class IterativeAFF(AttentionalFeatureFusion):
    """Iterative attentional feature fusion (Dai et al. 2021): the initial integration ``X + Y`` is
    replaced by a first AFF, ``Z = M(X (+) Y) * X + (1 - M(X (+) Y)) * Y`` with ``X (+) Y = AFF(X, Y)``.
    Same arguments and shapes as :class:`AttentionalFeatureFusion`."""

    map_prefix = "iaff"
    iterative = True
