"""Resume: checkpoints load on the CPU whatever the run's device (RNG states must stay CPU tensors),
and a run under ``train.max_minutes`` that is interrupted and resumed follows the same LR trajectory
as one that is not (the shrunk epoch count, the time spent and the last validation's duration are
in the checkpoint). The clock is simulated: each step takes 10 s, each validation 30 s."""

from __future__ import annotations

import dataclasses
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from medseg.config import load_config
from medseg.train import engine, setup, train

TINY = ["model.channels=[4,8,16]", "data.patch_size=[16,16,16]", "train.batch_size=1", "data.num_workers=0",
        "data.val_cases=[phantom_003]", "train.tb_num_cases=0", "train.precision=fp32"]


def tiny_config(pre, *extra):
    return load_config(None, [f"data.preprocessed={pre}", *TINY, *extra])


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_resume_on_a_gpu_run_loads_the_checkpoint_on_the_cpu(preprocessed_phantoms, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(preprocessed_phantoms, "train.epochs=1", "train.iters_per_epoch=1")
    train(cfg, run)

    seen: dict = {"restored": []}
    real_load, real_restore = setup.load_checkpoint, setup.restore_rng

    def spy_load(path, map_location="cpu"):
        seen["map_location"] = torch.device(map_location)
        return real_load(path, map_location="cpu")  # this machine may have no GPU to map to

    def spy_restore(state):
        seen["restored"].append([t.device.type for t in _tensors(state)])
        real_restore(state)

    monkeypatch.setattr(setup, "load_checkpoint", spy_load)
    monkeypatch.setattr(setup, "restore_rng", spy_restore)
    ctx = setup.build_context(load_config(run / "config.yaml"), run, setup.DistInfo())
    # the rank of a CUDA run: its device is a GPU, its model (here) stays where it was built
    ctx.info = dataclasses.replace(ctx.info, device=torch.device("cuda", 0))
    setup.resume_from_latest(ctx)

    assert seen["map_location"] == torch.device("cpu")
    assert len(seen["restored"]) == 1 and seen["restored"][0]
    assert set(seen["restored"][0]) == {"cpu"}
    assert ctx.step == 1


class FakeClock:
    """``perf_counter`` for the engine: 10 s per training step, 30 s per validation."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def _simulated(monkeypatch, lrs: list, stop_at_step: int | None = None):
    """Patch the engine: a fake clock, recorded LRs, a stub validation, SIGTERM after ``stop_at_step``."""
    clock = FakeClock()
    real_step = engine.train_step

    def step(ctx, batch):
        lrs.append(ctx.optimizer.param_groups[0]["lr"])
        clock.now += 10.0
        out = real_step(ctx, batch)
        if stop_at_step is not None and ctx.step + 1 == stop_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # StopRequest turns it into a flag: the loop saves and returns
        return out

    def validate(ctx, epoch):
        clock.now += 30.0
        return 0.5

    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(engine, "_validate", validate)


def test_interrupted_time_budgeted_run_resumes_on_the_same_lr_trajectory(preprocessed_phantoms, tmp_path,
                                                                         monkeypatch):
    # 20 configured epochs of 2 steps (20 s each + 30 s validation every 2nd epoch), 4 minutes:
    # the budget shrinks the schedule to fewer epochs after the first ones
    cfg = tiny_config(preprocessed_phantoms, "train.epochs=20", "train.iters_per_epoch=2", "train.val_interval=2",
                      "train.checkpoint_interval=1", "train.max_minutes=4", "train.optimizer=sgd",
                      "train.scheduler=poly")
    straight: list = []
    with monkeypatch.context() as m:
        _simulated(m, straight)
        whole = train(cfg, tmp_path / "a")
    assert whole["status"] == "finished"
    steps = whole["step"]
    assert 6 <= steps < 20 * 2  # the budget did shrink the run
    assert straight[-1] < 0.15 * straight[0]  # ... and the poly schedule decays to ~0 at its end

    first: list = []
    stop = 7  # mid-epoch 4, after the validation of epoch 2
    with monkeypatch.context() as m:
        _simulated(m, first, stop_at_step=stop)
        part = train(cfg, tmp_path / "b")
    assert part["status"] == "interrupted" and part["step"] == stop
    state = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["budget"]["total_epochs"] < 20 and state["budget"]["train_s"] == pytest.approx(stop * 10.0 + 30.0)

    rest: list = []
    with monkeypatch.context() as m:
        _simulated(m, rest)
        resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["status"] == "finished" and resumed["step"] == steps
    assert first + rest == pytest.approx(straight, rel=1e-12)


def test_stop_on_an_epochs_last_iteration_keeps_its_history_record(preprocessed_phantoms, tmp_path, monkeypatch):
    # a SIGTERM that lands on the last step of epoch 3 (steps 5-6), whose validation is due
    # (val_interval 3): the epoch is complete, so its losses stay in the history; the resumed run
    # first validates that epoch, and its history, validations and LRs are the uninterrupted run's
    cfg = tiny_config(preprocessed_phantoms, "train.epochs=5", "train.iters_per_epoch=2", "train.val_interval=3",
                      "train.checkpoint_interval=1", "train.optimizer=sgd", "train.scheduler=poly")
    straight: list = []
    with monkeypatch.context() as m:
        _simulated(m, straight)
        whole = train(cfg, tmp_path / "a")
    first: list = []
    with monkeypatch.context() as m:
        _simulated(m, first, stop_at_step=6)
        part = train(cfg, tmp_path / "b")
    assert part["status"] == "interrupted" and part["step"] == 6
    assert [r["epoch"] for r in part["history"]] == [0, 1, 2]
    assert not any("val_mean_fg_dice" in r for r in part["history"])  # the stop came before epoch 3's validation
    state = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=True)
    assert [r["epoch"] for r in state["history"]] == [0, 1, 2] and state["epoch"] == 2
    assert state["epoch_end_pending"] is True
    rest: list = []
    with monkeypatch.context() as m:
        _simulated(m, rest)
        resumed = train(cfg, tmp_path / "b", resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [r["epoch"] for r in whole["history"]] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in resumed["history"][:3]] == pytest.approx([r["loss"] for r in whole["history"][:3]])
    validated = [r["epoch"] for r in resumed["history"] if "val_mean_fg_dice" in r]
    assert validated == [r["epoch"] for r in whole["history"] if "val_mean_fg_dice" in r] == [2, 4]
    assert first + rest == pytest.approx(straight, rel=1e-12)
    assert resumed["best_metric"] == whole["best_metric"] == 0.5
    assert (tmp_path / "b" / "checkpoints" / "best.pt").is_file()
    state = torch.load(tmp_path / "b" / "checkpoints" / "final.pt", weights_only=True)
    assert state["epoch_end_pending"] is False
