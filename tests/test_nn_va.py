"""Volumetric Attention (issue 11 item 8; Wang et al., MICCAI 2019): the z neighbourhood, a hand
computation, the map, the config."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.config import load_config
from medseg.nn import build_model, create_block_attention
from medseg.nn.va import VolumetricAttention


def va_block(channels=4, radius=1, nz=7, **kw):
    torch.manual_seed(0)
    block = create_block_attention("va", channels, spatial_dims=2, radius=radius, min_hidden=1, kernel_size=3, **kw)
    block.z_len = nz
    return block.eval()


@pytest.mark.parametrize("radius", [1, 2])
def test_a_slice_depends_on_its_feature_bag_and_on_no_other_slice(radius):
    nz, z0 = 9, 4
    block = va_block(radius=radius, nz=nz)
    x = torch.randn(2 * nz, 4, 5, 5)  # two volumes of 9 slices, slices consecutive
    with torch.no_grad():
        ref = block(x)
        for dz in range(-nz, nz):
            z = z0 + dz
            if not 0 <= z < nz:
                continue
            xp = x.clone()
            xp[z] += 3.0 * torch.randn_like(xp[z])
            change = (block(xp)[z0] - ref[z0]).abs().max().item()
            if abs(dz) <= radius:
                assert change > 1e-4, (dz, change)  # inside the bag: the output moves
            else:
                assert change == 0.0, (dz, change)  # outside the bag: exactly unchanged
        other = x.clone()
        other[nz + z0] += 5.0  # the same slice of the other volume of the batch
        assert torch.equal(block(other)[z0], ref[z0])


def test_in_the_25d_net_a_slice_depends_on_the_input_slices_within_the_z_halo_only():
    """3-slice stacks (radius 1) and 3 VA blocks of radius 1 in series: z_halo = 4, and it is tight."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.slices=3", "model.channels=[4,8]", "model.block_attention.name=va"]).model
    model = build_model(cfg, num_classes=2).eval()
    assert model.z_halo == 4
    x = torch.randn(1, 1, 8, 8, 13)
    z0 = 6
    with torch.no_grad():
        ref = model(x)[..., z0]
        for dz, moves in [(-5, False), (-4, True), (4, True), (5, False)]:
            xp = x.clone()
            xp[..., z0 + dz] += 3.0
            change = (model(xp)[..., z0] - ref).abs().max().item()
            assert (change > 1e-6) if moves else (change == 0.0), (dz, change)


def test_hand_computation_on_a_small_tensor():
    """C = 2, hidden = 1, bag radius 1, 1x1 spatial kernel: every weight set by hand, the output
    written out from the equations (replicate padding at the z ends)."""
    block = VolumetricAttention(2, radius=1, reduction=2, min_hidden=1, kernel_size=1)
    with torch.no_grad():
        # fc1 (hidden=1, C=2, bag=3): weight[0, c, j] reads channel c of stack z - 1 + j
        block.fc1.weight.copy_(torch.tensor([[[0.5, 1.0, -0.5], [0.0, 2.0, 1.0]]]))
        block.fc1.bias.fill_(0.1)
        block.fc2.weight.copy_(torch.tensor([[[1.0]], [[-2.0]]]))
        block.fc2.bias.copy_(torch.tensor([0.0, 0.3]))
        # spatial (1, 2, 1, 1, 3): [mean-map, max-map] x stack z - 1 + j
        block.spatial.weight.copy_(torch.tensor([[0.2, 0.4, 0.6], [-0.3, 0.5, 0.1]]).reshape(1, 2, 1, 1, 3))
    nz = 3
    block.z_len = nz
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]],    # slice 0: channel 0 = [1, 2], channel 1 = [3, -1]
                      [[[0.0, 4.0]], [[-2.0, 2.0]]],    # slice 1
                      [[[2.0, 2.0]], [[1.0, 5.0]]]])    # slice 2; shape (Z=3, C=2, x=1, y=2)
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    relu = lambda v: max(v, 0.0)  # noqa: E731
    gap = [[sum(x[z, c, 0].tolist()) / 2 for c in range(2)] for z in range(nz)]
    w1 = [[0.5, 1.0, -0.5], [0.0, 2.0, 1.0]]
    sw = [[0.2, 0.4, 0.6], [-0.3, 0.5, 0.1]]
    expected = torch.zeros_like(x)
    maps = torch.zeros(nz, 1, 1, 2)
    for z in range(nz):
        bag = [min(max(z + j - 1, 0), nz - 1) for j in range(3)]  # replicate padding at the ends
        hidden = relu(0.1 + sum(w1[c][j] * gap[bag[j]][c] for c in range(2) for j in range(3)))
        mc = [sig(1.0 * hidden + 0.0), sig(-2.0 * hidden + 0.3)]
        for p in range(2):
            mean_p = [(x[s, 0, 0, p].item() + x[s, 1, 0, p].item()) / 2 for s in bag]
            max_p = [max(x[s, 0, 0, p].item(), x[s, 1, 0, p].item()) for s in bag]
            ms = sig(sum(sw[0][j] * mean_p[j] + sw[1][j] * max_p[j] for j in range(3)))
            for c in range(2):
                expected[z, c, 0, p] = x[z, c, 0, p] * mc[c] * ms
            maps[z, 0, 0, p] = (mc[0] + mc[1]) / 2 * ms
    with torch.no_grad():
        y, m = block(x, return_map=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, maps, rtol=1e-5, atol=1e-6)
    # one number written out: slice 0, channel 0, pixel 0 (bag = slices 0, 0, 1)
    h0 = relu(0.1 + 0.5 * 1.5 + 1.0 * 1.5 - 0.5 * 2.0 + 0.0 * 1.0 + 2.0 * 1.0 + 1.0 * 0.0)  # = 3.35
    ms0 = sig(0.2 * 2.0 + 0.4 * 2.0 + 0.6 * -1.0 - 0.3 * 3.0 + 0.5 * 3.0 + 0.1 * 0.0)    # = sig(1.2)
    assert y[0, 0, 0, 0].item() == pytest.approx(1.0 * sig(h0) * ms0, rel=1e-5)


def test_the_map_is_the_channel_mean_of_the_applied_factor():
    block = va_block(nz=5)
    x = torch.rand(10, 4, 6, 6) + 0.5  # nonzero: the factor is y / x
    with torch.no_grad():
        y, m = block(x, return_map=True)
    assert m.shape == (10, 1, 6, 6) and 0.0 <= m.min() and m.max() <= 1.0
    torch.testing.assert_close(m, (y / x).mean(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_config_builds_a_25d_net_whose_va_maps_come_back_3d():
    cfg = load_config("va_unet25d")
    assert cfg.model.block_attention.name == "va" and cfg.model.slices == 3
    model = build_model(cfg.model, num_classes=3, spacing=(1.0, 1.0, 2.0)).eval()
    x = torch.randn(1, 1, 32, 32, 4)
    with torch.no_grad():
        y, maps = model(x, return_attention=True)
    assert y.shape == (1, 3, 32, 32, 4)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "va/dec3": (1, 1, 4, 4, 4), "va/dec2": (1, 1, 8, 8, 4), "va/dec1": (1, 1, 16, 16, 4)}
    assert all(0.0 <= v.min() and v.max() <= 1.0 for v in maps.values())
    model.train()
    out = model(x)  # training with deep supervision: a backward reaches the VA weights
    sum(o.float().mean() for o in out).backward()
    assert all(m.fc1.weight.grad is not None and m.spatial.weight.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, VolumetricAttention))


def test_on_3d_features_z_is_the_last_axis_and_a_lone_2d_net_has_one_slice_volumes():
    block = va_block(nz=None)
    x = torch.randn(2, 4, 5, 6, 7)  # (B, C, X, Y, Z)
    stacked = x.permute(0, 4, 1, 2, 3).reshape(14, 4, 5, 6)  # the 2.5D layout (B*Z, C, X, Y)
    with torch.no_grad():
        y, m = block(x, return_map=True)
        block.z_len = 7
        y2, m2 = block(stacked, return_map=True)
        block.z_len = None
        alone = block(stacked)  # no z_len: every slice is a volume of its own
        block.z_len = 1
        torch.testing.assert_close(block(stacked), alone)
    torch.testing.assert_close(y2, y.permute(0, 4, 1, 2, 3).reshape(14, 4, 5, 6))
    torch.testing.assert_close(m2, m.permute(0, 4, 1, 2, 3).reshape(14, 1, 5, 6))
    assert not torch.allclose(alone, y2, atol=1e-4)
    block.z_len = 2
    with pytest.raises(ValueError, match="not a whole number of volumes"):
        block(torch.randn(3, 4, 5, 5))
    model = build_model(load_config(None, ["model.channels=[4,8]", "model.block_attention.name=va"]).model,
                        num_classes=2).eval()
    _, maps = model(torch.randn(1, 1, 8, 8, 6), return_attention=True)
    assert set(maps) == {"va/enc0", "va/enc1", "va/dec0"} and model.patch_divisor == (2, 2, 2)
