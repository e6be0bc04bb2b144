"""DistributedDataParallel on CPU: `torchrun --standalone --nproc_per_node=2 -m medseg train` (gloo),
three iterations on phantoms (a parameter without a gradient only fails from the second one), with
deep supervision off (the decoder's level-1 head idle) and on, and for a MONAI baseline; only rank 0
writes, validation cases are shared out and gathered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ITERS = 3
VARIANTS = {
    "unet_gate_no_deep_supervision": ["model.skip_fusion.name=gate", "model.deep_supervision=false"],
    "unet_deep_supervision": ["model.deep_supervision=true"],
    "monai_dynunet": ["model.arch=monai_dynunet"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_process_gloo_training(variant, preprocessed_phantoms, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medseg", "train",
           "--data", str(preprocessed_phantoms), "--out", str(run), "model.channels=[4,8,16]",
           "data.patch_size=[16,16,16]", "train.epochs=1", f"train.iters_per_epoch={ITERS}", "data.num_workers=0",
           "data.val_cases=[phantom_002,phantom_003]", "train.tb_num_cases=1", "train.device=cpu",
           *VARIANTS[variant]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = (run / "log.txt").read_text()
    assert log.count("epoch 1/1") == 1 and "batch 2 x 2 rank(s)" in log  # rank 0 alone writes
    assert proc.stdout.count("done:") == 1
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert state["step"] == ITERS and len(state["rng"]) == 2  # one RNG state per rank
    assert not any(k.startswith("module.") for k in state["model"])  # the bare model, not the DDP wrapper
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["phantom_002", "phantom_003"]  # one per rank


def test_two_process_hard_negative_mining_gathers_one_table(preprocessed_phantoms, tmp_path):
    """Hard-negative mining under DDP: each rank predicts its share of the training cases, the tables are
    gathered, and every rank's file holds the same table of every training case."""
    import numpy as np

    from medseg.train.hard_negatives import hard_negative_file, read_hard_negatives

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medseg", "train",
           "--data", str(preprocessed_phantoms), "--out", str(run), "model.channels=[4,8,16]",
           "data.patch_size=[16,16,16]", "train.epochs=2", "train.iters_per_epoch=2", "data.num_workers=0",
           "data.val_cases=[phantom_002,phantom_003]", "train.tb_num_cases=0", "train.device=cpu",
           "data.fg_oversample=0", "data.hard_negatives=1.0", "data.hard_negative_interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    tables = [read_hard_negatives(hard_negative_file(run, r)) for r in (0, 1)]
    assert sorted(tables[0]) == sorted(tables[1]) == ["phantom_000", "phantom_001"]  # one case mined per rank
    for case in tables[0]:
        np.testing.assert_array_equal(tables[0][case], tables[1][case])
    log = (run / "log.txt").read_text()
    assert log.count("hard negatives epoch 1:") == 1 and "hard negatives epoch 2" not in log  # none after the last
    assert f"{sum(len(v) for v in tables[0].values())} false-positive voxels kept in" in log
