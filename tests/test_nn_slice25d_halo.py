"""2.5D z halo (issue 11 item 4): training patches and sliding windows give every predicted slice its
real neighbours; only the volume's own ends are replicate-padded. 3-D models are untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medseg.config import load_config
from medseg.infer.sliding import count_windows, sliding_window_predict, z_halo_plan
from medseg.nn import build_model, make_unet
from medseg.nn.slice25d import crop_z_halo, z_halo
from medseg.train import data as tdata
from medseg.train.losses import SegmentationLoss

NO_AUG = [f"train.augment.{k}=0" for k in ("p_rotate", "p_scale", "p_noise", "p_blur", "p_brightness", "p_contrast",
                                           "p_lowres", "p_gamma", "p_mirror")]


def model25d(*overrides, num_classes=3, spacing=None):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.slices=5", "model.channels=[4,8]", *overrides]).model
    return build_model(cfg, num_classes=num_classes, spacing=spacing).eval()


def test_z_halo_is_the_stack_radius_plus_the_va_radii():
    assert z_halo(model25d()) == 2
    assert z_halo(model25d("model.slice_offset_mm=4.0", spacing=(1.0, 1.0, 2.0))) == 4  # step 2
    # va after both stages of encoder and decoder level 0: 3 blocks of radius 1 in series
    assert z_halo(model25d("model.block_attention.name=va")) == 2 + 3
    assert z_halo(build_model(load_config("va_unet25d").model, num_classes=2)) == 1 + 3
    assert z_halo(make_unet(spatial_dims=3, channels=[4, 8])) == 0


def _old_sliding(model, x, roi, overlap, blend):
    """The sliding window before the z halo: MONAI's, the model's replicate padding at every window edge."""
    with torch.no_grad():
        return sliding_window_inference(x[None], roi, 2, model, overlap=overlap, mode=blend)[0]


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overrides", [("model.skip_fusion.name=gate",), ("model.block_attention.name=va",)],
                         ids=["gated25d", "va25d"])
def test_a_seam_slice_is_predicted_as_with_one_window_over_the_whole_volume(blend, overrides):
    model = model25d(*overrides)
    h = z_halo(model)
    x = torch.randn(1, 8, 6, 26)
    whole_roi, split_roi = (8, 6, 26), (8, 6, 6)  # windows of 6 + 2h slices
    whole, whole_maps = sliding_window_predict(model, x, roi_size=whole_roi, overlap=0.25, blend=blend,
                                               return_attention=True, sw_batch_size=2)
    split, split_maps = sliding_window_predict(model, x, roi_size=split_roi, overlap=0.25, blend=blend,
                                               return_attention=True, sw_batch_size=2)
    # the split plan has several windows along z only; every slice, seams included, matches
    window, overlap, _ = z_halo_plan(x.shape, split_roi, 0.25, h, blend)
    assert window == (8, 6, 6 + 2 * h) and count_windows((1, 8, 6, 26 + 2 * h), window, overlap) >= 4
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert whole_maps.keys() == split_maps.keys() and whole_maps
    for name in whole_maps:
        torch.testing.assert_close(split_maps[name], whole_maps[name], rtol=1e-5, atol=1e-5)
    probs = torch.softmax(split, 0)
    torch.testing.assert_close(probs, torch.softmax(whole, 0), rtol=1e-5, atol=1e-6)
    # the old behaviour (replicate padding at every window edge) fails the same comparison at the seams
    old_split = _old_sliding(model, x, split_roi, 0.25, blend)
    old_whole = _old_sliding(model, x, whole_roi, 0.25, blend)
    assert (old_split - old_whole).abs().amax(dim=(0, 1, 2)).max() > 1e-3


def test_plain_25d_sliding_equals_the_net_on_the_whole_volume_at_every_slice():
    """Without VA, replicate-padding the volume by the halo is the net's own end padding: the sliding
    window reproduces ``model(volume)`` at every slice, the two end slices included."""
    model = model25d()
    x = torch.randn(1, 8, 6, 17)
    with torch.no_grad():
        ref = model(x[None])[0]
    out = sliding_window_predict(model, x, roi_size=(8, 6, 4), overlap=0.5, blend="gaussian")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_3d_models_are_blended_exactly_as_before():
    torch.manual_seed(0)
    model = make_unet(spatial_dims=3, channels=[4, 8], num_classes=2).eval()
    x = torch.randn(1, 8, 8, 13)
    for blend in ("gaussian", "constant"):
        out = sliding_window_predict(model, x, roi_size=(8, 8, 6), overlap=0.25, blend=blend)
        torch.testing.assert_close(out, _old_sliding(model, x, (8, 8, 6), 0.25, blend), rtol=0, atol=0)


def test_window_plan_of_a_halo():
    roi, ov, w = z_halo_plan((1, 8, 8, 30), (8, 8, 6), 0.25, 2, "gaussian")  # the training patch's 6 slices + 2 * 2
    assert roi == (8, 8, 10) and ov[:2] == (0.25, 0.25) and ov[2] == pytest.approx(0.4)  # interval 6 = 10 - 2*2
    assert w.shape == (8, 8, 10)
    assert (w[..., :2] == 0).all() and (w[..., 8:] == 0).all() and (w[..., 2:8] > 0).all()
    assert z_halo_plan((1, 8, 8, 3), (8, 8, 40), 0.5, 2, "constant")[0] == (8, 8, 7)  # z cut to the padded depth
    assert z_halo_plan((1, 8, 8, 30), (8, 8, 40), 0.5, 2, "constant")[1][2] == 0.5  # the overlap asked for suffices


# --------------------------------------------------------------------------- training
def _ramp_case(nz=40):
    image = np.broadcast_to(np.arange(nz, dtype=np.float32), (1, 12, 12, nz)).copy()  # value = z index
    label = np.zeros((1, 12, 12, nz), dtype=np.uint8)
    label[0, 6, 6, 20] = 1
    return {"case": "ramp", "image": image, "label": label, "fg": {1: np.array([[6, 6, 20]], dtype=np.int32)}}


def test_training_patches_carry_the_halo_of_real_slices():
    cfg = load_config(None, ["train.batch_size=1", "data.fg_oversample=1.0", *NO_AUG])
    plain = tdata.PatchDataset([_ramp_case()], [8, 8, 6], cfg)
    halo = tdata.PatchDataset([_ramp_case()], [8, 8, 6], cfg, z_halo=3)
    a, b = plain[0], halo[0]
    assert a["image"].shape == (1, 8, 8, 6) and b["image"].shape == (1, 8, 8, 12) and b["label"].shape == (1, 8, 8, 12)
    torch.testing.assert_close(b["image"][..., 3:9], a["image"])  # same centre, same patch proper
    assert torch.equal(b["label"][..., 3:9], a["label"])
    assert b["image"][0, 0, 0].tolist() == [float(z) for z in range(14, 26)]  # consecutive real slices, no copies


def test_the_loss_sees_the_central_slices_only():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 4, 4, 10), torch.randn(2, 3, 2, 2, 10)]  # deep supervision: z kept
    label = torch.randint(0, 3, (2, 1, 4, 4, 10))
    loss_h = SegmentationLoss(z_halo=2)
    ref = SegmentationLoss()(crop_z_halo(logits, 2), label[..., 2:8])
    torch.testing.assert_close(loss_h(logits, label), ref)
    moved = [t.clone() for t in logits]
    for t in moved:
        t[..., :2] += 10.0
        t[..., 8:] -= 10.0
    label2 = label.clone()
    label2[..., :2] = 0
    torch.testing.assert_close(loss_h(moved, label2), ref)  # the halo slices do not enter the loss
    assert (SegmentationLoss()(moved, label2) - SegmentationLoss()(logits, label)).abs() > 1e-3


def test_a_va_25d_run_trains_on_haloed_patches_and_validates(preprocessed_phantoms, tmp_path, monkeypatch):
    """One iteration of the engine with a 2.5D VA net: the net sees ``patch_z + 2 * z_halo`` slices in
    training, the validation's sliding windows run, the run finishes with a finite loss."""
    from medseg.nn.slice25d import SliceStack25D
    from medseg.train import train

    seen = []
    forward = SliceStack25D.forward

    def spy(self, x, return_attention=False):
        seen.append((self.training, tuple(x.shape)))
        return forward(self, x, return_attention)

    monkeypatch.setattr(SliceStack25D, "forward", spy)
    cfg = load_config("va_unet25d", [f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8,16]", "model.strides=[1,2,2]",
                                     "model.block_attention.stages=[false,true,true]", "data.patch_size=[16,16,8]",
                                     "train.epochs=1", "train.iters_per_epoch=1", "train.batch_size=2",
                                     "data.num_workers=0", "data.val_cases=[phantom_003]", "train.tb_num_cases=0",
                                     "train.precision=fp32"])
    result = train(cfg, tmp_path / "run")
    assert result["status"] == "finished" and math.isfinite(result["history"][0]["loss"])
    halo = 1 + 1  # 3-slice stacks + one VA block (decoder level 1; stage 2 is the bottleneck, no decoder level)
    train_shapes = {s for training, s in seen if training}
    assert train_shapes == {(2, 1, 16, 16, 8 + 2 * halo)}
    assert any(not training for training, _ in seen)  # validation ran through the sliding window
