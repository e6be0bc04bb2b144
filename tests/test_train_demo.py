"""`medseg demo`: the whole pipeline end to end, small and fast here with a Dice threshold (the real one is marked
slow)."""

from __future__ import annotations

import json

import pytest
import torch

from medseg.cli import main as cli_main

# Small enough for seconds (3 x 3 x 4 mm voxels, 24^3 patches, 100 steps at a constant LR of 0.02),
# large enough that the liver is learnt: its held-out Dice was 0.63-0.87 over train.seed 0-6 (~20 s
# on 2 busy cores), and still 0 at 50 steps for 4 of those seeds; an untrained net or a broken step
# (geometry, labels, optimizer) scores ~0.
TINY = ["model.channels=[8,16,32]", "model.strides=[1,2,2]", "data.patch_size=[24,24,24]", "train.epochs=10",
        "train.iters_per_epoch=10", "train.val_interval=5", "train.scheduler=constant", "train.lr=0.02",
        "train.max_minutes=null", "data.target_spacing=[3.0,3.0,4.0]"]


@pytest.fixture
def one_thread():
    """One compute thread: on 2 cores shared with other work, 2 threads make each step many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_pipeline_learns_end_to_end(tmp_path, capsys, one_thread):
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
    # the held-out case, in its own geometry: the liver is found (an untrained net scores ~0)
    assert summary["mean"]["1"]["Dice"] >= 0.5, summary["mean"]
    assert summary["foreground_mean"]["Dice"] >= 0.1, summary["mean"]


@pytest.mark.slow
def test_demo_reaches_the_dice_target(tmp_path):
    from medseg.pipelines.demo import run_demo

    summary = run_demo(tmp_path / "demo")
    assert summary["status"] == "finished"
    assert summary["foreground_mean"]["Dice"] >= 0.85, summary["mean"]
    assert sum(summary["timings_s"].values()) < 9.5 * 60
