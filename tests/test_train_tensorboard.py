"""TensorBoard: the documented scalar / image / histogram tags are in the event file, and the
overlays are drawn in radiological orientation with the right colours."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, IMAGES, SCALARS, EventAccumulator

from medseg.config import load_config
from medseg.train import train
from medseg.errors import InputError
from medseg.train.tensorboard import export_gate_grid, main, render_case, slice_indices


def test_event_file_holds_the_documented_tags(preprocessed_phantoms, tmp_path):
    cfg = load_config(None, [
        f"data.preprocessed={preprocessed_phantoms}", "model.channels=[4,8,16]", "data.patch_size=[16,16,16]",
        "train.epochs=1", "train.iters_per_epoch=2", "data.num_workers=0", "data.val_cases=[phantom_003]",
        "train.tb_num_cases=1", "model.skip_fusion.name=gate", "model.block_attention.name=cbam",
        "model.block_attention.bottleneck=abn", "model.deep_supervision=true",
    ])
    run = tmp_path / "run"
    result = train(cfg, run)
    assert result["history"][0]["aux"] > 0  # the attention branch's auxiliary loss is trained

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0, IMAGES: 0, HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {"loss/total", "loss/dice_ce", "loss/aux", "lr", "val/mean_fg_dice", "speed/patches_per_s",
               "time/epoch_s"} | {f"val/dice/{c}" for c in ("liver", "spleen", "kidney", "lesion")}
    assert scalars <= set(tags["scalars"])
    images = set(tags["images"])
    for view in ("axial", "coronal"):
        assert f"val/phantom_003/{view}/segmentation" in images
        gates = {t for t in images if t.startswith(f"gates/phantom_003/{view}/")}
        assert {f"gates/phantom_003/{view}/gate/level{i}" for i in (0, 1)} <= gates
        assert any("cbam" in t for t in gates)
    assert any(t.startswith("gate_hist/gate/") for t in tags["histograms"])
    total = acc.Scalars("loss/total")[-1].value
    assert total == pytest.approx(result["history"][0]["loss"], rel=1e-5)
    ct_truth_pred = acc.Images("val/phantom_003/axial/segmentation")[-1]
    assert ct_truth_pred.width > 2.5 * ct_truth_pred.height  # three panels side by side

    png = export_gate_grid(run / "tensorboard", tmp_path / "grid.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_render_case_is_radiological_and_colours_labels():
    image = np.zeros((1, 20, 16, 10), np.float32)
    image[0, 15:, :, :] = 1.0  # bright block at high x = patient right (RAS)
    label = np.zeros((20, 16, 10), np.uint8)
    label[15:, 10:, 4:6] = 1  # right, anterior
    gate = np.zeros((20, 16, 10), np.float32)
    gate[:5] = 1.0  # patient left
    out = render_case(image, label, np.zeros_like(label), {"gate/level1": gate}, spacing=(1.0, 1.0, 2.0),
                      indices=slice_indices(label, label.shape))
    assert set(out) == {"axial/segmentation", "axial/gate/level1", "coronal/segmentation", "coronal/gate/level1"}
    ax = out["axial/segmentation"]
    h, w, _ = ax.shape
    panel = (w - 4) // 3
    ct = ax[:, :panel].astype(float)
    assert ct[:, : panel // 5].mean() > 200 and ct[:, -panel // 5:].mean() < 30  # right on the image left
    truth = ax[:, panel + 2: 2 * panel + 2].astype(float)
    coloured = np.abs(truth[..., 0] - truth[..., 2]) > 30
    rows, cols = np.nonzero(coloured)
    assert rows.mean() < h / 2 and cols.mean() < panel / 4  # anterior = top, right = left
    cold = render_case(image, label, label, {"g": np.zeros_like(gate)}, spacing=(1.0, 1.0, 2.0))["axial/g"]
    red = out["axial/gate/level1"][..., 0].astype(float) - cold[..., 0]  # jet: 1 is red, 0 is dark blue
    assert red[:, -5:].mean() > 40 and abs(red[:, :5].mean()) < 1  # gate on patient left = image right
    cor = out["coronal/segmentation"]
    assert cor.shape[0] == pytest.approx(cor.shape[1] / 3, rel=0.1)  # 10 slices x 2 mm = 20 mm = 20 x 1 mm wide


def test_export_without_images_is_an_input_error_and_its_main_exits_2(tmp_path, capsys):
    (tmp_path / "tb").mkdir()
    with pytest.raises(InputError, match="tb: no validation images"):
        export_gate_grid(tmp_path / "tb", tmp_path / "x.png")
    assert main(["--logdir", str(tmp_path / "tb"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no validation images" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
