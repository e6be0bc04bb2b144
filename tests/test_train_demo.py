"""`medseg demo`: the whole pipeline end to end (tiny and fast here; the real one is marked slow)."""

from __future__ import annotations

import json

import pytest

from medseg.cli import main as cli_main

TINY = ["model.channels=[4,8,16]", "model.strides=[1,2,2]", "data.patch_size=[16,16,16]", "train.epochs=1",
        "train.iters_per_epoch=2", "train.max_minutes=null", "data.target_spacing=[2.0,2.0,3.0]"]


def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--train-cases", "3", "--test-cases", "1", *TINY]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "foreground mean" in printed and f"tensorboard --logdir {out / 'run' / 'tensorboard'}" in printed
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["phantom_003"]
    assert set(summary["mean"]) == {"1", "2", "3", "4"}
    assert (out / "predictions" / "phantom_003.nii.gz").is_file()
    assert (out / "run" / "checkpoints" / "final.pt").is_file()


@pytest.mark.slow
def test_demo_reaches_the_dice_target(tmp_path):
    from medseg.train.demo import run_demo

    summary = run_demo(tmp_path / "demo")
    assert summary["status"] == "finished"
    assert summary["foreground_mean"]["Dice"] >= 0.85, summary["mean"]
    assert sum(summary["timings_s"].values()) < 9.5 * 60
