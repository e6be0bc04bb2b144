"""Training engine: 1-2 iteration runs on tiny phantoms for the main variants, run-directory
contents, checkpoints readable with weights_only, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from medseg.config import load_config
from medseg.train import train

TINY = [
    "model.channels=[4,8,16]",
    "data.patch_size=[16,16,16]",
    "train.epochs=1",
    "train.iters_per_epoch=1",
    "train.batch_size=2",
    "data.num_workers=0",
    "data.val_cases=[phantom_003]",
    "train.tb_num_cases=1",
    "infer.sw_batch_size=4",
]

VARIANTS = {
    "plain": ["model.deep_supervision=true"],
    "attention_gate": ["model.skip_fusion.name=gate"],
    "cbam": ["model.block_attention.name=cbam"],
    "unet25d": ["model.slices=3", "model.skip_fusion.name=gate", "data.patch_size=[16,16,8]"],
}


def tiny_config(pre, *extra):
    return load_config(None, [f"data.preprocessed={pre}", *TINY, *extra])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_iteration_writes_the_run_directory(variant, preprocessed_phantoms, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(preprocessed_phantoms, *VARIANTS[variant]), run)

    assert result["status"] == "finished" and result["step"] == 1 and result["epoch"] == 0
    loss = result["history"][0]["loss"]
    assert math.isfinite(loss) and loss > 0
    for name in ("config.yaml", "plans.json", "log.txt", "validation/summary.json", "checkpoints/latest.pt",
                 "checkpoints/best.pt", "checkpoints/final.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    run_plans = json.loads((run / "plans.json").read_text())
    assert run_plans.pop("inference_allowed_mirroring_axes") == [0, 1, 2]  # the mirroring TTA may use
    assert run_plans == json.loads((preprocessed_phantoms / "plans.json").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["patch_size"] == load_config(None, TINY + VARIANTS[variant]).data.patch_size
    assert resolved["data"]["preprocessed"] == str(preprocessed_phantoms.resolve())

    ckpt = torch.load(run / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "rng", "config", "plans"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 1 and ckpt["plans"]["num_classes"] == 5

    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["phantom_003"]
    assert set(summary["mean"]) <= {"1", "2", "3", "4"} and "Dice" in summary["foreground_mean"]
    dice = summary["foreground_mean"]["Dice"]
    assert 0.0 <= dice <= 1.0
    assert result["best_metric"] == pytest.approx(dice)
    assert "epoch 1/1" in (run / "log.txt").read_text()


def test_resume_reproduces_the_next_step_and_trains_longer(preprocessed_phantoms, tmp_path):
    extra = ["model.skip_fusion.name=gate", "train.val_interval=5", "train.precision=fp32"]
    straight = train(tiny_config(preprocessed_phantoms, *extra, "train.epochs=2"), tmp_path / "a")

    first = train(tiny_config(preprocessed_phantoms, *extra, "train.epochs=1"), tmp_path / "b")
    assert first["step"] == 1
    resumed = train(tiny_config(preprocessed_phantoms, *extra, "train.epochs=2"), tmp_path / "b", resume=True)

    assert resumed["step"] == 2 and len(resumed["history"]) == 2
    assert first["history"][0]["loss"] == pytest.approx(straight["history"][0]["loss"], rel=1e-6)
    # the step after the interruption: same patches, weights, momentum, LR and RNG as without it
    assert resumed["history"][1]["loss"] == pytest.approx(straight["history"][1]["loss"], rel=1e-5)
    assert resumed["history"][1]["lr"] == pytest.approx(straight["history"][1]["lr"], rel=1e-9)


def test_training_without_resume_refuses_to_overwrite(preprocessed_phantoms, tmp_path):
    from medseg.errors import InputError

    cfg = tiny_config(preprocessed_phantoms, "train.tb_num_cases=0")
    train(cfg, tmp_path / "run")
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path / "run")
    with pytest.raises(InputError, match="no checkpoints/latest.pt"):
        train(cfg, tmp_path / "other", resume=True)
    wider = tiny_config(preprocessed_phantoms, "train.tb_num_cases=0", "model.channels=[8,8,16]")
    with pytest.raises(InputError, match="does not match the model"):
        train(wider, tmp_path / "run", resume=True)
