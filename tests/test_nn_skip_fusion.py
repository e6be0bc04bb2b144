"""Skip fusions (concat, gate, aff, iaff): shapes, gradients, the gate's product, AFF's convexity, cost."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.nn import SKIP_FUSION, create_skip_fusion
from medseg.nn.layers import conv_stage
from test_nn_blocks import randomize  # tests/ is on sys.path (pytest's default import mode)

NAMES = SKIP_FUSION.names()
# (skip shape, gating shape): odd fine grids whose coarse grid is ceil(S / 2)
PAIRS = {3: ((1, 16, 5, 7, 9), (1, 32, 3, 4, 5)), 2: ((2, 16, 5, 7), (2, 32, 3, 4))}
CASES = [(n, d) for n in NAMES for d in (2, 3)]


def test_registry_names_and_unknown_name():
    assert NAMES == ["aff", "concat", "gate", "iaff"]
    with pytest.raises(ValueError, match="valid names: aff, concat, gate, iaff"):
        create_skip_fusion("add", 16, 32)


@pytest.mark.parametrize("name,dims", CASES)
def test_fusion_output_shape_and_gradients(name, dims):
    xs, gs = PAIRS[dims]
    fusion = randomize(create_skip_fusion(name, xs[1], gs[1], spatial_dims=dims)).train()
    x = torch.randn(xs, requires_grad=True)
    g = torch.randn(gs, requires_grad=True)
    out = fusion(x, g)
    assert out.shape == (xs[0], fusion.out_channels, *xs[2:])
    assert fusion.out_channels == (2 * xs[1] if name in ("concat", "gate") else xs[1])
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
    for pname, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("name,dims", [c for c in CASES if c[0] != "concat"])
def test_fusion_maps_in_unit_interval_at_skip_resolution(name, dims):
    xs, gs = PAIRS[dims]
    fusion = randomize(create_skip_fusion(name, xs[1], gs[1], spatial_dims=dims)).eval()
    x, g = torch.randn(xs) * 3, torch.randn(gs) * 3
    out, m = fusion(x, g, return_map=True)
    torch.testing.assert_close(out, fusion(x, g))
    assert m.shape == (xs[0], 1, *xs[2:])
    assert m.min() >= 0 and m.max() <= 1 and m.std() > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_gate_output_is_skip_times_map_next_to_upsampled_gating(dims):
    xs, gs = PAIRS[dims]
    gate = randomize(create_skip_fusion("gate", xs[1], gs[1], spatial_dims=dims, inter_channels=8)).eval()
    x, g = torch.randn(xs), torch.randn(gs)
    out, a = gate(x, g, return_map=True)
    torch.testing.assert_close(out[:, : xs[1]], x * a)
    torch.testing.assert_close(out[:, xs[1] :], gate.up(g, xs[2:]))
    assert gate.theta.out_channels == 8 and gate.theta.stride == (2,) * dims  # theta(x) strided onto g's grid
    assert gate.psi.out_channels == 1


def test_gate_map_is_computed_on_the_coarse_grid():
    gate = randomize(create_skip_fusion("gate", 8, 16, inter_channels=4)).eval()
    x, g = torch.randn(1, 8, 8, 8, 8), torch.randn(1, 16, 4, 4, 4)
    _, a = gate(x, g, return_map=True)
    # the psi logits live on the 4^3 grid: trilinear upsampling of a 4^3 map reproduces a
    alpha = torch.sigmoid(gate.psi(torch.relu(gate.theta(x) + gate.phi(g))))
    up = torch.nn.functional.interpolate(alpha, size=(8, 8, 8), mode="trilinear", align_corners=False)
    torch.testing.assert_close(a, up)


@pytest.mark.parametrize("name", ["gate", "aff"])
def test_attention_fusion_is_cheap_next_to_the_decoder_stage(name):
    cs, cg, n = 32, 64, 24
    x, g = torch.randn(1, cs, n, n, n), torch.randn(1, cg, n // 2, n // 2, n // 2)

    def flops(fn):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            fn()
        return counter.get_total_flops()

    plain = create_skip_fusion("concat", cs, cg).eval()
    fusion = create_skip_fusion(name, cs, cg).eval()
    stage = conv_stage(spatial_dims=3, in_channels=2 * cs, out_channels=cs).eval()
    extra = flops(lambda: fusion(x, g)) - flops(lambda: plain(x, g))
    assert extra < 0.05 * flops(lambda: stage(torch.randn(1, 2 * cs, n, n, n)))


@pytest.mark.parametrize("name", ["aff", "iaff"])
def test_aff_output_is_a_convex_mix_of_skip_and_upsampled_gating(name):
    fusion = randomize(create_skip_fusion(name, 16, 32)).eval()
    x, g = torch.randn(1, 16, 5, 7, 9), torch.randn(1, 32, 3, 4, 5)
    z = fusion(x, g)
    y = fusion.up(g, x.shape[2:])
    lo, hi = torch.minimum(x, y), torch.maximum(x, y)
    assert (z >= lo - 1e-5).all() and (z <= hi + 1e-5).all()
    assert not torch.allclose(z, 0.5 * (x + y), atol=1e-3)  # the weights are learned, not 1/2


@pytest.mark.parametrize(
    "name,args,kwargs,arg",
    [
        ("gate", (0, 8), {}, "skip_channels"),
        ("concat", (8, 0), {}, "gating_channels"),
        ("gate", (8, 8), {"inter_channels": 0}, "inter_channels"),
        ("aff", (8, 8), {"spatial_dims": 1}, "spatial_dims"),
        ("iaff", (8, 8), {"reduction": 0}, "reduction"),
        ("gate", (8, 8), {"scale": 0}, "scale"),
        ("aff", (8, 8), {"norm": "none"}, "norm"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(name, args, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        create_skip_fusion(name, *args, **kwargs)
