"""Block attention (se, eca, cbam, bam, nonlocal, abn): shapes, gradients, the papers' equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.nn import BLOCK_ATTENTION, create_block_attention
from medseg.nn.channel import eca_kernel_size

NAMES = BLOCK_ATTENTION.names()
SHAPES = {3: [(1, 16, 5, 7, 9), (2, 16, 4, 6, 3)], 2: [(1, 16, 5, 7), (2, 16, 6, 9)]}
CASES = [(n, d, s) for n in NAMES for d in (2, 3) for s in SHAPES[d]]


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised layers would hide a broken gradient path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def test_registry_lists_every_block_and_rejects_unknown_names():
    assert NAMES == ["abn", "bam", "cbam", "eca", "nonlocal", "se", "va"]
    with pytest.raises(ValueError, match="valid names: abn, bam, cbam, eca, nonlocal, se, va"):
        create_block_attention("sse", 8)
    assert isinstance(create_block_attention(None, 8), torch.nn.Identity)


@pytest.mark.parametrize("name,dims,shape", CASES)
def test_block_keeps_shape_and_gradients_reach_input_and_every_parameter(name, dims, shape):
    torch.manual_seed(0)
    # BAM's channel batch norm has no batch statistics for one sample (it refuses: see test_nn_attention_paper)
    kw = {"channel_norm": "none"} if name == "bam" and shape[0] == 1 else {}
    block = randomize(create_block_attention(name, shape[1], spatial_dims=dims, **kw)).train()
    x = torch.randn(shape, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    loss = (y * torch.randn_like(y)).sum()
    if hasattr(block, "auxiliary_loss"):
        loss = loss + block.auxiliary_loss(torch.randint(0, 2, (shape[0], 1, *shape[2:])))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@pytest.mark.parametrize("name,dims,shape", [c for c in CASES if getattr(BLOCK_ATTENTION.get(c[0]), "returns_map", False)])
def test_gate_maps_are_single_channel_and_in_unit_interval(name, dims, shape):
    block = randomize(create_block_attention(name, shape[1], spatial_dims=dims)).eval()
    x = torch.randn(shape) * 5
    y, m = block(x, return_map=True)
    assert torch.equal(y, block(x))
    assert m.shape == (shape[0], 1, *shape[2:])
    assert m.min() >= 0 and m.max() <= 1
    assert m.std() > 0  # a spatial map, not a constant


@pytest.mark.parametrize("name", ["se", "eca"])
@pytest.mark.parametrize("dims", [2, 3])
def test_channel_gates_are_constant_over_space(name, dims):
    shape = SHAPES[dims][0]
    block = randomize(create_block_attention(name, shape[1], spatial_dims=dims)).eval()
    x = torch.rand(shape) + 0.5  # no zeros: the ratio y / x is the gate
    ratio = (block(x) / x).flatten(2)
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), atol=1e-5)
    assert ratio.std(dim=1).mean() > 1e-3  # it differs between channels


def test_cbam_channel_gate_is_constant_over_space_and_spatial_gate_over_channels():
    block = randomize(create_block_attention("cbam", 16)).eval()
    x = torch.rand(2, 16, 5, 7, 9) + 0.5
    mc = block.channel_gate(x)
    assert mc.shape == (2, 16, 1, 1, 1)
    with torch.no_grad():
        block.spatial_gate.conv.weight.zero_()  # Ms = sigmoid(0) = 0.5 everywhere
    ratio = (block(x) / x).flatten(2)
    assert torch.allclose(ratio, 0.5 * mc.flatten(2).expand_as(ratio), atol=1e-6)


def cbam_reference(x, w0, b0, w1, b1, ws):
    """Woo et al. 2018, eqs. (2)-(3), written directly on pooled vectors."""
    dims = tuple(range(2, x.ndim))
    avg, mx = x.mean(dims), x.amax(dims)  # (B, C)
    mlp = lambda v: F.linear(F.relu(F.linear(v, w0, b0)), w1, b1)  # noqa: E731
    mc = torch.sigmoid(mlp(avg) + mlp(mx)).reshape(*avg.shape, *([1] * len(dims)))
    f1 = mc * x
    desc = torch.cat([f1.mean(1, keepdim=True), f1.amax(1, keepdim=True)], 1)
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    ms = torch.sigmoid(conv(desc, ws, padding=ws.shape[-1] // 2))
    return ms * f1, ms


@pytest.mark.parametrize("dims", [2, 3])
def test_cbam_matches_the_papers_equations(dims):
    torch.manual_seed(1)
    block = randomize(create_block_attention("cbam", 16, spatial_dims=dims, reduction=4, kernel_size=7), seed=3).eval()
    cg, sg = block.channel_gate, block.spatial_gate
    x = torch.randn(SHAPES[dims][1])
    ref, ref_map = cbam_reference(x, cg.fc1.weight.flatten(1), cg.fc1.bias, cg.fc2.weight.flatten(1), cg.fc2.bias, sg.conv.weight)
    y, m = block(x, return_map=True)
    assert sg.conv.weight.shape[-dims:] == (7,) * dims and sg.conv.bias is None
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, ref_map, atol=1e-6, rtol=1e-5)


def test_se_reduction_ratio_sets_the_hidden_width():
    assert create_block_attention("se", 64, reduction=4).fc1.out_channels == 16
    assert create_block_attention("se", 256).fc1.out_channels == 16  # r = 16 by default
    assert create_block_attention("se", 16).fc1.out_channels == 8  # at least min(8, C)


def test_eca_uses_the_adaptive_kernel_size_and_no_reduction():
    assert [eca_kernel_size(c) for c in (16, 64, 128, 256, 512)] == [3, 3, 5, 5, 5]
    block = create_block_attention("eca", 256)
    assert block.conv.weight.shape == (1, 1, 5)
    assert sum(p.numel() for p in block.parameters()) == 5  # one k-tap filter shared by all channels


def test_bam_is_f_plus_f_times_sigmoid_of_branch_sum():
    block = create_block_attention("bam", 16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()  # Mc = Ms = 0 -> F + F * 0.5
    x = torch.randn(1, 16, 5, 7, 9)
    torch.testing.assert_close(block(x), 1.5 * x)
    with torch.no_grad():
        block.spatial[-1].bias.fill_(-1e4)  # spatial branch closes the gate -> identity
    torch.testing.assert_close(block(x), x)


def test_nonlocal_starts_as_identity_and_then_mixes_distant_positions():
    block = create_block_attention("nonlocal", 16, subsample=True).eval()
    x = torch.randn(1, 16, 5, 7, 9)
    torch.testing.assert_close(block(x), x)
    randomize(block)
    x2 = x.clone()
    x2[..., -1, -1, -1] += 10.0  # the far corner
    assert (block(x2)[..., 0, 0, 0] - block(x)[..., 0, 0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "name,kwargs,arg",
    [
        ("se", {"reduction": 0}, "reduction"),
        ("se", {"spatial_dims": 4}, "spatial_dims"),
        ("eca", {"kernel_size": 4}, "kernel_size"),
        ("cbam", {"kernel_size": 6}, "kernel_size"),
        ("cbam", {"reduction": -2}, "reduction"),
        ("bam", {"dilation": 0}, "dilation"),
        ("bam", {"norm": "layer"}, "norm"),
        ("bam", {"channel_norm": "instance"}, "channel_norm"),
        ("bam", {"min_hidden": 0}, "min_hidden"),
        ("se", {"min_hidden": -1}, "min_hidden"),
        ("cbam", {"min_hidden": 0}, "min_hidden"),
        ("cbam", {"arrangement": "serial"}, "arrangement"),
        ("nonlocal", {"inter_channels": 0}, "inter_channels"),
        ("abn", {"num_classes": 1}, "num_classes"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        create_block_attention(name, 16, **kwargs)
    with pytest.raises(ValueError, match="channels"):
        create_block_attention(name, 0)


@pytest.mark.parametrize("shape", [(2, 5, 4, 6, 3), (1, 16, 5, 7)])
def test_channel_mean_matches_torch_mean_in_both_memory_layouts(shape):
    from medseg.nn.layers import channel_mean

    x = torch.randn(shape)
    ref = x.mean(1, keepdim=True)
    torch.testing.assert_close(channel_mean(x), ref)
    cl = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    torch.testing.assert_close(channel_mean(x.contiguous(memory_format=cl)), ref)
    torch.testing.assert_close(channel_mean(x.transpose(2, 3)), ref.transpose(2, 3))  # other strides: fallback


# --------------------------------------------------------------------------- instance norm on the group-norm kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_instance_norm_matches_torch_instance_norm_values_and_gradients(channels_last):
    from medseg.nn.layers import InstanceNorm3d

    torch.manual_seed(0)
    ref, ours = torch.nn.InstanceNorm3d(6, affine=True), InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(ref.state_dict())  # same keys: checkpoints of either load into the other
    x = torch.randn(2, 6, 7, 9, 5) * 3.0 + 2.0
    x_ours = x.clone().contiguous(memory_format=torch.channels_last_3d) if channels_last else x.clone()
    x_ref, x_ours = x.clone().requires_grad_(), x_ours.requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, atol=1e-5, rtol=1e-5)
    assert y_ours.is_contiguous(memory_format=torch.channels_last_3d) == channels_last  # layout kept, no copy back
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-3, rtol=1e-4)


def _own_and_kernel_norm(dims: int, dtype: torch.dtype, seed: int, monkeypatch, groups: int | None = None):
    """A channels-last instance norm's (``groups`` None) or group norm's forward + backward with medseg's backward
    and with PyTorch's kernel: ``(norm, x, fmt, own, stock)``, each of ``own`` / ``stock`` = (grad_fn name, y,
    x.grad, weight.grad, bias.grad)."""
    from medseg.nn import layers

    torch.manual_seed(seed)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    channels = 5 if groups is None else 2 * groups
    if groups is None:
        norm = (layers.InstanceNorm3d if dims == 3 else layers.InstanceNorm2d)(channels, affine=True)
    else:
        norm = layers.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    shape = (2, channels, 6, 7, 4)[: dims + 2]
    x = (torch.randn(shape) * 4.0 - 3.0).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)

    def run(own: bool):
        monkeypatch.setattr(layers, "CHANNELS_LAST_NORM_BACKWARD", own)
        x.grad = norm.weight.grad = norm.bias.grad = None
        y = norm(x)
        name = type(y.grad_fn).__name__
        y.backward(grad)
        return name, y.detach(), x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()

    own, stock = run(True), run(False)
    assert own[0] == "_ChannelsLastGroupNormBackward" and stock[0] == "NativeGroupNormBackward0"
    assert own[2].dtype == dtype and own[2].is_contiguous(memory_format=fmt)  # layout kept: no copy for the conv below
    return norm, x, fmt, own, stock


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_training_norm_takes_its_own_backward_and_matches_the_kernel(dims, monkeypatch):
    from medseg.nn import layers

    norm, x, fmt, own, stock = _own_and_kernel_norm(dims, torch.float32, 1, monkeypatch)
    for a, b in zip(own[1:], stock[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # where it does not apply: no gradients, a contiguous input, float64 -> PyTorch's kernel
    monkeypatch.setattr(layers, "CHANNELS_LAST_NORM_BACKWARD", True)
    with torch.no_grad():
        assert norm(x).grad_fn is None
    assert type(norm(x.detach().contiguous().requires_grad_()).grad_fn).__name__ == "NativeGroupNormBackward0"
    assert type(norm.double()(x.detach().double().contiguous(memory_format=fmt).requires_grad_()).grad_fn).__name__ \
        == "NativeGroupNormBackward0"


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_bf16_training_norm_matches_the_kernel(dims, monkeypatch):
    """bf16 activations (CPU autocast) take the own backward too, computed in fp32, gradient returned in bf16."""
    _, _, _, own, stock = _own_and_kernel_norm(dims, torch.bfloat16, 3, monkeypatch)
    torch.testing.assert_close(own[1], stock[1], atol=0, rtol=0)  # the same forward kernel
    torch.testing.assert_close(own[2].float(), stock[2].float(), atol=2e-2, rtol=2e-2)  # bf16 rounding
    torch.testing.assert_close(own[3], stock[3], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(own[4], stock[4], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("groups", [2, 3, 6])
def test_channels_last_group_norm_backward_matches_the_kernel(groups, monkeypatch):
    """``norm: group`` (medseg.nn.layers.GroupNorm) takes the same backward, summing each group's channels."""
    _, _, _, own, stock = _own_and_kernel_norm(3, torch.float32, 4, monkeypatch, groups=groups)
    for a, b in zip(own[1:], stock[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels,groups", [(3, 3), (6, 3), (4, 1)])  # instance norm, 2 channels per group, one group
def test_channels_last_norm_backward_passes_gradcheck(channels, groups):
    from medseg.nn.layers import _ChannelsLastGroupNorm

    torch.manual_seed(2)
    x = (torch.randn(2, channels, 4, 3, 5, dtype=torch.float64) * 2 + 1).contiguous(
        memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.rand(channels, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(channels, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _ChannelsLastGroupNorm.apply(x, w, b, groups, 1e-5), (x, w, b))


def test_cpu_instance_norm_keeps_torch_errors_and_is_what_unet_stages_use():
    from medseg.nn.layers import InstanceNorm3d, conv_stage

    norm = InstanceNorm3d(4, affine=True).train()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        norm(torch.randn(2, 4, 1, 1, 1))  # one voxel: torch's own check, not a silent constant
    stage = conv_stage(spatial_dims=3, in_channels=1, out_channels=4)
    assert sum(isinstance(m, InstanceNorm3d) for m in stage.modules()) == 2
