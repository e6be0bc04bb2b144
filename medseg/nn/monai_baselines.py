"""MONAI's own networks as baselines, wrapped to the medseg call signature.

``model(x, return_attention=True)`` returns ``(logits, {})``: MONAI does not hand out its gate
maps. Every baseline honours ``spatial_dims``, ``in_channels``, ``num_classes``, ``channels`` and
``strides`` (``strides[0]`` must be 1: MONAI's nets predict at the input resolution, there is no
strided stem). What else each one honours:

* ``monai_unet`` (:class:`monai.networks.nets.UNet`, 2 residual units per block, its first conv
  already downsamples): ``norm``, ``act``, ``kernel_sizes`` (one size for every stage). It is
  always residual (``residual: true`` is accepted, ``false`` is the default and means "as built").
* ``monai_attention_unet`` (:class:`monai.networks.nets.AttentionUnet`, Oktay-style gates evaluated
  at full resolution, ~8x the FLOPs of ``UNet``): ``kernel_sizes`` (one size for every stage) and
  its own fixed choices, which the config may name: ``norm: batch``, ``act: relu``,
  ``skip_fusion.name: gate`` (its additive attention gate).
* ``monai_dynunet`` (:class:`monai.networks.nets.DynUNet`, nnU-Net's network): ``kernel_sizes``
  per stage, ``norm``, ``act``, ``residual``, ``deep_supervision`` (training returns the list
  ``[full, head_1, ...]``; MONAI upsamples every head to full resolution).

Any other setting of :func:`medseg.nn.factory.unet_kwargs` left at its default (no block or
bottleneck attention, ``skip_fusion: concat``, ``convs_per_stage: 2``, no deep supervision, empty
``kwargs``, ...) means "the baseline as MONAI builds it". A value the baseline cannot honour raises
:class:`~medseg.errors.ConfigError` naming the ``model.*`` key (``model.arch=monai_unet
model.block_attention.name=cbam`` would otherwise train a plain UNet under a CBAM label).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.networks.nets import AttentionUnet, DynUNet
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from medseg.errors import ConfigError
from medseg.nn.layers import act_spec, norm_spec, to_tuple
from medseg.registry import is_none_name

__all__ = ["MonaiBaseline", "check_settings", "monai_attention_unet", "monai_dynunet", "monai_unet"]

# the config key of every setting build_model passes, and the value meaning "not asked for"
_KEYS = {
    "kernel_sizes": ("model.kernel_sizes", None),
    "convs_per_stage": ("model.convs_per_stage", 2),
    "norm": ("model.norm", "instance"),
    "act": ("model.act", "leakyrelu"),
    "residual": ("model.residual", False),
    "deep_supervision": ("model.deep_supervision", False),
    "train_at_stem": ("model.train_at_stem", False),
    "block_attention": ("model.block_attention.name", None),
    "block_attention_where": ("model.block_attention.where", "both"),
    "block_attention_stages": ("model.block_attention.stages", None),
    "block_attention_kwargs": ("model.block_attention.kwargs", {}),
    "bottleneck_attention": ("model.block_attention.bottleneck", None),
    "bottleneck_attention_kwargs": ("model.block_attention.bottleneck_kwargs", {}),
    "skip_fusion": ("model.skip_fusion.name", "concat"),
    "skip_fusion_kwargs": ("model.skip_fusion.kwargs", {}),
    "skip_fusion_levels": ("model.skip_fusion.levels", None),
}
_NAMES = {"block_attention", "bottleneck_attention", "skip_fusion"}


def _canon(key: str, value: Any) -> Any:
    if key in _NAMES and is_none_name(value):
        return "concat" if key == "skip_fusion" else None
    if isinstance(value, str):
        return value.lower()
    if value is None and key.endswith("_kwargs"):
        return {}
    return value


def check_settings(arch: str, settings: dict[str, Any], accepted: dict[str, tuple] | None = None) -> None:
    """Refuse every setting in ``settings`` that ``arch`` cannot honour.

    Args:
        arch: the ``model.arch`` name (for the message).
        settings: keyword arguments of :func:`medseg.nn.factory.unet_kwargs` that ``arch`` does not
            take as parameters.
        accepted: per key, values other than the default that ``arch`` honours as built.

    Raises:
        ConfigError: a value other than the default (or ``accepted``), naming the ``model.*`` key.
        TypeError: a keyword no model takes.
    """
    accepted = accepted or {}
    for key, value in settings.items():
        if key not in _KEYS:
            raise TypeError(f"{arch}() got an unexpected keyword argument '{key}'")
        config_key, default = _KEYS[key]
        ok = [default, *accepted.get(key, ())]
        if _canon(key, value) not in ok:
            shown = ", ".join("none" if v is None else repr(v) for v in ok)
            raise ConfigError(
                f"{config_key}: {value!r} is not supported by model.arch={arch} (it builds MONAI's network as is; "
                f"accepted: {shown}); see medseg.nn.monai_baselines for what each baseline honours, "
                "or use model.arch=unet"
            )


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


def _down_strides(strides: Sequence | None, n: int, spatial_dims: int, arch: str) -> list[tuple[int, ...]]:
    """The ``n - 1`` downsampling strides (medseg's ``strides`` minus the first, full-resolution one).

    Raises:
        ConfigError: ``strides[0]`` is not 1 (a strided stem; MONAI's nets have none).
    """
    if strides is None:
        return [(2,) * spatial_dims] * (n - 1)
    if len(strides) != n:
        raise ValueError(f"strides must have one entry per stage ({n}), got {strides!r}")
    per_stage = [to_tuple(s, spatial_dims, "strides") for s in strides]
    if any(v != 1 for v in per_stage[0]):
        raise ConfigError(f"model.strides: the first stride {strides[0]!r} must be 1 for model.arch={arch} "
                          "(a strided stem is a feature of model.arch=unet)")
    return per_stage[1:]


def _one_kernel(kernel_sizes: Sequence | None, n: int, spatial_dims: int, arch: str) -> int | tuple[int, ...]:
    """The single kernel size MONAI's ``UNet`` / ``AttentionUnet`` use for every stage.

    Raises:
        ConfigError: the stages' kernel sizes differ.
    """
    if kernel_sizes is None:
        return 3
    if len(kernel_sizes) != n:
        raise ValueError(f"kernel_sizes must have one entry per stage ({n}), got {kernel_sizes!r}")
    kernels = {to_tuple(k, spatial_dims, "kernel_sizes") for k in kernel_sizes}
    if len(kernels) > 1:
        raise ConfigError(f"model.kernel_sizes: model.arch={arch} takes one kernel size for all stages, got {kernel_sizes!r}")
    (k,) = kernels
    return k[0] if len(set(k)) == 1 else k


def _divisor(strides: list[tuple[int, ...]], spatial_dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.prod(np.array(strides), axis=0)) if strides else (1,) * spatial_dims


def _common(arch, spatial_dims, in_channels, num_classes, channels, strides, kernel_sizes) -> tuple[dict, list[tuple[int, ...]]]:
    """Keyword arguments shared by MONAI's ``UNet`` and ``AttentionUnet``, and the down strides."""
    down = _down_strides(strides, len(channels), spatial_dims, arch)
    kwargs = dict(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=tuple(s[0] if len(set(s)) == 1 else s for s in down),
        kernel_size=_one_kernel(kernel_sizes, len(channels), spatial_dims, arch),
    )
    return kwargs, down


def monai_unet(*, spatial_dims, in_channels, num_classes, channels, strides=None, kernel_sizes=None, norm="instance",
               act="prelu", **settings: Any) -> MonaiBaseline:
    """MONAI ``UNet`` with 2 residual units per block (its first conv already downsamples).

    Raises:
        ConfigError: a setting it cannot honour (see the module docstring), naming the ``model.*`` key.
    """
    check_settings("monai_unet", settings, {"residual": (True,)})
    kwargs, down = _common("monai_unet", spatial_dims, in_channels, num_classes, channels, strides, kernel_sizes)
    norm_t = norm_spec(norm, min(channels))
    groups = norm_t[1].get("num_groups", 1)
    if num_classes % groups:  # MONAI normalises its top up-convolution's num_classes outputs too
        raise ConfigError(f"model.norm: group norm with {groups} groups (from the narrowest stage, {min(channels)} "
                          f"channels) cannot normalise the {num_classes} class outputs of MONAI's UNet top "
                          "up-convolution; use another norm or widths/classes that share the group count")
    net = MonaiUNet(**kwargs, num_res_units=2, norm=norm_t, act=act_spec(act))
    return MonaiBaseline(net, _divisor(down, spatial_dims))


def monai_attention_unet(*, spatial_dims, in_channels, num_classes, channels, strides=None, kernel_sizes=None,
                         **settings: Any) -> MonaiBaseline:
    """MONAI ``AttentionUnet`` (batch norm, ReLU and additive gates of its own).

    Raises:
        ConfigError: a setting it cannot honour (see the module docstring), naming the ``model.*`` key.
    """
    check_settings("monai_attention_unet", settings, {"norm": ("batch",), "act": ("relu",), "skip_fusion": ("gate",)})
    kwargs, down = _common("monai_attention_unet", spatial_dims, in_channels, num_classes, channels, strides, kernel_sizes)
    return MonaiBaseline(AttentionUnet(**kwargs), _divisor(down, spatial_dims))


def monai_dynunet(
    *, spatial_dims, in_channels, num_classes, channels, strides=None, kernel_sizes=None, norm="instance", act="leakyrelu",
    residual=False, deep_supervision=False, **settings: Any,
) -> MonaiBaseline:
    """MONAI ``DynUNet`` (nnU-Net's network) with our widths, strides and kernels.

    Raises:
        ConfigError: a setting it cannot honour (see the module docstring), naming the ``model.*`` key.
    """
    check_settings("monai_dynunet", settings)
    n = len(channels)
    down = _down_strides(strides, n, spatial_dims, "monai_dynunet")
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
