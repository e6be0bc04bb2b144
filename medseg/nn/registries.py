"""Registries and factories of the attention blocks and skip fusions (timm's ``create_attn`` habit).

* ``create_block_attention(name, channels, *, spatial_dims=3, **kw)``: a module ``(B, C, *S) -> (B, C, *S)``;
  ``None`` (or ``"none"`` / ``"identity"``: :func:`medseg.registry.is_none_name`) gives :class:`torch.nn.Identity`.
* ``create_skip_fusion(name, skip_channels, gating_channels, *, spatial_dims=3, **kw)``: a module
  called as ``fusion(x, g)`` with the skip ``x: (B, Cs, *S)`` and the gating signal from the coarser
  decoder level ``g: (B, Cg, *S / scale)``; returns ``(B, fusion.out_channels, *S)``.

Callers never branch on the name. A wrong name raises ``ValueError`` listing the valid names.

**Gate maps.** A module that computes a spatial attention map sets the class attribute
``returns_map = True`` and accepts ``return_map=True`` in ``forward``, then returns
``(output, map)`` with ``map: (B, 1, *S)`` in ``[0, 1]``. :func:`call_with_map` hides the branch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medseg.registry import Registry, is_none_name

__all__ = ["BLOCK_ATTENTION", "SKIP_FUSION", "call_with_map", "create_block_attention", "create_skip_fusion"]

BLOCK_ATTENTION = Registry("block attention")
SKIP_FUSION = Registry("skip fusion")


def create_block_attention(name: str | None, channels: int, *, spatial_dims: int = 3, **kw: Any) -> nn.Module:
    """Build the block attention ``name`` for ``channels`` channels (``None`` -> ``nn.Identity()``).

    Raises:
        ValueError: unknown name (the message lists the valid names) or a bad argument.
    """
    if is_none_name(name):
        return nn.Identity()
    return BLOCK_ATTENTION.get(name)(channels, spatial_dims=spatial_dims, **kw)


def create_skip_fusion(
    name: str | None, skip_channels: int, gating_channels: int, *, spatial_dims: int = 3, **kw: Any
) -> nn.Module:
    """Build the skip fusion ``name`` (``None`` -> ``concat``); its output width is ``.out_channels``.

    Raises:
        ValueError: unknown name (the message lists the valid names) or a bad argument.
    """
    key = "concat" if is_none_name(name) else name
    return SKIP_FUSION.get(key)(skip_channels, gating_channels, spatial_dims=spatial_dims, **kw)


def call_with_map(module: nn.Module, *args: torch.Tensor, maps: dict | None, key: str) -> torch.Tensor:
    """``module(*args)``; when ``maps`` is a dict and the module has a gate map, store it at ``key``."""
    if maps is None or not getattr(module, "returns_map", False):
        return module(*args)
    out, gate = module(*args, return_map=True)
    if gate is not None:
        maps[f"{module.map_prefix}/{key}"] = gate
    return out
