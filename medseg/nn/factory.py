"""``build_model(model_cfg, *, in_channels=None, num_classes=None, spacing=None)``: config -> network.

``model.arch`` picks our :class:`~medseg.nn.unet.UNet` (``unet``) or a MONAI baseline
(``monai_unet``, ``monai_attention_unet``, ``monai_dynunet``); ``model.slices = k > 1`` wraps a 2-D
U-Net in :class:`~medseg.nn.slice25d.SliceStack25D`. Every model has the same call signature
(``model(x, return_attention=False)``) and a ``patch_divisor``. Only models whose blocks declare an
auxiliary loss (``abn``) define ``model.auxiliary_loss(label)``; the others do not have the method.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.nn.layers import to_tuple
from medseg.nn.monai_baselines import monai_attention_unet, monai_dynunet, monai_unet
from medseg.nn.registries import BLOCK_ATTENTION, SKIP_FUSION
from medseg.nn.slice25d import SliceStack25D, SliceStack25DWithAuxiliaryLoss, slice_step
from medseg.nn.unet import make_unet
from medseg.registry import Registry, is_none_name

__all__ = ["MODELS", "build_model", "is_slice_stack", "patch_geometry", "unet_kwargs"]

MODELS = Registry("model architecture")
MODELS.register("unet", make_unet)
MODELS.register("monai_unet", monai_unet)
MODELS.register("monai_attention_unet", monai_attention_unet)
MODELS.register("monai_dynunet", monai_dynunet)


def _check_name(registry: Registry, name: str | None, key: str, allow_none: bool = True) -> None:
    if allow_none and is_none_name(name):
        return
    if name not in registry:
        raise ConfigError(f"{key}: unknown {registry.kind} '{name}'; valid names: {', '.join(registry.names())}")


def _axes(values: Sequence | None, n: int) -> list | None:
    """Per-stage ints or per-axis lists cut to the first ``n`` axes (3-D settings -> 2-D net)."""
    if values is None:
        return None
    return [v if isinstance(v, int) else list(v)[:n] for v in values]


def is_slice_stack(cfg: ModelConfig) -> bool:
    """True for a 2.5D net: ``model.slices = k > 1`` stacks k slices on a 2-D U-Net."""
    return isinstance(cfg.slices, int) and cfg.slices > 1


def patch_geometry(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """The net's patch divisor and stem stride per axis (x, y, z), from the config alone (no net built).

    ``divisor`` is the product of ``model.strides`` over the stages (the built net's
    ``patch_divisor``: patch sizes must be multiples of it), ``stem`` is ``strides[0]`` (a strided
    stem keeps no full-resolution feature map). 2.5D nets (``model.slices > 1``) downsample x and y
    only: 1 along z. Default strides ``[1, 2, 2, ...]`` as :class:`~medseg.nn.unet.UNet`. The planner
    uses this (:func:`medseg.data.plan.model_plan_args`); a test checks it against every built net.

    Raises:
        ConfigError: ``model.strides`` malformed (wrong number of stages or axes, not positive).
    """
    n = len(cfg.channels)
    planar = is_slice_stack(cfg)
    sd = 2 if planar else cfg.spatial_dims
    strides = _axes(cfg.strides, sd) if cfg.strides is not None else [1] + [2] * (n - 1)
    if len(strides) != n:
        raise ConfigError(f"model.strides: one entry per stage ({n}: model.channels), got {cfg.strides!r}")
    try:
        per_stage = np.array([to_tuple(s, sd, "model.strides") for s in strides])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    pad = (1,) * (3 - sd)
    return {"divisor": tuple(int(v) for v in per_stage.prod(axis=0)) + pad,
            "stem": tuple(int(v) for v in per_stage[0]) + pad}


def unet_kwargs(cfg: ModelConfig, *, in_channels: int, num_classes: int, spatial_dims: int) -> dict[str, Any]:
    """The keyword arguments of :func:`~medseg.nn.unet.make_unet` / the MONAI builders for ``cfg``."""
    ba, sf = cfg.block_attention, cfg.skip_fusion
    return dict(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        channels=list(cfg.channels),
        strides=_axes(cfg.strides, spatial_dims),
        kernel_sizes=_axes(cfg.kernel_sizes, spatial_dims),
        convs_per_stage=cfg.convs_per_stage,
        norm=cfg.norm,
        act=cfg.act,
        residual=cfg.residual,
        deep_supervision=cfg.deep_supervision,
        train_at_stem=cfg.train_at_stem,
        block_attention=ba.name,
        block_attention_where=ba.where,
        block_attention_stages=ba.stages,
        block_attention_kwargs=dict(ba.kwargs),
        bottleneck_attention=ba.bottleneck,
        bottleneck_attention_kwargs=dict(ba.bottleneck_kwargs),
        skip_fusion=sf.name,
        skip_fusion_kwargs=dict(sf.kwargs),
        skip_fusion_levels=sf.levels,
    )


def build_model(
    model_cfg: ModelConfig,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    spacing: Sequence[float] | None = None,
) -> nn.Module:
    """Build the network described by ``model_cfg``.

    Args:
        model_cfg: the ``model`` section of the config.
        in_channels: image channels (default ``model_cfg.in_channels``).
        num_classes: K, background included (default ``model_cfg.num_classes``; the trainer and the
            predictor pass ``plans["num_classes"]``).
        spacing: voxel spacing (x, y, z) in mm of the patches (``plans["target_spacing"]``); only
            needed for 2.5D with ``slice_offset_mm``.

    Returns:
        ``nn.Module`` with ``forward(x, return_attention=False)`` and ``patch_divisor``; see
        :mod:`medseg.nn.unet` for the output and gate-map contract.

    Raises:
        ConfigError: unknown names or invalid values; the message names the ``model.*`` key.
    """
    cfg = model_cfg
    _check_name(MODELS, cfg.arch, "model.arch", allow_none=False)
    _check_name(BLOCK_ATTENTION, cfg.block_attention.name, "model.block_attention.name")
    _check_name(BLOCK_ATTENTION, cfg.block_attention.bottleneck, "model.block_attention.bottleneck")
    _check_name(SKIP_FUSION, cfg.skip_fusion.name, "model.skip_fusion.name")
    c_in = cfg.in_channels if in_channels is None else in_channels
    k = cfg.num_classes if num_classes is None else num_classes
    if not isinstance(k, int) or k < 2:
        raise ConfigError(
            f"model.num_classes: need at least 2 classes (background included), got {k!r}; "
            "pass num_classes=plans['num_classes'] to build_model or set model.num_classes"
        )
    slices = cfg.slices
    if not isinstance(slices, int) or slices < 1 or slices % 2 == 0:
        raise ConfigError(f"model.slices: must be a positive odd integer, got {slices!r}")
    if slices > 1 and cfg.arch != "unet":
        raise ConfigError(f"model.slices: 2.5D stacking is built on arch 'unet', not '{cfg.arch}'")
    try:
        step = slice_step(cfg.slice_offset_mm, None if spacing is None else float(spacing[-1])) if slices > 1 else 1
        sd = 2 if slices > 1 else cfg.spatial_dims
        kwargs = unet_kwargs(cfg, in_channels=c_in * slices, num_classes=k, spatial_dims=sd)
        net = MODELS.get(cfg.arch)(**kwargs)
        if slices > 1:
            cls = SliceStack25DWithAuxiliaryLoss if hasattr(net, "auxiliary_loss") else SliceStack25D
            net = cls(net, slices=slices, step=step)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    return net
