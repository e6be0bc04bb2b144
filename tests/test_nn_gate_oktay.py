"""The additive attention gate's options from Oktay et al. (MIDL 2018): the finest skip left ungated
(``model.skip_fusion.levels``), a gating-signal transform, inter channels = skip channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.nn import build_model, create_skip_fusion, make_unet
from medseg.nn.skip_fusion import AttentionGate, ConcatFusion
from test_nn_blocks import randomize  # tests/ is on sys.path (pytest's default import mode)

SMALL = dict(spatial_dims=3, in_channels=1, num_classes=3, channels=[4, 8, 16, 32], skip_fusion="gate")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_gate_parameter_counts_by_hand():
    """Cs = 8, Cg = 16, 3-D, scale 2. theta: Cs*Ci*2^3 (no bias); phi: Cg*Ci + Ci; psi: Ci + 1;
    up (transposed conv, no bias): Cg*Cs*2^3 = 1024."""
    default = create_skip_fusion("gate", 8, 16)  # Ci = Cs // 2 = 4: 256 + 68 + 5 + 1024
    assert default.theta.out_channels == 4 and n_params(default) == 1353 and default.gating is None
    skip = create_skip_fusion("gate", 8, 16, inter_channels="skip")  # Ci = Cs = 8: 512 + 136 + 9 + 1024
    assert skip.theta.out_channels == 8 and skip.phi.out_channels == 8 and n_params(skip) == 1681
    # gating transform: 1x1 conv Cg -> Cg without bias (256) + instance norm's affine (2 * 16)
    gt = create_skip_fusion("gate", 8, 16, gating_transform=True)
    assert n_params(gt) == 1353 + 256 + 32
    assert n_params(create_skip_fusion("gate", 8, 16, inter_channels=3)) == 8 * 3 * 8 + 16 * 3 + 3 + 3 + 1 + 1024


@pytest.mark.parametrize("dims", [2, 3])
def test_gating_transform_is_conv_norm_relu_on_g_before_phi_by_hand(dims):
    torch.manual_seed(0)
    gt = randomize(create_skip_fusion("gate", 8, 16, spatial_dims=dims, gating_transform=True)).eval()
    plain = create_skip_fusion("gate", 8, 16, spatial_dims=dims)
    plain.load_state_dict({k: v for k, v in gt.state_dict().items() if not k.startswith("gating.")})
    x, g = torch.randn(2, 8, *([6] * dims)) * 3, torch.randn(2, 16, *([3] * dims)) * 3
    conv = F.conv3d if dims == 3 else F.conv2d
    norm = gt.gating[1]
    g_t = F.relu(F.instance_norm(conv(g, gt.gating[0].weight), weight=norm.weight, bias=norm.bias, eps=norm.eps))
    out, a = gt(x, g, return_map=True)
    torch.testing.assert_close(a, plain.gate(x, g_t))
    assert not torch.allclose(a, plain.gate(x, g))  # the transform changes the map
    torch.testing.assert_close(out[:, :8], x * a)
    torch.testing.assert_close(out[:, 8:], gt.up(g, x.shape[2:]))  # the decoder path sees the raw g
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0


def test_gating_transform_takes_the_model_norm_and_bad_options_are_refused():
    model = make_unet(**SMALL, norm="batch", skip_fusion_kwargs={"gating_transform": True})
    assert all(isinstance(f.gating[1], torch.nn.BatchNorm3d) for f in model.decoder.fusions)
    with pytest.raises(ValueError, match="inter_channels must be a positive integer, null or 'skip', got 'half'"):
        create_skip_fusion("gate", 8, 16, inter_channels="half")
    with pytest.raises(ValueError, match="gating_transform must be true or false"):
        create_skip_fusion("gate", 8, 16, gating_transform="yes")


def test_finest_skip_left_ungated_passes_unchanged_and_returns_no_map():
    torch.manual_seed(0)
    gated_all = make_unet(**SMALL)
    oktay = make_unet(**SMALL, skip_fusion_levels=[False, True, True])
    assert isinstance(oktay.decoder.fusions[0], ConcatFusion)
    assert all(isinstance(f, AttentionGate) for f in oktay.decoder.fusions[1:])
    # the only difference is level 0's gate: Cs = 4, Cg = 8, Ci = 2: theta 4*2*8 + phi 8*2+2 + psi 2+1 = 85
    assert n_params(gated_all) - n_params(oktay) == 85
    assert oktay.decoder.fusions[0].out_channels == gated_all.decoder.fusions[0].out_channels == 8
    seen = {}
    oktay.decoder.fusions[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    oktay.eval()
    with torch.no_grad():
        _, maps = oktay(torch.randn(1, 1, 16, 16, 16), return_attention=True)
    assert sorted(maps) == ["gate/level1", "gate/level2"]
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps.values())
    assert torch.equal(seen["out"][:, :4], seen["x"])  # the full-resolution skip enters the decoder unchanged


def test_levels_config_key_builds_and_is_checked():
    cfg = load_config(None, ["model.channels=[4,8,16,32]", "model.skip_fusion.name=gate",
                             "model.skip_fusion.levels=[false,true,true]",
                             "model.skip_fusion.kwargs={inter_channels: skip, gating_transform: true}"]).model
    model = build_model(cfg, num_classes=2).eval()
    assert isinstance(model.decoder.fusions[0], ConcatFusion)
    assert [f.theta.out_channels for f in model.decoder.fusions[1:]] == [8, 16]  # Ci = Cs
    assert all(f.gating is not None for f in model.decoder.fusions[1:])
    with torch.no_grad():
        _, maps = model(torch.randn(1, 1, 16, 16, 16), return_attention=True)
    assert sorted(maps) == ["gate/level1", "gate/level2"]
    cfg.skip_fusion.levels = [False, True]
    with pytest.raises(ConfigError, match=r"model.skip_fusion.levels\) must have one entry per decoder level \(3"):
        build_model(cfg, num_classes=2)
    monai = load_config(None, ["model.arch=monai_attention_unet", "model.norm=batch", "model.act=relu",
                               "model.skip_fusion.name=gate", "model.skip_fusion.levels=[false,true,true]"]).model
    with pytest.raises(ConfigError, match="model.skip_fusion.levels"):
        build_model(monai, num_classes=2)


def test_zero_init_gates_start_at_one_half_everywhere_and_learn():
    """zero_init: psi = 0, so every map is exactly 0.5 and the gated skip is x / 2; theta and phi
    have no gradient at the first step (psi's weight is zero), psi has one, and after one SGD step
    the map is no longer uniform."""
    torch.manual_seed(0)
    model = make_unet(**SMALL, skip_fusion_kwargs={"zero_init": True})
    gates = list(model.decoder.fusions)
    assert all(torch.count_nonzero(f.psi.weight) == 0 and torch.count_nonzero(f.psi.bias) == 0 for f in gates)
    x = torch.randn(2, 1, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        _, maps = model(x, return_attention=True)
    assert sorted(maps) == ["gate/level0", "gate/level1", "gate/level2"]
    assert all(torch.equal(m, torch.full_like(m, 0.5)) for m in maps.values())
    model.train()
    out = model(x)
    (out[0] if isinstance(out, (list, tuple)) else out).square().mean().backward()
    assert all(w.grad is None or torch.count_nonzero(w.grad) == 0 for f in gates for w in (f.theta.weight, f.phi.weight))
    assert any(torch.count_nonzero(f.psi.weight.grad) > 0 for f in gates)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.eval()
    with torch.no_grad():
        _, maps = model(x, return_attention=True)
    assert all(m.std() > 0 for m in maps.values())
    # default: PyTorch's init, a random non-uniform map from the start
    default = make_unet(**SMALL).eval()
    with torch.no_grad():
        _, maps = default(x, return_attention=True)
    assert all(m.std() > 0 for m in maps.values())
    with pytest.raises(ValueError, match="zero_init must be true or false"):
        create_skip_fusion("gate", 8, 16, zero_init=1)


def test_residual_gate_scales_the_skip_by_one_plus_the_map():
    """residual: the skip becomes x * (1 + a) (Wang et al. 2017), never less than x; same map and
    parameters as the plain gate, which gives x * a."""
    torch.manual_seed(0)
    plain = create_skip_fusion("gate", 4, 8)
    res = create_skip_fusion("gate", 4, 8, residual=True)
    res.load_state_dict(plain.state_dict())  # no parameters of its own
    x, g = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 8, 4, 4, 4)
    out_p, a = plain(x, g, return_map=True)
    out_r, a_r = res(x, g, return_map=True)
    assert torch.equal(a, a_r) and 0 < a.min() and a.max() < 1
    assert torch.allclose(out_r[:, :4], x * (1 + a)) and torch.allclose(out_p[:, :4], x * a)
    assert torch.equal(out_r[:, 4:], out_p[:, 4:])  # the upsampled gating signal is unchanged
    assert (out_r[:, :4].abs() >= x.abs()).all()  # nothing suppressed
    model = build_model(load_config(None, ["model.skip_fusion.name=gate", "model.skip_fusion.kwargs.residual=true",
                                           "model.channels=[4,8,16]"]).model, num_classes=3)
    assert all(f.residual for f in model.decoder.fusions)
    with pytest.raises(ValueError, match="residual must be true or false"):
        create_skip_fusion("gate", 8, 16, residual="yes")
