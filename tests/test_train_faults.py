"""Faults: bad config / data -> errors naming the key or folder; NaN loss stops and keeps the last
good checkpoint; SIGTERM saves ``latest`` and exits cleanly (143), and the run resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg.cli import main as cli_main
from medseg.config import load_config
from medseg.errors import InputError
from medseg.train import TrainingDiverged, train

TINY = ["model.channels=[4,8,16]", "data.patch_size=[16,16,16]", "train.iters_per_epoch=1", "data.num_workers=0",
        "data.val_cases=[phantom_003]", "train.tb_num_cases=0"]


def test_cli_bad_config_key_and_missing_data_exit_2(preprocessed_phantoms, tmp_path, capsys):
    assert cli_main(["train", "--data", str(preprocessed_phantoms), "--out", str(tmp_path / "a"), "train.optimiser=sgd"]) == 2
    assert "train.optimiser" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(preprocessed_phantoms), "--out", str(tmp_path / "b"), "train.optimizer=adam"]) == 2
    assert "train.optimizer" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "missing: preprocessed folder not found" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(tmp_path / "d")]) == 2
    assert "data.preprocessed" in capsys.readouterr().err


def test_empty_folder_and_no_foreground(preprocessed_phantoms, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cases").mkdir(parents=True)
    shutil.copy(preprocessed_phantoms / "plans.json", empty / "plans.json")
    with pytest.raises(InputError, match="no preprocessed cases"):
        train(load_config(None, [f"data.preprocessed={empty}", *TINY]), tmp_path / "run1")

    blank = tmp_path / "blank"
    shutil.copytree(preprocessed_phantoms, blank)
    for props in (blank / "cases").glob("*.json"):
        d = json.loads(props.read_text())
        d["class_locations"] = {k: [] for k in d["class_locations"]}
        props.write_text(json.dumps(d))
    with pytest.raises(InputError, match="no training case has foreground"):
        train(load_config(None, [f"data.preprocessed={blank}", *TINY]), tmp_path / "run2")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(preprocessed_phantoms, tmp_path, monkeypatch):
    from medseg.train import setup

    real = setup.build_loss
    calls = {"n": 0}

    def poisoned(train_cfg, *args, **kwargs):
        loss = real(train_cfg, *args, **kwargs)
        forward = loss.forward

        def nan_on_third(*a, **k):
            calls["n"] += 1
            out = forward(*a, **k)
            return out * float("nan") if calls["n"] == 3 else out

        loss.forward = nan_on_third
        return loss

    monkeypatch.setattr(setup, "build_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at epoch 3.*latest\.pt"):
        train(load_config(None, [f"data.preprocessed={preprocessed_phantoms}", *TINY, "train.epochs=5"]), run)
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # saved after epoch 2, nothing after the NaN
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "checkpoints" / "final.pt").exists()


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"'{text}' never appeared in {path}")


def test_sigterm_saves_latest_exits_143_and_resumes(preprocessed_phantoms, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(preprocessed_phantoms), "--out", str(run), *TINY, "train.val_interval=1000",
            "train.checkpoint_interval=1000", "train.precision=fp32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "medseg", "train", *args, "train.epochs=100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "log.txt", "epoch 2/", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "SIGTERM received" in err and "--resume" in out
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] >= 2
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no half-written file left behind
    # resume with a smaller epoch count than the original: finishes at once after one more epoch
    epochs = state["step"] + 1
    result = train(load_config(run / "config.yaml", [f"train.epochs={epochs}"]), run, resume=True)
    assert result["status"] == "finished" and result["step"] == epochs
    assert (run / "checkpoints" / "final.pt").is_file()
