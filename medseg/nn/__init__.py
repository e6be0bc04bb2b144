"""Models: attention blocks, skip fusions, the configurable U-Net, 2.5D stacking, MONAI baselines.

Public entry points::

    from medseg.nn import build_model, create_block_attention, create_skip_fusion
    model = build_model(cfg.model, in_channels=1, num_classes=plans["num_classes"])
    logits = model(x)                                  # (B, K, X, Y, Z)
    logits, maps = model(x, return_attention=True)     # maps: {"gate/level1": (B, 1, x, y, z), ...}
"""

from medseg.nn import abn, bam, cbam, channel, nonlocal_, skip_fusion, va  # noqa: F401  (register the blocks)
from medseg.nn.factory import MODELS, build_model, unet_kwargs
from medseg.nn.registries import BLOCK_ATTENTION, SKIP_FUSION, create_block_attention, create_skip_fusion
from medseg.nn.slice25d import SliceStack25D
from medseg.nn.unet import UNet, make_unet

__all__ = [
    "BLOCK_ATTENTION",
    "MODELS",
    "SKIP_FUSION",
    "SliceStack25D",
    "UNet",
    "build_model",
    "create_block_attention",
    "create_skip_fusion",
    "make_unet",
    "unet_kwargs",
]
