"""2.5D slice stacking: 3-D in, 3-D out, the centre slice sees only its k neighbours."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.nn import SliceStack25D, build_model, make_unet


def cfg25d(**kw):
    base = {"slices": 3, "channels": "[4,8,16]"}
    return load_config(None, [f"model.{k}={v}" for k, v in {**base, **kw}.items()]).model


def test_build_model_wraps_a_2d_unet_and_keeps_3d_shapes():
    model = build_model(cfg25d(), num_classes=3).eval()
    assert isinstance(model, SliceStack25D)
    assert model.net.encoder.spatial_dims == 2
    assert model.net.encoder.stages[0][0].conv.in_channels == 3  # C * k input channels
    assert model.patch_divisor == (4, 4, 1)
    for shape in [(2, 1, 8, 12, 5), (1, 1, 8, 4, 1)]:
        with torch.no_grad():
            y = model(torch.randn(shape))
        assert y.shape == (shape[0], 3, *shape[2:])


def test_stacks_are_the_k_neighbouring_slices_with_replicate_padding():
    model = SliceStack25D(make_unet(spatial_dims=2, in_channels=2 * 5, num_classes=2, channels=[4, 8]), slices=5, step=1)
    x = torch.randn(2, 2, 3, 4, 6)
    stacks = model.to_slices(x)  # (B*Z, C*k, X, Y)
    assert stacks.shape == (12, 10, 3, 4)
    for b in range(2):
        for z in range(6):
            idx = [min(max(z + o, 0), 5) for o in (-2, -1, 0, 1, 2)]
            expected = x[b][:, :, :, idx].permute(0, 3, 1, 2).reshape(10, 3, 4)  # channel-major, then slice
            torch.testing.assert_close(stacks[b * 6 + z], expected)


@pytest.mark.parametrize("offset_mm,spacing,near,far", [(None, None, 1, 2), (4.0, (1.0, 1.0, 2.0), 2, 1)])
def test_centre_slice_depends_only_on_its_k_neighbours(offset_mm, spacing, near, far):
    torch.manual_seed(0)
    kw = {} if offset_mm is None else {"slice_offset_mm": offset_mm}
    model = build_model(cfg25d(**kw), num_classes=2, spacing=spacing).eval()
    x = torch.randn(1, 1, 8, 8, 9)
    z0 = 4
    with torch.no_grad():
        ref = model(x)[..., z0]
        x_far = x.clone()
        x_far[..., z0 + far] += 5.0  # outside the stack of z0 (step 2 skips z0 +- 1)
        x_near = x.clone()
        x_near[..., z0 + near] += 5.0
        torch.testing.assert_close(model(x_far)[..., z0], ref)
        assert (model(x_near)[..., z0] - ref).abs().max() > 1e-3
        assert (model(x_far)[..., z0 + far] - model(x)[..., z0 + far]).abs().max() > 1e-3


def test_slice_offset_in_mm_needs_the_spacing():
    assert build_model(cfg25d(slice_offset_mm=3.0), num_classes=2, spacing=[0.8, 0.8, 1.5]).step == 2
    with pytest.raises(ConfigError, match="slice_offset_mm"):
        build_model(cfg25d(slice_offset_mm=3.0), num_classes=2)


def test_gate_maps_deep_supervision_and_auxiliary_loss_come_back_3d():
    model = build_model(cfg25d(**{"skip_fusion.name": "gate", "block_attention.bottleneck": "abn", "deep_supervision": True}), num_classes=3)
    x = torch.randn(2, 1, 8, 8, 5)
    model.eval()
    y, maps = model(x, return_attention=True)
    assert y.shape == (2, 3, 8, 8, 5)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "abn/bottleneck": (2, 1, 2, 2, 5),
        "gate/level1": (2, 1, 4, 4, 5),
        "gate/level0": (2, 1, 8, 8, 5),
    }
    model.train()
    out = model(x)
    assert [tuple(o.shape) for o in out] == [(2, 3, 8, 8, 5), (2, 3, 4, 4, 5)]  # only x, y downsampled
    loss = model.auxiliary_loss(torch.randint(0, 3, (2, 1, 8, 8, 5)))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert not hasattr(build_model(cfg25d(), num_classes=3), "auxiliary_loss")


def test_sliding_window_inference_runs_unchanged():
    model = build_model(cfg25d(), num_classes=2).eval()
    x = torch.randn(1, 1, 12, 10, 7)
    with torch.no_grad():
        y = sliding_window_inference(x, roi_size=(8, 8, 4), sw_batch_size=2, predictor=model, overlap=0.25)
    assert y.shape == (1, 2, 12, 10, 7)


@pytest.mark.parametrize("slices", [2, 0])
def test_bad_slice_count_raises(slices):
    with pytest.raises(ValueError, match="slices"):
        SliceStack25D(make_unet(spatial_dims=2, channels=[4, 8]), slices=slices)
