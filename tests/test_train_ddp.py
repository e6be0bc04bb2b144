"""DistributedDataParallel on CPU: `torchrun --standalone --nproc_per_node=2 -m medseg train` (gloo),
one iteration on phantoms; only rank 0 writes, validation cases are shared out and gathered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def test_two_process_gloo_training(preprocessed_phantoms, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medseg", "train",
           "--data", str(preprocessed_phantoms), "--out", str(run), "model.channels=[4,8,16]",
           "data.patch_size=[16,16,16]", "train.epochs=1", "train.iters_per_epoch=1", "data.num_workers=0",
           "data.val_cases=[phantom_002,phantom_003]", "train.tb_num_cases=1", "model.skip_fusion.name=gate",
           "train.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = (run / "log.txt").read_text()
    assert log.count("epoch 1/1") == 1 and "batch 2 x 2 rank(s)" in log  # rank 0 alone writes
    assert proc.stdout.count("done:") == 1
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert state["step"] == 1 and len(state["rng"]) == 2  # one RNG state per rank
    assert not any(k.startswith("module.") for k in state["model"])  # the bare model, not the DDP wrapper
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == ["phantom_002", "phantom_003"]  # one per rank
