"""MONAI's own networks as baselines, wrapped to the medseg call signature.

``arch: monai_unet`` (:class:`monai.networks.nets.UNet`, residual units = 2),
``monai_attention_unet`` (:class:`monai.networks.nets.AttentionUnet`, Oktay-style gates evaluated at
full resolution, ~8x the FLOPs of ``UNet``) and ``monai_dynunet`` (:class:`monai.networks.nets.DynUNet`,
nnU-Net's network). ``model(x, return_attention=True)`` returns ``(logits, {})``: MONAI does not hand
out its gate maps. With deep supervision (DynUNet only) training returns the list
``[full, head_1, ...]``; note that MONAI upsamples every head to full resolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.networks.nets import AttentionUnet, DynUNet
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from medseg.nn.layers import act_spec, norm_spec, to_tuple

__all__ = ["MonaiBaseline", "monai_attention_unet", "monai_dynunet", "monai_unet"]


class MonaiBaseline(nn.Module):
    """Wrap a MONAI network: ``forward(x, return_attention=False)`` and ``patch_divisor``.

    Shapes: ``(B, C_in, *S) -> (B, K, *S)`` (a list in training with DynUNet deep supervision).
    """

    def __init__(self, net: nn.Module, patch_divisor: Sequence[int]):
        super().__init__()
        self.net = net
        self.patch_divisor = tuple(int(v) for v in patch_divisor)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        out = self.net(x)
        if isinstance(out, torch.Tensor) and out.ndim == x.ndim + 1:  # DynUNet's stacked heads
            out = list(torch.unbind(out, dim=1))
        return (out, {}) if return_attention else out


def _down_strides(strides: Sequence | None, n: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """The ``n - 1`` downsampling strides (medseg's ``strides`` minus the first, full-resolution one)."""
    if strides is None:
        return [(2,) * spatial_dims] * (n - 1)
    if len(strides) != n:
        raise ValueError(f"strides must have one entry per stage ({n}), got {strides!r}")
    return [to_tuple(s, spatial_dims, "strides") for s in strides[1:]]


def _divisor(strides: list[tuple[int, ...]], spatial_dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.prod(np.array(strides), axis=0)) if strides else (1,) * spatial_dims


def _common(spatial_dims, in_channels, num_classes, channels, strides) -> tuple[dict, list[tuple[int, ...]]]:
    """Keyword arguments shared by MONAI's ``UNet`` and ``AttentionUnet``, and the down strides."""
    down = _down_strides(strides, len(channels), spatial_dims)
    kwargs = dict(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=tuple(s[0] if len(set(s)) == 1 else s for s in down),
    )
    return kwargs, down


def monai_unet(*, spatial_dims, in_channels, num_classes, channels, strides=None, norm="instance", act="prelu", **_) -> MonaiBaseline:
    """MONAI ``UNet`` with 2 residual units per block (its first conv already downsamples)."""
    kwargs, down = _common(spatial_dims, in_channels, num_classes, channels, strides)
    net = MonaiUNet(**kwargs, num_res_units=2, norm=norm_spec(norm, min(channels)), act=act_spec(act))
    return MonaiBaseline(net, _divisor(down, spatial_dims))


def monai_attention_unet(*, spatial_dims, in_channels, num_classes, channels, strides=None, **_) -> MonaiBaseline:
    """MONAI ``AttentionUnet`` (batch norm, its own activation; norm/act settings do not apply)."""
    kwargs, down = _common(spatial_dims, in_channels, num_classes, channels, strides)
    return MonaiBaseline(AttentionUnet(**kwargs), _divisor(down, spatial_dims))


def monai_dynunet(
    *, spatial_dims, in_channels, num_classes, channels, strides=None, kernel_sizes=None, norm="instance", act="leakyrelu",
    residual=False, deep_supervision=False, **_,
) -> MonaiBaseline:
    """MONAI ``DynUNet`` (nnU-Net's network) with our widths, strides and kernels."""
    n = len(channels)
    down = _down_strides(strides, n, spatial_dims)
    kernels = [3] * n if kernel_sizes is None else list(kernel_sizes)
    if len(kernels) != n:
        raise ValueError(f"kernel_sizes must have one entry per stage ({n}), got {kernel_sizes!r}")
    net = DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        kernel_size=kernels,
        strides=[1, *down],
        upsample_kernel_size=down,
        filters=list(channels),
        norm_name=norm_spec(norm, min(channels)),
        act_name=act_spec(act),
        deep_supervision=bool(deep_supervision),
        deep_supr_num=max(n - 2, 1),
        res_block=bool(residual),
    )
    return MonaiBaseline(net, _divisor(down, spatial_dims))
