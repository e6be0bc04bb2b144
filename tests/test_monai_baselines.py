"""MONAI baselines refuse every setting they cannot honour, naming the config key; what they honour reaches MONAI."""

from __future__ import annotations

import pytest
import torch

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.nn import build_model
from medseg.nn.monai_baselines import monai_unet

ARCHS = ["monai_unet", "monai_attention_unet", "monai_dynunet"]


def _build(arch: str, *overrides: str):
    cfg = load_config(None, [f"model.arch={arch}", "model.channels=[4,8,16,32]", *overrides]).model
    return build_model(cfg, num_classes=3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("override,key", [
    ("model.block_attention.name=cbam", "model.block_attention.name"),
    ("model.block_attention.bottleneck=nonlocal", "model.block_attention.bottleneck"),
    ("model.block_attention.kwargs={reduction: 4}", "model.block_attention.kwargs"),
    ("model.block_attention.where=encoder", "model.block_attention.where"),
    ("model.skip_fusion.name=aff", "model.skip_fusion.name"),
    ("model.skip_fusion.kwargs={reduction: 2}", "model.skip_fusion.kwargs"),
    ("model.convs_per_stage=3", "model.convs_per_stage"),
    ("model.strides=[2,2,2,2]", "model.strides"),
])
def test_every_baseline_refuses_what_none_of_them_has(arch, override, key):
    with pytest.raises(ConfigError, match=f"^{key}: .*{arch}"):
        _build(arch, override)


@pytest.mark.parametrize("arch,override,key", [
    ("monai_unet", "model.deep_supervision=true", "model.deep_supervision"),
    ("monai_attention_unet", "model.deep_supervision=true", "model.deep_supervision"),
    ("monai_attention_unet", "model.residual=true", "model.residual"),
    ("monai_attention_unet", "model.norm=group", "model.norm"),
    ("monai_attention_unet", "model.act=gelu", "model.act"),
    ("monai_unet", "model.skip_fusion.name=gate", "model.skip_fusion.name"),
    ("monai_dynunet", "model.skip_fusion.name=gate", "model.skip_fusion.name"),
    ("monai_unet", "model.kernel_sizes=[3,3,3,5]", "model.kernel_sizes"),
    ("monai_attention_unet", "model.kernel_sizes=[3,5,3,3]", "model.kernel_sizes"),
])
def test_baseline_specific_refusals(arch, override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        _build(arch, override)


def test_no_block_spelled_any_way_is_accepted():
    for name in ("none", "identity", "None", "''"):
        assert type(_build("monai_unet", f"model.block_attention.name={name}").net).__name__ == "UNet"


def test_what_a_baseline_honours_reaches_the_monai_network():
    att = _build("monai_attention_unet", "model.skip_fusion.name=gate", "model.norm=batch", "model.act=relu",
                 "model.kernel_sizes=[[3,3,1],[3,3,1],[3,3,1],[3,3,1]]").net
    assert att.model[0].conv[0].conv.kernel_size == (3, 3, 1)
    unet = _build("monai_unet", "model.kernel_sizes=[5,5,5,5]", "model.residual=true", "model.norm=batch", "model.act=relu").net
    first = unet.model[0].conv.unit0
    assert first.conv.kernel_size == (5, 5, 5) and isinstance(first.adn.N, torch.nn.BatchNorm3d)
    assert isinstance(first.adn.A, torch.nn.ReLU)
    dyn = _build("monai_dynunet", "model.deep_supervision=true", "model.residual=true", "model.kernel_sizes=[3,3,1,1]").net
    assert dyn.deep_supervision and type(dyn.input_block).__name__ == "UnetResBlock"
    assert dyn.downsamples[-1].conv1.conv.kernel_size == (1, 1, 1)


def test_an_unknown_keyword_is_a_programming_error():
    with pytest.raises(TypeError, match="colour"):
        monai_unet(spatial_dims=3, in_channels=1, num_classes=2, channels=[4, 8], colour="red")


def test_monai_unet_group_norm_must_divide_the_class_outputs():
    with pytest.raises(ConfigError, match="^model.norm: group norm with 4 groups .* 3 class outputs"):
        _build("monai_unet", "model.norm=group")  # 4 groups (gcd(8, 4)); MONAI normalises the 3 logits too
    cfg = load_config(None, ["model.arch=monai_unet", "model.channels=[4,8,16,32]", "model.norm=group"]).model
    net = build_model(cfg, num_classes=4).net
    assert [m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)][-1] == 4
