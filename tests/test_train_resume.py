"""Resume: checkpoints load on the CPU whatever the run's device (RNG states must stay CPU tensors)."""

from __future__ import annotations

import dataclasses

import torch

from medseg.config import load_config
from medseg.train import setup, train

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
