"""BAM, CBAM and the channel MLPs as their papers define them, checked by hand on 2x2x2 tensors.

* BAM (Park et al., BMVC 2018): batch norm on both branch outputs, ``F' = F * (1 + sigmoid(Mc + Ms))``,
  and the returned map is the channel mean of the applied ``sigmoid(Mc + Ms)``.
* CBAM (Woo et al., ECCV 2018, Table 3): channel->spatial, spatial->channel and parallel arrangements.
* Reduction ratio: the hidden-width floor ``min_hidden`` (default 8) and the paper's exact ratio (1).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.nn import build_model, create_block_attention
from medseg.nn.bam import BAM
from medseg.nn.cbam import CBAM
from medseg.nn.channel import SqueezeExcitation
from medseg.nn.registries import SKIP_FUSION

ROOT = Path(__file__).resolve().parents[1]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def vol(values) -> torch.Tensor:
    """8 values -> one 2x2x2 channel (z-major)."""
    return torch.tensor(values, dtype=torch.float32).reshape(2, 2, 2)


def set_bn(bn: torch.nn.modules.batchnorm._BatchNorm, weight, bias, mean) -> None:
    """An eval-mode batch norm that is exactly ``(v - mean) * weight + bias`` (running var = 1 - eps)."""
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        bn.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        bn.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        bn.running_var.fill_(1.0 - bn.eps)


# --------------------------------------------------------------------------- BAM
def bam_by_hand() -> tuple[BAM, torch.Tensor]:
    """C = 2, hidden = 1 (r = 2, min_hidden = 1), batch norms, dilation 4 on a 2x2x2 volume."""
    block = create_block_attention("bam", 2, reduction=2, min_hidden=1, dilation=4, norm="batch").eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            set_bn(m, 1.0, 0.0, 0.0)  # identity unless overridden below
    with torch.no_grad():
        block.fc1.weight.copy_(torch.tensor([1.0, 1.0]).reshape(1, 2, 1, 1, 1))
        block.fc1.bias.fill_(0.5)
        block.fc2.weight.copy_(torch.tensor([0.5, -1.0]).reshape(2, 1, 1, 1, 1))
        block.fc2.bias.copy_(torch.tensor([0.0, 1.0]))
        convs = [m for m in block.spatial if isinstance(m, torch.nn.Conv3d)]
        assert [c.kernel_size for c in convs] == [(1, 1, 1), (3, 3, 3), (3, 3, 3), (1, 1, 1)]
        convs[0].weight.fill_(1.0)  # a + b
        for c in convs[1:]:
            c.weight.fill_(1.0)  # dilation 4 on 2 voxels: only the centre tap sees the volume
        for c in convs:
            c.bias.zero_()
    set_bn(block.channel_bn, [1.0, 0.5], [0.0, 0.25], [0.5, 0.0])  # Mc = BN(MLP(avg))
    set_bn(block.spatial[-1], 0.5, -1.0, 0.0)  # Ms = BN(conv1x1(...)) = 0.5 s - 1
    x = torch.stack([vol([0, 1, 2, 3, 0, 1, 2, 3]), vol([1, 1, 1, 1, -1, -1, -1, -1])])[None]
    return block, x


def test_bam_output_is_f_times_one_plus_sigmoid_of_bn_branches_and_map_is_its_channel_mean():
    block, x = bam_by_hand()
    # channel: avg = (1.5, 0); relu(1.5 + 0 + 0.5) = 2; fc2 -> (1, -1); BN -> ((1 - 0.5) * 1, -1 * 0.5 + 0.25)
    mc = [0.5, -0.25]
    # spatial: relu(a + b) = (1, 2, 3, 4, 0, 0, 1, 2) through the identity layers; BN -> 0.5 s - 1
    ms = [0.5 * s - 1.0 for s in (1, 2, 3, 4, 0, 0, 1, 2)]
    att = torch.stack([vol([sig(c + s) for s in ms]) for c in mc])[None]  # (1, 2, 2, 2, 2)
    y, m = block(x, return_map=True)
    torch.testing.assert_close(y, x * (1.0 + att), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m, att.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)
    assert m.shape == (1, 1, 2, 2, 2)
    assert m[0, 0, 0, 0, 0].item() == pytest.approx((sig(0.5 - 0.5) + sig(-0.25 - 0.5)) / 2, abs=1e-6)


def test_bam_map_is_the_applied_factor_minus_one_averaged_over_channels():
    torch.manual_seed(0)
    block = create_block_attention("bam", 16).eval()
    x = torch.rand(2, 16, 6, 5, 4) + 0.5  # no zeros: y / x is the applied factor
    y, m = block(x, return_map=True)
    torch.testing.assert_close((y / x).mean(1, keepdim=True), 1.0 + m, atol=1e-5, rtol=1e-5)


def test_bam_channel_batch_norm_uses_batch_statistics_in_training_and_refuses_one_sample():
    torch.manual_seed(0)
    block = create_block_attention("bam", 8).train()
    seen = {}
    block.channel_bn.register_forward_hook(lambda mod, inp, out: seen.update(v=inp[0], out=out))
    block(torch.randn(2, 8, 4, 4, 4))
    v = seen["v"].flatten(1)  # the MLP output (2, 8)
    # weight 1, bias 0, statistics of the two samples: (v - mean) / sqrt(biased var + eps), i.e. about -1 and +1
    half = (v[0] - v[1]) / 2
    expected = torch.stack([half, -half]) / torch.sqrt(half**2 + block.channel_bn.eps)
    torch.testing.assert_close(seen["out"].flatten(1), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="channel_norm"):
        block(torch.randn(1, 8, 4, 4, 4))
    none = create_block_attention("bam", 8, channel_norm="none").train()
    assert isinstance(none.channel_bn, torch.nn.Identity)
    assert none(torch.randn(1, 8, 4, 4, 4)).shape == (1, 8, 4, 4, 4)
    null = create_block_attention("bam", 8, channel_norm=None).train()  # YAML `channel_norm: null`
    assert isinstance(null.channel_bn, torch.nn.Identity)
    assert null(torch.randn(1, 8, 4, 4, 4)).shape == (1, 8, 4, 4, 4)


# --------------------------------------------------------------------------- CBAM arrangements
def cbam_by_hand(arrangement: str) -> tuple[CBAM, torch.Tensor]:
    """C = 2, hidden = 1, k = 1; MLP ``v -> (h, -h)`` with ``h = relu(v_0)``; Ms logit = max over channels."""
    block = create_block_attention("cbam", 2, reduction=2, min_hidden=1, kernel_size=1, arrangement=arrangement).eval()
    cg, sg = block.channel_gate, block.spatial_gate
    with torch.no_grad():
        cg.fc1.weight.copy_(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1, 1))
        cg.fc1.bias.zero_()
        cg.fc2.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1, 1))
        cg.fc2.bias.zero_()
        sg.conv.weight.copy_(torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1, 1))  # [mean_c, max_c] -> max_c
    x = torch.stack([vol([1, 1, 1, 1, -1, -1, -1, -1]), vol([2, 0, 2, 0, 2, 0, 2, 0])])[None]
    return block, x


def test_cbam_channel_spatial_by_hand():
    block, x = cbam_by_hand("channel_spatial")
    # Mc on F: avg (0, 1) -> MLP (0, 0); max (1, 2) -> MLP (1, -1); logits (1, -1)
    s1, sm1 = sig(1.0), sig(-1.0)
    f1 = x * torch.tensor([s1, sm1]).reshape(1, 2, 1, 1, 1)
    # Ms on F' = max over channels of (s1 * a, sm1 * b): (1,2)->s1, (1,0)->s1, (-1,2)->2 sm1, (-1,0)->0
    ms = torch.sigmoid(vol([s1, s1, s1, s1, 2 * sm1, 0, 2 * sm1, 0]))[None, None]
    y, m = block(x, return_map=True)
    torch.testing.assert_close(y, f1 * ms, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m, ms, atol=1e-6, rtol=1e-6)


def test_cbam_spatial_channel_by_hand():
    block, x = cbam_by_hand("spatial_channel")
    # Ms on F: max over channels = (2, 1, 2, 1, 2, 0, 2, 0)
    ms = torch.sigmoid(vol([2, 1, 2, 1, 2, 0, 2, 0]))[None, None]
    f1 = x * ms
    # Mc on F': avg_0 = (2 s2 + 2 s1 - 2 s2 - 2 s0) / 8 = (s1 - 1/2) / 4, max_0 = s2 (both > 0)
    t = (sig(1.0) - 0.5) / 4 + sig(2.0)
    y, m = block(x, return_map=True)
    torch.testing.assert_close(y, f1 * torch.tensor([sig(t), sig(-t)]).reshape(1, 2, 1, 1, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m, ms, atol=1e-6, rtol=1e-6)


def test_cbam_parallel_sums_the_branch_outputs_before_one_sigmoid_by_hand():
    block, x = cbam_by_hand("parallel")
    mc, ms = (1.0, -1.0), (2, 1, 2, 1, 2, 0, 2, 0)  # both branches on F
    att = torch.stack([vol([sig(c + s) for s in ms]) for c in mc])[None]
    y, m = block(x, return_map=True)
    torch.testing.assert_close(y, x * att, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m, att.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)


def test_cbam_arrangements_share_weights_but_differ_and_bad_names_are_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 4, 3)
    ref = create_block_attention("cbam", 16).eval()
    outs = {}
    for arr in ("channel_spatial", "spatial_channel", "parallel"):
        block = create_block_attention("cbam", 16, arrangement=arr).eval()
        block.load_state_dict(ref.state_dict())  # same parameters, only the wiring differs
        outs[arr] = block(x)
    torch.testing.assert_close(outs["channel_spatial"], ref(x))
    assert (outs["spatial_channel"] - outs["channel_spatial"]).abs().max() > 1e-4
    assert (outs["parallel"] - outs["channel_spatial"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="arrangement must be one of channel_spatial, spatial_channel, parallel"):
        create_block_attention("cbam", 16, arrangement="serial")
    cfg = load_config(ROOT / "configs" / "cbam_unet3d.yaml", ["model.block_attention.kwargs.arrangement=serial"])
    with pytest.raises(ConfigError, match="arrangement"):
        build_model(cfg.model, num_classes=2)


# --------------------------------------------------------------------------- reduction ratio
WIDTHS = (16, 32, 64, 128, 256)


def hidden_widths(name: str, **kw) -> list[int]:
    out = []
    for c in WIDTHS:
        if name == "aff":
            mscam = SKIP_FUSION.get("aff")(c, 2 * c, **kw).mscam
            assert mscam.local[0].out_channels == mscam.glob[0].out_channels
            out.append(mscam.local[0].out_channels)
            continue
        block = create_block_attention(name, c, **kw)
        mlp = block.channel_gate if name == "cbam" else block
        if name == "bam":
            assert block.spatial[0].out_channels == block.fc1.out_channels  # both branches reduce by r
        out.append(mlp.fc1.out_channels)
    return out


@pytest.mark.parametrize(
    "name,reduction,floored,exact",
    [
        ("se", 16, [8, 8, 8, 8, 16], [1, 2, 4, 8, 16]),
        ("cbam", 16, [8, 8, 8, 8, 16], [1, 2, 4, 8, 16]),
        ("bam", 16, [8, 8, 8, 8, 16], [1, 2, 4, 8, 16]),
        ("aff", 4, [8, 8, 16, 32, 64], [4, 8, 16, 32, 64]),
    ],
)
def test_hidden_width_with_the_default_floor_and_with_the_papers_ratio(name, reduction, floored, exact):
    assert hidden_widths(name, reduction=reduction) == floored
    assert hidden_widths(name, reduction=reduction, min_hidden=8) == floored
    assert hidden_widths(name, reduction=reduction, min_hidden=1) == exact
    assert exact == [c // reduction for c in WIDTHS]
    with pytest.raises(ValueError, match="min_hidden"):
        hidden_widths(name, reduction=reduction, min_hidden=0)


@pytest.mark.parametrize(
    "config,section,shown",
    [
        ("se_unet3d", "block_attention", {"reduction": 16, "min_hidden": 8}),
        ("cbam_unet3d", "block_attention", {"reduction": 16, "min_hidden": 8, "kernel_size": 7, "arrangement": "channel_spatial"}),
        ("bam_unet3d", "block_attention", {"reduction": 16, "min_hidden": 8, "dilation": 4, "channel_norm": "batch"}),
        ("aff_unet3d", "skip_fusion", {"reduction": 4, "min_hidden": 8}),
    ],
)
def test_configs_show_the_floor_and_can_ask_for_the_papers_ratio(config, section, shown):
    path = ROOT / "configs" / f"{config}.yaml"
    assert getattr(load_config(path).model, section).kwargs == shown
    cfg = load_config(path, [f"model.{section}.kwargs.min_hidden=1"])
    model = build_model(cfg.model, num_classes=2)
    widths = {}
    for m in model.modules():
        if isinstance(m, (SqueezeExcitation, BAM)):
            widths[m.fc1.in_channels] = m.fc1.out_channels
        elif isinstance(m, CBAM):
            widths[m.channel_gate.fc1.in_channels] = m.channel_gate.fc1.out_channels
        elif hasattr(m, "mscam"):
            widths[m.mscam.local[0].in_channels] = m.mscam.local[0].out_channels
    assert widths and all(h == c // shown["reduction"] for c, h in widths.items()), widths
