"""Small building blocks shared by the attention blocks, the skip fusions and the U-Net.

Everything here is N-d (``spatial_dims`` 2 or 3): tensors are ``(B, C, *spatial)`` and reductions
run over ``tuple(range(2, x.ndim))``. Conv stages are MONAI blocks
(:class:`monai.networks.blocks.Convolution`, :class:`~monai.networks.blocks.UnetResBlock`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetResBlock
from monai.networks.layers.factories import Norm
from monai.networks.layers.utils import get_norm_layer
from torch import nn

__all__ = [
    "NORMS",
    "ACTS",
    "GroupNorm",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "check_positive_int",
    "check_spatial_dims",
    "conv_nd",
    "conv_stage",
    "act_spec",
    "channel_mean",
    "make_norm",
    "match_size",
    "norm_spec",
    "spatial_amax",
    "spatial_mean",
    "to_tuple",
    "Upsample",
]

NORMS = ("instance", "batch", "group")
ACTS = ("leakyrelu", "relu", "prelu", "gelu")


# --------------------------------------------------------------------------- argument checks
def check_spatial_dims(spatial_dims: int) -> int:
    """``spatial_dims`` must be 2 or 3; raises ValueError naming the argument."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def check_positive_int(name: str, value: object) -> int:
    """A positive integer or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def to_tuple(value: int | Sequence[int], n: int, name: str = "value") -> tuple[int, ...]:
    """An int broadcast to ``n`` axes, or a length-``n`` sequence checked and made a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value,) * n
    else:
        out = tuple(int(v) for v in value)
        if len(out) != n:
            raise ValueError(f"{name} must be an int or {n} values, got {value!r}")
    if any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


# --------------------------------------------------------------------------- norms / activations
CHANNELS_LAST_NORM_BACKWARD = True
"""Train channels-last fp32 / bf16 instance and group norms through :class:`_ChannelsLastGroupNorm` (False:
PyTorch's group-norm backward; ``benchmarks/train_speed.py --layouts channels_last channels_last_stock_norm``
times both)."""


def _takes_channels_last_backward(x: torch.Tensor, affine: bool, weight: torch.Tensor | None) -> bool:
    """Whether a CPU norm of ``x`` in training goes through :class:`_ChannelsLastGroupNorm`: gradients on, an
    affine fp32 norm, fp32 / bf16 activations in channels-last memory (not also contiguous)."""
    if not (CHANNELS_LAST_NORM_BACKWARD and affine and weight is not None and torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dim() in (4, 5) and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == torch.float32):
        return False
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return x.is_contiguous(memory_format=fmt) and not x.is_contiguous()


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """Group norm (instance norm: one group per channel) of a channels-last fp32 / bf16 CPU tensor with a
    backward written for that layout.

    Forward is PyTorch's group-norm kernel (fast in channels-last). Its backward is not: on a 2-core
    AVX2 EPYC it took 20 ms for a ``(2, 16, 48, 48, 48)`` channels_last_3d tensor against 6 ms
    contiguous (5 ms / 0.4 ms at ``(2, 32, 24, 24, 24)``), ~12% of a training step of the lesion
    recipe. Here the backward runs on the ``(B, S, C)`` view of the same memory (``S`` voxels, channels
    innermost): two per-channel sums over ``S``, summed again over each group's channels, and two fused
    passes for the standard normalization gradient (Wu & He, 2018, group norm; ``N`` = voxels x channels
    of a group, ``gy`` the gradient of ``y``)::

        xhat = (x - mean) * rstd;   dxhat = weight * gy
        dx = rstd * (dxhat - sum_N(dxhat) / N - xhat * sum_N(dxhat * xhat) / N)

    bf16 inputs (autocast) are computed in fp32 and the gradient returned in bf16; the kernel's bf16
    channels-last backward took 66 ms at ``(2, 16, 48, 48, 48)`` against 1.4 ms contiguous on the same CPU.

    Shapes: ``x (B, C, *S)`` channels-last, ``weight``, ``bias`` ``(C,)``, ``groups`` dividing ``C`` ->
    ``(B, C, *S)`` in the layout of ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
        b, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, b, c, x[0, 0].numel(), groups, eps)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        b, c = x.shape[:2]
        groups = ctx.groups
        per = c // groups  # channels per group
        dt = torch.promote_types(x.dtype, torch.float32)  # bf16 computed in fp32; fp32 / float64 (gradcheck) as they are

        def per_channel(t: torch.Tensor) -> torch.Tensor:  # (B, G) group values -> (B, 1, C)
            return t.to(dt).view(b, groups, 1).expand(b, groups, per).reshape(b, 1, c)

        def group_sum(t: torch.Tensor) -> torch.Tensor:  # (B, 1, C) per channel -> (B, 1, C) its group's sum
            return per_channel(t.view(b, groups, per).sum(-1))

        perm = (0, *range(2, x.dim()), 1)
        v = x.permute(perm).reshape(b, -1, c).to(dt)  # a view: channels-last memory is (B, *S, C); bf16 -> fp32
        g = grad.permute(perm).reshape(b, -1, c).to(dt)  # a copy only if not channels-last (or bf16)
        n = v.shape[1] * per
        mean, rstd = per_channel(mean), per_channel(rstd)
        sum_g = g.sum(dim=1, keepdim=True)  # (B, 1, C)
        sum_g_xhat = ((g * v).sum(dim=1, keepdim=True) - mean * sum_g) * rstd  # sum_S(g * xhat), (B, 1, C)
        grad_w = (sum_g_xhat.sum(dim=(0, 1)) if ctx.needs_input_grad[1] else None)
        grad_b = (sum_g.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dt).view(1, 1, c)
            a = w * rstd  # dx = a * g + c1 * x + c0
            c1 = -rstd * rstd * group_sum(w * sum_g_xhat) / n
            c0 = -rstd * group_sum(w * sum_g) / n - c1 * mean
            dx = torch.addcmul(c0, v, c1).addcmul_(g, a)
            grad_x = dx.view(b, *x.shape[2:], c).permute(0, x.dim() - 1, *range(1, x.dim() - 1)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None


class _InstanceNormOnCPU:
    """Instance normalization (Ulyanov et al., 2016) computed by ``F.group_norm`` on the CPU.

    Instance norm is group norm with one group per channel. On the CPU, PyTorch's instance norm
    reshapes the input to ``(1, B*C, *S)`` for a batch norm, which forces a copy to the default
    memory format; the group-norm kernel works on ``channels_last_3d`` tensors in place and in
    bf16. With oneDNN convolutions in channels-last bf16 that removes every layout copy: a
    (16..256) U-Net forward on 2x1x128x96x128 windows went from 2.6 s to 1.4 s on 2 cores
    (``benchmarks/infer_speed.py``). Same parameters and state-dict keys as ``nn.InstanceNorm*d``;
    CUDA tensors, running statistics and one-voxel inputs take the stock path. Training in
    channels-last fp32 or bf16 (gradients on, affine) goes through :class:`_ChannelsLastGroupNorm`,
    whose backward avoids the group-norm kernel's slow channels-last backward.

    Shapes: ``(B, C, *S) -> (B, C, *S)``, memory format kept.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (input.device.type != "cpu" or self.track_running_stats or input.dim() != self._get_no_batch_dim() + 1
                or input[0, 0].numel() <= 1):
            return super().forward(input)
        if _takes_channels_last_backward(input, self.affine, self.weight):
            return _ChannelsLastGroupNorm.apply(input, self.weight, self.bias, self.num_features, self.eps)
        return F.group_norm(input, self.num_features, self.weight, self.bias, self.eps)


class InstanceNorm2d(_InstanceNormOnCPU, nn.InstanceNorm2d):
    __doc__ = _InstanceNormOnCPU.__doc__


class InstanceNorm3d(_InstanceNormOnCPU, nn.InstanceNorm3d):
    __doc__ = _InstanceNormOnCPU.__doc__


class GroupNorm(nn.GroupNorm):
    """Group normalization (Wu & He, 2018), ``nn.GroupNorm`` whose CPU training in channels-last fp32 / bf16
    (gradients on, affine) goes through :class:`_ChannelsLastGroupNorm`, as :class:`InstanceNorm3d` does: PyTorch's
    group-norm backward is several times slower in that layout than contiguous. Same parameters and state-dict keys.

    Shapes: ``(B, C, *S) -> (B, C, *S)``, memory format kept.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _takes_channels_last_backward(input, self.affine, self.weight):
            return _ChannelsLastGroupNorm.apply(input, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(input)


_INSTANCE = {1: nn.InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}
if "MEDSEG_INSTANCE" not in Norm.components:
    Norm.add_factory_callable("medseg_instance", lambda dim: _INSTANCE[dim], "instance norm on the group-norm kernel (CPU)")
if "MEDSEG_GROUP" not in Norm.components:
    Norm.add_factory_callable("medseg_group", lambda dim: GroupNorm, "group norm with a channels-last CPU training backward")


def norm_spec(name: str, channels: int | None = None) -> tuple:
    """MONAI norm spec for ``name`` (instance with affine as nnU-Net, as :class:`InstanceNorm3d`; group with <= 8 groups)."""
    key = str(name).lower()
    if key == "instance":
        return ("medseg_instance", {"affine": True})
    if key == "batch":
        return ("batch", {})
    if key == "group":
        groups = math.gcd(8, channels) if channels else 8
        return ("medseg_group", {"num_groups": groups})
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {name!r}")


def act_spec(name: str) -> tuple:
    """MONAI activation spec for ``name``."""
    key = str(name).lower()
    if key == "leakyrelu":
        return ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    if key == "relu":
        return ("relu", {"inplace": True})
    if key == "prelu":
        return ("prelu", {})
    if key == "gelu":
        return ("gelu", {})
    raise ValueError(f"act must be one of {', '.join(ACTS)}, got {name!r}")


def make_norm(name: str, channels: int, spatial_dims: int) -> nn.Module:
    """A norm layer for ``(B, channels, *spatial)`` tensors: MONAI's ``get_norm_layer`` of
    :func:`norm_spec` (the one place that maps a norm name to its layer and arguments).

    Raises:
        ValueError: ``name`` not one of :data:`NORMS`, or ``spatial_dims`` not 2/3.
    """
    return get_norm_layer(norm_spec(name, channels), spatial_dims=check_spatial_dims(spatial_dims), channels=channels)


# --------------------------------------------------------------------------- convolutions
def conv_nd(spatial_dims: int, in_ch: int, out_ch: int, kernel_size=1, *, stride=1, padding=None, dilation=1, bias=True):
    """``nn.Conv2d`` / ``nn.Conv3d`` with 'same' padding for odd kernels by default."""
    cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    if padding is None:
        ks = to_tuple(kernel_size, spatial_dims, "kernel_size")
        padding = tuple((k - 1) // 2 * dilation for k in ks)
    return cls(in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias)


def conv_stage(
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    n_convs: int = 2,
    norm: str = "instance",
    act: str = "leakyrelu",
    residual: bool = False,
) -> nn.Sequential:
    """One U-Net stage: ``n_convs`` conv-norm-act layers, the first one strided.

    Plain stages are MONAI :class:`Convolution` layers (conv -> norm -> act). Residual stages are
    ``ceil(n_convs / 2)`` MONAI :class:`UnetResBlock` (two convs + identity / 1x1 projection each).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *ceil(S / stride))``.
    """
    check_positive_int("convs_per_stage", n_convs)
    layers: list[nn.Module] = []
    if residual:
        for i in range((n_convs + 1) // 2):
            layers.append(
                UnetResBlock(
                    spatial_dims,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size=kernel_size,
                    stride=stride if i == 0 else 1,
                    norm_name=norm_spec(norm, out_channels),
                    act_name=act_spec(act),
                )
            )
        return nn.Sequential(*layers)
    for i in range(n_convs):
        layers.append(
            Convolution(
                spatial_dims,
                in_channels if i == 0 else out_channels,
                out_channels,
                strides=stride if i == 0 else 1,
                kernel_size=kernel_size,
                act=act_spec(act),
                norm=norm_spec(norm, out_channels),
                bias=True,
            )
        )
    return nn.Sequential(*layers)


class Upsample(nn.Module):
    """Transposed convolution with kernel = stride = ``scale`` (nnU-Net's decoder upsampling).

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *(S * scale))``; with ``size`` given, the
    result is cropped / replicate-padded to it (odd input sizes).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, scale: int | Sequence[int] = 2):
        super().__init__()
        scale = to_tuple(scale, spatial_dims, "scale")
        cls = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.scale = scale
        self.conv = cls(in_channels, out_channels, kernel_size=scale, stride=scale, bias=False)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        y = self.conv(x)
        return y if size is None else match_size(y, size)


# --------------------------------------------------------------------------- tensor helpers
def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (at the far end) or replicate-pad ``x`` so that ``x.shape[2:] == size``."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    x = x[tuple([slice(None), slice(None)] + [slice(0, s) for s in size])]
    pad: list[int] = []
    for cur, want in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, max(0, want - cur)]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return x


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Global average over all spatial axes, keeping dims: ``(B, C, *S) -> (B, C, 1, ...)``."""
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


def spatial_amax(x: torch.Tensor) -> torch.Tensor:
    """Global max over all spatial axes, keeping dims: ``(B, C, *S) -> (B, C, 1, ...)``."""
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels, ``(B, C, *S) -> (B, 1, *S)``, as a matrix product.

    Equal to ``x.mean(1, keepdim=True)`` but 3-5x faster on CPU (fp32 and bf16), where a reduction
    over the strided channel axis is slow; works on contiguous and channels-last tensors.
    """
    b, c = x.shape[:2]
    w = x.new_full((c, 1), 1.0 / c)
    if x.is_contiguous():
        return torch.matmul(w.t(), x.reshape(b, c, -1)).reshape(b, 1, *x.shape[2:])
    last = (0, *range(2, x.ndim), 1)
    cl = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    if x.ndim in (4, 5) and x.is_contiguous(memory_format=cl):
        y = torch.matmul(x.permute(last).reshape(b, -1, c), w)  # (B, N, 1), a view of the CL memory
        return y.reshape(b, *x.shape[2:], 1).permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    return x.mean(dim=1, keepdim=True)
