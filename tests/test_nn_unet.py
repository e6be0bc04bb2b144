"""The U-Net, build_model, the configs in configs/ and the MONAI baselines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.config import ModelConfig, load_config
from medseg.errors import ConfigError
from medseg.nn import UNet, build_model, make_unet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SMALL = dict(spatial_dims=3, in_channels=1, num_classes=3, channels=[4, 8, 16])


def model_cfg(**kw) -> ModelConfig:
    return load_config(None, [f"model.{k}={v}" for k, v in kw.items()]).model


VARIANTS = {"unet3d", "attention_unet3d", "cbam_unet3d", "se_unet3d", "eca_unet3d", "bam_unet3d"}
VARIANTS |= {"nonlocal_unet3d", "aff_unet3d", "unet25d", "attention_unet25d"}


def test_configs_folder_has_every_variant():
    assert VARIANTS <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_runs_a_forward_on_a_small_patch(path):
    cfg = load_config(path)
    if path.stem in VARIANTS:  # templates: the user points them at a dataset
        assert cfg.data.dataset == "" and cfg.data.preprocessed == ""
    model = build_model(cfg.model, num_classes=2, spacing=(1.0, 1.0, 2.0)).eval()
    # a small patch the net divides (a strided stem doubles the divisor); instance norm needs > 1 voxel at the bottleneck
    size = [s if d == 1 else d * max(2, s // d) for s, d in zip((32, 32, 16), model.patch_divisor)]
    x = torch.randn(1, cfg.model.in_channels, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 2, *size)
    assert torch.isfinite(y).all()


def test_default_unet_layout_and_patch_divisor():
    model = build_model(ModelConfig(), num_classes=2)
    assert isinstance(model, UNet)
    assert model.patch_divisor == (16, 16, 16)
    assert [m.out_channels for m in model.decoder.heads] == [2, 2, 2, 2]
    aniso = make_unet(**SMALL, strides=[1, [2, 2, 1], 2])
    assert aniso.patch_divisor == (4, 4, 2)
    assert aniso(torch.randn(1, 1, 8, 8, 6)).shape == (1, 3, 8, 8, 6)


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_outputs_count_and_shapes(dims):
    model = make_unet(**{**SMALL, "spatial_dims": dims, "channels": [4, 8, 16, 32]}, deep_supervision=True).train()
    x = torch.randn(2, 1, *([16] * dims))
    out = model(x)
    assert isinstance(out, list) and len(out) == 3  # len(channels) - 1 levels: full, 1/2, 1/4
    assert [tuple(o.shape) for o in out] == [(2, 3, *([16 // 2**i] * dims)) for i in range(3)]
    model.eval()
    assert model(x).shape == (2, 3, *([16] * dims))


def test_state_dict_loads_with_deep_supervision_on_or_off():
    torch.manual_seed(0)
    trained = make_unet(**SMALL, deep_supervision=True, skip_fusion="gate", block_attention="cbam")
    plain = make_unet(**SMALL, deep_supervision=False, skip_fusion="gate", block_attention="cbam")
    assert plain.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(plain.eval()(x), trained.eval()(x))


def test_return_attention_gives_documented_maps_and_plain_forward_gives_logits():
    model = make_unet(
        **SMALL, skip_fusion="gate", block_attention="cbam", block_attention_where="both", bottleneck_attention="abn"
    ).eval()
    x = torch.randn(2, 1, 16, 16, 12)
    assert isinstance(model(x), torch.Tensor)
    y, maps = model(x, return_attention=True)
    torch.testing.assert_close(y, model(x))
    sizes = {0: (16, 16, 12), 1: (8, 8, 6), 2: (4, 4, 3)}
    expected = {f"cbam/enc{i}": sizes[i] for i in range(3)}
    expected |= {f"cbam/dec{i}": sizes[i] for i in range(2)} | {f"gate/level{i}": sizes[i] for i in range(2)}
    expected["abn/bottleneck"] = sizes[2]
    assert {k: tuple(v.shape[2:]) for k, v in maps.items()} == expected
    for name, m in maps.items():
        assert m.shape[:2] == (2, 1) and m.min() >= 0 and m.max() <= 1, name


def test_per_stage_switches_and_where():
    model = make_unet(**SMALL, block_attention="bam", block_attention_where="encoder", block_attention_stages=[False, True, True])
    _, maps = model.eval()(torch.randn(1, 1, 8, 8, 8), return_attention=True)
    assert sorted(maps) == ["bam/enc1", "bam/enc2"]
    assert isinstance(model.decoder.attention[0], torch.nn.Identity)


def test_training_reaches_every_parameter_and_auxiliary_loss_only_where_declared():
    torch.manual_seed(0)
    model = make_unet(
        **SMALL, deep_supervision=True, skip_fusion="gate", block_attention="cbam", bottleneck_attention="abn", residual=True
    ).train()
    x = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    out = model(x)
    loss = sum(o.square().mean() for o in out) + model.auxiliary_loss(label)
    loss.backward()
    assert x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert not hasattr(make_unet(**SMALL), "auxiliary_loss")
    assert not hasattr(make_unet(**SMALL, block_attention="cbam"), "auxiliary_loss")


@pytest.mark.parametrize("arch", ["monai_unet", "monai_attention_unet", "monai_dynunet"])
def test_monai_baselines_through_build_model(arch):
    # deep supervision: only DynUNet has it (the others refuse it, tests/test_monai_baselines.py)
    model = build_model(model_cfg(arch=arch, channels=[4, 8, 16, 32], deep_supervision=arch == "monai_dynunet"), num_classes=3)
    assert model.patch_divisor == (8, 8, 8)
    x = torch.randn(1, 1, 16, 16, 16)
    model.eval()
    y, maps = model(x, return_attention=True)
    assert y.shape == (1, 3, 16, 16, 16) and maps == {}
    assert not hasattr(model, "auxiliary_loss")
    assert type(model.net).__name__ == {"monai_unet": "UNet", "monai_attention_unet": "AttentionUnet", "monai_dynunet": "DynUNet"}[arch]


def test_build_model_uses_config_widths_norm_and_classes():
    cfg = model_cfg(channels=[8, 16, 32], norm="group", act="relu", residual=True, in_channels=2)
    model = build_model(cfg, num_classes=4)
    assert model.encoder.stages[0][0].conv1.conv.in_channels == 2
    assert isinstance(model.encoder.stages[1][0].norm1, torch.nn.GroupNorm)
    assert model.decoder.heads[0].out_channels == 4
    assert build_model(cfg, in_channels=3, num_classes=2).encoder.stages[0][0].conv1.conv.in_channels == 3


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"arch": "resnet"}, "model.arch"),
        ({"block_attention.name": "sse"}, "model.block_attention.name"),
        ({"block_attention.bottleneck": "gate"}, "model.block_attention.bottleneck"),
        ({"skip_fusion.name": "add"}, "model.skip_fusion.name"),
        ({"slices": 4}, "model.slices"),
        ({"strides": "[1,2]"}, "strides"),
        ({"channels": "[16]"}, "channels"),
        ({"norm": "layer"}, "norm"),
        ({"act": "swish"}, "act"),
        ({"block_attention.where": "middle"}, "block_attention_where"),
        ({"block_attention.stages": "[true]"}, "block_attention_stages"),
        ({"kernel_sizes": "[3,3]"}, "kernel_sizes"),
        ({"convs_per_stage": 0}, "convs_per_stage"),
    ],
)
def test_bad_model_config_raises_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(model_cfg(**overrides), num_classes=2)


def test_missing_num_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_model(ModelConfig())


def test_channels_last_and_bf16_autocast_give_the_same_logits():
    torch.manual_seed(0)
    model = make_unet(**SMALL, skip_fusion="gate", block_attention="cbam", bottleneck_attention="nonlocal").eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last_3d)(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, maps = model(x, return_attention=True)
    torch.testing.assert_close(cl, ref, atol=1e-4, rtol=1e-4)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps.values())


def test_strided_stem_predicts_on_the_input_grid_at_an_eighth_of_the_flops():
    """strides[0] = 2: logits and deep-supervision level 0 on the input grid, levels >= 1 at
    1 / prod(strides[:i+1]), gate maps at their level, divisor includes the stem, ~1/8 FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    kw = dict(SMALL, channels=[8, 16, 32], skip_fusion="gate", deep_supervision=True)
    full, stem = make_unet(**kw), make_unet(**kw, strides=[2, 2, 2])
    assert stem.patch_divisor == (8, 8, 8) and full.patch_divisor == (4, 4, 4)
    x = torch.randn(1, 1, 32, 32, 16)
    outs = stem.train()(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32, 16), (8, 8, 4)]
    logits, maps = stem.eval()(x, return_attention=True)
    assert logits.shape == (1, 3, 32, 32, 16)
    assert {k: tuple(v.shape[2:]) for k, v in maps.items()} == {"gate/level0": (16, 16, 8), "gate/level1": (8, 8, 4)}

    def flops(m):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            m.eval()(x)
        return counter.get_total_flops()

    assert 0.08 < flops(stem) / flops(full) < 0.2
    stem.train()
    sum(o.float().mean() for o in stem(x)).backward()
    assert all(p.grad is not None for p in stem.parameters())  # both heads run with deep supervision


def test_train_at_stem_keeps_training_logits_at_the_stem_resolution_and_inference_on_the_input_grid():
    """model.train_at_stem: training mode returns level 0 at S / strides[0] (deep supervision and
    plain), evaluation mode upsamples as before; same weights, same eval logits; no-op without a
    strided stem; refused by the MONAI baselines."""
    torch.manual_seed(0)
    kw = dict(SMALL, channels=[8, 16, 32], skip_fusion="gate", strides=[2, 2, 2])
    x = torch.randn(2, 1, 32, 32, 16)
    for ds in (True, False):
        base, coarse = make_unet(**kw, deep_supervision=ds), make_unet(**kw, deep_supervision=ds, train_at_stem=True)
        coarse.load_state_dict(base.state_dict())
        out = coarse.train()(x)
        level0 = out[0] if ds else out
        assert tuple(level0.shape[2:]) == (16, 16, 8)
        if ds:
            assert tuple(out[1].shape[2:]) == (8, 8, 4)
        # the coarse training logits are exactly what the default net upsamples
        ref = base.train()(x)
        ref0 = ref[0] if ds else ref
        up = torch.nn.functional.interpolate(level0, size=(32, 32, 16), mode="trilinear", align_corners=False)
        torch.testing.assert_close(up, ref0)
        with torch.no_grad():
            torch.testing.assert_close(coarse.eval()(x), base.eval()(x))
        assert coarse.eval()(x).shape == (2, 3, 32, 32, 16)
    flat = make_unet(**dict(kw, strides=[1, 2, 2]), train_at_stem=True).train()
    assert flat(x).shape == (2, 3, 32, 32, 16)
    net = build_model(model_cfg(strides="[2,2,2]", channels="[8,16,32]", train_at_stem="true"), num_classes=3)
    assert net.train_at_stem and tuple(net.train()(x).shape[2:]) == (16, 16, 8)
    with pytest.raises(ConfigError, match="model.train_at_stem"):
        build_model(model_cfg(arch="monai_unet", train_at_stem="true"), num_classes=3)
    # 2.5D: the 2-D net's stem halves x and y only; the loss takes the label at that grid, z halo cropped
    from medseg.nn.slice25d import z_halo
    from medseg.train.losses import SegmentationLoss

    s25 = build_model(model_cfg(slices=3, strides="[2,2,2]", channels="[4,8,16]", train_at_stem="true"), num_classes=3)
    x25 = torch.randn(1, 1, 32, 32, 8 + 2 * z_halo(s25))
    assert tuple(s25.train()(x25).shape) == (1, 3, 16, 16, 10)
    assert tuple(s25.eval()(x25).shape) == (1, 3, 32, 32, 10)
    y25 = torch.randint(0, 3, (1, 1, 32, 32, 10))
    assert torch.isfinite(SegmentationLoss(z_halo=z_halo(s25))(s25.train()(x25), y25))
