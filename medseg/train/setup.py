"""Setting a run up: the :class:`Context` of its objects, the run directory, resume, the loader.

Used by :mod:`medseg.train.engine`; every function here runs once per run (per rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from medseg.config import Config, save_config
from medseg.train.budget import plan_train_patch
from medseg.errors import ConfigError, InputError
from medseg.io import atomic_write_text
from medseg.nn.slice25d import z_halo
from medseg.runtime import (available_cores, get_logger, progress_enabled, resolve_channels_last, resolve_precision,
                            seed_everything)
from medseg.train import data as tdata
from medseg.train.checkpoint import load_checkpoint, restore_rng
from medseg.train.checks import resolve_patch_size
from medseg.train.distributed import DistInfo
from medseg.train.hard_negatives import hard_negative_file
from medseg.train.losses import build_loss
from medseg.train.optim import build_optimizer, build_scheduler, refresh_lr

__all__ = ["Context", "budget_state", "build_context", "check_run_dir", "open_log", "restore_budget",
           "resume_from_latest", "train_loader", "write_run_files"]

log = get_logger("medseg.train")


@dataclass
class Context:
    """The objects of one run that the loop helpers share (state lives in ``step``/``epoch``/``best``)."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    pre_dir: Path
    plans: dict
    patch: list[int]
    model: torch.nn.Module  # bare network
    ddp: torch.nn.Module  # what the forward pass calls (DDP wrapper or the model)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    amp_dtype: torch.dtype | None
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)
    training_single: dict[str, bool] | None = None  # per class: one structure in every training label (post-processing fallback)
    training_multi: list[str] | None = None  # classes some training label shows as several structures (post-processing veto)
    writer: SummaryWriter | None = None
    total_epochs: int = 1  # may shrink under train.max_minutes
    train_s: float = 0.0  # training wall time before this session (restored on resume)
    timed_from: int = 0  # the step from which train_s + this session's time is counted
    val_s: float = 0.0  # duration of the last validation (the budget keeps that much for the final one)
    clock0: float = 0.0  # the engine's perf_counter() at which the run's counted time is zero
    step: int = 0  # iterations done
    epoch: int = -1  # last completed epoch
    best: float = float("-inf")
    history: list[dict] = field(default_factory=list)
    epoch_end_pending: bool = False  # the last epoch ended with a stop: its validation / checkpoint not done yet
    final_summary: dict | None = None
    # train.channels_last as set (before "auto" resolved for this device): what config.yaml records, so that a
    # run resumed on another device (CPU -> GPU) resolves it again there
    channels_last_setting: bool | str = "auto"

    def recorded_config(self) -> Config:
        """The run's config as config.yaml and the checkpoints record it: resolved, but with
        ``train.channels_last`` as set (``"auto"`` stays ``"auto"``)."""
        import copy

        cfg = copy.deepcopy(self.cfg)
        cfg.train.channels_last = self.channels_last_setting
        return cfg

    @property
    def iters(self) -> int:
        return self.cfg.train.iters_per_epoch

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def open_log(run_dir: Path, info: DistInfo) -> logging.Handler | None:
    if not info.is_main:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger("medseg").addHandler(handler)
    return handler


def check_run_dir(run_dir: Path, resume: bool) -> None:
    latest = run_dir / "checkpoints" / "latest.pt"
    if resume and not latest.is_file():
        raise InputError(f"{run_dir}: --resume given but there is no checkpoints/latest.pt to resume from")
    if not resume and any((run_dir / "checkpoints").glob("*.pt")):
        raise InputError(f"{run_dir}: already holds checkpoints; pass --resume to continue it or choose another --out")


def build_context(cfg: Config, run_dir: Path, info: DistInfo) -> Context:
    from medseg.nn import build_model

    if not cfg.data.preprocessed:
        raise ConfigError("data.preprocessed: not set; pass --preprocessed DIR (medseg train) or set it in the config")
    pre_dir = Path(cfg.data.preprocessed).resolve()
    plans = tdata.read_plans(pre_dir)
    tdata.resolve_mirror_axes(cfg, pre_dir, plans)  # "auto" -> a list, before anything builds the augmentation
    amp_dtype = resolve_precision(cfg.train.precision, info.device)
    seed_everything(cfg.train.seed + info.rank)
    budget = plan_train_patch(cfg, plans, run_dir, info)  # under train.max_minutes with no data.patch_size
    if budget is not None:
        plans["budget_plan"] = budget  # kept in the run's plans.json (write_run_files)
    model = build_model(cfg.model, in_channels=len(plans.get("channel_names", {})) or cfg.model.in_channels,
                        num_classes=int(plans["num_classes"]), spacing=plans.get("target_spacing"))
    patch = resolve_patch_size(cfg, plans, getattr(model, "patch_divisor", None))
    cfg.data.patch_size, cfg.data.preprocessed = patch, str(pre_dir)
    model = model.to(info.device)
    # "auto" -> on for 3D nets on the CPU; the resolved value is what training, validation and hard-negative mining
    # read; config.yaml keeps the setting (Context.recorded_config)
    setting = cfg.train.channels_last
    cfg.train.channels_last = resolve_channels_last(setting, info.device, model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = build_optimizer(model, cfg.train)
    log.info("model %s: %.2f M parameters; device %s, autocast %s, channels_last_3d %s (%s), %s", cfg.model.arch,
             sum(p.numel() for p in model.parameters()) / 1e6, info.device, amp_dtype or "off (fp32)",
             "on" if cfg.train.channels_last else "off", setting, cfg.train.optimizer)
    ctx = Context(cfg=cfg, info=info, run_dir=run_dir, pre_dir=pre_dir, plans=plans, patch=patch, model=model,
                  ddp=model, optimizer=optimizer, scheduler=None,
                  scaler=torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16),
                  loss_fn=build_loss(cfg.train, ignore_label=plans.get("ignore_label"), z_halo=z_halo(model)),
                  amp_dtype=amp_dtype, total_epochs=cfg.train.epochs, channels_last_setting=setting)
    ctx.scheduler = build_scheduler(optimizer, cfg.train, lambda: ctx.total_epochs * ctx.iters)
    return ctx


def restore_budget(ctx: Context, budget: dict | None) -> None:
    """Time spent, last validation's duration and the schedule's epoch count from a checkpoint's ``budget``.

    The shrunk epoch count is kept only while ``train.max_minutes`` is the one the run saved it
    under (a changed budget is refitted after the next epoch). A checkpoint without ``budget``
    (older medseg) counts the time from the resumed step on.
    """
    if not budget:
        ctx.timed_from = ctx.step
        return
    ctx.train_s, ctx.val_s, ctx.timed_from = float(budget["train_s"]), float(budget["val_s"]), int(budget["timed_from"])
    shrunk = budget.get("total_epochs")  # None: the budget had not shrunk the schedule
    if shrunk is not None and budget.get("max_minutes") == ctx.cfg.train.max_minutes:
        ctx.total_epochs = min(ctx.cfg.train.epochs, int(shrunk))


def budget_state(ctx: Context, now: float) -> dict:
    """The ``budget`` entry of a checkpoint written at ``now`` (the engine's clock); see :func:`restore_budget`."""
    shrunk = ctx.total_epochs if ctx.total_epochs < ctx.cfg.train.epochs else None
    return {"total_epochs": shrunk, "max_minutes": ctx.cfg.train.max_minutes, "train_s": now - ctx.clock0,
            "timed_from": ctx.timed_from, "val_s": ctx.val_s}


def resume_from_latest(ctx: Context) -> None:
    """Load ``checkpoints/latest.pt`` into the context: weights, optimizer, schedule, RNG, budget.

    The file is read on the CPU whatever the device (``load_state_dict`` copies to the model's and
    optimizer's device; the RNG states must stay CPU tensors).

    Raises:
        InputError: unreadable checkpoint, or one that does not fit this config's model / optimizer.
    """
    path = ctx.ckpt_dir / "latest.pt"
    state = load_checkpoint(path, map_location="cpu")
    try:
        ctx.model.load_state_dict(state["model"])
        ctx.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"{path}: does not match the model / optimizer of this config (changed model.* or "
                         f"train.optimizer since the run started?): {str(err).splitlines()[0]}") from None
    ctx.scheduler.load_state_dict(state["scheduler"])
    ctx.scaler.load_state_dict(state["scaler"])
    ctx.step, ctx.epoch = int(state["step"]), int(state["epoch"])
    ctx.best, ctx.history = float(state["best_metric"]), list(state.get("history", []))
    ctx.epoch_end_pending = bool(state.get("epoch_end_pending", False))
    rng = state.get("rng") or []
    if len(rng) > ctx.info.rank:
        restore_rng(rng[ctx.info.rank])
    restore_budget(ctx, state.get("budget"))
    refresh_lr(ctx.scheduler)  # the schedule's total may have changed (raised train.epochs)
    if ctx.step >= ctx.total_epochs * ctx.iters:
        log.warning("the checkpoint is at epoch %d already; raise train.epochs (or train.max_minutes) to train "
                    "longer", ctx.epoch + 1)
    log.info("resumed from %s at epoch %d (step %d, best mean fg Dice %.4f)", path, ctx.epoch + 1, ctx.step, ctx.best)


def write_run_files(ctx: Context) -> None:
    if not ctx.info.is_main:
        return
    save_config(ctx.recorded_config(), ctx.run_dir / "config.yaml")
    import json

    from medseg.data.pipeline import load_plans
    from medseg.infer.sliding import allowed_mirror_axes

    plans = load_plans(ctx.pre_dir)
    if "budget_plan" in ctx.plans:  # the patch chosen for train.max_minutes (medseg.train.budget)
        plans["budget_plan"] = ctx.plans["budget_plan"]
    # the axes training mirrors: all that --tta may flip (nnU-Net's inference_allowed_mirroring_axes)
    plans["inference_allowed_mirroring_axes"] = allowed_mirror_axes(ctx.cfg.train.augment)
    atomic_write_text(ctx.run_dir / "plans.json", json.dumps(plans, indent=1))


def train_loader(ctx: Context, train_cases: list[str]) -> torch.utils.data.DataLoader:
    cfg, info = ctx.cfg, ctx.info
    mode = tdata.resolve_cache_mode(cfg.data.cache, ctx.pre_dir, train_cases, copies=info.local_world_size)
    workers = tdata.resolve_num_workers(cfg.data.num_workers, info.device.type, cores=available_cores(),
                                        threads=torch.get_num_threads(), ranks=info.local_world_size)
    cases = tdata.case_dataset(ctx.pre_dir, train_cases, mode, workers=workers,
                               progress=info.is_main and progress_enabled())
    tdata.check_foreground(cases, ctx.pre_dir)
    log.info("%d training cases (cache: %s), %d validation cases, patch %s, batch %d x %d rank(s), %s",
             len(train_cases), mode, len(ctx.val_cases), ctx.patch, cfg.train.batch_size, info.world_size,
             f"{workers} loader worker(s)" if workers else "batches loaded in the main process")
    patches = tdata.PatchDataset(cases, ctx.patch, cfg, rank=info.rank, z_halo=z_halo(ctx.model),
                                 ignore_label=ctx.plans.get("ignore_label"),
                                 hard_file=hard_negative_file(ctx.run_dir, info.rank))
    return tdata.make_train_loader(patches, start_batch=ctx.step, end_batch=cfg.train.epochs * ctx.iters,
                                   num_workers=workers, pin_memory=info.device.type == "cuda")
