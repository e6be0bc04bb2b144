"""Attention branch (Fukui et al., CVPR 2019): an area-preserving auxiliary target, the learned
attention map, the paper's plain loss sum, and configs/abn_unet3d.yaml end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import TrainConfig, load_config
from medseg.nn import build_model, create_block_attention
from medseg.nn.abn import class_fractions


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_class_fractions_keep_the_spheres_that_nearest_downsampling_erases():
    """Spheres of 925 and 4,169 voxels in a 64^3 label: the 1/16 grid (4^3 cells of 16^3 voxels)."""
    small, big = ball((64,) * 3, (16, 16, 16), 6), ball((64,) * 3, (48, 48, 48), 10)
    assert small.sum() == 925 and big.sum() == 4169
    lab = np.zeros((64,) * 3, np.int64)
    lab[small], lab[big] = 1, 2
    label = torch.from_numpy(lab)[None, None]
    # the old target: nearest neighbour samples voxels 8, 24, 40, 56 per axis, none inside a sphere
    nearest = F.interpolate(label.float(), size=(4, 4, 4), mode="nearest-exact")
    assert nearest.max() == 0
    t = class_fractions(label, 3, (4, 4, 4))
    assert t.shape == (1, 3, 4, 4, 4) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(1, 4, 4, 4))
    # area preserved: fractions times the cell volume give back the voxel counts
    assert t[0, 1].sum().item() * 4096 == pytest.approx(925, abs=1e-3)
    assert t[0, 2].sum().item() * 4096 == pytest.approx(4169, abs=1e-3)
    # the small sphere (centre 16, radius 6) straddles the 8 cells around the corner (16, 16, 16):
    # cell (1, 1, 1) holds voxels 16..22 on each axis, cell (0, 0, 0) voxels 10..15
    oct_far = int(small[16:32, 16:32, 16:32].sum())
    oct_near = int(small[:16, :16, :16].sum())
    assert t[0, 1, 1, 1, 1].item() == pytest.approx(oct_far / 4096)
    assert t[0, 1, 0, 0, 0].item() == pytest.approx(oct_near / 4096)
    assert 0 < oct_near < oct_far  # 6 vs 7 planes of the ball on each axis
    assert (t[0, 1] > 0).sum() == 8 and (t[0, 2] > 0).sum() == 8
    assert t[0, 1, 2:, 2:, 2:].sum() == 0 and t[0, 2, :2, :2, :2].sum() == 0


def test_class_fractions_by_hand_with_an_ignore_label_in_2d():
    label = torch.tensor([[[[0, 1, 0, 0], [0, 0, 0, 3]]]])  # (1, 1, 2, 4); 3 = ignore (>= K)
    t = class_fractions(label, 2, (1, 2))
    expected = torch.tensor([[[[0.75, 0.75]], [[0.25, 0.0]]]])  # right cell: 3 of 4 voxels not ignored
    torch.testing.assert_close(t, expected)


def _branch(norm: str = "instance", residual: bool = True, loss: str = "dice_ce") -> nn.Module:
    """A 2-D branch on K = C = 3 channels whose head is the identity, so P = x (hand-computable)."""
    block = create_block_attention("abn", 3, spatial_dims=2, num_classes=3, norm=norm, residual=residual, loss=loss)
    block.head = nn.Identity()
    with torch.no_grad():
        block.map_conv.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    return block.train()


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("residual", [True, False])
def test_map_is_sigmoid_of_normed_1x1_conv_of_the_class_map_by_hand(norm, residual):
    block = _branch(norm, residual)
    # pixels a = (1, 0, 2), b = (0, 1, 0), c = (0, 0, 0) over the K = 3 channels
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]).view(1, 3, 1, 3)
    y, m = block(x, return_map=True)
    # conv: z = (1 + 1, -2, 0) = (2, -2, 0); norm over the map (mean 0, variance 8/3), gamma 1, beta 0
    expected = torch.sigmoid(torch.tensor([2.0, -2.0, 0.0]) / math.sqrt(8 / 3 + 1e-5)).view(1, 1, 1, 3)
    torch.testing.assert_close(m, expected, atol=1e-6, rtol=1e-6)
    assert [round(v, 4) for v in m.flatten().tolist()] == [0.7729, 0.2271, 0.5]
    # the returned map is what is applied: F * (1 + M) (the paper) or F * M
    torch.testing.assert_close(y, x * (1 + expected) if residual else x * expected)
    # not the fixed foreground probability 1 - softmax(P)[0] of the old branch (0.7553 at pixel a)
    assert 1 - torch.softmax(x, 1)[0, 0, 0, 0].item() == pytest.approx(0.7553, abs=1e-4)
    # learned: the map's conv and norm receive gradients from the features' loss alone
    y.sum().backward()
    assert block.map_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.map_norm.parameters())


def test_auxiliary_loss_is_soft_ce_plus_soft_dice_on_fractions_by_hand():
    block = create_block_attention("abn", 4, spatial_dims=2, num_classes=2)
    block(torch.randn(1, 4, 1, 2))
    block.last_logits = torch.zeros(1, 2, 1, 2)  # p = (0.5, 0.5) in both cells
    label = torch.tensor([[[[0, 1, 0, 0], [0, 0, 0, 0]]]])  # fractions: left (0.75, 0.25), right (1, 0)
    # CE: -(sum_k t_k log 0.5) per cell = log 2; Dice (class 1): 1 - 2 * (0.5 * 0.25) / (0.5 + 0.5 + 0.25) = 0.8
    assert block.auxiliary_loss(label).item() == pytest.approx(math.log(2) + 0.8, abs=1e-4)
    block.loss = "ce"
    assert block.auxiliary_loss(label).item() == pytest.approx(math.log(2), abs=1e-6)
    block.loss = "dice"
    assert block.auxiliary_loss(label).item() == pytest.approx(0.8, abs=1e-4)
    # an ignored voxel (label 2 >= K) in the right cell: weights (1, 0.75); CE still log 2,
    # Dice: p * w = (0.5, 0.375) -> 1 - 2 * 0.125 / (0.875 + 0.25) = 0.7778
    label[0, 0, 1, 3] = 2
    assert block.auxiliary_loss(label).item() == pytest.approx(1 - 0.25 / 1.125, abs=1e-4)
    block.loss = "ce"
    block.last_logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])  # left cell p = (0.25, 0.75)
    ce_left = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    ce_right = -(0.75 * math.log(0.5))
    assert block.auxiliary_loss(label).item() == pytest.approx((ce_left + ce_right) / 1.75, abs=1e-5)


def test_bad_loss_is_refused_and_defaults_follow_the_paper():
    with pytest.raises(ValueError, match="loss must be one of dice_ce, ce, dice"):
        create_block_attention("abn", 4, loss="focal")
    block = create_block_attention("abn", 4)
    assert block.residual is True and block.loss == "dice_ce"
    assert TrainConfig().aux_loss_weight == 1.0  # L = L_seg + L_att, as Fukui et al.
    assert load_config("abn_unet3d").train.aux_loss_weight == 1.0


def test_abn_config_builds_and_names_its_map():
    cfg = load_config("abn_unet3d")
    assert cfg.model.block_attention.bottleneck == "abn"
    model = build_model(cfg.model, num_classes=3).eval()
    with torch.no_grad():
        out, maps = model(torch.randn(1, 1, 32, 32, 32), return_attention=True)
    assert out.shape == (1, 3, 32, 32, 32)
    assert sorted(maps) == ["abn/bottleneck"] and maps["abn/bottleneck"].shape == (1, 1, 2, 2, 2)
    assert 0 <= maps["abn/bottleneck"].min() and maps["abn/bottleneck"].max() <= 1


def test_abn_config_trains_a_step_and_infers_its_map(preprocessed_phantoms, tmp_path):
    from medseg.infer.predictor import Predictor
    from medseg.train import train

    cfg = load_config("abn_unet3d", [
        f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8,16]", "model.strides=[1,2,2]",
        "data.patch_size=[16,16,16]", "train.epochs=1", "train.iters_per_epoch=1", "data.num_workers=0",
        "data.val_cases=[phantom_003]", "train.tb_num_cases=0", "infer.sw_batch_size=4",
    ])
    result = train(cfg, tmp_path / "run")
    rec = result["history"][0]
    assert rec["aux"] > 0 and rec["loss"] == pytest.approx(rec["dice_ce"] + rec["aux"], rel=1e-5)  # plain sum
    image = sorted((preprocessed_phantoms.parent / "raw" / "imagesTs").glob("*.nii.gz"))[0]
    res = Predictor.from_run(tmp_path / "run", checkpoint="final", device="cpu", precision="fp32").predict(image, gates=True)
    gate = res.gates["abn/bottleneck"]
    assert gate.shape == res.mask.shape and 0 <= gate.array.min() and gate.array.max() <= 1
